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
session. Each append is one ``BEGIN IMMEDIATE`` transaction: it takes SQLite's
single write lock first, then checks idempotency, the session and the branch
head (``stores.base.check_head``), and writes; nothing is checked in one
transaction and written in another. A process waits up to ``busy_timeout``
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
import operator
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Concatenate, Final, ParamSpec, TypeVar
from urllib.parse import parse_qsl

import aiosqlite
import msgspec

from ledger.errors import (
    BranchExistsError,
    ConfigError,
    EventNotFoundError,
    IntegrityError,
    InvalidEventError,
    SessionCapacityError,
    SessionNotFoundError,
    StoreClosedError,
    StoreError,
)
from ledger.events import Event, SessionCreated, decode_stored, encode_stored, gc_paused
from stores.base import (
    OPEN_STATUSES,
    AppendRequest,
    AppendResult,
    FeedItem,
    FeedStore,
    SessionPage,
    SessionQuery,
    SessionRow,
    check_ancestry,
    check_head,
    page_cursor,
    parse_cursor,
    validate_request,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION: Final = 2
"""``PRAGMA user_version`` of the files this code writes.

1: ``events.data`` is the event's JSON. 2: large events are deflated
(``ledger.events.encode_stored``). A version 1 file is upgraded in place at
open: its rows are valid version 2 rows, only the number changes, so that
code that knows only version 1 refuses the file instead of misreading it.
"""

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS events (
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
    "CREATE INDEX IF NOT EXISTS events_session ON events (session_id, position)",
    """CREATE UNIQUE INDEX IF NOT EXISTS events_session_key
        ON events (session_id, idempotency_key) WHERE idempotency_key IS NOT NULL""",
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

_EVENT_COLUMNS: Final = "position, id, session_id, data"
_SESSION_COLUMNS: Final = (
    "session_id, user_id, agent, status, created_at, last_activity_at, event_count"
)
_OPEN_STATUSES_SQL: Final = ", ".join(f"'{status}'" for status in OPEN_STATUSES)
_SYNCHRONOUS: Final = {"full": "FULL", "normal": "NORMAL"}
_NO_LIMIT: Final = 2**63 - 1
_PATH_WINDOW: Final = 4096
"""Rows read at once by ``ancestors``: a path of a million events takes 245 reads."""

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
    private method every one of its public calls goes through. Nothing else in
    this module touches aiosqlite's internals.
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
        if version == 1:
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
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _setup_reader(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA query_only=ON")


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back (after an I/O error, say); a failing
    # ROLLBACK is left to raise, chained to the error that caused it.
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _append_tx(conn: sqlite3.Connection, request: AppendRequest, rows: list[_Row]) -> _Row | None:
    """The whole append as one write transaction; the original's row on a replay.

    Mirrors ``MemoryStore.append`` check for check, in the same order; it also
    refuses a ``SessionCreated`` for a session id that exists on another branch.
    """
    session_id, branch = request.session_id, request.branch
    first, last = request.events[0], request.events[-1]
    created = first.body if isinstance(first.body, SessionCreated) else None
    key = first.idempotency_key
    conn.execute("BEGIN IMMEDIATE")
    try:
        if key is not None:
            if created is not None:
                original = conn.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = (SELECT e.id "
                    "FROM sessions AS s JOIN events AS e ON e.session_id = s.session_id "
                    "AND e.idempotency_key = s.create_key "
                    "WHERE s.user_id = ? AND s.create_key = ?)",
                    (created.user_id, key),
                ).fetchone()
            else:
                original = conn.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM events "
                    "WHERE session_id = ? AND idempotency_key = ?",
                    (session_id, key),
                ).fetchone()
            if original is not None:
                conn.execute("ROLLBACK")
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
            updated = conn.execute(
                "UPDATE sessions SET status = coalesce(?, status), "
                "last_activity_at = max(last_activity_at, ?), "
                "event_count = event_count + ? WHERE session_id = ?",
                (request.status, last.at, len(rows), session_id),
            ).rowcount
            if updated == 0:
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
                    len(rows),
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
        conn.executemany(
            "INSERT INTO events (id, session_id, parent, seq, branch, kind, at, "
            "idempotency_key, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute(
            "INSERT INTO heads (session_id, branch, head) VALUES (?, ?, ?) "
            "ON CONFLICT (session_id, branch) DO UPDATE SET head = excluded.head",
            (session_id, branch, last.id),
        )
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return None


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


_get_data = operator.itemgetter(3)
_get_row_id = operator.itemgetter(1)
_get_row_session = operator.itemgetter(2)
_get_id = operator.attrgetter("id")
_get_session = operator.attrgetter("session")


def _decode_rows(rows: Sequence[_Row], path: str) -> list[Event]:
    """``_decode`` of many rows, its checks made on whole lists (a replay's hot loop).

    On any failure the rows go through ``_decode`` one by one, which names the bad one.
    """
    try:
        events = list(map(decode_stored, map(_get_data, rows)))
    except (msgspec.MsgspecError, TypeError):
        events = []
    if (
        len(events) != len(rows)
        or list(map(_get_id, events)) != list(map(_get_row_id, rows))
        or list(map(_get_session, events)) != list(map(_get_row_session, rows))
    ):
        return [_decode(row, path) for row in rows]
    return events


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


class SQLiteStore(FeedStore):
    """The embedded default store: one SQLite file in WAL mode, many processes.

    Args:
        path: The database file; its directory is created when missing.
        synchronous: ``"full"`` (default): an acknowledged append survives a
            power loss. ``"normal"``: it survives a process kill, but the last
            appends may roll back after a power loss or OS crash. See the
            module docstring.
        busy_timeout: Seconds an append waits for another process's write
            lock before raising ``StoreError`` (default 30).

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
        # Resolved now, so that a later chdir does not move the store.
        self._path = Path(path).expanduser().absolute()
        self.filename = str(self._path)
        self.url = url or f"sqlite:///{self.filename}"
        self.synchronous = _SYNCHRONOUS[str(synchronous).lower()]
        self.busy_timeout = timeout
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Each transaction already runs whole in the writer's thread; the lock
        # also keeps appends of one process in arrival order and lets close()
        # wait for the one in flight.
        self._write_lock = asyncio.Lock()
        self._appended = asyncio.Event()

    @classmethod
    def from_url(
        cls, url: str, *, synchronous: str | None = None, busy_timeout: float | None = None
    ) -> SQLiteStore:
        """``sqlite:///relative/path.db`` (from the working directory) or ``sqlite:////abs.db``.

        The options may also be given in the query string
        (``?synchronous=normal&busy_timeout=5``); keywords win.
        """
        path, query = _parse_url(url)
        unknown = set(query) - {"synchronous", "busy_timeout"}
        if unknown:
            raise ConfigError(f"Unknown SQLite URL option(s) in {url!r}: {sorted(unknown)}")
        if synchronous is None:
            synchronous = query.get("synchronous", "full")
        if busy_timeout is None:
            try:
                busy_timeout = float(query.get("busy_timeout", 30.0))
            except ValueError:
                raise ConfigError(f"Invalid SQLite busy_timeout in {url!r}") from None
        return cls(path, synchronous=synchronous, busy_timeout=busy_timeout, url=url)

    # lifecycle

    async def _open(self) -> None:
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
                writer = await aiosqlite.connect(
                    self._path, timeout=self.busy_timeout, isolation_level=None
                )
                await _in_thread(writer, _setup_writer, self.filename, self.synchronous)
                reader = await aiosqlite.connect(
                    self._path, timeout=self.busy_timeout, isolation_level=None
                )
                await _in_thread(reader, _setup_reader)
        except BaseException:
            await _close_all(reader, writer)
            raise
        self._writer, self._reader = writer, reader

    async def _close(self) -> None:
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
        session_id = request.session_id
        rows: list[_Row] = [
            (
                e.id,
                session_id,
                e.parent,
                e.seq,
                e.branch,
                e.kind,
                e.at,
                e.idempotency_key,
                encode_stored(e),
            )
            for e in request.events
        ]
        async with self._write_lock:
            self._check_open()
            assert self._writer is not None
            with _translate(self.filename, session_id):
                original = await _in_thread(self._writer, _append_tx, request, rows)
        if original is not None:
            return AppendResult([_decode(original, self.filename)], replayed=True)
        # Wake this process's feed waiters now; other processes' are polled.
        self._appended.set()
        self._appended = asyncio.Event()
        return AppendResult(list(request.events))

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

    # reads

    async def get(self, event_id: str) -> Event:
        rows = await self._fetch(f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = ?", (event_id,))
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
        rows = await self._fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = (SELECT e.id "
            "FROM sessions AS s JOIN events AS e ON e.session_id = s.session_id "
            "AND e.idempotency_key = s.create_key WHERE s.user_id = ? AND s.create_key = ?)",
            (user_id, key),
        )
        return _decode(rows[0], self.filename) if rows else None

    async def ancestors(self, event_id: str, limit: int | None = None) -> list[Event]:
        self._check_open()
        if limit is not None and limit <= 0:
            return []
        # A path is mostly a run of the session's events in append order (a
        # branch's events follow one another), so it is read as windows of the
        # session's events newest first, an index range scan, and the parent
        # links followed in memory: far cheaper than one index seek per step.
        # Positions fall strictly along the walk, so even a tampered parent
        # column cannot make it loop.
        with gc_paused():  # a long path is a bulk read: see ledger.events.gc_paused
            chosen: list[_Row] = []
            cursor: str | None = event_id
            below = _NO_LIMIT
            sparse = False
            while cursor is not None and (limit is None or len(chosen) < limit):
                want = _PATH_WINDOW if limit is None else min(limit - len(chosen), _PATH_WINDOW)
                if sparse:
                    # The last window was mostly other branches' events: one
                    # window's worth of the path by index seeks, then windows again.
                    rows = await self._chain(cursor, below, want)
                    chosen.extend(rows)
                    if len(rows) < want:
                        break  # the root, or a parent missing: named below
                    cursor, below, sparse = rows[-1][4], rows[-1][0], False
                    continue
                rows = await self._fetch(
                    f"SELECT {_EVENT_COLUMNS}, e.parent FROM events AS e, "
                    "(SELECT position AS p, session_id AS s FROM events WHERE id = ?) AS c "
                    "WHERE e.session_id = c.s AND e.position <= c.p AND e.position < ? "
                    "ORDER BY e.position DESC LIMIT ?",
                    (cursor, below, want),
                )
                if not rows or rows[0][1] != cursor:
                    break  # unknown, or a parent missing or out of order: named below
                taken = len(chosen)
                for row in rows:
                    if row[1] == cursor:
                        chosen.append(row)
                        cursor = row[4]
                        if cursor is None or len(chosen) == limit:
                            break
                below = chosen[-1][0]
                sparse = len(chosen) - taken < len(rows) // 4
            if not chosen:
                raise EventNotFoundError(event_id)
            events = _decode_rows(chosen, self.filename)
            return check_ancestry(events, limit, f"in {self.filename!r}")

    async def _chain(self, event_id: str, below: int, limit: int) -> list[_Row]:
        """Up to ``limit`` events of the parent path from ``event_id``, by index seeks."""
        return await self._fetch(
            "WITH RECURSIVE chain(position, id, session_id, data, parent, depth) AS ("
            " SELECT position, id, session_id, data, parent, 1 FROM events"
            " WHERE id = ? AND position < ?"
            " UNION ALL"
            " SELECT e.position, e.id, e.session_id, e.data, e.parent, c.depth + 1"
            " FROM chain AS c JOIN events AS e"
            " ON e.id = c.parent AND e.position < c.position"
            " WHERE c.depth < ?"
            ") SELECT position, id, session_id, data, parent FROM chain ORDER BY depth",
            (event_id, below, limit),
        )

    async def events(self, session_id: str, *, page_size: int = 1000) -> AsyncIterator[Event]:
        page_size = max(1, page_size)
        # The session's events as of now, as MemoryStore gives them: later
        # appends are not chased.
        ((upper,),) = await self._fetch(
            "SELECT coalesce(max(position), 0) FROM events WHERE session_id = ?", (session_id,)
        )
        after = 0
        while after < upper:
            rows = await self._fetch(
                f"SELECT {_EVENT_COLUMNS} FROM events "
                "WHERE session_id = ? AND position > ? AND position <= ? "
                "ORDER BY position LIMIT ?",
                (session_id, after, upper, page_size),
            )
            with gc_paused():
                events = _decode_rows(rows, self.filename)
            for event in events:
                yield event
            if len(rows) < page_size:
                return
            after = rows[-1][0]

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
