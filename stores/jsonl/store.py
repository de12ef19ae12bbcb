"""``JSONLStore``: the store's surface, its state, opening and closing, the writers'
lock; the work is done by the package's modules (see the package docstring)."""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import fcntl
import logging
import mmap
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl

from ledger.errors import ConfigError, EventNotFoundError, IntegrityError, SessionNotFoundError
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
    anchors,
    appends,
    catch_up,
    erase,
    feed_reads,
    index,
    lines,
    reads,
    retention,
    saved_index,
    scan,
    snapshots,
)
from stores.jsonl.feed_log import _INTENT_BYTES
from stores.jsonl.files import _fsync_dir, _translate
from stores.jsonl.format import _get_parent, _Step, _step_parent
from stores.jsonl.index import _Session
from stores.jsonl.lines import SessionLines
from stores.jsonl.write import _SYNC_WINDOW

log = logging.getLogger("stores.jsonl")


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

    async def put_anchor(self, session_id: str, anchor: bytes) -> None:
        await anchors.put_anchor(self, session_id, anchor)

    async def anchors(self, session_id: str) -> list[bytes]:
        return await anchors.anchors(self, session_id)

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

    def events(self, session_id: str, *, page_size: int = 1000) -> AsyncIterator[Event]:
        return self.events_from(session_id, 0, page_size=page_size)

    async def event_pages(
        self, session_id: str, start: int = 0, *, page_size: int = 1000
    ) -> AsyncIterator[list[Event]]:
        await catch_up.refresh(self)
        session = self._sessions.get(session_id)
        if session is None:
            return
        # The session's events as of now: later appends are not chased.
        upper = len(session.ids)
        page_size = max(1, page_size)
        for first in range(start, upper, page_size):
            self._check_open()
            page = await reads.events_between(self, session, first, min(upper, first + page_size))
            if page:
                yield page

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
        return await feed_reads.read_feed(self, after, limit)

    async def wait_for_feed(self, after: int, max_wait: float) -> None:
        """Return when a position above ``after`` has committed, or after ``max_wait``.

        Appends of this process wake the waiter at once; those of other
        processes are seen by polling the size of ``feed.log``.
        """
        await feed_reads.wait_for_feed(self, after, max_wait)

    async def session_lines(self, session_id: str, start: int) -> SessionLines | None:
        """Where the session's events from the ``start``-th on are in its file, as of now:
        what ``read_session_lines`` reads in another process, which opens nothing but
        the file (opening the store there would read its whole index). None when the
        session has no event after the ``start``-th (``start`` at least 1)."""
        return await lines.session_lines(self, session_id, start)
