"""The second process of a parallel ``verify``: each event's digest and id, and the Merkle log.

Run as ``python -m ledger.verify_worker MODE`` through ``Worker``, which writes
chunks to its stdin and reads one answer per chunk from its stdout. A plain
subprocess rather than ``multiprocessing``: nothing of the caller's
``__main__`` is imported again, so any script can verify.

Request: an 8-byte big-endian length, then that many bytes: a JSON array of
events encoded canonically (``encode_request``), so that each body's bytes are
the very bytes its digest covers and the worker decodes none of them; length 0
ends. Answer: one byte (1: every event verifies on its own, 0: one does not),
one byte the number of Merkle levels, then each level as an 8-byte length and
its bytes: with ``--log``, the hashes of the complete subtrees of the chunk's
ids (a chunk starts at a multiple of a power of two, so they are subtrees of
the session's log), else none (``--content``).

With ``--tail`` the worker checks a long session's tail on its own instead
(``TailRequest``, one request and one answer, each an 8-byte length and msgpack): it
opens the store (for JSONL, only the session file, where the caller's index says:
``stores.jsonl.read_session_lines``), reads the session from the ``start``-th event
on, checks each event's content and the tail's structure from unknown branch heads
(``TailWalk``), and answers what the caller must find at the start of the tail for it
to hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Final, Literal

import blake3
import msgspec

from ledger.errors import IntegrityError, LedgerError
from ledger.events import (
    FORMAT_VERSION,
    Closed,
    Erased,
    Event,
    Expired,
    MetadataSet,
    Recorded,
    Suspended,
    TurnAdded,
    canonical,
    event_problem,
    header_bytes,
)
from ledger.merkle import MerkleLog
from stores.jsonl import SessionLines, read_session_lines

__all__ = [
    "PLAIN",
    "Answer",
    "Envelope",
    "Mode",
    "TailAnswer",
    "TailRequest",
    "TailWalk",
    "TailWorker",
    "Worker",
    "check_chunk",
    "check_events",
    "check_tail",
    "encode_request",
    "event_chunks",
    "event_id_if_sound",
    "main",
    "read_answer",
    "sound_id",
]

Answer = tuple[bool, list[bytes]]
"""A chunk's answer: did every event verify on its own, and the Merkle levels of its ids."""
Mode = Literal["--content", "--log"]
"""What the worker answers: each chunk's verdict, and with ``--log`` the Merkle levels
of its ids."""

_blake3 = blake3.blake3
_encode_canonical = msgspec.json.Encoder(order="deterministic").encode


class Envelope(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, gc=False):
    """An event as the worker reads it: the envelope, and the body left as its JSON bytes."""

    id: str
    session: str
    parent: str | None
    seq: int
    branch: str
    at: int
    actor: str
    body: msgspec.Raw
    body_digest: str
    salt: str
    idempotency_key: str | None = None
    format: int = FORMAT_VERSION


PLAIN: Final = frozenset({TurnAdded, Suspended, Closed, Expired, MetadataSet, Recorded})
"""The kinds whose step on an active branch, linked to its head, verify can find nothing
wrong with whatever the state (no checksum, no lifecycle rule, no fork, no redaction)."""
_ENDING: Final = frozenset({Suspended, Closed, Expired})
"""The plain kinds after which a branch is no longer active."""
_TAIL_PAGE: Final = 8192
"""Events per page a tail worker reads."""


class TailRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Check the session's events from the ``start``-th on, in the store at ``url``, or
    (``lines``, a JSONL store) in the lines of its file that the caller's index names."""

    url: str
    session: str
    start: int
    log: bool
    lines: SessionLines | None = None


class TailAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """``sure``: every event of the tail verifies on its own, and steps plainly from the
    one before it on its branch (``PLAIN``), provided that each branch's head before the
    tail is ``firsts[branch]``'s parent, active, one shallower and no later. Not sure:
    something there needs the state before the tail (or is wrong): the caller checks it."""

    sure: bool
    count: int = 0
    firsts: dict[str, tuple[str | None, int, int]] = {}
    """Branch -> (parent, depth, time) of its first event in the tail."""
    levels: list[list[bytes]] = []
    """The Merkle levels of each ``CHUNK`` of the tail's ids (with ``log``)."""


class TailWalk:
    """The structure of a session's tail, checked from unknown branch heads."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.firsts: dict[str, tuple[str | None, int, int]] = {}
        self.heads: dict[str, tuple[str, int, int, bool]] = {}  # id, depth, time, active

    def walk(self, events: Sequence[Event]) -> bool:
        """Do these next events step plainly? (False: the caller must see for itself.)"""
        heads, firsts = self.heads, self.firsts
        for event in events:
            kind = type(event.body)
            if kind not in PLAIN or event.session != self.session_id:
                return False
            head = heads.get(event.branch)
            if head is None:
                firsts[event.branch] = (event.parent, event.seq, event.at)
            elif not (
                head[3]
                and event.parent == head[0]
                and event.seq == head[1] + 1
                and event.at >= head[2]
            ):
                return False
            heads[event.branch] = (event.id, event.seq, event.at, kind not in _ENDING)
        return True


async def check_tail(request: TailRequest, chunk_size: int) -> TailAnswer:
    """What the worker answers to a ``TailRequest`` (chunks of ``chunk_size``, a power of two)."""
    walk = TailWalk(request.session)
    levels: list[list[bytes]] = []
    count = 0
    try:
        async for chunk in event_chunks(_tail_pages(request), chunk_size):
            if not _tail_chunk(walk, chunk, request.log, levels):
                return TailAnswer(sure=False)
            count += len(chunk)
    except LedgerError:
        return TailAnswer(sure=False)  # an event that does not read: the caller names it
    return TailAnswer(sure=True, count=count, firsts=walk.firsts, levels=levels)


async def event_chunks(
    pages: AsyncIterator[list[Event]], size: int
) -> AsyncGenerator[list[Event], None]:
    """The events of ``pages`` in lists of ``size``, the last one shorter: a page at a
    time, not an iterator step per event. An ``IntegrityError`` of the pages is raised
    after the chunk of the events read before it."""
    chunk: list[Event] = []
    try:
        async for page in pages:
            chunk += page
            while len(chunk) >= size:
                yield chunk[:size]
                del chunk[:size]
    except IntegrityError:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


async def _tail_pages(request: TailRequest) -> AsyncIterator[list[Event]]:
    """The tail's events: from the lines named, or from the store opened here."""
    if request.lines is not None:
        for page in read_session_lines(request.lines, _TAIL_PAGE):
            yield page
        return
    from stores import open_store  # the stores only where a worker reads one itself

    async with open_store(request.url) as store:
        async for page in store.event_pages(request.session, request.start, page_size=_TAIL_PAGE):
            yield page


def _tail_chunk(walk: TailWalk, chunk: list[Event], log: bool, levels: list[list[bytes]]) -> bool:
    ok, chunk_levels = check_events(chunk, log)
    levels.append(chunk_levels)
    return ok and walk.walk(chunk)


_decode_envelopes = msgspec.json.Decoder(list[Envelope]).decode
_decode_events = msgspec.json.Decoder(list[Event]).decode


def sound_id(
    event: Event | Envelope, kind: str, body: bytes, hasher: blake3.blake3 | None = None
) -> bytes | None:
    """The event's id (bytes) when it verifies on its own, else None: ``event_problem``'s
    checks of an event whose body is not ``Erased``, given the body's kind and its
    canonical bytes (whatever form the body itself has).

    ``hasher``: one to reset and reuse (a new one costs as much as the hashing itself).
    """
    salt = _salt_bytes(event.salt)
    if event.format != FORMAT_VERSION or salt is None:
        return None
    hasher = hasher or _blake3()
    hasher.reset()
    hasher.update(salt)
    hasher.update(body)
    if hasher.digest().hex() != event.body_digest:  # cheaper than hexdigest()
        return None
    hasher.reset()
    hasher.update(
        header_bytes(
            event.format,
            event.session,
            event.parent,
            event.seq,
            event.branch,
            event.at,
            event.actor,
            kind,
            event.idempotency_key,
            event.body_digest,
        )
    )
    digest = hasher.digest()
    return digest if digest.hex() == event.id else None


def _salt_bytes(salt: str) -> bytes | None:
    """The salt's 16 bytes when it is 32 lower-case hex digits (``_SALT``), else None:
    the round trip through ``fromhex`` rules out upper case and spaces, without a regex."""
    try:
        raw = bytes.fromhex(salt)
    except ValueError:
        return None
    return raw if len(raw) == 16 and raw.hex() == salt else None


def event_id_if_sound(event: Event, hasher: blake3.blake3 | None = None) -> bytes | None:
    """The event's id (bytes) when ``event_problem`` finds nothing wrong with it, else None
    (then ask ``event_problem`` why): the same checks, with fewer calls."""
    body = event.body
    if type(body) is Erased:
        return bytes.fromhex(event.id) if event_problem(event) is None else None
    return sound_id(event, type(body).__name__, canonical(body), hasher)


def check_events(events: Sequence[Event], log: bool) -> Answer:
    """Do these events verify on their own? And (``log``) the Merkle levels of their ids.

    The answer the worker gives for the same events: the caller checks some chunks itself.
    """
    ids = []
    hasher = _blake3()
    for event in events:
        leaf = event_id_if_sound(event, hasher)
        if leaf is None:
            return False, []
        ids.append(leaf)
    return True, _levels(ids) if log else []


def check_chunk(blob: bytes | bytearray, log: bool) -> Answer:
    """``check_events`` of a request's events (a JSON array, as ``encode_request`` writes it).

    Each body is digested as the bytes it came in, which are canonical; an erased
    body (rare) makes the whole chunk decode again as events, for ``event_problem``.
    """
    ids = []
    hasher = _blake3()
    for envelope in _decode_envelopes(blob):
        body = bytes(envelope.body)
        kind = body[9 : body.index(b'"', 9)].decode()  # the tag comes first: {"kind":"..."
        leaf = sound_id(envelope, kind, body, hasher) if kind != "Erased" else None
        if leaf is None:
            return check_events(_decode_events(blob), log)  # exactly event_problem's verdict
        ids.append(leaf)
    return True, _levels(ids) if log else []


def _levels(ids: list[bytes]) -> list[bytes]:
    return [bytes(level) for level in MerkleLog.from_leaves(b"".join(ids)).levels]


def encode_request(events: Sequence[Event]) -> bytes:
    """One request of these events (none: the request that ends the worker).

    Canonical encoding: the bytes of each body are ``canonical(body)``, what its digest covers.
    """
    if not events:
        return bytes(8)
    blob = _encode_canonical(events)
    return len(blob).to_bytes(8, "big") + blob


def _answer(ok: bool, levels: list[bytes]) -> bytes:
    parts = [bytes([int(ok), len(levels)])]
    for level in levels:
        parts += [len(level).to_bytes(8, "big"), level]
    return b"".join(parts)


def read_answer(stream: IO[bytes]) -> Answer | None:
    """One answer from the worker's stdout; None at its end (raises ``EOFError`` if cut)."""
    head = stream.read(2)
    if not head:
        return None
    if len(head) != 2:
        raise EOFError("the worker closed its stdout in the middle of an answer")
    levels = [_read(stream, int.from_bytes(_read(stream, 8), "big")) for _ in range(head[1])]
    return bool(head[0]), levels


def _read(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the other process closed the pipe")
    return data


IMPORT_ROOT: Final = os.pathsep.join(
    [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
).rstrip(os.pathsep)
"""Where the worker finds this package, installed or not."""


class Worker:
    """The worker process, written to from one thread and read from another: neither
    waits for this process's event loop, which a walk over a store that never
    yields (the memory store) would not give them."""

    def __init__(self, mode: Mode) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ledger.verify_worker", mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": IMPORT_ROOT},
        )
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="ledger-verify")
        self._writes: list[Future[None]] = []
        self._answers = self._threads.submit(self._read_answers)

    def busy(self) -> bool:
        """Is the worker yet to take in the last request sent? (A request is larger
        than a pipe holds: its write ends only as the worker reads it.)"""
        return bool(self._writes) and not self._writes[-1].done()

    def send(self, request: bytes) -> None:
        previous = self._writes[-1] if self._writes else None
        self._writes.append(self._threads.submit(self._write, request, previous))

    def _write(self, data: bytes, previous: Future[None] | None) -> None:
        if previous is not None:
            previous.result()  # in order; and a failed write fails every later one
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def _read_answers(self) -> list[Answer]:
        assert self.process.stdout is not None
        answers = []
        while (answer := read_answer(self.process.stdout)) is not None:
            answers.append(answer)
        return answers

    async def results(self) -> list[Answer] | None:
        """Every answer, once the worker has ended after the last request; None if it failed."""
        self.send(encode_request([]))
        try:
            await asyncio.wrap_future(self._writes[-1])
            answers = await asyncio.wrap_future(self._answers)
            returncode = await asyncio.to_thread(self.process.wait)
        except (OSError, EOFError, ValueError):
            return None
        return answers if returncode == 0 else None

    async def close(self) -> None:
        """The process and the threads ended, whatever happened."""
        if self.process.poll() is None:
            self.process.kill()
        await asyncio.to_thread(self._end)

    def _end(self) -> None:
        self.process.wait()
        for write in self._writes:
            with contextlib.suppress(Exception):
                write.result()
        with contextlib.suppress(Exception):
            self._answers.result()
        self._threads.shutdown()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class TailWorker:
    """A worker that checks a session's tail (``--tail``) while this process checks the rest."""

    def __init__(self, request: TailRequest, chunk_size: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ledger.verify_worker", "--tail", str(chunk_size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": IMPORT_ROOT},
        )
        data = msgspec.msgpack.encode(request)  # on stdin: a URL may hold a password
        self._answer = asyncio.ensure_future(
            asyncio.to_thread(self.process.communicate, len(data).to_bytes(8, "big") + data)
        )

    async def answer(self) -> TailAnswer | None:
        """The worker's answer once it has ended; None if it failed."""
        try:
            out, _ = await asyncio.shield(self._answer)
        except (OSError, ValueError):
            return None
        if self.process.returncode != 0 or len(out) < 8:
            return None
        try:
            return msgspec.msgpack.decode(out[8:], type=TailAnswer)
        except msgspec.MsgspecError:
            return None

    async def close(self) -> None:
        """The process ended, whatever happened."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(Exception):
            await self._answer


def _tail_main(chunk_size: int) -> None:
    source = sys.stdin.buffer
    request = msgspec.msgpack.decode(
        _read(source, int.from_bytes(_read(source, 8), "big")), type=TailRequest
    )
    asyncio.run(_tail_answer(request, chunk_size))


async def _tail_answer(request: TailRequest, chunk_size: int) -> None:
    """Writes the answer itself: ``asyncio.run`` must return nothing large. On its way
    out, Python 3.11's runner can format its main task (an enum lookup of the SIGINT
    handler that fails), result and all: ``repr`` of megabytes of Merkle levels."""
    answer = msgspec.msgpack.encode(await check_tail(request, chunk_size))
    sink = sys.stdout.buffer
    sink.write(len(answer).to_bytes(8, "big") + answer)
    sink.flush()


def main() -> None:
    # A short-lived process whose objects form no cycles (pages of events, freed as the
    # chunks are checked): the collector would only scan them again and again.
    gc.disable()
    mode = sys.argv[1] if len(sys.argv) > 1 else "--content"
    if mode == "--tail":
        _tail_main(int(sys.argv[2]))
        return
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        size = int.from_bytes(_read(source, 8), "big")
        if size == 0:
            return
        request = _read(source, size)
        sink.write(_answer(*check_chunk(request, mode == "--log")))
        sink.flush()


if __name__ == "__main__":
    main()
