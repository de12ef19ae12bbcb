"""SQLite-specific tests: the file on disk, real processes, kills and damage.

The behaviour every store shares is in the contract suite (``ledger.testing``);
this module tests what only a file shared by processes can get wrong.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledger.errors import (
    ConfigError,
    ConflictError,
    IntegrityError,
    InvalidEventError,
    StoreClosedError,
    StoreError,
)
from ledger.events import (
    Event,
    SessionCreated,
    TurnAdded,
    encode_stored,
    event_problem,
    make_event,
    new_session_id,
)
from stores import open_store
from stores.base import AppendRequest
from stores.sqlite import SCHEMA_VERSION, SQLiteStore, _in_thread

ROOT = Path(__file__).resolve().parent.parent


# --- helpers --------------------------------------------------------------------


def create(user: str = "user-1", *, session: str | None = None, key: str | None = None) -> Event:
    return make_event(
        session=session or new_session_id(),
        parent=None,
        seq=0,
        branch="main",
        at=time.time_ns(),
        actor=user,
        body=SessionCreated(user_id=user, agent="agent-1"),
        idempotency_key=key,
    )


def turn(parent: Event, content: str = "hello", *, key: str | None = None) -> Event:
    return make_event(
        session=parent.session,
        parent=parent.id,
        seq=parent.seq + 1,
        branch=parent.branch,
        at=time.time_ns(),
        actor="user-1",
        body=TurnAdded(role="user", content=content),
        idempotency_key=key,
    )


def request(events: list[Event], expected_head: str | None) -> AppendRequest:
    return AppendRequest(
        session_id=events[0].session,
        branch=events[0].branch,
        expected_head=expected_head,
        events=events,
    )


async def new_session(store: SQLiteStore, turns: int = 0) -> list[Event]:
    """A session with ``turns`` turns on main; its events, root first."""
    chain = [create()]
    await store.append(request(chain[:1], None))
    for n in range(turns):
        event = turn(chain[-1], f"turn {n}")
        await store.append(request([event], chain[-1].id))
        chain.append(event)
    return chain


async def collect(store: SQLiteStore, session_id: str, page_size: int = 7) -> list[Event]:
    return [event async for event in store.events(session_id, page_size=page_size)]


async def assert_linear(store: SQLiteStore, session_id: str) -> list[Event]:
    """One verified chain on main, head at its end, listing row in step; the chain."""
    events = await collect(store, session_id)
    assert events, session_id
    assert events[0].parent is None
    for parent, child in itertools.pairwise(events):
        assert child.parent == parent.id
        assert child.seq == parent.seq + 1
    for event in events:
        assert event_problem(event) is None, event.id
    assert await store.heads(session_id) == {"main": events[-1].id}
    assert (await store.session(session_id)).event_count == len(events)
    return events


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to the file, closed on exit."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def file_header(path: Path) -> bytes:
    return path.read_bytes()[:100]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def garbage_db(db: Path) -> Path:
    db.write_bytes(b"this is not an SQLite database, just some text\n" * 200)
    return db


# --- the file: pragmas, schema version, URLs -------------------------------------


@pytest.mark.parametrize(("synchronous", "level"), [("full", 2), ("normal", 1)])
async def test_wal_and_synchronous_are_in_force(db: Path, synchronous: str, level: int) -> None:
    async with SQLiteStore(db, synchronous=synchronous) as store:
        await new_session(store, turns=1)
        # synchronous is a setting of the connection, not of the file: ask the
        # sqlite3 connection the store writes through.
        assert store._writer is not None

        def pragma(conn: sqlite3.Connection, name: str) -> Any:
            return conn.execute(f"PRAGMA {name}").fetchone()[0]

        assert await _in_thread(store._writer, pragma, "synchronous") == level
        assert await _in_thread(store._writer, pragma, "journal_mode") == "wal"
        # WAL is recorded in the file itself: any other connection sees it.
        with raw(db) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert file_header(db)[18:20] == b"\x02\x02"  # WAL's read and write versions


async def test_newer_schema_version_refuses_to_open(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await new_session(store)
    with raw(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SQLiteStore(db)
    with pytest.raises(StoreError) as info:
        await store.open()
    message = str(info.value)
    assert str(db) in message
    assert str(SCHEMA_VERSION + 1) in message
    assert "newer" in message


async def test_an_sqlite_library_too_old_is_refused_before_touching_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 32, 3))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.32.3")
    db = tmp_path / "new" / "ledger.db"
    with pytest.raises(StoreError) as info:
        await SQLiteStore(db).open()
    assert str(db) in str(info.value)
    assert "3.33.0 or later" in str(info.value) and "3.32.3" in str(info.value)
    assert not db.parent.exists()


async def test_file_that_is_not_a_database_is_a_clear_store_error(garbage_db: Path) -> None:
    db = garbage_db
    store = SQLiteStore(db)
    with pytest.raises(StoreError) as info:
        await store.open()
    assert str(db) in str(info.value)
    assert "Not an SQLite database" in str(info.value)
    # No driver traceback: the ledger's error stands alone.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


async def test_foreign_sqlite_database_is_refused(db: Path) -> None:
    with raw(db) as conn:
        conn.execute("CREATE TABLE events (x)")
    with pytest.raises(StoreError, match="not a session ledger"):
        await SQLiteStore(db).open()


async def test_relative_url_is_resolved_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///nested/dir/ledger.db")
    assert isinstance(store, SQLiteStore)
    assert store.filename == str(tmp_path / "nested" / "dir" / "ledger.db")
    monkeypatch.chdir(ROOT)  # a later chdir does not move the store
    async with store:
        await new_session(store)
    assert (tmp_path / "nested" / "dir" / "ledger.db").is_file()


async def test_absolute_url_and_options(tmp_path: Path) -> None:
    path = tmp_path / "abs" / "ledger.db"
    url = f"sqlite:///{path}"
    assert url.startswith("sqlite:////")
    store = SQLiteStore.from_url(url, synchronous="normal", busy_timeout=5)
    assert (store.filename, store.url, store.synchronous, store.busy_timeout) == (
        str(path),
        url,
        "NORMAL",
        5.0,
    )
    async with store:
        await new_session(store)
    assert path.is_file()
    by_query = SQLiteStore.from_url(f"{url}?synchronous=normal&busy_timeout=2.5")
    assert (by_query.synchronous, by_query.busy_timeout) == ("NORMAL", 2.5)
    default = SQLiteStore.from_url(url)
    assert (default.synchronous, default.busy_timeout) == ("FULL", 30.0)


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("sqlite://ledger.db", {}),
        ("sqlite:///", {}),
        ("sqlite:///:memory:", {}),
        ("sqlite:///x.db?journal=off", {}),
        ("sqlite:///x.db?busy_timeout=soon", {}),
        ("sqlite:///x.db", {"synchronous": "off"}),
        ("sqlite:///x.db", {"busy_timeout": -1}),
    ],
)
def test_bad_urls_and_options_are_config_errors(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SQLiteStore.from_url(url, **options)


# --- transactions inside one process ---------------------------------------------


async def test_failed_batch_rolls_back_and_leaves_the_connection_usable(db: Path) -> None:
    async with SQLiteStore(db) as store:
        root, first = await new_session(store, turns=1)
        keyed = turn(first, key="k")
        await store.append(request([keyed], first.id))
        before = await collect(store, root.session)
        # The second event repeats a key already used in the session: the
        # unique index refuses it after the first event was inserted.
        a = turn(keyed, "a")
        b = turn(a, "b", key="k")
        with pytest.raises(InvalidEventError) as info:
            await store.append(request([a, b], keyed.id))
        assert str(db) in str(info.value)
        assert root.session in str(info.value)
        assert await collect(store, root.session) == before
        assert await store.heads(root.session) == {"main": keyed.id}
        assert (await store.session(root.session)).event_count == len(before)
        # Not left inside a transaction: the next append goes through.
        after = turn(keyed, "after")
        await store.append(request([after], keyed.id))
        await assert_linear(store, root.session)


def empty_wal(path: Path) -> None:
    """Checkpoint the whole WAL into the file and truncate it: what follows starts it anew."""
    with raw(path) as conn:
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0)


def written_since_emptied(path: Path) -> set[str]:
    """The tables and indexes that own a page the WAL holds (``dbstat``'s names)."""
    wal = Path(f"{path}-wal").read_bytes()
    page_size = int.from_bytes(wal[8:12], "big")
    frames = range(32, len(wal) - 23, 24 + page_size)  # WAL header, then header + page
    pages = {int.from_bytes(wal[start : start + 4], "big") for start in frames}
    with raw(path) as conn:
        try:
            owners = dict(conn.execute("SELECT pageno, name FROM dbstat"))
        except sqlite3.OperationalError:
            pytest.skip("this SQLite has no dbstat table")
    return {owners[page] for page in pages if page in owners}


async def test_an_append_that_keeps_the_status_leaves_the_status_index_unwritten(
    db: Path,
) -> None:
    # Assigning status, even its own value, rewrites the (user_id, status) index
    # entry: a page more per append. Both the group path and the per-append one.
    async with SQLiteStore(db) as store:
        chain = await new_session(store)
        for key in (None, "key-1"):  # a plain group; an append run alone (a key to look up)
            event = turn(chain[-1], key=key)
            empty_wal(db)
            await store.append(request([event], chain[-1].id))
            written = written_since_emptied(db)
            assert "sessions_activity" in written
            assert "sessions_user_status" not in written
            chain.append(event)
        suspend = turn(chain[-1])
        empty_wal(db)
        await store.append(
            AppendRequest(
                session_id=suspend.session,
                branch="main",
                expected_head=chain[-1].id,
                events=[suspend],
                status="suspended",
            )
        )
        assert "sessions_user_status" in written_since_emptied(db)
        row = await store.session(suspend.session)
        assert (row.status, row.event_count) == ("suspended", 4)


async def test_concurrent_tasks_racing_on_one_head_one_wins(db: Path) -> None:
    async with SQLiteStore(db) as store:
        root, head = await new_session(store, turns=1)
        rivals = [turn(head, f"rival {n}") for n in range(20)]
        results = await asyncio.gather(
            *(store.append(request([e], head.id)) for e in rivals), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert len(failures) == len(rivals) - 1
        assert all(isinstance(r, ConflictError) for r in failures)
        events = await assert_linear(store, root.session)
        assert len(events) == 3


async def test_busy_write_lock_times_out_with_store_error_and_writes_nothing(db: Path) -> None:
    async with SQLiteStore(db, busy_timeout=0.1) as store:
        root, head = await new_session(store, turns=1)
        with raw(db) as conn:
            conn.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            with pytest.raises(StoreError) as info:
                await store.append(request([turn(head)], head.id))
            assert "locked" in str(info.value)
            assert str(db) in str(info.value)
            # Reads go on while a writer holds the lock (WAL).
            assert await store.heads(root.session) == {"main": head.id}
            conn.execute("ROLLBACK")
        await store.append(request([turn(head)], head.id))
        assert len(await assert_linear(store, root.session)) == 3


async def test_wait_for_feed_sees_another_connections_commit(db: Path) -> None:
    async with SQLiteStore(db) as waiter, SQLiteStore(db) as other:
        (root,) = await new_session(other)
        (last,) = await waiter.read_feed(0)
        waiter.poll_interval = 0.02

        async def append_later() -> None:
            await asyncio.sleep(0.1)
            await other.append(request([turn(root)], root.id))

        started = time.monotonic()
        await asyncio.gather(waiter.wait_for_feed(last.position, 30.0), append_later())
        assert time.monotonic() - started < 15  # woke up by polling, not by timeout
        assert len(await waiter.read_feed(last.position)) == 1


async def test_methods_refuse_after_close(db: Path) -> None:
    store = SQLiteStore(db)
    async with store:
        (root,) = await new_session(store)
    with pytest.raises(StoreClosedError):
        await store.get(root.id)
    with pytest.raises(StoreClosedError):
        await store.append(request([turn(root)], root.id))


# --- damage ---------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "other-event", "wrong-session"])
async def test_damaged_row_raises_integrity_error_naming_it(db: Path, damage: str) -> None:
    async with SQLiteStore(db) as store:
        chain = await new_session(store, turns=3)
        victim, other = chain[2], chain[1]
        with raw(db) as conn:
            if damage == "garbage":
                conn.execute("UPDATE events SET data = ? WHERE id = ?", (b"\x00\xff{", victim.id))
            elif damage == "other-event":
                conn.execute(
                    "UPDATE events SET data = (SELECT data FROM events WHERE id = ?) WHERE id = ?",
                    (other.id, victim.id),
                )
            else:
                conn.execute(
                    "UPDATE events SET session_id = 'elsewhere' WHERE id = ?", (victim.id,)
                )

        async def in_feed() -> object:
            return await store.read_feed(0)

        async def in_events() -> object:
            return await collect(store, chain[0].session)

        readers: list[Any] = [
            lambda: store.get(victim.id),
            lambda: store.ancestors(chain[-1].id),
            lambda: store.path(chain[-1].id),
            in_feed,
        ]
        if damage != "wrong-session":  # the row left the session's listing
            readers.append(in_events)
        for read in readers:
            with pytest.raises(IntegrityError) as info:
                await read()
            assert info.value.event_id == victim.id
            assert victim.id in str(info.value)
            assert "position" in str(info.value)
        # the untouched rows still read
        assert await store.get(chain[1].id) == chain[1]


@pytest.mark.parametrize("page_size", [1, 2, 3, 1000])
async def test_a_replay_names_a_row_holding_another_sessions_event(
    db: Path, page_size: int
) -> None:
    # The replay reads no session column: the session it selected must be the
    # one every event it decodes belongs to, in whichever page the row falls.
    async with SQLiteStore(db) as store:
        chain = await new_session(store, turns=4)
        foreign = turn(create(), "elsewhere")  # never stored
        with raw(db) as conn:
            conn.execute(
                "UPDATE events SET id = ?, data = ? WHERE id = ?",
                (foreign.id, encode_stored(foreign), chain[3].id),
            )
        with pytest.raises(IntegrityError) as info:
            await collect(store, chain[0].session, page_size)
        assert info.value.event_id == foreign.id
        assert "position 4" in str(info.value) and foreign.session in str(info.value)


@pytest.mark.parametrize("page_size", [1, 2, 3, 5, 1000])
async def test_a_replay_reads_plain_compressed_and_text_rows_alike(
    db: Path, page_size: int
) -> None:
    # A page gathers the plain JSON rows in one statement and reads the others
    # (zstd frames, and rows kept as TEXT rather than BLOB) one by one, in place.
    async with SQLiteStore(db) as store:
        chain = [create()]
        await store.append(request(chain[:1], None))
        for n in range(12):
            content = "long " * 400 if n % 3 == 0 else f"turn {n}"  # every third is zstd
            chain.append(turn(chain[-1], content))
            await store.append(request(chain[-1:], chain[-2].id))
        with raw(db) as conn:
            kinds = [row[0] for row in conn.execute("SELECT substr(data, 1, 1) FROM events")]
            assert kinds.count(b"\x02") == 4, kinds
            conn.execute(
                "UPDATE events SET data = CAST(data AS TEXT) WHERE id IN (?, ?)",
                (chain[2].id, chain[8].id),
            )
        assert await collect(store, chain[0].session, page_size) == chain
        assert [e async for e in store.events_from(chain[0].session, 4, page_size=page_size)] == (
            chain[4:]
        )


def _cut_before_body(data: bytes) -> bytes:
    """An event's JSON cut before its body: the rest, which starts with "{" as a row of
    plain JSON does, could close it only from another row."""
    return data[: data.index(b'"body":') + len(b'"body":')]


@pytest.mark.parametrize(
    "damage", ["trailing-bytes", "nul-then-bytes", "two-events", "cut-across-rows", "blob-id"]
)
@pytest.mark.parametrize("page_size", [2, 1000])
async def test_a_replay_names_a_row_that_is_not_exactly_one_event(
    db: Path, damage: str, page_size: int
) -> None:
    # A page's rows are decoded together, framed so that no row's bytes can be
    # read as part of another's: each of these decodes only with its neighbours.
    async with SQLiteStore(db) as store:
        chain = await new_session(store, turns=5)
        victim, following = chain[2], chain[3]
        data = encode_stored(victim)
        with raw(db) as conn:
            if damage == "trailing-bytes":
                conn.execute("UPDATE events SET data = ? WHERE id = ?", (data + b" 1", victim.id))
            elif damage == "nul-then-bytes":
                conn.execute(
                    "UPDATE events SET data = ? WHERE id = ?", (data + b"\x00 1", victim.id)
                )
            elif damage == "two-events":  # the next row's event inside this row too
                two = data + b"]\n[" + encode_stored(following)
                conn.execute("UPDATE events SET data = ? WHERE id = ?", (two, victim.id))
            elif damage == "cut-across-rows":
                # This row ends mid-event; the next row ends it, then holds its own
                # event: read as one text the two rows are the two events, in order.
                head = _cut_before_body(data)
                tail = data[len(head) :] + b" " + encode_stored(following)
                conn.execute("UPDATE events SET data = ? WHERE id = ?", (head, victim.id))
                conn.execute("UPDATE events SET data = ? WHERE id = ?", (tail, following.id))
            else:
                conn.execute("UPDATE events SET id = CAST(id AS BLOB) WHERE id = ?", (victim.id,))
        with pytest.raises(IntegrityError) as info:
            await collect(store, chain[0].session, page_size)
        assert victim.id in str(info.value)
        assert "position 3" in str(info.value)
        if damage != "blob-id":  # then the row's id is bytes, named as such
            assert info.value.event_id == victim.id


async def test_tampered_parent_column_is_caught_by_ancestors(db: Path) -> None:
    async with SQLiteStore(db) as store:
        chain = await new_session(store, turns=3)
        with raw(db) as conn:
            conn.execute("UPDATE events SET parent = ? WHERE id = ?", (chain[0].id, chain[3].id))
        with pytest.raises(IntegrityError) as info:
            await store.ancestors(chain[3].id)
        assert chain[3].id in str(info.value)


# --- real processes -------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from ledger.errors import ConflictError
    from ledger.events import SessionCreated, TurnAdded, make_event, new_session_id
    from stores.base import AppendRequest
    from stores.sqlite import SQLiteStore

    async def main(path, mode, name, count):
        async with SQLiteStore(path) as store:
            if mode == "own":
                # a new session of its own, created with an idempotency key
                session = new_session_id()
                root = make_event(
                    session=session, parent=None, seq=0, branch="main",
                    at=time.time_ns(), actor=name,
                    body=SessionCreated(user_id=name, agent="crash-test"),
                    idempotency_key="create",
                )
                result = await store.append(AppendRequest(
                    session_id=session, branch="main", expected_head=None, events=[root]))
                print("session", result.events[0].session, flush=True)
            else:
                session = mode
            n = 0
            while count < 0 or n < count:
                # continue from the head, whoever wrote it (CAS retry)
                head = await store.get((await store.heads(session))["main"])
                event = make_event(
                    session=session, parent=head.id, seq=head.seq + 1, branch="main",
                    at=time.time_ns(), actor=name,
                    body=TurnAdded(role="assistant", content=f"{name} {n}"),
                )
                try:
                    await store.append(AppendRequest(
                        session_id=session, branch="main", expected_head=head.id,
                        events=[event]))
                except ConflictError:
                    continue
                # acknowledged: only now does the parent learn of it
                print(event.id, flush=True)
                n += 1

    path, mode, name, count = sys.argv[1:]
    asyncio.run(main(path, mode, name, int(count)))
    """
)


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return script


def spawn(
    script: Path, db: Path, mode: str, name: str, count: int, log: Path
) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="error")
    with log.open("w") as stderr:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, str(script), str(db), mode, name, str(count)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=ROOT,
            env=env,
        )


def setup_session(db: Path) -> str:
    async def run() -> str:
        async with SQLiteStore(db) as store:
            (root,) = await new_session(store)
        return root.session

    return asyncio.run(run())


@pytest.mark.slow
def test_acknowledged_appends_survive_sigkill(db: Path, tmp_path: Path, child_script: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    session = setup_session(db)
    acknowledged: list[str] = []
    kills = 0
    log = tmp_path / "child.log"

    async def check() -> None:
        async with SQLiteStore(db) as store:
            events = await assert_linear(store, session)
            ids = collections.Counter(e.id for e in events)
            assert all(ids[i] == 1 for i in acknowledged), f"lost an ack (seed {seed})"

    for round_ in range(25):
        proc = spawn(child_script, db, session, f"w{round_}", -1, log)
        assert proc.stdout is not None
        wanted = rng.choice([1, 2, 5, 10, 20, 40])
        try:
            for _ in range(wanted):
                line = proc.stdout.readline()
                assert line.endswith("\n"), f"child died (seed {seed}): {log.read_text()}"
                acknowledged.append(line.strip())
            # then a random moment: mid-append, mid-commit, or still starting up
            time.sleep(rng.uniform(0, 0.004))
        finally:
            proc.send_signal(signal.SIGKILL)
            rest, _ = proc.communicate()
        kills += proc.returncode == -signal.SIGKILL
        # printed before the kill, so acknowledged; a line cut short was not
        acknowledged.extend(
            line.strip() for line in rest.splitlines(keepends=True) if line.endswith("\n")
        )
        # reopen after every kill; the next child continues from the head
        asyncio.run(check())
    assert kills >= 20, f"children finished before the kill (seed {seed})"
    assert len(acknowledged) >= 25


@pytest.mark.slow
def test_processes_appending_concurrently(db: Path, tmp_path: Path, child_script: Path) -> None:
    per_writer = 25
    session = setup_session(db)
    # Four on one session (CAS retry), four on sessions of their own, all at once.
    logs = [tmp_path / f"p{n}.log" for n in range(8)]
    procs = [
        spawn(child_script, db, session, f"shared{n}", per_writer, logs[n]) for n in range(4)
    ] + [spawn(child_script, db, "own", f"own{n}", per_writer, logs[4 + n]) for n in range(4)]
    outputs = []
    for proc, log in zip(procs, logs, strict=True):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, log.read_text()
        outputs.append(out.split())

    async def check() -> None:
        async with SQLiteStore(db) as store:
            shared = await assert_linear(store, session)
            assert len(shared) == 1 + 4 * per_writer
            counts = collections.Counter(e.id for e in shared)
            for ids in outputs[:4]:
                assert len(ids) == per_writer
                assert all(counts[i] == 1 for i in ids)
            for words in outputs[4:]:
                assert words[0] == "session"
                own = await assert_linear(store, words[1])
                assert [e.id for e in own[1:]] == words[2:]
            feed = await store.read_feed(0, 10_000)
            assert len(feed) == 1 + 4 * per_writer + 4 * (1 + per_writer)
            positions = [item.position for item in feed]
            assert positions == sorted(set(positions))

    asyncio.run(check())


@pytest.mark.slow
def test_processes_opening_a_new_file_at_once(tmp_path: Path, child_script: Path) -> None:
    db = tmp_path / "fresh" / "ledger.db"
    logs = [tmp_path / f"p{n}.log" for n in range(6)]
    procs = [spawn(child_script, db, "own", f"p{n}", 3, log) for n, log in enumerate(logs)]
    for proc, log in zip(procs, logs, strict=True):
        proc.communicate(timeout=120)
        assert proc.returncode == 0, log.read_text()
    with raw(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 6
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 6 * 4


async def test_a_replay_left_early_drops_its_read_ahead_and_the_store_reads_on(
    tmp_path: Path,
) -> None:
    async with SQLiteStore(tmp_path / "l.db") as store:
        chain = await new_session(store, turns=30)
        for stop in (1, 3, 7, 8, 29):  # within, at the end of, and just past a page of 3
            replay = store.events(chain[0].session, page_size=3)
            taken = []
            async for event in replay:
                taken.append(event)
                if len(taken) == stop:
                    break
            await replay.aclose()  # type: ignore[attr-defined]
            assert taken == chain[:stop]
        assert [e async for e in store.events(chain[0].session, page_size=3)] == chain
        assert await collect(store, chain[0].session) == chain


def test_a_program_that_never_closes_its_store_still_exits(tmp_path: Path) -> None:
    # aiosqlite's threads would hold the interpreter at exit: this program
    # appends, then dies of an exception with the ledger open (its traceback
    # keeps the ledger alive), and must exit at once with its append kept.
    program = textwrap.dedent(
        """
        import asyncio, sys
        from ledger import Ledger

        async def main():
            led = await Ledger.open(sys.argv[1]).__aenter__()
            session = await led.create(user_id="u", agent="a")
            await led.add_turn(session.session_id, role="user", content="kept")
            print(session.session_id, flush=True)
            raise RuntimeError("the program fails with its ledger open")

        asyncio.run(main())
        """
    )
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    done = subprocess.run(
        [sys.executable, "-c", program, url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "the program fails" in done.stderr
    session_id = done.stdout.strip()

    async def turns() -> list[str]:
        from ledger import Ledger

        async with Ledger.open(url) as led:
            return [t.content for t in await led.turns(session_id)]

    assert asyncio.run(turns()) == ["kept"]
