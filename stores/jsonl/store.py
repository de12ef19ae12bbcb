"""``JSONLStore``: the store's surface, its state, opening and closing, the writers'
lock; the work is done by the package's modules (see the package docstring)."""

from __future__ import annotations

import array
import asyncio
import bisect
import collections
import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl

import msgspec

from ledger.errors import (
    ConfigError,
    EventNotFoundError,
    IntegrityError,
    InvalidEventError,
    SessionNotFoundError,
)
from ledger.events import Event, gc_paused
from stores.base import (
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
    page_cursor,
    parse_cursor,
)
from stores.jsonl import (
    appends,
    catch_up,
    erase,
    index,
    purge_log,
    reads,
    retention,
    saved_index,
    scan,
    snapshots,
)
from stores.jsonl.feed_log import _INTENT_BYTES, _REC, _RECORD, _RECORDS
from stores.jsonl.files import _fsync_dir, _read_if_there, _translate
from stores.jsonl.format import (
    _SESSION_ID,
    _SUFFIX,
    _damaged,
    _decode_page,
    _get_parent,
    _Step,
    _step_parent,
)
from stores.jsonl.index import _bisect, _Session
from stores.jsonl.reads import _INLINE_BYTES
from stores.jsonl.write import _SYNC_WINDOW

log = logging.getLogger("stores.jsonl")


class SessionLines(msgspec.Struct, frozen=True, kw_only=True):
    """A run of a session file's lines as the index holds them (``session_lines``): the
    line before the run (the parent of a version 2 line that leaves its own out), then
    the run. ``starts`` and ``ends`` are ``array("q")`` bytes, one per line."""

    path: str
    version: int
    session: str
    first: int
    """The index of the line before the run in the file (line 0: its first event)."""
    starts: bytes
    ends: bytes
    ids: list[str]


def read_session_lines(lines: SessionLines, page_size: int) -> Iterator[list[Event]]:
    """The events of the run of ``lines`` (all but its first line), ``page_size`` at a
    time, each line checked against the index as the store's own reads check it.

    Raises:
        IntegrityError: a page that does not read as the index says (the store's
            own read names the line).
    """
    session = _Session(lines.session, Path(lines.path).parent)
    session._path = Path(lines.path)
    session.version = lines.version
    session.starts.frombytes(lines.starts)
    session.ends.frombytes(lines.ends)
    session.ids = dict(enumerate(lines.ids))
    count = len(session.ids)
    if len(session.starts) != count or len(session.ends) != count:
        raise IntegrityError(
            f"Not a run of lines of {lines.path!r}: {count} ids, {len(session.starts)} lines"
        )
    fd = os.open(lines.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for first in range(1, count, max(1, page_size)):
            stop = min(count, first + page_size)
            base = session.starts[first]
            data = os.pread(fd, session.ends[stop - 1] - base, base)
            events = _decode_page(data, session, first, stop)
            if events is None:
                raise _first_damaged(lines, session, data, first, stop)
            yield events
    finally:
        os.close(fd)


def _first_damaged(
    lines: SessionLines, session: _Session, data: bytes, first: int, stop: int
) -> IntegrityError:
    """The error naming the first line of a page (``data``) that does not read as the index says."""
    base = session.starts[first]
    for k in range(first, stop):
        line = data[session.starts[k] - base : session.ends[k] - base]
        if _decode_page(line, session, k, k + 1) is None:
            break
    lineno = lines.first + k + 2  # the file's header is line 1
    return _damaged(lines.path, lineno, "not the event the index names there", session.ids[k])


_BOOLS: Final = {
    "1": True,
    "true": True,
    "on": True,
    "yes": True,
    "0": False,
    "false": False,
    "off": False,
    "no": False,
}


def _parse_url(url: str) -> tuple[Path, dict[str, str]]:
    prefix = "jsonl:///"
    if not url.startswith(prefix):
        raise ConfigError(
            f"Invalid JSONL URL: {url!r} (expected jsonl:///relative/dir or jsonl:////absolute/dir)"
        )
    rest, _, query = url[len(prefix) :].partition("?")
    if not rest:
        raise ConfigError(f"Invalid JSONL URL: {url!r} (needs a directory)")
    return Path(rest), dict(parse_qsl(query, keep_blank_values=True))


def _parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    flag = _BOOLS.get(str(value).strip().lower())
    if flag is None:
        raise ConfigError(f"Invalid JSONL {name} setting: {value!r} (expected on or off)")
    return flag


class JSONLStore(PurgeStore):
    """Plain files: one append-only JSON-lines file per session, many processes.

    Args:
        directory: Where the files live; created (mode 0700) when missing.
        fsync: ``True`` (default): an append returns once its bytes are on
            disk, so it survives a power loss. ``False``: it survives a process
            crash, not a power loss or OS crash. See the package docstring.

    Attributes:
        recovered: The files that recovery moved aside (a torn tail each), in
            the order it did so; each is also logged on ``stores.jsonl``.

    Example::

        async with JSONLStore.from_url("jsonl:///var/lib/ledger") as store:
            await store.append(request)
    """

    def __init__(
        self, directory: str | Path, *, fsync: bool = True, url: str | None = None
    ) -> None:
        self.directory = Path(directory).expanduser().absolute()
        self.url = url or f"jsonl:///{self.directory}"
        self.fsync = _parse_bool("fsync", fsync)
        self.recovered: list[Path] = []
        self._sessions_dir = self.directory / "sessions"
        self._feed_path = self.directory / "feed.log"
        self._lock_path = self.directory / "lock"
        self._redo_path = self.directory / "redact.redo"
        self._purges_path = self.directory / "purges.jsonl"
        self._purge_redo_path = self.directory / "purge.redo"
        self._purge_redo_name = str(self._purge_redo_path)  # checked before every write
        self._purges_fd = -1
        self._purges_seen = 0  # bytes of purges.jsonl this process has read
        self._index_path = self.directory / "index"
        # (feed records, purges.jsonl bytes) read when the saved index was loaded
        # with nothing to scan: while they stay so, there is nothing new to save
        self._loaded: tuple[int, int] | None = None
        # (first, last) feed positions of the sessions purged since this process
        # opened the store (older ones are tombstones in feed.log), sorted
        self._purged: list[tuple[int, int]] = []
        # purged sessions whose cached descriptor the event loop's thread must close
        self._stale: set[str] = set()
        self._lock_fd = -1
        # ``lock``'s intent record, mapped: written and read with no system call,
        # and a write seldom dirties the inode (only when the page was clean), so
        # the journal commit of an append's fsync rarely carries it
        self._intent: mmap.mmap | None = None
        self._feed_fd = -1
        self._n = 0  # feed records this process has read and indexed
        self._sessions: dict[str, _Session] = {}
        # event id -> where: the session's number (in ``_numbered``) << 40 | its line
        # index; plain ints, so that the garbage collector has nothing per event to scan
        self._by_id: dict[str, int] = {}
        self._numbered: list[_Session] = []
        self._created: dict[tuple[str, str], tuple[_Session, int]] = {}
        self._open_count: dict[str, int] = {}
        # (last activity, session id) of every session, sorted: the listing's
        # order, kept as sessions change (built once after the scan at open)
        self._order: list[tuple[int, str]] = []
        self._ordered = False
        self._snapshots_dir = self.directory / "snapshots"
        # Held while the index changes (and while catching up with other
        # processes); the event loop only ever tries it without blocking.
        self._sync = threading.Lock()
        self._write_lock = asyncio.Lock()
        self._appended: asyncio.Event | None = None  # made by a feed waiter, set by an append
        # Session files kept open, by session id, least recently used first;
        # used and changed on the event loop's thread only (never by a worker).
        self._fds: dict[str, int] = {}
        # whether each of the last _SYNC_WINDOW appends' write + fsync was slow, and how many
        self._slow_syncs: collections.deque[bool] = collections.deque(
            [False] * _SYNC_WINDOW, maxlen=_SYNC_WINDOW
        )
        self._slow_count = 0

    @classmethod
    def from_url(cls, url: str, *, fsync: bool | str | None = None) -> JSONLStore:
        """``jsonl:///relative/dir`` (from the working directory) or ``jsonl:////abs/dir``.

        ``fsync`` may also be given in the query string (``?fsync=off``); the keyword wins.
        """
        directory, query = _parse_url(url)
        unknown = set(query) - {"fsync"}
        if unknown:
            raise ConfigError(f"Unknown JSONL URL option(s) in {url!r}: {sorted(unknown)}")
        flag = _parse_bool("fsync", query.get("fsync", "on") if fsync is None else fsync)
        return cls(directory, fsync=flag, url=url)

    async def _open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    async def _close(self) -> None:
        async with self._write_lock:
            if self._lock_fd >= 0:
                try:
                    await asyncio.to_thread(saved_index.save_index, self)
                except (OSError, IntegrityError) as exc:
                    # Derived data: the next open scans the files instead.
                    log.warning("%s: the index was not saved: %s", self._index_path, exc)
            fds, self._fds = self._fds, {}
            self._unmap_intent()
            for fd in (*fds.values(), self._feed_fd, self._lock_fd, self._purges_fd):
                if fd >= 0:
                    with _translate(self.directory):
                        os.close(fd)
            self._feed_fd = self._lock_fd = self._purges_fd = -1

    def _open_sync(self) -> None:
        try:
            with _translate(self.directory):
                for folder in (self.directory, self._sessions_dir):
                    if not folder.is_dir():
                        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                        folder.chmod(0o700)
                        _fsync_dir(folder.parent)
                self._lock_fd = os.open(
                    self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
                self._feed_fd = os.open(
                    self._feed_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
                self._purges_fd = os.open(
                    self._purges_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
                with self._locked():
                    if os.fstat(self._lock_fd).st_size < _INTENT_BYTES:
                        os.ftruncate(self._lock_fd, _INTENT_BYTES)
                    self._intent = mmap.mmap(self._lock_fd, _INTENT_BYTES)
                    retention.finish_purge(self)
                    with gc_paused():  # builds the whole index: see ledger.events.gc_paused
                        if not saved_index.load_index(self):
                            index.forget_all(self)
                            scan.scan_all(self)
                    self._order = sorted((s.last_at, s.session_id) for s in self._sessions.values())
                    self._ordered = True
                    self._purges_seen = os.fstat(self._purges_fd).st_size
                    erase.finish_erase(self)
        except BaseException:
            self._unmap_intent()
            for fd in (self._feed_fd, self._lock_fd, self._purges_fd):
                if fd >= 0:
                    os.close(fd)
            self._feed_fd = self._lock_fd = self._purges_fd = -1
            raise

    def _unmap_intent(self) -> None:
        if self._intent is not None:
            self._intent.close()
            self._intent = None

    def _try_lock(self) -> bool:
        """Take the writers' lock if it is free at once (a ``_locked`` without waiting)."""
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not self._sync.acquire(blocking=False):
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            return False
        return True

    def _unlock(self) -> None:
        self._sync.release()
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The writers' lock: across processes (flock), then within this one."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            with self._sync:
                yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def append(self, request: AppendRequest) -> AppendResult:
        return await appends.append(self, request)

    async def put_snapshots(
        self, session_id: str, key: str, states: Sequence[tuple[str, bytes]]
    ) -> None:
        """Append the states to the session's snapshot file (one write, not synced).

        Snapshots are derived data: a lost or torn line costs a longer fold later.
        """
        await snapshots.put_snapshots(self, session_id, key, states)

    def _anchors_path(self, session_id: str) -> Path:
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise InvalidEventError(
                f"Invalid session id for the JSONL store: {session_id!r} "
                "(a lower-case uuid4 string)"
            )
        return self.directory / "anchors" / (session_id + _SUFFIX)

    async def put_anchor(self, session_id: str, anchor: bytes) -> None:
        self._check_open()
        path = self._anchors_path(session_id)
        line = bytes(anchor)
        if b"\n" in line:
            raise InvalidEventError(f"Anchor of session {session_id!r} encodes with a newline")
        async with self._write_lock:
            self._check_open()
            with _translate(path, session_id):
                await asyncio.to_thread(self._put_anchor_sync, path, line + b"\n")

    def _put_anchor_sync(self, path: Path, line: bytes) -> None:
        with self._locked():
            folder = path.parent
            if not folder.is_dir():
                folder.mkdir(mode=0o700, exist_ok=True)
                if self.fsync:
                    _fsync_dir(folder.parent)
            new = not path.exists()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size:  # cut off a line a killed writer left without its newline
                    tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
                    if not tail.endswith(b"\n"):
                        cut = tail.rfind(b"\n")
                        if cut < 0 and size > len(tail):
                            raise IntegrityError(f"Damaged anchor file: {str(path)!r}")
                        size = size - len(tail) + cut + 1
                        os.ftruncate(fd, size)
                view = memoryview(line)
                while view:
                    written = os.pwrite(fd, view, size)
                    view, size = view[written:], size + written
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if new and self.fsync:
                _fsync_dir(folder)

    async def anchors(self, session_id: str) -> list[bytes]:
        self._check_open()
        path = self._anchors_path(session_id)
        with _translate(path, session_id):
            data = await asyncio.to_thread(_read_if_there, path)
        lines = data.split(b"\n")
        return lines[:-1]  # the last piece is empty, or a write still in flight

    async def idle_sessions(
        self,
        before: int,
        *,
        user_id: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[SessionRow]:
        await catch_up.refresh(self)
        start = parse_cursor(after) if after is not None else (-(2**63), "")
        order, sessions = self._order, self._sessions
        i = bisect.bisect_right(order, start)
        rows: list[SessionRow] = []
        # oldest activity first, after the cursor
        while i < len(order) and order[i][0] < before and len(rows) < limit:
            s = sessions[order[i][1]]
            if user_id is None or s.user_id == user_id:
                rows.append(s.row())
            i += 1
        return rows

    async def purge(self, requests: Sequence[PurgeRequest]) -> list[PurgeRecord]:
        """Delete the sessions still as planned, with their anchors and snapshots.

        Under the writers' lock: the sessions whose event count and last activity
        still match their records are chosen; their ``purges.jsonl`` lines go to
        ``purge.redo`` (synced, then renamed into place: the batch's commit point);
        then ``retention.finish_purge`` appends them to ``purges.jsonl``, turns the events'
        ``feed.log`` records into tombstones and removes the files. A crash after
        the rename is finished by the next writer or open; before it, nothing
        happened.
        """
        return await retention.purge(self, requests)

    async def purges(
        self, *, user_id: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> PurgePage:
        return await retention.purges(self, user_id=user_id, limit=limit, cursor=cursor)

    async def get(self, event_id: str) -> Event:
        await catch_up.refresh(self)
        found = index.find(self, event_id)
        if found is None:
            raise EventNotFoundError(event_id)
        return (await reads.events_between(self, found[0], found[1], found[1] + 1))[0]

    async def find_by_key(self, session_id: str, key: str) -> Event | None:
        await catch_up.refresh(self)
        session = self._sessions.get(session_id)
        if session is None or key not in session.keys:
            return None
        k = session.keys[key]
        return (await reads.events_between(self, session, k, k + 1))[0]

    async def find_created(self, user_id: str, key: str) -> Event | None:
        await catch_up.refresh(self)
        found = self._created.get((user_id, key))
        if found is None:
            return None
        return (await reads.events_between(self, found[0], found[1], found[1] + 1))[0]

    async def ancestors(self, event_id: str, limit: int | None = None) -> list[Event]:
        return await reads.path(self, event_id, limit, reads.read_range, _get_parent)

    async def path_index(self, event_id: str, limit: int) -> list[_Step]:
        """``(id, seq, parent)`` of up to ``limit`` events of the path from ``event_id``
        back, newest first, read from the lines' starts: no event is decoded or checked.

        For the fold engine's walk back to a snapshot (``projections.engine.PathIndex``),
        which reads the events it folds through ``ancestors``, with every check.
        """
        with gc_paused():
            return await reads.path(self, event_id, limit, reads.read_steps, _step_parent)

    async def events(self, session_id: str, *, page_size: int = 1000) -> AsyncIterator[Event]:
        await catch_up.refresh(self)
        session = self._sessions.get(session_id)
        if session is None:
            return
        # The session's events as of now: later appends are not chased.
        upper = len(session.ids)
        page_size = max(1, page_size)
        for first in range(0, upper, page_size):
            self._check_open()
            for event in await reads.events_between(
                self, session, first, min(upper, first + page_size)
            ):
                yield event

    async def heads(self, session_id: str) -> dict[str, str]:
        await catch_up.refresh(self)
        session = self._sessions.get(session_id)
        return dict(session.heads) if session is not None else {}

    async def session(self, session_id: str) -> SessionRow:
        await catch_up.refresh(self)
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFoundError(session_id)
        return session.row()

    async def sessions(self, query: SessionQuery) -> SessionPage:
        await catch_up.refresh(self)
        order, sessions = self._order, self._sessions
        i = len(order)
        if query.cursor is not None:
            i = bisect.bisect_left(order, parse_cursor(query.cursor))
        limit = max(0, query.limit)
        rows: list[SessionRow] = []
        # newest first from the cursor, until a page and one more are found
        while i > 0 and len(rows) <= limit:
            i -= 1
            s = sessions[order[i][1]]
            if (
                (query.user_id is None or s.user_id == query.user_id)
                and (query.agent is None or s.agent == query.agent)
                and (query.status is None or s.status == query.status)
            ):
                rows.append(s.row())
        page = rows[:limit]
        more = len(rows) > limit
        return SessionPage(page, page_cursor(page[-1]) if more and page else None)

    async def get_snapshot(self, session_id: str, key: str, event_id: str) -> bytes | None:
        return await snapshots.get_snapshot(self, session_id, key, event_id)

    async def read_feed(self, after: int = 0, limit: int = 1000) -> list[FeedItem]:
        await catch_up.refresh(self)
        items: list[FeedItem] = []
        position = max(after, 0)
        # Purged sessions leave gaps: read on past them until ``limit`` items.
        while len(items) < limit and position < self._n:
            stop = min(self._n, position + limit - len(items))
            for attempt in range(3):
                try:
                    items.extend(await self._feed_between(position, stop))
                    break
                except SessionNotFoundError:
                    # A session file went between the record's read and the line's: a
                    # purge, which tombstoned the records first; read them again.
                    if attempt == 2:
                        raise
            position = stop
        return items

    async def _feed_between(self, after: int, stop: int) -> list[FeedItem]:
        """The events at positions ``after + 1`` to ``stop``, less the purged ones."""
        with _translate(self._feed_path):
            data = os.pread(self._feed_fd, (stop - after) * _REC, (after + 1) * _REC)
        runs = self._feed_runs(after, data)
        if runs is None:
            runs = self._feed_runs_checked(after, data)
        items: list[FeedItem] = []
        for session, first, positions in runs:
            stop_k = first + len(positions)
            if session.ends[stop_k - 1] - session.starts[first] <= _INLINE_BYTES:
                with _translate(session.path, session.session_id):
                    events = reads.read_range(self, session, first, stop_k, True)
            else:
                events = await reads.events_between(self, session, first, stop_k)
            items.extend(map(FeedItem, positions, events))
        return items

    def _feed_runs(self, after: int, data: bytes) -> list[tuple[_Session, int, range]] | None:
        """``data``'s records as runs of consecutive lines of one session, or None.

        The fast path, for records that are all well formed, at their
        positions, and name indexed lines: anything else (a tombstone, a purged
        session, damage) returns None, and ``_feed_runs_checked`` takes it.
        """
        if not _RECORDS.fullmatch(data):
            return None
        fields = data.split()
        count = len(fields) // 4
        if list(map(int, fields[0::4])) != list(range(after + 1, after + 1 + count)):
            return None
        offsets = fields[2::4]
        runs: list[tuple[_Session, int, range]] = []
        i = 0
        for raw_id, same in itertools.groupby(fields[1::4]):
            n = len(list(same))
            session = self._sessions.get(raw_id.decode())
            if session is None:
                return None
            starts = session.starts
            first = bisect.bisect_left(starts, int(offsets[i]))
            # every record names the next line of the session
            if starts[first : first + n] != array.array("q", map(int, offsets[i : i + n])):
                return None
            runs.append((session, first, range(after + 1 + i, after + 1 + i + n)))
            i += n
        return runs

    def _feed_runs_checked(self, after: int, data: bytes) -> list[tuple[_Session, int, range]]:
        """``_feed_runs`` record by record: skips purged positions, names a damaged record."""
        runs: list[tuple[_Session, int, range]] = []
        for i in range(len(data) // _REC):
            pos = after + 1 + i
            raw = data[i * _REC : (i + 1) * _REC]
            rec = _RECORD.fullmatch(raw)
            session = self._sessions.get(rec[2].decode()) if rec else None
            k = -1
            if rec is not None and session is not None and int(rec[1]) == pos:
                k = _bisect(session.starts, int(rec[3]))
            if session is None or k < 0:
                if purge_log.gone(self, pos, raw):
                    continue
                raise _damaged(self._feed_path, pos + 1, "does not match the session files")
            if runs:
                last, first, positions = runs[-1]
                if last is session and first + len(positions) == k and positions[-1] + 1 == pos:
                    runs[-1] = (session, first, range(positions[0], pos + 1))
                    continue
            runs.append((session, k, range(pos, pos + 1)))
        return runs

    async def wait_for_feed(self, after: int, max_wait: float) -> None:
        """Return when a position above ``after`` has committed, or after ``max_wait``.

        Appends of this process wake the waiter at once; those of other
        processes are seen by polling the size of ``feed.log``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, max_wait)
        while True:
            appended = self._appended
            if appended is None:
                appended = self._appended = asyncio.Event()
            await catch_up.refresh(self)
            remaining = deadline - loop.time()
            if self._n > after or remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(appended.wait(), min(remaining, self.poll_interval))

    async def session_lines(self, session_id: str, start: int) -> SessionLines | None:
        """Where the session's events from the ``start``-th on are in its file, as of now:
        what ``read_session_lines`` reads in another process, which opens nothing but
        the file (opening the store there would read its whole index). None when the
        session has no event after the ``start``-th (``start`` at least 1)."""
        await catch_up.refresh(self)
        session = self._sessions.get(session_id)
        upper = len(session.ids) if session is not None else 0
        if session is None or not 1 <= start < upper:
            return None
        ids = session.ids
        return SessionLines(
            path=str(session.path),
            version=session.version,
            session=session_id,
            first=start - 1,
            starts=session.starts[start - 1 : upper].tobytes(),
            ends=session.ends[start - 1 : upper].tobytes(),
            ids=[ids[k] for k in range(start - 1, upper)],
        )
