"""``Ledger.verify`` of a dataset in a process of its own, for the verify scenarios.

A verification is an audit job: the ``ledger verify`` command, or a job of its
own, not a call inside the process that serves the sessions. The bench process
holds every store's dataset at once, and those of the others slow the one
measured: with the memory store's 100,000 listed sessions alive (Python objects
that the collector scans and that crowd the caches) a SQLite verify of the
1,000,000-event session ran at ~310,000 events/s, and at ~430,000/s in the same
process once that store was dropped. So each store is verified in a fresh
process that opens it by its URL, as a user's would; the memory store, which
no other process can open, is verified in this one.

``python -m bench.verify_apart`` reads a request on stdin (``Request``) and
prints the answer (``Answer``): the time of the ``verify`` call alone, not the
interpreter's start nor the store's opening.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgspec

from bench.harness import MemoryProbe
from ledger import Ledger
from ledger.anchors import Anchor
from ledger.events import gc_paused
from ledger.verify import VerifyReport

__all__ = ["Answer", "Request", "verify_apart", "verify_here"]


class Request(msgspec.Struct, frozen=True):
    url: str
    session: str
    key: str | None = None
    """The ledger's key, hex."""
    anchors: list[Anchor] = []


class Answer(msgspec.Struct, frozen=True):
    seconds: float
    peak: float | None
    report: VerifyReport


async def verify_apart(request: Request) -> Answer:
    """``request``'s verify in a child process; RuntimeError with its output if it fails."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.verify_apart",
        cwd=Path(__file__).parent.parent,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await child.communicate(msgspec.json.encode(request))
    finally:
        if child.returncode is None:  # cancelled: over the scenario's time limit
            child.kill()
            await child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"verify in a child process failed: {err.decode()[-400:]}")
    return msgspec.json.decode(out, type=Answer)


async def verify_here(led: Ledger, request: Request) -> Answer:
    """``request``'s verify by ``led``, in this process: its time and peak memory."""
    with MemoryProbe().measure() as probe:
        report = await led.verify(request.session, anchors=request.anchors)
    return Answer(probe.seconds, probe.peak, report)


async def _serve() -> None:
    request = msgspec.json.decode(sys.stdin.buffer.read(), type=Request)
    async with Ledger.open(request.url, key=request.key) as led:
        with gc_paused():  # as `ledger verify` runs (ledger.cli.cmd_verify)
            answer = await verify_here(led, request)
    sys.stdout.buffer.write(msgspec.json.encode(answer))


if __name__ == "__main__":
    asyncio.run(_serve())
