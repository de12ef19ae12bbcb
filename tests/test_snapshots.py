"""Snapshots: any point of any branch is cheap to read, and never read wrong.

Laws: the state at any event, answered from snapshots, equals the fold of its
path from the root (random trees with branches, checkpoints and restores, and
reads in random order); snapshots never change what a read returns; a damaged
snapshot is named, ignored and rebuilt. And the README's claims: snapshots are
written as the ledger appends, so a fresh process reads an old point of a long
session by folding at most ``snapshot_every`` events.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.content import chain
from ledger import Ledger, LedgerConfig, Projection, Recorded
from ledger.errors import IntegrityError
from ledger.events import Event, new_session_id
from projections.base import fold
from projections.engine import FoldEngine, open_snapshot, seal_snapshot
from projections.session import SESSION
from stores import open_store
from stores.base import AppendRequest, FeedStore
from stores.jsonl import JSONLStore
from stores.memory import MemoryStore
from stores.sqlite import SQLiteStore

MakeStore = Callable[[], FeedStore]
KEY = "session@1"


def ledger(store: FeedStore, every: int, key: str | None = None) -> Ledger:
    return Ledger(store, LedgerConfig(url="memory://", snapshot_every=every, key=key))


def recorded_count(count: int, event: Event) -> int:
    return count + 1 if isinstance(event.body, Recorded) else count


RECORDS: Projection[int] = Projection(
    "records", 1, initial=int, apply=recorded_count, state_type=int
)


class CountingStore(MemoryStore):
    """A real in-memory store that also counts the events its path reads return."""

    def __init__(self) -> None:
        super().__init__()
        self.read = 0

    async def ancestors(self, event_id: str, limit: int | None = None) -> list[Event]:
        events = await super().ancestors(event_id, limit)
        self.read += len(events)
        return events


# --- the laws, on random trees ----------------------------------------------------

# ("turn", b): a turn on branch number b; ("record", b): a Recorded event;
# ("branch", i): a new branch forked at event number i; ("checkpoint", b);
# ("restore", b, c): branch b restored to checkpoint number c; ("read", i): a
# state() of event number i in between, which writes snapshots lazily.
operations = st.lists(
    st.one_of(
        st.tuples(st.just("turn"), st.integers(0, 5)),
        st.tuples(st.just("record"), st.integers(0, 5)),
        st.tuples(st.just("branch"), st.integers(0, 1_000)),
        st.tuples(st.just("checkpoint"), st.integers(0, 5)),
        st.tuples(st.just("restore"), st.integers(0, 5), st.integers(0, 100)),
        st.tuples(st.just("read"), st.integers(0, 1_000)),
    ),
    min_size=1,
    max_size=60,
)


async def grow(led: Ledger, ops: Sequence[tuple[Any, ...]]) -> tuple[str, list[str]]:
    """Apply the operations through the ledger; return the session and its event ids."""
    s = await led.create(user_id="u", agent="a")
    sid = s.session_id
    ids = [s.head]
    branches = ["main"]
    checkpoints: list[str] = []
    for op in ops:
        kind = op[0]
        if kind == "read":
            await led.state(sid, at=ids[op[1] % len(ids)])
            continue
        name = branches[op[1] % len(branches)] if kind != "branch" else ""
        if kind == "turn":
            event = await led.add_turn(sid, role="user", content=len(ids), tokens_in=1, branch=name)
        elif kind == "record":
            event = await led.record(sid, "tool", {"n": len(ids)}, branch=name)
        elif kind == "branch":
            name = f"b{len(branches)}"
            event = await led.branch(sid, name, at=ids[op[1] % len(ids)])
            branches.append(name)
        elif kind == "checkpoint":
            cp = await led.checkpoint(sid, branch=name)
            checkpoints.append(cp.id)
            ids.append(cp.id)
            continue
        elif not checkpoints:
            continue
        else:
            event = await led.restore(sid, checkpoints[op[2] % len(checkpoints)], branch=name)
        ids.append(event.id)
    return sid, ids


async def check_laws(
    make_store: MakeStore, ops: Sequence[tuple[Any, ...]], order: list[int]
) -> None:
    async with make_store() as store:
        sid, ids = await grow(ledger(store, 3), ops)
        # A fresh ledger: an empty cache, so every answer comes from the store's
        # snapshots (written on append and by the reads above) and a fold.
        fresh = ledger(store, 3)
        without = ledger(store, 10**9)  # never finds nor writes a snapshot
        for i in order:
            at = ids[i % len(ids)]
            path = await store.path(at)
            expected = fold(SESSION, path)
            assert await fresh.state(sid, at=at) == expected
            assert await without.state(sid, at=at) == expected
            assert await fresh.project(sid, RECORDS, at=at) == fold(RECORDS, path)
            assert await fresh.history(sid, at=at) == path
        assert fresh._engine.damaged == []
        # Every snapshot kept is the fold of its event's path, and due ones exist.
        for at in ids:
            stored = await store.get_snapshot(sid, KEY, at)
            path = await store.path(at)
            if stored is not None:
                state = open_snapshot(sid, KEY, at, stored)
                assert state is not None
                assert SESSION.decode(state) == fold(SESSION, path)
            elif path[-1].seq % 3 == 0 and path[-1].seq > 0:
                pytest.fail(f"no snapshot at {at!r} (depth {path[-1].seq})")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations, st.lists(st.integers(0, 1_000), max_size=30))
def test_state_from_snapshots_equals_the_fold_from_the_root_memory(
    ops: list[tuple[Any, ...]], order: list[int]
) -> None:
    asyncio.run(check_laws(MemoryStore, ops, order))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations, st.lists(st.integers(0, 1_000), max_size=30))
def test_state_from_snapshots_equals_the_fold_from_the_root_durable(
    ops: list[tuple[Any, ...]], order: list[int]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for url in (f"sqlite:///{tmp}/l.db", f"jsonl:///{tmp}/j"):
            asyncio.run(check_laws(lambda url=url: open_store(url), ops, order))  # type: ignore[misc]


# --- the README's claims -------------------------------------------------------------


async def test_snapshots_are_written_as_the_ledger_appends(make_store: MakeStore) -> None:
    async with make_store() as store:
        led = ledger(store, 4)
        s = await led.create(user_id="u", agent="a")
        events = [await led.add_turn(s.session_id, role="user", content=i) for i in range(12)]
        have = [await store.get_snapshot(s.session_id, KEY, e.id) is not None for e in events]
        # seq 1..12: snapshots at 4, 8 and 12; none at the root.
        assert have == [e.seq % 4 == 0 for e in events]
        assert await store.get_snapshot(s.session_id, KEY, s.head) is None


async def test_a_fresh_process_folds_at_most_snapshot_every_events() -> None:
    async with CountingStore() as store:
        led = ledger(store, 16)
        s = await led.create(user_id="u", agent="a")
        ids = [(await led.add_turn(s.session_id, role="user", content=i)).id for i in range(200)]
        for n in (3, 50, 100, 150, 199):
            fresh = ledger(store, 16)  # what a new process has: the store alone
            store.read = 0
            state = await fresh.state(s.session_id, at=ids[n])
            assert state.turn_count == n + 1
            assert 0 < store.read <= 16  # one window back to a snapshot, never the root


async def test_snapshots_never_change_what_a_read_returns(make_store: MakeStore) -> None:
    async with make_store() as store:
        led = ledger(store, 2)
        led.register(RECORDS)
        s = await led.create(user_id="u", agent="a")
        sid = s.session_id
        ids = []
        for i in range(9):
            ids.append((await led.add_turn(sid, role="user", content=i, tokens_in=i)).id)
            ids.append((await led.record(sid, "tool", {"i": i})).id)
        await led.branch(sid, "alt", at=ids[5])
        ids.append((await led.add_turn(sid, role="user", content="alt", branch="alt")).id)

        async def reads(reader: Ledger) -> list[object]:
            out: list[object] = []
            for at in ids:
                out.append(await reader.state(sid, at=at))
                out.append(await reader.project(sid, "records", at=at))
                out.append(await reader.turns(sid, at=at))
            out.append(await reader.state(sid, branch="alt"))
            return out

        everywhere = ledger(store, 1)
        nowhere = ledger(store, 10**9)
        for reader in (everywhere, nowhere):
            reader.register(RECORDS)
        assert await reads(everywhere) == await reads(nowhere) == await reads(led)


# --- damaged snapshots: named, ignored, rebuilt --------------------------------------


def tamper_ways(sid: str, event_id: str, other_id: str, good: bytes) -> dict[str, bytes]:
    state = good[32:]
    changed = state.replace(b'"turn_count":4', b'"turn_count":5')
    assert changed != state
    return {
        "a flipped byte": good[:40] + bytes([good[40] ^ 1]) + good[41:],
        "cut short": good[:20],
        "empty": b"",
        "another event's seal": seal_snapshot(sid, KEY, other_id, state),
        "a changed state, resealed without the key": seal_snapshot(sid, KEY, event_id, changed),
        "garbage under a valid seal": seal_snapshot(sid, KEY, event_id, b"not json"),
    }


@pytest.mark.parametrize("how", range(6))
async def test_a_damaged_snapshot_is_named_ignored_and_rebuilt(
    make_store: MakeStore, how: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="projections.engine")
    key = "22" * 32
    async with make_store() as store:
        led = ledger(store, 4, key=key)
        s = await led.create(user_id="u", agent="a")
        sid = s.session_id
        ids = [(await led.add_turn(sid, role="user", content=i)).id for i in range(6)]
        target, later = ids[3], ids[5]  # seq 4 is due; seq 6 folds from it
        good = await store.get_snapshot(sid, KEY, target)
        assert good is not None
        name, bad = list(tamper_ways(sid, target, ids[0], good).items())[how]
        await store.put_snapshots(sid, KEY, [(target, bad)])

        fresh = ledger(store, 4, key=key)
        state = await fresh.state(sid, at=later)
        assert state == fold(SESSION, await store.path(later)), name
        assert state.turn_count == 6
        assert fresh._engine.damaged == [(sid, KEY, target)], name
        assert repr(target) in caplog.text and repr(sid) in caplog.text
        # Rebuilt: the stored snapshot is good again, and the next reader trusts it.
        assert await store.get_snapshot(sid, KEY, target) == good
        again = ledger(store, 4, key=key)
        assert await again.state(sid, at=later) == state
        assert again._engine.damaged == []


async def test_a_snapshot_sealed_with_another_key_is_rebuilt(make_store: MakeStore) -> None:
    async with make_store() as store:
        keyed = ledger(store, 2, key="33" * 32)
        s = await keyed.create(user_id="u", agent="a")
        ids = [(await keyed.add_turn(s.session_id, role="user", content=i)).id for i in range(3)]
        plain = ledger(store, 2)
        state = await plain.state(s.session_id, at=ids[2])
        assert state.turn_count == 3
        assert plain._engine.damaged == [(s.session_id, KEY, ids[1])]


async def test_a_failed_snapshot_write_does_not_fail_the_append(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ledger.ledger")
    async with JSONLStore(tmp_path / "j") as store:
        led = ledger(store, 2)
        s = await led.create(user_id="u", agent="a")
        blocker = tmp_path / "j" / "snapshots"
        blocker.write_text("a file where the directory should be")
        first = await led.add_turn(s.session_id, role="user", content="one")
        second = await led.add_turn(s.session_id, role="user", content="two")  # seq 2: due
        assert [e.id for e in await led.history(s.session_id)][1:] == [first.id, second.id]
        assert "Snapshot not written" in caplog.text and repr(s.session_id) in caplog.text
        blocker.unlink()
        fresh = ledger(store, 2)
        assert (await fresh.state(s.session_id)).turn_count == 2


# --- the JSONL snapshot file -------------------------------------------------------


async def test_jsonl_snapshots_survive_reopen_and_damaged_lines_are_rebuilt(
    tmp_path: Path,
) -> None:
    url = f"jsonl:///{tmp_path / 'j'}"
    async with open_store(url) as store:
        led = ledger(store, 2)
        s = await led.create(user_id="u", agent="a")
        ids = [(await led.add_turn(s.session_id, role="user", content=i)).id for i in range(5)]
    sid = s.session_id
    snap = tmp_path / "j" / "snapshots" / f"{sid}.snap"
    lines = [line for line in snap.read_bytes().splitlines(keepends=True) if line != b"\n"]
    assert [line.split(b" ")[0].decode() for line in lines] == [ids[1], ids[3]]
    async with open_store(url) as store:
        assert await store.get_snapshot(sid, KEY, ids[1]) is not None
        # Another process's torn line and a line that is not base64 at all.
        snap.write_bytes(lines[0] + f"{ids[3]} {KEY} !!!\n".encode() + b"abc")
        assert await store.get_snapshot(sid, KEY, ids[3]) is None
        fresh = ledger(store, 2)
        assert (await fresh.state(sid, at=ids[4])).turn_count == 5
        assert await store.get_snapshot(sid, KEY, ids[3]) is not None  # rebuilt


def test_seal_round_trip_and_binding() -> None:
    sid, other = "s-1", "s-2"
    sealed = seal_snapshot(sid, KEY, "e1", b"{}")
    assert open_snapshot(sid, KEY, "e1", sealed) == b"{}"
    assert open_snapshot(other, KEY, "e1", sealed) is None
    assert open_snapshot(sid, "session@2", "e1", sealed) is None
    assert open_snapshot(sid, KEY, "e2", sealed) is None
    assert open_snapshot(sid, KEY, "e1", sealed, b"k" * 32) is None
    keyed = seal_snapshot(sid, KEY, "e1", b"{}", b"k" * 32)
    assert open_snapshot(sid, KEY, "e1", keyed, b"k" * 32) == b"{}"
    assert open_snapshot(sid, KEY, "e1", keyed) is None


class CountingSQLiteStore(SQLiteStore):
    """A real SQLite store that also counts the events its path reads return."""

    read = 0

    async def ancestors(self, event_id: str, limit: int | None = None) -> list[Event]:
        events = await super().ancestors(event_id, limit)
        self.read += len(events)
        return events


class Unindexed:
    """The SQLite store seen through ``SnapshotSource`` alone: no ``PathIndex``."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    async def ancestors(self, event_id: str, limit: int | None = None) -> list[Event]:
        return await self.store.ancestors(event_id, limit)

    async def get_snapshot(self, session_id: str, key: str, event_id: str) -> bytes | None:
        return await self.store.get_snapshot(session_id, key, event_id)

    async def put_snapshots(
        self, session_id: str, key: str, states: Sequence[tuple[str, bytes]]
    ) -> None:
        await self.store.put_snapshots(session_id, key, states)


async def _bulk_loaded(store: SQLiteStore, n: int) -> list[Event]:
    """A session of ``n`` events appended in two requests: no snapshot stored."""
    sid = new_session_id()
    events = list(chain(sid, n, "a turn"))
    await store.append(
        AppendRequest(
            session_id=sid, branch="main", expected_head=None, events=events[:1], status="active"
        )
    )
    await store.append(
        AppendRequest(session_id=sid, branch="main", expected_head=events[0].id, events=events[1:])
    )
    return events


@pytest.mark.parametrize("indexed", [True, False])
@pytest.mark.parametrize("held", [0, 1, 100, 10**9])
async def test_a_long_first_fold_past_its_budget_reads_again_and_folds_the_same(
    tmp_path: Path, held: int, indexed: bool
) -> None:
    n = 1_500
    async with CountingSQLiteStore(tmp_path / "l.db") as store:
        events = await _bulk_loaded(store, n)
        sid = events[0].session
        engine = FoldEngine(store if indexed else Unindexed(store), snapshot_every=8)
        engine.held_events = held
        state = await engine.state_at(SESSION, sid, events[-1].id)
        assert state == fold(SESSION, events)
        if indexed:
            # One interval is read whole (and again past the budget); the rest of the
            # path is walked by its ids and its events read once, for the fold.
            assert store.read == n + (8 if held < 8 else 0)
        else:
            # Past the budget the walk's events were dropped and read again; within it, once.
            reread = held < n - 1
            assert store.read > n if reread else store.read == n
        # The snapshots the fold passed were written, each the fold of its path.
        for event in events[8::8][:40] + events[-8::]:
            stored = await store.get_snapshot(sid, SESSION.key, event.id)
            assert (stored is not None) == (event.seq % 8 == 0)
            if stored is not None:
                opened = open_snapshot(sid, SESSION.key, event.id, stored)
                assert opened is not None
                assert SESSION.decode(opened) == fold(SESSION, events[: event.seq + 1])


@pytest.mark.parametrize("depth", [1, 9, 700, 1_490])
async def test_a_first_fold_by_the_path_index_names_a_tampered_parent_column(
    tmp_path: Path, depth: int
) -> None:
    async with SQLiteStore(tmp_path / "l.db") as store:
        events = await _bulk_loaded(store, 1_500)
        child, skipped = events[depth + 1], events[depth - 1]
        with sqlite3.connect(store.filename) as conn:  # the parent column skips one event
            conn.execute("UPDATE events SET parent = ? WHERE id = ?", (skipped.id, child.id))
        engine = FoldEngine(store, snapshot_every=8)
        with pytest.raises(IntegrityError) as info:
            await engine.state_at(SESSION, events[0].session, events[-1].id)
        assert child.id in str(info.value)


@pytest.mark.parametrize("depth", [1, 700, 1_490])
async def test_a_first_fold_by_the_path_index_names_a_missing_parent(
    tmp_path: Path, depth: int
) -> None:
    async with SQLiteStore(tmp_path / "l.db") as store:
        events = await _bulk_loaded(store, 1_500)
        with sqlite3.connect(store.filename) as conn:
            conn.execute("DELETE FROM events WHERE id = ?", (events[depth].id,))
        engine = FoldEngine(store, snapshot_every=8)
        with pytest.raises(IntegrityError) as info:
            await engine.state_at(SESSION, events[0].session, events[-1].id)
        assert events[depth + 1].id in str(info.value)
