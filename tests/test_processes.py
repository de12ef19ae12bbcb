"""Real processes writing through the Ledger to one SQLite file at once."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ledger import Ledger

pytestmark = pytest.mark.slow

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from ledger import Ledger

    async def main(url, session_ids, turns):
        async with Ledger.open(url) as led:
            for i in range(turns):
                for sid in session_ids:
                    event = await led.add_turn(sid, role="user", content=f"{sys.argv[4]}-{i}")
                    print(event.id, flush=True)  # acknowledged: printed only after the commit

    asyncio.run(main(sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])))
    """
)


def run_writers(url: str, jobs: list[list[str]], turns: int) -> list[str]:
    """Start one process per job at once; return every acknowledged event id."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, ",".join(sids), str(turns), f"w{n}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n, sids in enumerate(jobs)
    ]
    acked: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        acked += out.split()
    return acked


async def test_four_processes_one_session_and_four_sessions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    async with Ledger.open(url) as led:
        shared = (await led.create(user_id="u", agent="a")).session_id
        own = [(await led.create(user_id=f"u{i}", agent="a")).session_id for i in range(4)]

    acked = run_writers(url, [[shared]] * 4 + [[sid] for sid in own], turns=25)

    async with Ledger.open(url) as led:
        stored: list[str] = []
        for sid in [shared, *own]:
            history = await led.history(sid)
            # One linear branch: each event's parent is the one before it.
            assert all(b.parent == a.id for a, b in itertools.pairwise(history))
            assert list(await led.store.heads(sid)) == ["main"]
            assert (await led.verify(sid)).ok
            stored += [e.id for e in history[1:]]
        assert len(await led.history(shared)) == 1 + 4 * 25
        assert sorted(stored) == sorted(acked)  # every acknowledged turn, exactly once
        assert len(set(acked)) == len(acked) == 8 * 25


def test_writers_do_not_block_the_event_loop_forever(tmp_path: Path) -> None:
    """A second process holding the write lock delays, never breaks, an append."""
    url = f"sqlite:///{tmp_path / 'locked.db'}"

    async def create() -> str:
        async with Ledger.open(url) as led:
            return (await led.create(user_id="u", agent="a")).session_id

    sid = asyncio.run(create())
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); "
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); "
            "time.sleep(1); c.rollback()",
            str(tmp_path / "locked.db"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"

    async def write() -> int:
        async with Ledger.open(url) as led:
            await led.add_turn(sid, role="user", content="after the lock")
            return (await led.state(sid)).turn_count

    assert asyncio.run(write()) == 1
    assert holder.wait(timeout=30) == 0
    holder.stdout.close()
