"""The SQLite store: one file on disk, shared by every process of one machine.

Durability. The file runs in WAL mode (``journal_mode=WAL``). With the default
``synchronous="full"`` SQLite syncs the write-ahead log after each transaction
commits, so an append that has returned survives a process kill (SIGKILL) *and*
an operating-system crash or power loss, on storage that honours fsync. With
``synchronous="normal"`` no sync happens during most transactions (only around
checkpoints): an acknowledged append still survives a process kill, and the
file is never corrupted, but the last transactions may roll back after a power
loss or OS crash. See https://www.sqlite.org/pragma.html#pragma_synchronous
("With synchronous=FULL in WAL mode, an additional sync operation of the WAL
file happens after each transaction commit") and
https://www.sqlite.org/wal.html#performance_considerations ("A transaction
committed in WAL mode with synchronous=NORMAL might roll back following a power
loss or system crash. Transactions are durable across application crashes
regardless of the synchronous setting").

Concurrency. Several processes may open the same file and append to the same
session. Appends are committed in groups (``stores.group``): the appends that
one process has queued run in one ``BEGIN IMMEDIATE`` transaction, each in a
savepoint of its own, and share one commit and one WAL sync. The transaction
takes SQLite's single write lock first; then each append checks idempotency,
the session and the branch head (``stores.base.check_head``) and writes;
nothing is checked in one transaction and written in another. A process waits up to ``busy_timeout``
seconds for another's write lock. Within a process, appends go through one
write connection whose transactions each run whole in its worker thread; reads
go through a second connection, so a read never sees a write that has not
committed (WAL lets readers run beside the writer).

The global feed is the ``events.position`` column. SQLite has one writer at a
time and a position is assigned inside the write transaction, so position
order is commit order: when a reader sees position ``p``, every position below
``p`` has already committed, and a tailing reader never skips an event.
``AUTOINCREMENT`` keeps positions from being reused after events are purged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, Final, ParamSpec, TypeVar, cast
from urllib.parse import parse_qsl

import aiosqlite
import msgspec
import orjson

from ledger.errors import (
    BranchExistsError,
    ConfigError,
    EventNotFoundError,
    IntegrityError,
    InvalidEventError,
    LedgerError,
    SessionCapacityError,
    SessionNotFoundError,
    StoreClosedError,
    StoreError,
)
from ledger.events import (
    Event,
    SessionCreated,
    decode_stored,
    decode_stored_all,
    encode_stored,
    gc_paused,
)
from stores.base import (
    OPEN_STATUSES,
    AppendRequest,
    AppendResult,
    FeedItem,
    PurgePage,
    PurgeRecord,
    PurgeRequest,
    PurgeStore,
    SessionPage,
    SessionQuery,
    SessionRow,
    check_ancestry,
    check_erase,
    check_head,
    decode_checked,
    decode_page,
    page_cursor,
    parse_cursor,
    purge_cursor,
    validate_request,
    walk_path,
)
from stores.group import GroupCommit, GroupStats
from stores.sqlite_steps import chunks, execute_rows, statement

__all__ = ["DEFAULT_GROUP_SIZE", "SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION: Final = 3
"""``PRAGMA user_version`` of the files this code writes.

1: ``events.data`` is the event's JSON. 2: large events are deflated
(``ledger.events.encode_stored``). 3: the index of event ids holds only an id's
first 8 hex digits (``events_id``) and a trigger keeps ids unique, in place of a
unique index of whole ids (``_EVENTS``). A version 1 or 2 file is upgraded in
place at open (``_upgrade_events``): its rows are valid version 3 rows, and the
events table is rebuilt without its old unique index, so that code that knows
only an older version refuses the file instead of misreading it.
"""

MIN_SQLITE: Final = (3, 33, 0)
"""The oldest SQLite library the store runs on."""

DEFAULT_GROUP_SIZE: Final = 64
"""The most appends one group commit holds, unless ``group_size`` says otherwise."""

_EVENTS_TABLE: Final = """CREATE TABLE IF NOT EXISTS events (
        position INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        parent TEXT,
        seq INTEGER NOT NULL,
        branch TEXT NOT NULL,
        kind TEXT NOT NULL,
        at INTEGER NOT NULL,
        idempotency_key TEXT,
        data BLOB NOT NULL
    )"""
_EVENTS_INDEXES: Final = (
    # Ids are digests, so every append lands on random leaves of the id index, and
    # a commit rewrites each leaf it touched (a whole page in the WAL, and again at
    # the checkpoint). Whole 64-digit ids made that index ~75 bytes an entry; their
    # first 8 digits make it ~17, so a commit touches ~4x fewer leaves. A lookup
    # by id seeks the prefix, then compares the whole id (``_id_is``).
    "CREATE INDEX IF NOT EXISTS events_id ON events (substr(id, 1, 8))",
    # Ids stay unique, as a unique index kept them (the same error, the same
    # statement rolled back): the seek is on the leaf the insert then writes.
    """CREATE TRIGGER IF NOT EXISTS events_unique_id BEFORE INSERT ON events
        WHEN EXISTS (SELECT 1 FROM events
            WHERE substr(id, 1, 8) = substr(NEW.id, 1, 8) AND +id = NEW.id)
        BEGIN SELECT RAISE(ABORT, 'UNIQUE constraint failed: events.id'); END""",
    "CREATE INDEX IF NOT EXISTS events_session ON events (session_id, position)",
    """CREATE UNIQUE INDEX IF NOT EXISTS events_session_key
        ON events (session_id, idempotency_key) WHERE idempotency_key IS NOT NULL""",
)
_SCHEMA: Final = (
    _EVENTS_TABLE,
    *_EVENTS_INDEXES,
    """CREATE TABLE IF NOT EXISTS heads (
        session_id TEXT NOT NULL,
        branch TEXT NOT NULL,
        head TEXT NOT NULL,
        PRIMARY KEY (session_id, branch)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS sessions (
        session_id TEXT NOT NULL PRIMARY KEY,
        user_id TEXT NOT NULL,
        agent TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        last_activity_at INTEGER NOT NULL,
        event_count INTEGER NOT NULL,
        create_key TEXT
    )""",
    # Every append moves last_activity_at, and so rewrites each index holding
    # it: only the two listings that matter most get one (all sessions, and a
    # user's). A filter by agent or status walks one of them newest first,
    # which is cheap while matching sessions are not rare.
    """CREATE INDEX IF NOT EXISTS sessions_activity
        ON sessions (last_activity_at, session_id)""",
    """CREATE INDEX IF NOT EXISTS sessions_user
        ON sessions (user_id, last_activity_at, session_id)""",
    # Counting a user's open sessions must not scan all their closed ones.
    "CREATE INDEX IF NOT EXISTS sessions_user_status ON sessions (user_id, status)",
    """CREATE UNIQUE INDEX IF NOT EXISTS sessions_create_key
        ON sessions (user_id, create_key) WHERE create_key IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS snapshots (
        session_id TEXT NOT NULL,
        key TEXT NOT NULL,
        event_id TEXT NOT NULL,
        state BLOB NOT NULL,
        PRIMARY KEY (session_id, key, event_id)
    ) WITHOUT ROWID""",
)
# The anchors the ledger issued, in the order it issued them (ledger.anchors); also
# created on opening a file of this schema version made before they existed.
_ANCHORS: Final = (
    """CREATE TABLE IF NOT EXISTS anchors (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL,
        data BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS anchors_session ON anchors (session_id, n)",
)

_PURGE_SCHEMA: Final = (
    # Created at every open (not only with the schema): files written before
    # retention existed get it too.
    """CREATE TABLE IF NOT EXISTS purges (
        session_id TEXT NOT NULL PRIMARY KEY,
        user_id TEXT NOT NULL,
        purged_at INTEGER NOT NULL,
        record BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS purges_time ON purges (purged_at, session_id)",
    "CREATE INDEX IF NOT EXISTS purges_user ON purges (user_id, purged_at, session_id)",
)

_EVENT_COLUMNS: Final = "position, id, session_id, data"


def _id_is(column: str, value: str = "?") -> str:
    """SQL that holds when ``column`` is the event id ``value``, found by a seek in
    ``events_id`` (which indexes an id's first 8 digits). A ``?`` value is bound twice.

    The ``+`` keeps SQLite 3.40's planner from scanning the table instead: given an
    equality on the whole column as well, it did not weigh the index on the prefix.
    """
    return f"substr({column}, 1, 8) = substr({value}, 1, 8) AND +{column} = {value}"


_BY_ID: Final = f"SELECT {_EVENT_COLUMNS} FROM events WHERE {_id_is('id')}"
"""An event's row by its id, bound twice."""
_FIND_CREATED: Final = (
    "SELECT e.position, e.id, e.session_id, e.data "
    "FROM sessions AS s JOIN events AS e ON e.session_id = s.session_id "
    "AND e.idempotency_key = s.create_key WHERE s.user_id = ? AND s.create_key = ?"
)
"""The ``SessionCreated`` a user made with an idempotency key."""


_SESSION_COLUMNS: Final = (
    "session_id, user_id, agent, status, created_at, last_activity_at, event_count"
)
_OPEN_STATUSES_SQL: Final = ", ".join(f"'{status}'" for status in OPEN_STATUSES)
_SYNCHRONOUS: Final = {"full": "FULL", "normal": "NORMAL"}
_WRITER_CACHE_KIB: Final = 65_536
"""The writer's page cache, at most (SQLite's default: 2 MiB). A large append dirties
thousands of index pages at random places; a cache smaller than them spills pages
to the WAL in the middle of the transaction and reads them back."""
_CHECKPOINT_PAGES: Final = 10_000
"""WAL pages between automatic checkpoints (SQLite's default: 1,000)."""
_PATH_WINDOW: Final = 4096
"""Rows read at once by a walk of a path (``stores.base.walk_path``)."""

log = logging.getLogger(__name__)

_Row = tuple[Any, ...]
_P = ParamSpec("_P")
_T = TypeVar("_T")


# --- driver errors: translated here and nowhere else -------------------------------


@contextlib.contextmanager
def _translate(path: str, session_id: str | None = None) -> Iterator[None]:
    """Turn every sqlite3 error raised inside the block into the ledger's error."""
    try:
        yield
    except sqlite3.Error as exc:
        name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
        where = f" (session {session_id!r})" if session_id else ""
        error: Exception
        if name == "SQLITE_NOTADB":
            error = StoreError(f"Not an SQLite database: {path!r} ({exc})")
        elif name.startswith("SQLITE_CORRUPT"):
            error = IntegrityError(f"SQLite file is corrupt: {path!r}{where} ({exc})")
        elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            error = StoreError(
                f"SQLite database is locked: {path!r}{where}: another connection held "
                f"it longer than the busy timeout ({exc})"
            )
        elif name.startswith("SQLITE_CONSTRAINT"):
            # Reached only by a batch whose later events repeat an event id or an
            # idempotency key: the first event's key is checked before writing.
            error = InvalidEventError(f"Write refused by {path!r}{where}: {exc}")
        else:
            error = StoreError(f"SQLite error on {path!r}{where}: {exc} ({name})")
        # The driver's traceback adds nothing to a message that names the file.
        raise error from None
    except ValueError as exc:
        # aiosqlite's word for a connection closed under a call in flight.
        if str(exc) in ("Connection closed", "no active connection"):
            raise StoreClosedError(f"Store was closed: {path!r}") from None
        raise


def _translated(error: Exception, path: str, session_id: str) -> LedgerError:
    """``error`` as ``_translate`` turns it into the ledger's, for an append to ``session_id``."""
    if isinstance(error, LedgerError):
        return error
    try:
        with _translate(path, session_id):
            raise error
    except LedgerError as translated:
        return translated
    raise AssertionError("unreachable")  # _translate raised something else


async def _connect(path: Path, busy_timeout: float) -> aiosqlite.Connection:
    """An aiosqlite connection whose worker thread does not hold the process at exit.

    aiosqlite's thread is not a daemon: a store a program forgot to close kept
    the interpreter waiting at exit until the garbage collector happened to
    finalize it (minutes, or forever when a traceback still held it). Nothing is
    lost by exiting without a close: every acknowledged append was committed.
    """
    db = aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)
    # aiosqlite >= 0.22 keeps its thread aside; before, the connection was the thread.
    thread: threading.Thread = getattr(db, "_thread", None) or cast(threading.Thread, db)
    thread.daemon = True
    return await db


async def _in_thread(
    db: aiosqlite.Connection,
    fn: Callable[Concatenate[sqlite3.Connection, _P], _T],
    *args: _P.args,
    **kwargs: _P.kwargs,
) -> _T:
    """Run ``fn(connection, ...)`` in the connection's worker thread, in one hop.

    A whole transaction then costs one round trip to the thread instead of one
    per statement, and no other task's statement can run in the middle of it.
    aiosqlite has no public call for this: ``Connection._execute`` is the
    private method every one of its public calls goes through. Only ``_connect``
    touches another internal (its thread's daemon flag).
    """

    def call() -> _T:
        return fn(db._conn, *args, **kwargs)

    result: _T = await db._execute(call)  # type: ignore[no-untyped-call]
    return result


# --- what runs in the worker threads --------------------------------------------


def _setup_writer(conn: sqlite3.Connection, path: str, synchronous: str) -> None:
    """Enter WAL mode and create or check the schema, safely against other processes."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"Cannot put {path!r} in WAL mode (journal mode is {mode!r})")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    # Checkpoint every ~40 MiB of WAL, not SQLite's default ~4 MiB: a checkpoint
    # copies each page it holds once, however often it changed, and syncs the
    # file; appends touch the same index pages again and again (ids, sessions,
    # heads), so rarer checkpoints write and sync far less. Durability is the
    # WAL's, synced at each commit either way. The WAL is cut back to that size.
    conn.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute(f"PRAGMA journal_size_limit={_CHECKPOINT_PAGES * page_size}")
    # Freed bytes are zeroed, so a redaction or a purge leaves no copy of what it
    # erased in the file's free space (appends free almost nothing: cheap).
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute(f"PRAGMA cache_size=-{_WRITER_CACHE_KIB}")
    # A statement of many rows, and a savepoint, keep the pages they change as they
    # were, to undo them alone: in memory, not in a temporary file they spilled to
    # past 64 KiB (one page written there for each page changed).
    conn.execute("PRAGMA temp_store=MEMORY")
    # IMMEDIATE: two processes opening a new file at once create the schema one
    # after the other, and the second sees the first's user_version.
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path!r} has schema version {version}, newer than this code knows "
                f"({SCHEMA_VERSION}): upgrade the session ledger to open it"
            )
        if version in (1, 2):
            _upgrade_events(conn)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version < SCHEMA_VERSION:
            if conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                raise StoreError(
                    f"{path!r} is an SQLite database but not a session ledger "
                    "(it has tables and no schema version)"
                )
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        for statement in (*_PURGE_SCHEMA, *_ANCHORS):
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _upgrade_events(conn: sqlite3.Connection) -> None:
    """Rebuild a version 1 or 2 events table as version 3's, inside the open
    transaction: the rows copied as they are, positions and the position counter
    kept, the indexes and the trigger made anew (the old unique index of whole
    ids cannot be dropped from a table that declares it)."""
    counter = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    for index in ("events_session", "events_session_key"):  # their names are wanted
        conn.execute(f"DROP INDEX IF EXISTS {index}")
    conn.execute("ALTER TABLE events RENAME TO events_old")
    conn.execute(_EVENTS_TABLE)
    conn.execute("INSERT INTO events SELECT * FROM events_old ORDER BY position")
    conn.execute("DROP TABLE events_old")
    for index in _EVENTS_INDEXES:
        conn.execute(index)
    if counter is not None:  # positions are never reused, even those of purged events
        conn.execute("DELETE FROM sqlite_sequence WHERE name = 'events'")
        conn.execute(
            "INSERT INTO sqlite_sequence (name, seq) "
            "VALUES ('events', max(?, (SELECT coalesce(max(position), 0) FROM events)))",
            counter,
        )


def _setup_reader(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA query_only=ON")


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back (after an I/O error, say); a failing
    # ROLLBACK is left to raise, chained to the error that caused it.
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _rollback_to(conn: sqlite3.Connection, savepoint: str) -> None:
    """Undo and end ``savepoint``, unless SQLite already rolled the whole transaction back."""
    if conn.in_transaction:
        conn.execute(f"ROLLBACK TO {savepoint}")
        conn.execute(f"RELEASE {savepoint}")


_INSERT_EVENTS: Final = (
    "INSERT INTO events (id, session_id, parent, seq, branch, kind, at, idempotency_key, data) "
    "VALUES {values}"
)
_UPSERT_HEADS: Final = (
    "INSERT INTO heads (session_id, branch, head) VALUES {values} "
    "ON CONFLICT (session_id, branch) DO UPDATE SET head = excluded.head"
)


class _Packed:
    """The event rows of a group's appends, packed by the store's packing thread
    while the writer thread runs the group's SQL.

    Packing an event (``encode_stored``: its JSON, compressed when large) is the
    costliest step of an append outside the writer. On the event loop it would
    add to every group: the loop runs the callers between two groups while the
    writer waits, and the writer runs a group while the loop waits. Here it
    overlaps the writer's statements instead (the compressor releases the GIL). ``rows(i)``
    waits only for the ``i``-th append's rows.
    """

    def __init__(self, group: list[AppendRequest], packer: ThreadPoolExecutor) -> None:
        self._packed: queue.SimpleQueue[list[_Row] | BaseException] = queue.SimpleQueue()
        self._taken: list[list[_Row] | BaseException] = []
        packer.submit(self._pack, group)

    def _pack(self, group: list[AppendRequest]) -> None:
        for request in group:
            try:
                self._packed.put(_rows_of(request))
            except BaseException as exc:  # the writer waits for every append's answer
                self._packed.put(exc)

    def rows(self, index: int) -> list[_Row]:
        """The ``index``-th append's rows; InvalidEventError when one of its events
        does not encode (that append's own refusal)."""
        while len(self._taken) <= index:
            self._taken.append(self._packed.get())
        rows = self._taken[index]
        if isinstance(rows, BaseException):
            raise rows
        return rows


def _rows_of(request: AppendRequest) -> list[_Row]:
    rows: list[_Row] = []
    for event in request.events:
        try:
            data = encode_stored(event)
        except (msgspec.MsgspecError, TypeError, ValueError, OverflowError) as exc:
            raise InvalidEventError(
                f"Event does not encode: {event.id!r} of session {request.session_id!r} ({exc})"
            ) from None
        rows.append(
            (
                event.id,
                request.session_id,
                event.parent,
                event.seq,
                event.branch,
                event.kind,
                event.at,
                event.idempotency_key,
                data,
            )
        )
    return rows


def _touch_sessions(conn: sqlite3.Connection, appends: list[tuple[AppendRequest, int]]) -> int:
    """Move the listing of the sessions appended to (last activity, event count, and
    the status where an append sets one); ``appends`` pairs each request with its
    event count, in queue order. Returns how many sessions were updated.

    One row per session (the latest activity, the counts summed, the last status
    set), in a few statements (``stores.sqlite_steps``). An UPDATE that assigns
    ``status`` rewrites the session's entry in the ``(user_id, status)`` index
    even when the value stays the same: one more page written per append, at a
    random place of a large file. So the sessions whose status no append sets
    (nearly all) get a statement without it.
    """
    moved: dict[str, list[Any]] = {}
    for request, count in appends:
        at = request.events[-1].at
        row = moved.get(request.session_id)
        if row is None:
            moved[request.session_id] = [request.session_id, at, count, request.status]
        else:
            row[1], row[2] = max(row[1], at), row[2] + count
            row[3] = request.status if request.status is not None else row[3]
    same_status = [row[:3] for row in moved.values() if row[3] is None]
    new_status = [row for row in moved.values() if row[3] is not None]
    return execute_rows(
        conn,
        "UPDATE sessions SET last_activity_at = max(last_activity_at, v.column2), "
        "event_count = event_count + v.column3 "
        "FROM (VALUES {values}) AS v WHERE session_id = v.column1",
        3,
        same_status,
    ) + execute_rows(
        conn,
        "UPDATE sessions SET last_activity_at = max(last_activity_at, v.column2), "
        "event_count = event_count + v.column3, status = v.column4 "
        "FROM (VALUES {values}) AS v WHERE session_id = v.column1",
        4,
        new_status,
    )


def _read_heads(
    conn: sqlite3.Connection, pairs: Sequence[tuple[str, str]]
) -> tuple[set[str], dict[tuple[str, str], str]]:
    """The sessions that exist among ``pairs`` (session, branch), and the heads
    of the pairs that have one: one aggregated row per statement
    (``stores.sqlite_steps``)."""
    known: set[str] = set()
    heads: dict[tuple[str, str], str] = {}
    for count, params in chunks(pairs, len(pairs)):
        (found,) = conn.execute(statement(_READ_HEADS, 2, count), params).fetchone()
        for session_id, branch, exists, head in orjson.loads(found):
            if exists:
                known.add(session_id)
            if head is not None:
                heads[(session_id, branch)] = head
    return known, heads


_READ_HEADS: Final = (
    "SELECT json_group_array(json_array(w.column1, w.column2, "
    "s.session_id IS NOT NULL, h.head)) "
    "FROM (VALUES {values}) AS w "
    "LEFT JOIN sessions AS s ON s.session_id = w.column1 "
    "LEFT JOIN heads AS h ON h.session_id = w.column1 AND h.branch = w.column2"
)


def _append_tx(
    conn: sqlite3.Connection, request: AppendRequest, rows: Callable[[], list[_Row]]
) -> _Row | None:
    """One append, whole or not at all, inside its group's transaction; the original's
    row on a replay. ``rows`` gives its rows (``_Packed.rows``), asked for last.

    It runs in a savepoint of its own: when it raises, everything it wrote is
    rolled back and the rest of the group stands. Mirrors ``MemoryStore.append``
    check for check, in the same order; it also refuses a ``SessionCreated`` for
    a session id that exists on another branch.
    """
    session_id, branch = request.session_id, request.branch
    first, last = request.events[0], request.events[-1]
    created = first.body if isinstance(first.body, SessionCreated) else None
    key = first.idempotency_key
    conn.execute("SAVEPOINT append")
    try:
        if key is not None:
            if created is not None:
                original = conn.execute(_FIND_CREATED, (created.user_id, key)).fetchone()
            else:
                original = conn.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM events "
                    "WHERE session_id = ? AND idempotency_key = ?",
                    (session_id, key),
                ).fetchone()
            if original is not None:
                conn.execute("RELEASE append")
                return tuple(original)
        if created is not None:
            limit = request.max_open_sessions
            if limit is not None:
                (open_count,) = conn.execute(
                    "SELECT count(*) FROM sessions "
                    f"WHERE user_id = ? AND status IN ({_OPEN_STATUSES_SQL})",
                    (created.user_id,),
                ).fetchone()
                if open_count >= limit:
                    raise SessionCapacityError(f"user {created.user_id!r}", "open sessions", limit)
        else:
            # Existence check and listing update in one statement.
            if _touch_sessions(conn, [(request, len(request.events))]) == 0:
                raise SessionNotFoundError(session_id)
        current = conn.execute(
            "SELECT head FROM heads WHERE session_id = ? AND branch = ?",
            (session_id, branch),
        ).fetchone()
        check_head(request, current[0] if current is not None else None)
        if created is not None:
            if conn.execute(
                "SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone():
                # A second SessionCreated for a live session id, on another branch.
                raise BranchExistsError(session_id, branch, None)
            conn.execute(
                f"INSERT INTO sessions ({_SESSION_COLUMNS}, create_key) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    session_id,
                    created.user_id,
                    created.agent,
                    request.status or "active",
                    first.at,
                    last.at,
                    len(request.events),
                    key,
                ),
            )
        elif request.expected_head is None and request.max_branches is not None:
            (branches,) = conn.execute(
                "SELECT count(*) FROM heads WHERE session_id = ?", (session_id,)
            ).fetchone()
            if branches >= request.max_branches:
                raise SessionCapacityError(
                    f"session {session_id!r}", "branches", request.max_branches
                )
        execute_rows(conn, _UPSERT_HEADS, 3, [(session_id, branch, last.id)])
        execute_rows(conn, _INSERT_EVENTS, 9, rows())
        if request.erase:
            _erase_rows(conn, request)
        conn.execute("RELEASE append")
    except BaseException:
        _rollback_to(conn, "append")
        raise
    return None


def _group_tx(
    conn: sqlite3.Connection, path: str, group: list[AppendRequest], packed: _Packed
) -> list[_Row | LedgerError | None]:
    """A group of appends as one write transaction and one commit (one WAL sync).

    A group of plain appends only (the common case: turns added to existing
    branches) is checked and written as a whole (``_plain_group_tx``). Otherwise
    each append runs whole in its own savepoint (``_append_tx``); one that is
    refused (conflict, unknown session, a limit, a constraint) is rolled back
    alone and its error returned in its place. Any other failure, and a failed
    commit, raises: SQLite then rolls the whole transaction back, and nothing
    of the group is written. The events' rows come from ``packed``, made meanwhile.
    """
    outcomes: list[_Row | LedgerError | None] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        if all(map(_is_plain, group)):
            plain = _plain_group_tx(conn, group, packed)
            if plain is not None:
                conn.execute("COMMIT")
                return plain
            # A row was refused: the group starts over, one savepoint per append.
            _rollback(conn)
            conn.execute("BEGIN IMMEDIATE")
        for index, request in enumerate(group):
            try:
                outcomes.append(_append_tx(conn, request, functools.partial(packed.rows, index)))
            except (LedgerError, sqlite3.IntegrityError) as exc:
                # A refusal, or a constraint only this batch broke, is its own;
                # any other error (I/O, a full disk, corruption) is the group's,
                # and so is any after which SQLite ended the transaction.
                if not conn.in_transaction:
                    raise
                outcomes.append(_translated(exc, path, request.session_id))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return outcomes


def _is_plain(request: AppendRequest) -> bool:
    """An append to an existing branch with nothing to look up first: no idempotency
    key to replay, no session to create, no branch to count, nothing to erase."""
    return (
        request.expected_head is not None
        and not request.erase
        and request.events[0].idempotency_key is None
        and not isinstance(request.events[0].body, SessionCreated)
    )


def _plain_group_tx(
    conn: sqlite3.Connection, group: list[AppendRequest], packed: _Packed
) -> list[_Row | LedgerError | None] | None:
    """A group of plain appends (``_is_plain``) with a handful of statements in all.

    The same checks as ``_append_tx``, in the same order, but made for the whole
    group at once: one read of the sessions and heads concerned, each request
    checked in queue order against the heads the requests before it leave, then
    the accepted ones written a table at a time in multi-row statements
    (``stores.sqlite_steps``), the events last (their rows are the last packed).
    None when a write breaks a constraint or an event does not encode, which only
    the per-append path can pin on one request: the caller then rolls back the
    whole transaction, which holds nothing else. No savepoint: SQLite would copy
    every page the group changes to a journal of its own, to undo it alone.
    """
    known, heads = _read_heads(conn, list({(r.session_id, r.branch): None for r in group}))
    outcomes: list[_Row | LedgerError | None] = []
    accepted: list[tuple[int, AppendRequest]] = []
    for index, request in enumerate(group):
        session_id, branch = request.session_id, request.branch
        try:
            if session_id not in known:
                raise SessionNotFoundError(session_id)
            check_head(request, heads.get((session_id, branch)))
        except LedgerError as refused:
            outcomes.append(refused)
            continue
        heads[(session_id, branch)] = request.events[-1].id
        accepted.append((index, request))
        outcomes.append(None)
    if not accepted:
        return outcomes
    try:
        _touch_sessions(conn, [(request, len(request.events)) for _, request in accepted])
        new_heads = {(r.session_id, r.branch): r.events[-1].id for _, r in accepted}
        execute_rows(conn, _UPSERT_HEADS, 3, [(*pair, head) for pair, head in new_heads.items()])
        # The events last, each chunk as soon as its rows are packed.
        rows = (row for index, _ in accepted for row in packed.rows(index))
        execute_rows(conn, _INSERT_EVENTS, 9, rows, sum(len(r.events) for _, r in accepted))
    except (sqlite3.IntegrityError, LedgerError):
        return None
    return outcomes


def _erase_rows(conn: sqlite3.Connection, request: AppendRequest) -> None:
    """Overwrite events with their redacted forms, inside the append's transaction.

    ``secure_delete`` (set on the writer) zeroes the bytes the old rows leave in
    their pages and freed overflow pages; the WAL frames that still hold them are
    dropped by the checkpoint that follows the commit (``_truncate_wal``).
    """
    session_id = request.session_id
    for erased in request.erase:
        row = conn.execute(_BY_ID, (erased.id, erased.id)).fetchone()
        stored = None
        if row is not None:
            stored = _decode(tuple(row), conn.execute("PRAGMA database_list").fetchone()[2])
        check_erase(request, stored, erased)
        conn.execute(
            f"UPDATE events SET data = ? WHERE {_id_is('id')}",
            (encode_stored(erased), erased.id, erased.id),
        )
    # Snapshots are folds of the session's paths: they may hold the erased content.
    conn.execute("DELETE FROM snapshots WHERE session_id = ?", (session_id,))


def _truncate_wal(conn: sqlite3.Connection) -> bool:
    """Checkpoint the whole WAL into the database and truncate it to zero bytes.

    Waits (the busy timeout) for readers of other connections to move past the
    old frames; False when one still holds them, and the WAL file keeps its bytes.
    """
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return not busy


def _purge_tx(conn: sqlite3.Connection, requests: Sequence[PurgeRequest]) -> list[PurgeRecord]:
    """Delete whole sessions and write their records, in one write transaction."""
    done: list[PurgeRecord] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for request in requests:
            record = request.record
            session_id = record.session_id
            row = conn.execute(
                "SELECT event_count, last_activity_at FROM sessions WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            if row is None or tuple(row) != (record.event_count, record.last_activity_at):
                continue  # gone, or written to since the purge was planned: kept
            for table in ("events", "heads", "snapshots", "anchors", "sessions"):
                conn.execute(f"DELETE FROM {table} WHERE session_id = ?", (session_id,))
            conn.execute(
                "INSERT INTO purges (session_id, user_id, purged_at, record) VALUES (?, ?, ?, ?)",
                (session_id, record.user_id, record.purged_at, msgspec.json.encode(record)),
            )
            done.append(record)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return done


def _put_anchor_tx(conn: sqlite3.Connection, session_id: str, data: bytes) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("INSERT INTO anchors (session_id, data) VALUES (?, ?)", (session_id, data))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _put_snapshots_tx(conn: sqlite3.Connection, rows: list[_Row]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "INSERT INTO snapshots (session_id, key, event_id, state) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (session_id, key, event_id) DO UPDATE SET state = excluded.state",
            rows,
        )
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


# --- decoding -----------------------------------------------------------------------


def _decode(row: _Row, path: str) -> Event:
    """A stored event, or IntegrityError: a bad row is never skipped nor returned.

    ``row`` starts with ``_EVENT_COLUMNS``; anything after them is ignored.
    """
    position, event_id, session_id, data = row[0], row[1], row[2], row[3]
    try:
        event = decode_stored(data)
    except (msgspec.MsgspecError, TypeError) as exc:
        raise IntegrityError(
            f"Stored event does not decode: {event_id!r} (position {position} in {path!r}): {exc}",
            event_id,
        ) from None
    if event.id != event_id or event.session != session_id:
        raise IntegrityError(
            f"Stored event does not match its row: {event_id!r} "
            f"(position {position} in {path!r}) decodes as {event.id!r} "
            f"of session {event.session!r}",
            event_id,
        )
    return event


def _purge_record(row: _Row, path: str) -> PurgeRecord:
    try:
        return msgspec.json.decode(row[1], type=PurgeRecord)
    except msgspec.MsgspecError as exc:
        raise IntegrityError(
            f"Stored purge record does not decode: session {row[0]!r} in {path!r}: {exc}"
        ) from None


def _decode_rows(rows: Sequence[_Row], path: str) -> list[Event]:
    """``_decode`` of many rows (``stores.base.decode_page``)."""
    return decode_page(rows, decode_stored_all, lambda row: _decode(row, path))


_row_first, _row_second = operator.itemgetter(0), operator.itemgetter(1)


def _events_page(
    conn: sqlite3.Connection, path: str, session_id: str, after: int, upper: int, size: int
) -> tuple[int, list[Event]]:
    """A session's events at positions in ``(after, upper]``, at most ``size``, decoded
    and checked, and the last one's position.

    A replay's hot loop: only ids and data are read (every Python object made per
    row costs), so the page's last position is looked up by its id, and a row's
    session is the one the query selected. When any row fails the checks, the
    page is read again whole and decoded row by row, to name the bad one.
    """
    with gc_paused():  # the rows too: a page is a bulk read (see gc_paused)
        rows = conn.execute(
            "SELECT id, data FROM events "
            "WHERE session_id = ? AND position > ? AND position <= ? ORDER BY position LIMIT ?",
            (session_id, after, upper, size),
        ).fetchall()
        if not rows:
            return upper, []
        last_id = rows[-1][0]
        found = conn.execute(
            f"SELECT position FROM events WHERE {_id_is('id')}", (last_id, last_id)
        ).fetchone()
        last = upper if found is None else found[0]  # None: purged since
        ids, datas = list(map(_row_first, rows)), list(map(_row_second, rows))
        del rows  # not left for the collection that follows the pause
        events = decode_checked(datas, ids, session_id, decode_stored_all)
        if events is None:
            whole = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events "
                "WHERE session_id = ? AND position > ? AND position <= ? ORDER BY position",
                (session_id, after, last),
            ).fetchall()
            events = [_decode(row, path) for row in whole]
    return last, events


def _session_row(row: _Row) -> SessionRow:
    return SessionRow(
        session_id=row[0],
        user_id=row[1],
        agent=row[2],
        status=row[3],
        created_at=row[4],
        last_activity_at=row[5],
        event_count=row[6],
    )


def _parse_url(url: str) -> tuple[Path, dict[str, str]]:
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ConfigError(
            f"Invalid SQLite URL: {url!r} (expected sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db)"
        )
    rest, _, query = url[len(prefix) :].partition("?")
    if not rest or rest == ":memory:":
        raise ConfigError(
            f"Invalid SQLite URL: {url!r} (needs a file path; use memory:// for a "
            "store that keeps nothing)"
        )
    return Path(rest), dict(parse_qsl(query, keep_blank_values=True))


class SQLiteStore(PurgeStore):
    """The embedded default store: one SQLite file in WAL mode, many processes.

    Args:
        path: The database file; its directory is created when missing.
        synchronous: ``"full"`` (default): an acknowledged append survives a
            power loss. ``"normal"``: it survives a process kill, but the last
            appends may roll back after a power loss or OS crash. See the
            module docstring.
        busy_timeout: Seconds an append waits for another process's write
            lock before raising ``StoreError`` (default 30).
        group_size: The most concurrent appends committed together in one
            transaction (default 64; 1: one transaction per append). See
            ``stores.group``.

    Example::

        async with SQLiteStore.from_url("sqlite:///ledger.db") as store:
            await store.append(request)
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "full",
        busy_timeout: float = 30.0,
        group_size: int = DEFAULT_GROUP_SIZE,
        url: str | None = None,
    ) -> None:
        if str(synchronous).lower() not in _SYNCHRONOUS:
            raise ConfigError(
                f"Invalid SQLite synchronous setting: {synchronous!r} (expected 'full' or 'normal')"
            )
        try:
            timeout = float(busy_timeout)
        except (TypeError, ValueError):
            timeout = -1.0
        if not timeout >= 0:
            raise ConfigError(f"Invalid SQLite busy_timeout: {busy_timeout!r} (seconds, >= 0)")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ConfigError(f"Invalid SQLite group_size: {group_size!r} (an integer >= 1)")
        # Resolved now, so that a later chdir does not move the store.
        self._path = Path(path).expanduser().absolute()
        self.filename = str(self._path)
        self.url = url or f"sqlite:///{self.filename}"
        self.synchronous = _SYNCHRONOUS[str(synchronous).lower()]
        self.busy_timeout = timeout
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Each transaction already runs whole in the writer's thread; the lock
        # lets close() wait for a snapshot write in flight.
        self._write_lock = asyncio.Lock()
        self._appended = asyncio.Event()
        self._group: GroupCommit[AppendRequest, _Row | None] = GroupCommit(
            self._run_group, max_size=group_size, name=repr(self.filename)
        )
        self._packer: ThreadPoolExecutor | None = None  # packs the rows of a group (_Packed)
        self._inline: sqlite3.Connection | None = None  # get_inline's, on the event loop

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        synchronous: str | None = None,
        busy_timeout: float | None = None,
        group_size: int | None = None,
    ) -> SQLiteStore:
        """``sqlite:///relative/path.db`` (from the working directory) or ``sqlite:////abs.db``.

        The options may also be given in the query string
        (``?synchronous=normal&busy_timeout=5&group_size=1``); keywords win.
        """
        path, query = _parse_url(url)
        unknown = set(query) - {"synchronous", "busy_timeout", "group_size"}
        if unknown:
            raise ConfigError(f"Unknown SQLite URL option(s) in {url!r}: {sorted(unknown)}")
        if synchronous is None:
            synchronous = query.get("synchronous", "full")
        if busy_timeout is None:
            try:
                busy_timeout = float(query.get("busy_timeout", 30.0))
            except ValueError:
                raise ConfigError(f"Invalid SQLite busy_timeout in {url!r}") from None
        if group_size is None:
            try:
                group_size = int(query.get("group_size", DEFAULT_GROUP_SIZE))
            except ValueError:
                raise ConfigError(
                    f"Invalid SQLite group_size in {url!r} (an integer >= 1)"
                ) from None
        return cls(
            path,
            synchronous=synchronous,
            busy_timeout=busy_timeout,
            group_size=group_size,
            url=url,
        )

    # lifecycle

    async def _open(self) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            # A group's writes use UPDATE ... FROM (3.33) and its reads JSON arrays.
            raise StoreError(
                f"Cannot open {self.filename!r}: the session ledger needs SQLite "
                f"{'.'.join(map(str, MIN_SQLITE))} or later, and this Python uses "
                f"{sqlite3.sqlite_version}"
            )
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create the directory of {self.filename!r}: {exc}") from None
        writer: aiosqlite.Connection | None = None
        reader: aiosqlite.Connection | None = None
        try:
            with _translate(self.filename):
                # isolation_level=None: the module never opens a transaction
                # behind our back; every write says BEGIN IMMEDIATE itself.
                writer = await _connect(self._path, self.busy_timeout)
                await _in_thread(writer, _setup_writer, self.filename, self.synchronous)
                reader = await _connect(self._path, self.busy_timeout)
                await _in_thread(reader, _setup_reader)
        except BaseException:
            await _close_all(reader, writer)
            raise
        self._writer, self._reader = writer, reader
        self._packer = ThreadPoolExecutor(1, thread_name_prefix="ledger-sqlite-packer")

    async def _close(self) -> None:
        # Appends already queued are committed (or fail) first; new ones are
        # refused, the store being marked closed.
        await self._group.close()
        if self._packer is not None:
            # Not waited for: a packing left running belongs to a group that has failed.
            self._packer.shutdown(wait=False)
            self._packer = None
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        async with self._write_lock:
            reader, writer = self._reader, self._writer
            self._reader = self._writer = None
            with _translate(self.filename):
                await _close_all(reader, writer)

    def _read_connection(self) -> aiosqlite.Connection:
        self._check_open()
        assert self._reader is not None
        return self._reader

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[_Row]:
        db = self._read_connection()
        with _translate(self.filename):
            return [tuple(row) for row in await db.execute_fetchall(sql, params)]

    # writes

    async def append(self, request: AppendRequest) -> AppendResult:
        self._check_open()
        validate_request(request)
        original = await self._group.submit(request)
        if original is None and request.erase:
            await self._after_erase()
        if original is not None:
            return AppendResult([_decode(original, self.filename)], replayed=True)
        return AppendResult(list(request.events))

    @property
    def group_stats(self) -> GroupStats:
        """How many groups this store has committed, and how many appends they held."""
        return self._group.stats

    async def _run_group(self, group: list[AppendRequest]) -> list[_Row | LedgerError | None]:
        """One group commit (``stores.group``): one transaction, one WAL sync; the
        events' rows packed meanwhile (``_Packed``)."""
        self._check_open_for_group()
        assert self._writer is not None and self._packer is not None
        packed = _Packed(group, self._packer)
        try:
            outcomes = await _in_thread(self._writer, _group_tx, self.filename, group, packed)
        except (sqlite3.Error, ValueError) as exc:
            # Nothing of the group was written; each caller hears of its own append.
            return [_translated(exc, self.filename, request.session_id) for request in group]
        # Wake this process's feed waiters now; other processes' are polled.
        self._appended.set()
        self._appended = asyncio.Event()
        return outcomes

    def _check_open_for_group(self) -> None:
        # The group drains while close() waits: only a missing connection stops it.
        if self._writer is None:
            raise StoreClosedError(f"Store was closed: {self.filename!r}")

    async def _after_erase(self) -> None:
        """Drop the WAL frames that held erased bytes.

        The erase has committed: a failure here is logged, not raised. The call
        queues on the writer's thread, so it runs between two group commits.
        """
        if self._writer is None:
            return  # closed meanwhile: closing checkpoints the WAL
        try:
            with _translate(self.filename):
                truncated = await _in_thread(self._writer, _truncate_wal)
        except StoreError as exc:
            log.warning("%s: the WAL checkpoint after an erase failed: %s", self.filename, exc)
            return
        if not truncated:
            log.warning(
                "%s: a reader of another connection kept the WAL from being truncated "
                "after an erase; its old frames go at the next full checkpoint",
                self.filename,
            )

    # retention

    async def idle_sessions(
        self,
        before: int,
        *,
        user_id: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[SessionRow]:
        self._check_open()
        if limit <= 0:
            return []
        where = "last_activity_at < ?"
        params: list[Any] = [before]
        if user_id is not None:
            where, params = "user_id = ? AND " + where, [user_id, before]
        if after is not None:
            where += " AND (last_activity_at, session_id) > (?, ?)"
            params.extend(parse_cursor(after))
        rows = await self._fetch(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE {where} "
            "ORDER BY last_activity_at, session_id LIMIT ?",
            (*params, limit),
        )
        return [_session_row(row) for row in rows]

    async def purge(self, requests: Sequence[PurgeRequest]) -> list[PurgeRecord]:
        self._check_open()
        if not requests:
            return []
        async with self._write_lock:
            self._check_open()
            assert self._writer is not None
            with _translate(self.filename):
                done = await _in_thread(self._writer, _purge_tx, requests)
            if done:
                await self._after_erase()
        return done

    async def purges(
        self, *, user_id: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> PurgePage:
        self._check_open()
        where: list[str] = []
        params: list[Any] = []
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        if cursor is not None:
            where.append("(purged_at, session_id) < (?, ?)")
            params.extend(parse_cursor(cursor))
        limit = max(0, limit)
        if limit == 0:
            return PurgePage([])
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = await self._fetch(
            f"SELECT session_id, record FROM purges {clause}"
            "ORDER BY purged_at DESC, session_id DESC LIMIT ?",
            (*params, limit + 1),
        )
        records = [_purge_record(row, self.filename) for row in rows[:limit]]
        return PurgePage(records, purge_cursor(records[-1]) if len(rows) > limit else None)

    async def put_snapshots(
        self, session_id: str, key: str, states: Sequence[tuple[str, bytes]]
    ) -> None:
        self._check_open()
        rows: list[_Row] = [(session_id, key, event_id, state) for event_id, state in states]
        if not rows:
            return
        async with self._write_lock:
            self._check_open()
            assert self._writer is not None
            with _translate(self.filename, session_id):
                await _in_thread(self._writer, _put_snapshots_tx, rows)

    async def put_anchor(self, session_id: str, anchor: bytes) -> None:
        self._check_open()
        async with self._write_lock:
            self._check_open()
            assert self._writer is not None
            with _translate(self.filename, session_id):
                await _in_thread(self._writer, _put_anchor_tx, session_id, bytes(anchor))

    async def anchors(self, session_id: str) -> list[bytes]:
        rows = await self._fetch(
            "SELECT data FROM anchors WHERE session_id = ? ORDER BY n", (session_id,)
        )
        return [bytes(row[0]) for row in rows]

    # reads

    async def get(self, event_id: str) -> Event:
        rows = await self._fetch(_BY_ID, (event_id, event_id))
        if not rows:
            raise EventNotFoundError(event_id)
        return _decode(rows[0], self.filename)

    async def find_by_key(self, session_id: str, key: str) -> Event | None:
        rows = await self._fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = ? AND idempotency_key = ?",
            (session_id, key),
        )
        return _decode(rows[0], self.filename) if rows else None

    async def find_created(self, user_id: str, key: str) -> Event | None:
        rows = await self._fetch(_FIND_CREATED, (user_id, key))
        return _decode(rows[0], self.filename) if rows else None

    async def ancestors(self, event_id: str, limit: int | None = None) -> list[Event]:
        self._check_open()
        if limit is not None and limit <= 0:
            return []
        with gc_paused():  # a long path is a bulk read: see ledger.events.gc_paused
            rows = await self._path_rows(event_id, limit, "data")
            events = _decode_rows(rows, self.filename)
            return check_ancestry(events, limit, f"in {self.filename!r}")

    async def path_index(self, event_id: str, limit: int) -> list[tuple[str, int, str | None]]:
        """``(id, seq, parent)`` of up to ``limit`` events of the path from ``event_id``
        back, newest first, read from the columns alone: nothing is decoded or checked.

        For the fold engine's walk back to a snapshot (``projections.engine.PathIndex``),
        which reads the events it folds through ``ancestors``, with every check.
        """
        self._check_open()
        if limit <= 0:
            return []
        with gc_paused():
            rows = await self._path_rows(event_id, limit, "seq")
        return [(row[1], row[3], row[4]) for row in rows]

    async def _path_rows(self, event_id: str, limit: int | None, column: str) -> list[_Row]:
        """Rows ``(position, id, session_id, column, parent)`` of the parent path from
        ``event_id`` back (``stores.base.walk_path``)."""

        async def window(cursor: str, below: int, want: int) -> list[_Row]:
            # The cursor's session and position as two scalar subqueries: single
            # values, so the session's index is read newest first with no sort.
            return await self._fetch(
                f"SELECT e.position, e.id, e.session_id, e.{column}, e.parent FROM events AS e "
                f"WHERE e.session_id = (SELECT session_id FROM events WHERE {_id_is('id')}) "
                f"AND e.position <= (SELECT position FROM events WHERE {_id_is('id')}) "
                "AND e.position < ? ORDER BY e.position DESC LIMIT ?",
                (cursor, cursor, cursor, cursor, below, want),
            )

        async def chain(cursor: str, below: int, want: int) -> list[_Row]:
            return await self._chain(cursor, below, want, column)

        return await walk_path(event_id, limit, window, chain, size=_PATH_WINDOW)

    async def _chain(self, event_id: str, below: int, limit: int, column: str) -> list[_Row]:
        """Up to ``limit`` rows of the parent path from ``event_id``, by index seeks."""
        return await self._fetch(
            f"WITH RECURSIVE chain(position, id, session_id, {column}, parent, depth) AS ("
            f" SELECT position, id, session_id, {column}, parent, 1 FROM events"
            f" WHERE {_id_is('id')} AND position < ?"
            " UNION ALL"
            f" SELECT e.position, e.id, e.session_id, e.{column}, e.parent, c.depth + 1"
            " FROM chain AS c JOIN events AS e"
            f" ON {_id_is('e.id', 'c.parent')} AND e.position < c.position"
            " WHERE c.depth < ?"
            f") SELECT position, id, session_id, {column}, parent FROM chain ORDER BY depth",
            (event_id, event_id, below, limit),
        )

    def events(self, session_id: str, *, page_size: int = 1000) -> AsyncIterator[Event]:
        return self.events_from(session_id, 0, page_size=page_size)

    async def event_pages(
        self, session_id: str, start: int = 0, *, page_size: int = 1000
    ) -> AsyncIterator[list[Event]]:
        page_size = max(1, page_size)
        # The session's events as of now, as MemoryStore gives them: later
        # appends are not chased.
        ((upper,),) = await self._fetch(
            "SELECT coalesce(max(position), 0) FROM events WHERE session_id = ?", (session_id,)
        )
        after = 0
        if start > 0:  # the position of the event before the start-th: a seek in the index
            rows = await self._fetch(
                "SELECT position FROM events WHERE session_id = ? ORDER BY position "
                "LIMIT 1 OFFSET ?",
                (session_id, start - 1),
            )
            after = rows[0][0] if rows else upper
        if upper <= after:
            return

        reader = self._read_connection()

        def page(after: int) -> asyncio.Task[tuple[int, list[Event]]]:
            return asyncio.ensure_future(
                _in_thread(reader, _events_page, self.filename, session_id, after, upper, page_size)
            )

        # Each page is read and decoded in the store's thread, the next one while
        # this one is handed out: the event loop only hands pages on.
        pending: asyncio.Task[tuple[int, list[Event]]] | None = page(after)
        try:
            while pending is not None:
                with _translate(self.filename, session_id):
                    last, events = await pending
                more = len(events) == page_size and last < upper
                pending = page(last) if more else None
                if events:
                    yield events
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, LedgerError, sqlite3.Error):
                    await pending

    async def heads(self, session_id: str) -> dict[str, str]:
        rows = await self._fetch(
            "SELECT branch, head FROM heads WHERE session_id = ?", (session_id,)
        )
        return {branch: head for branch, head in rows}

    async def session(self, session_id: str) -> SessionRow:
        rows = await self._fetch(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
        )
        if not rows:
            raise SessionNotFoundError(session_id)
        return _session_row(rows[0])

    async def sessions(self, query: SessionQuery) -> SessionPage:
        self._check_open()
        where: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("user_id", query.user_id),
            ("agent", query.agent),
            ("status", query.status),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if query.cursor is not None:
            where.append("(last_activity_at, session_id) < (?, ?)")
            params.extend(parse_cursor(query.cursor))
        limit = max(0, query.limit)
        if limit == 0:
            return SessionPage([])
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = await self._fetch(
            f"SELECT {_SESSION_COLUMNS} FROM sessions {clause}"
            "ORDER BY last_activity_at DESC, session_id DESC LIMIT ?",
            (*params, limit + 1),
        )
        page = [_session_row(row) for row in rows[:limit]]
        return SessionPage(page, page_cursor(page[-1]) if len(rows) > limit else None)

    async def get_snapshot(self, session_id: str, key: str, event_id: str) -> bytes | None:
        rows = await self._fetch(
            "SELECT state FROM snapshots WHERE session_id = ? AND key = ? AND event_id = ?",
            (session_id, key, event_id),
        )
        return bytes(rows[0][0]) if rows else None

    # the feed

    async def read_feed(self, after: int = 0, limit: int = 1000) -> list[FeedItem]:
        self._check_open()
        if limit <= 0:
            return []
        rows = await self._fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
            (max(after, 0), limit),
        )
        with gc_paused():
            events = _decode_rows(rows, self.filename)
        return [FeedItem(row[0], event) for row, event in zip(rows, events, strict=True)]

    async def wait_for_feed(self, after: int, max_wait: float) -> None:
        """Return when a position above ``after`` has committed, or after ``max_wait``.

        Appends of this process wake the waiter at once; those of other
        processes are seen by polling the highest position (an index seek).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, max_wait)
        while True:
            appended = self._appended
            ((last,),) = await self._fetch("SELECT coalesce(max(position), 0) FROM events")
            remaining = deadline - loop.time()
            if last > after or remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(appended.wait(), min(remaining, self.poll_interval))

    async def get_inline(self, event_id: str) -> Event:
        """``get`` on the calling thread: no hop to the store's thread and back.

        For the many single reads of a proof loop: the hop costs more than the
        indexed read itself, and its waits are what make the slowest reads slow.
        It runs on a read-only connection of its own (opened at first use, closed
        with the store) and blocks the event loop for one lookup by primary key; a
        database busy for more than a moment is read through ``get`` instead.
        """
        self._read_connection()  # refuses a closed store
        if self._inline is None:
            with _translate(self.filename):
                self._inline = sqlite3.connect(
                    f"{self._path.resolve().as_uri()}?mode=ro",
                    uri=True,
                    timeout=0.05,
                    isolation_level=None,
                )
        try:
            row = self._inline.execute(_BY_ID, (event_id, event_id)).fetchone()
        except sqlite3.Error:
            return await self.get(event_id)  # busy, say: the store's own read says what failed
        if row is None:
            raise EventNotFoundError(event_id)
        return _decode(row, self.filename)


async def _close_all(*connections: aiosqlite.Connection | None) -> None:
    """Close every connection given, even when closing one of them fails."""
    error: BaseException | None = None
    for connection in connections:
        if connection is None:
            continue
        try:
            await connection.close()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
