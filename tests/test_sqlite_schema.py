"""The SQLite file's schema: the narrow index of event ids (version 3), its
uniqueness, and the in-place upgrade of version 2 files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest

from ledger.errors import InvalidEventError
from ledger.events import Event
from ledger.testing import append_request, branch_event, create_event, next_event
from stores.sqlite import _BY_ID, _SCHEMA, SCHEMA_VERSION, SQLiteStore

# Version 2's events table and indexes, as that version created them.
_V2_EVENTS = (
    """CREATE TABLE events (
        position INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        session_id TEXT NOT NULL,
        parent TEXT,
        seq INTEGER NOT NULL,
        branch TEXT NOT NULL,
        kind TEXT NOT NULL,
        at INTEGER NOT NULL,
        idempotency_key TEXT,
        data BLOB NOT NULL
    )""",
    "CREATE INDEX events_session ON events (session_id, position)",
    """CREATE UNIQUE INDEX events_session_key
        ON events (session_id, idempotency_key) WHERE idempotency_key IS NOT NULL""",
)


def rows(db: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT * FROM events ORDER BY position").fetchall()


def layout(db: Path) -> tuple[int, set[str], set[str]]:
    """The file's version, the events table's indexes and its triggers."""
    with sqlite3.connect(db) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(events)")}
        triggers = {
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = 'events'"
            )
        }
    return version, indexes, triggers


def make_version_2(db: Path, counter: int) -> None:
    """Turn a file written by this code into what version 2 wrote, its position
    counter moved to ``counter`` (as after purging the newest events)."""
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute("BEGIN")
        conn.execute("ALTER TABLE events RENAME TO events_new")
        for index in ("events_session", "events_session_key"):
            conn.execute(f"DROP INDEX {index}")
        for statement in _V2_EVENTS:
            conn.execute(statement)
        conn.execute("INSERT INTO events SELECT * FROM events_new")
        conn.execute("DROP TABLE events_new")
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'events'", (counter,))
        conn.execute("PRAGMA user_version = 2")
        conn.execute("COMMIT")


async def a_session(store: SQLiteStore) -> list[Event]:
    """A session with a keyed turn and a second branch; its events in append order."""
    root = create_event()
    keyed = next_event(root, idempotency_key="k")
    fork = branch_event(root, "alt")
    await store.append(append_request([root], None))
    await store.append(append_request([keyed, next_event(keyed)], root.id))
    await store.append(append_request([fork], None))
    return [event async for event in store.events(root.session)]


async def test_a_new_file_indexes_the_first_digits_of_ids_and_keeps_ids_unique(
    tmp_path: Path,
) -> None:
    db = tmp_path / "l.db"
    async with SQLiteStore(db) as store:
        events = await a_session(store)
    version, indexes, triggers = layout(db)
    assert version == SCHEMA_VERSION == 3
    assert indexes == {"events_id", "events_session", "events_session_key"}
    assert triggers == {"events_unique_id"}
    with sqlite3.connect(db) as conn:
        plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {_BY_ID}", ("x", "x")))
        assert "USING INDEX events_id" in plan, plan
        # A row written by hand with an id already stored is refused, as a unique
        # index would refuse it, and nothing of the statement is left.
        with pytest.raises(sqlite3.IntegrityError, match=r"UNIQUE constraint failed: events\.id"):
            conn.execute(
                "INSERT INTO events (id, session_id, parent, seq, branch, kind, at, data) "
                "SELECT id, session_id, parent, seq, branch, kind, at, data FROM events "
                "WHERE position = 2"
            )
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == len(events)


def test_the_uniqueness_check_seeks_the_index_instead_of_scanning_the_table() -> None:
    # Counted in SQLite's virtual machine steps, not timed: a scan of the rows
    # below would cost ~4 steps a row, a seek a few dozen in all.
    conn = sqlite3.connect(":memory:")
    for statement in _SCHEMA:
        conn.execute(statement)
    insert = (
        "INSERT INTO events (id, session_id, seq, branch, kind, at, data) "
        "VALUES (?, 's', 0, 'main', 'TurnAdded', 0, x'00')"
    )
    conn.executemany(insert, [(f"{n * 2654435761 % 2**64:064x}",) for n in range(5000)])
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    conn.execute(insert, ("f" * 64,))
    assert steps < 500, steps


async def test_ids_that_share_their_indexed_digits_are_told_apart(tmp_path: Path) -> None:
    # Ids are not recomputed by the store: two ids made to share their first 8
    # digits stand for a rare collision of the index's key.
    async with SQLiteStore(tmp_path / "l.db") as store:
        first, second = create_event(), create_event()
        twin = msgspec.structs.replace(second, id=first.id[:8] + second.id[8:])
        await store.append(append_request([first], None))
        await store.append(append_request([twin], None))
        after = next_event(twin)
        await store.append(append_request([after], twin.id))
        assert await store.get(first.id) == first
        assert await store.get(twin.id) == twin
        assert await store.get_inline(twin.id) == twin
        assert await store.ancestors(after.id) == [after, twin]
        assert await store.path_index(after.id, 10) == [
            (after.id, 1, twin.id),
            (twin.id, 0, None),
        ]
        with pytest.raises(InvalidEventError) as info:  # the very event again
            await store.append(append_request([after], after.id))
        assert after.session in str(info.value)
        assert [e async for e in store.events(after.session)] == [twin, after]


async def test_an_event_already_stored_is_refused_and_nothing_of_its_batch_is_written(
    tmp_path: Path,
) -> None:
    async with SQLiteStore(tmp_path / "l.db") as store:
        root = create_event()
        first = next_event(root)
        await store.append(append_request([root], None))
        await store.append(append_request([first], root.id))
        other = next_event(root, branch="other")
        with pytest.raises(InvalidEventError) as info:
            # A new event, then one stored already (the chain holds: the ids are
            # not recomputed by the store): the second insert is refused.
            await store.append(
                append_request(
                    [other, msgspec.structs.replace(first, branch="other", parent=other.id, seq=2)],
                    None,
                )
            )
        assert store.filename in str(info.value)
        assert [e async for e in store.events(root.session)] == [root, first]
        assert await store.heads(root.session) == {"main": first.id}
        assert (await store.session(root.session)).event_count == 2


async def test_a_version_2_file_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    async with SQLiteStore(db) as store:
        events = await a_session(store)
        other = await a_session(store)
    before = rows(db)
    counter = len(before) + 5  # the newest events were purged: their positions stay used
    make_version_2(db, counter)
    assert layout(db) == (
        2,
        {"sqlite_autoindex_events_1", "events_session", "events_session_key"},
        set(),
    )

    async with SQLiteStore(db) as store:
        assert rows(db) == before  # every row as it was, at its position
        assert layout(db) == (
            SCHEMA_VERSION,
            {"events_id", "events_session", "events_session_key"},
            {"events_unique_id"},
        )
        for event in events + other:
            assert await store.get(event.id) == event
        assert [e async for e in store.events(events[0].session)] == events
        keyed = events[1]
        assert await store.find_by_key(keyed.session, "k") == keyed
        head = (await store.heads(keyed.session))["main"]
        with pytest.raises(InvalidEventError):
            await store.append(append_request([events[2]], head))
        later = next_event(events[2])
        await store.append(append_request([later], head))
        assert await store.ancestors(later.id) == [later, events[2], keyed, events[0]]
    with sqlite3.connect(db) as conn:
        (position,) = conn.execute(
            "SELECT position FROM events WHERE id = ?", (later.id,)
        ).fetchone()
    assert position == counter + 1

    async with SQLiteStore(db) as store:  # opened again: nothing more to upgrade
        assert await store.get(later.id) == later
    assert layout(db)[0] == SCHEMA_VERSION
