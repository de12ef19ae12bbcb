"""Crashes, concurrent processes and damage, for every durable store.

Each test runs against the durable backends among ``--backends`` (SQLite and
JSONL by default; PostgreSQL joins the crash and process tests when it is
selected). Writers are real processes going through ``ledger.Ledger``; an
event id counts as acknowledged once a writer has printed it, which it does
only after ``add_turn`` returned.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import Ledger
from ledger.errors import IntegrityError
from ledger.events import Event, event_problem
from tests.conftest import DURABLE, selected_backends, store_factory

ROOT = Path(__file__).resolve().parent.parent
KILLS = 50
"""SIGKILLs per store in the crash test."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "durable" in metafunc.fixturenames:
        names = [n for n in selected_backends(metafunc.config) if DURABLE[n]]
        if "damage" in metafunc.fixturenames:
            names = [n for n in names if n in DAMAGE]
        metafunc.parametrize("durable", names, ids=names)


def store_url(name: str, tmp_path: Path) -> str:
    """The URL of the store ``tests.conftest.store_factory`` makes for this backend."""
    return store_factory(name, tmp_path)().url


async def settled(led: Ledger) -> None:
    """Wait until a killed client's statements have finished on the server.

    A client killed after sending an append does not stop the server: the
    statement runs on and commits or rolls back whole. Until it has, two reads
    of the session may see different heads. (SQLite and JSONL appends end with
    the process that makes them.)
    """
    pool = getattr(led.store, "_pool", None)
    if pool is None:
        return
    for _ in range(1000):
        busy = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state <> 'idle'"
        )
        if not busy:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("a killed client's statement is still running after 10 s")


async def linear_history(led: Ledger, session_id: str) -> list[Event]:
    """The session's events: one verified chain on main, nothing beside it."""
    await settled(led)
    history = await led.history(session_id)
    assert [e async for e in led.store.events(session_id)] == history
    assert await led.store.heads(session_id) == {"main": history[-1].id}
    for parent, child in itertools.pairwise(history):
        assert child.parent == parent.id
        assert child.seq == parent.seq + 1
    report = await led.verify(session_id)
    assert report.ok, report.problems
    return history


# --- crash: SIGKILL at random moments ----------------------------------------------

CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from ledger import Ledger

    async def main(url, session_id, name):
        async with Ledger.open(url) as led:
            n = 0
            while True:
                event = await led.add_turn(session_id, role="assistant", content=f"{name} {n}")
                print(event.id, flush=True)  # acknowledged: add_turn has returned
                n += 1

    asyncio.run(main(*sys.argv[1:]))
    """
)


def spawn(script: str, *args: str, log: Path) -> subprocess.Popen[str]:
    with log.open("w") as stderr:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "error", "PATH": ""},
        )


async def create_sessions(url: str, count: int) -> list[str]:
    async with Ledger.open(url) as led:
        return [(await led.create(user_id=f"u{n}", agent="a")).session_id for n in range(count)]


@pytest.mark.slow
def test_acknowledged_appends_survive_sigkill(durable: str, tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    url = store_url(durable, tmp_path)
    (session_id,) = asyncio.run(create_sessions(url, 1))
    acknowledged: list[str] = []
    log = tmp_path / "child.log"
    kills = 0

    async def check() -> None:
        async with Ledger.open(url) as led:
            history = await linear_history(led, session_id)
            counts = collections.Counter(e.id for e in history)
            lost = [i for i in acknowledged if counts[i] != 1]
            assert not lost, f"acknowledged events lost (seed {seed}): {lost}"

    for round_ in range(KILLS + 5):
        proc = spawn(CRASH_CHILD, url, session_id, f"w{round_}", log=log)
        assert proc.stdout is not None
        try:
            for _ in range(rng.choice([0, 1, 2, 3, 5, 8])):
                line = proc.stdout.readline()
                assert line.endswith("\n"), f"child died (seed {seed}): {log.read_text()}"
                acknowledged.append(line.strip())
            time.sleep(rng.uniform(0, 0.02))  # mid-append, mid-sync, or still starting
        finally:
            proc.send_signal(signal.SIGKILL)
            rest, _ = proc.communicate()
        kills += proc.returncode == -signal.SIGKILL
        # printed in full before the kill: acknowledged; a line cut short was not
        acknowledged += [x.strip() for x in rest.splitlines(keepends=True) if x.endswith("\n")]
        asyncio.run(check())  # reopen after every kill

    assert kills >= KILLS, f"children exited before the kill (seed {seed})"

    async def append_after() -> None:
        async with Ledger.open(url) as led:
            await led.add_turn(session_id, role="user", content="after the crashes")
            history = await linear_history(led, session_id)
            assert len(history) >= len(acknowledged) + 2

    asyncio.run(append_after())


# --- processes: four on one session, four on their own --------------------------------

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from ledger import Ledger

    async def main(url, session_id, turns, name):
        async with Ledger.open(url) as led:
            for n in range(int(turns)):
                event = await led.add_turn(session_id, role="user", content=f"{name} {n}")
                print(event.id, flush=True)

    asyncio.run(main(*sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_processes_appending_at_once(durable: str, tmp_path: Path) -> None:
    turns = 20
    url = store_url(durable, tmp_path)
    shared, *own = asyncio.run(create_sessions(url, 5))
    jobs = [shared] * 4 + own
    logs = [tmp_path / f"w{n}.log" for n in range(len(jobs))]
    procs = [
        spawn(WRITER, url, sid, str(turns), f"w{n}", log=log)
        for n, (sid, log) in enumerate(zip(jobs, logs, strict=True))
    ]
    acked: list[list[str]] = []
    for proc, log in zip(procs, logs, strict=True):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log.read_text()
        acked.append(out.split())

    async def check() -> None:
        async with Ledger.open(url) as led:
            history = await linear_history(led, shared)
            assert len(history) == 1 + 4 * turns
            counts = collections.Counter(e.id for e in history)
            for ids in acked[:4]:
                assert len(ids) == turns
                assert all(counts[i] == 1 for i in ids)
            for sid, ids in zip(own, acked[4:], strict=True):
                assert [e.id for e in (await linear_history(led, sid))[1:]] == ids
            feed = [
                item
                async for item in _feed(led)
                if item.event.session in {shared, *own}  # a shared server holds others
            ]
            assert len(feed) == 5 + 8 * turns
            positions = [item.position for item in feed]
            assert positions == sorted(set(positions))

    asyncio.run(check())


async def _feed(led: Ledger) -> Any:
    after = 0
    while True:
        page = await led.store.read_feed(after, 1000)
        if not page:
            return
        for item in page:
            yield item
        after = page[-1].position


# --- damage: flipped bytes, truncation, spliced records -----------------------------


def damage_jsonl(directory: Path, data: st.DataObject) -> str:
    """Damage one file of a JSONL store; a description of what was done."""
    files = sorted((directory / "jsonl" / "sessions").glob("*.jsonl"))
    files.append(directory / "jsonl" / "feed.log")
    target = data.draw(st.sampled_from(files), label="file")
    raw = bytearray(target.read_bytes())
    op = data.draw(st.sampled_from(["flip", "truncate", "splice"]), label="op")
    if op == "flip":
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[at] ^= data.draw(st.integers(1, 255), label="xor")
    elif op == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1), label="at") :]
    else:
        lines = bytes(raw).splitlines(keepends=True)
        source = data.draw(st.sampled_from(files[:-1]), label="source")
        donor = source.read_bytes().splitlines(keepends=True)
        line = data.draw(st.sampled_from(donor), label="line")
        where = data.draw(st.integers(0, len(lines)), label="where")
        how = data.draw(st.sampled_from(["insert", "replace", "swap"]), label="how")
        if how == "insert":
            lines.insert(where, line)
        elif how == "replace" and where < len(lines):
            lines[where] = line
        elif where + 1 < len(lines):
            lines[where], lines[where + 1] = lines[where + 1], lines[where]
        raw = bytearray(b"".join(lines))
    target.write_bytes(bytes(raw))
    return f"{op} {target.name}"


def damage_sqlite(directory: Path, data: st.DataObject) -> str:
    """Damage the ``events.data`` column of one row of an SQLite store."""
    conn = sqlite3.connect(directory / "ledger.db", isolation_level=None)
    try:
        rows = conn.execute("SELECT position, data FROM events ORDER BY position").fetchall()
        position, blob = data.draw(st.sampled_from(rows), label="row")
        raw = bytearray(blob)
        op = data.draw(st.sampled_from(["flip", "truncate", "splice"]), label="op")
        if op == "flip":
            at = data.draw(st.integers(0, len(raw) - 1), label="at")
            raw[at] ^= data.draw(st.integers(1, 255), label="xor")
        elif op == "truncate":
            del raw[data.draw(st.integers(0, len(raw) - 1), label="at") :]
        else:
            _, other = data.draw(st.sampled_from(rows), label="other")
            cut = data.draw(st.integers(0, len(raw)), label="cut")
            keep = data.draw(st.integers(0, len(other)), label="keep")
            raw = bytearray(raw[:cut] + other[keep:])
        conn.execute("UPDATE events SET data = ? WHERE position = ?", (bytes(raw), position))
    finally:
        conn.close()
    return f"{op} row {position}"


DAMAGE: dict[str, Callable[[Path, st.DataObject], str]] = {
    "sqlite": damage_sqlite,
    "jsonl": damage_jsonl,
}
"""How to damage each store's files; a backend without an entry is not damaged."""


Seen = tuple[dict[str, object], list[tuple[int, Event]]]


async def observe(url: str, session_ids: list[str]) -> tuple[Seen, dict[str, bool]]:
    """Everything a reader sees, and whether each session verifies."""
    async with Ledger.open(url) as led:
        seen: dict[str, object] = {}
        verified: dict[str, bool] = {}
        for sid in session_ids:
            events = [e async for e in led.store.events(sid)]
            seen[sid] = (
                events,
                await led.store.heads(sid),
                await led.store.session(sid),
                [await led.store.get(e.id) for e in events],
            )
            verified[sid] = (await led.verify(sid)).ok and all(
                event_problem(e) is None for e in events
            )
        feed = [(item.position, item.event) async for item in _feed(led)]
        return (seen, feed), verified


@contextlib.contextmanager
def copy_of(template: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "store"
        shutil.copytree(template, target)
        yield target


@pytest.fixture
def damage(durable: str) -> Callable[[Path, st.DataObject], str]:
    return DAMAGE[durable]


@pytest.mark.slow
def test_damage_is_named_never_returned_as_good(
    durable: str, damage: Callable[[Path, st.DataObject], str], tmp_path: Path
) -> None:
    template = tmp_path / "template"
    url_of = {
        "sqlite": lambda d: f"sqlite:///{d / 'ledger.db'}",
        "jsonl": lambda d: f"jsonl:///{d / 'jsonl'}",
    }[durable]
    assert store_url(durable, template) == url_of(template)

    async def build() -> list[str]:
        async with Ledger.open(url_of(template)) as led:
            ids = []
            for n in range(2):
                sid = (await led.create(user_id=f"u{n}", agent="a")).session_id
                ids.append(sid)
                for t in range(3):
                    await led.add_turn(sid, role="user", content={"n": t, "text": "héllo"})
            await led.checkpoint(ids[0], label="cp")
            await led.branch(ids[0], "alt")
            await led.add_turn(ids[0], role="user", content="on alt", branch="alt")
            return ids

    session_ids = asyncio.run(build())
    expected, verified = asyncio.run(observe(url_of(template), session_ids))
    assert all(verified.values())

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        with copy_of(template) as directory:
            what = damage(directory, data)
            try:
                seen, verified = asyncio.run(observe(url_of(directory), session_ids))
            except IntegrityError as exc:
                message = str(exc)
                assert exc.event_id or ".jsonl" in message or "feed.log" in message, message
                return
            if seen == expected:
                return
            # Something differs: the session it differs in must fail verification.
            differing = [s for s in session_ids if seen[0][s] != expected[0][s]]
            assert differing, f"{what}: the feed changed and nothing noticed"
            for sid in differing:
                assert not verified[sid], f"{what}: wrong data of {sid} returned as good"

    run()
