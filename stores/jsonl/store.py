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
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl

import msgspec
import orjson

from ledger.errors import (
    BranchExistsError,
    ConfigError,
    EventNotFoundError,
    IntegrityError,
    InvalidEventError,
    SessionCapacityError,
    SessionNotFoundError,
    StoreError,
)
from ledger.events import Event, SessionCreated, encode_event, gc_paused, validate_name
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
    check_erase,
    check_head,
    page_cursor,
    parse_cursor,
    purge_cursor,
    validate_request,
)
from stores.jsonl import catch_up, index, purge_log, saved_index, scan, snapshots
from stores.jsonl.feed_log import _INTENT_BYTES, _REC, _RECORD, _RECORDS, _record, _tombstone
from stores.jsonl.files import _fsync_dir, _read_if_there, _translate, _write_all
from stores.jsonl.format import (
    _LINE,
    _SESSION_ID,
    _STATUSES,
    _STEPS,
    _SUFFIX,
    FORMAT_VERSION,
    _damaged,
    _decode_page,
    _event,
    _get_parent,
    _Head,
    _header_line,
    _Item,
    _json,
    _parent_field,
    _parse,
    _Step,
    _step_parent,
    _stored,
)
from stores.jsonl.index import _bisect, _Pending, _Session
from stores.jsonl.purge_log import _purge_line_decoder, _purge_mark_decoder, _PurgeLine

log = logging.getLogger("stores.jsonl")


_INLINE_BYTES: Final = 1 << 20
"""Reads up to this size run on the event loop (about a millisecond: a hop to a
worker thread and back costs more than that); bigger ones in a worker thread."""


_PATH_WINDOW: Final = 4096
"""Lines ``ancestors`` reads at once, ending at the next event of the path."""


_INLINE_SYNC_SECONDS: Final = 0.002
"""Appends run on the event loop unless most recent writes + fsyncs took longer than this."""


_SYNC_WINDOW: Final = 16
"""The recent writes + fsyncs that decide: a slow disk is slow in most of them, while a
busy machine's stall (tens of ms now and then) is one, and must not send the next
appends through a worker thread (the hop costs about as much as the rest of the append)."""


_MAX_FDS: Final = 64
"""Session files kept open (for appends and small reads) by the event loop's thread."""


class _PurgeRedo(msgspec.Struct):
    """``purge.redo``: the batch's lines of ``purges.jsonl`` and where they go."""

    offset: int
    lines: str


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted positions as ``(first, last)`` runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for pos in sorted(positions):
        if runs and runs[-1][1] + 1 == pos:
            runs[-1] = (runs[-1][0], pos)
        else:
            runs.append((pos, pos))
    return runs


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
                    self._finish_purge()
                    with gc_paused():  # builds the whole index: see ledger.events.gc_paused
                        if not saved_index.load_index(self):
                            index.forget_all(self)
                            scan.scan_all(self)
                    self._order = sorted((s.last_at, s.session_id) for s in self._sessions.values())
                    self._ordered = True
                    self._purges_seen = os.fstat(self._purges_fd).st_size
                    self._finish_erase()
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
        self._check_open()
        validate_request(request)
        session_id = request.session_id
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise InvalidEventError(
                f"Invalid session id for the JSONL store: {session_id!r} "
                "(a lower-case uuid4 string)"
            )
        validate_name("branch", request.branch, session_id)
        if request.status is not None and request.status not in _STATUSES:
            raise InvalidEventError(
                f"Invalid status for session {session_id!r}: {request.status!r} "
                f"(one of {', '.join(sorted(_STATUSES))})"
            )
        # As a new file's lines hold them, each after its parent's line; the
        # writer redoes the first if its parent is not the file's last line.
        payloads = [_stored(e) for e in request.events]
        for payload in payloads:
            if b"\n" in payload:  # msgspec escapes control characters; be sure
                raise InvalidEventError(f"Event of session {session_id!r} encodes with a newline")
        inline, original = False, None
        if not self._write_lock.locked():
            # No append or close of this store is under way, and an inline append runs
            # to its end without awaiting: no task can come in between, so the lock
            # need not be taken (~5,000 instructions of an append's ~120,000).
            inline, original = self._try_inline(request, payloads)
        if not inline:
            async with self._write_lock:
                self._check_open()
                inline, original = self._try_inline(request, payloads)
                if not inline:
                    original = await asyncio.to_thread(self._append_sync, request, payloads)
        if original is not None:
            return AppendResult([original], replayed=True)
        if self._appended is not None:
            self._appended.set()
            self._appended = None
        return AppendResult(list(request.events))

    def _try_inline(
        self, request: AppendRequest, payloads: list[bytes]
    ) -> tuple[bool, Event | None]:
        """Append on the event loop's thread when it pays and the writers' lock is free at
        once: whether it did, and the original event of a replay."""
        if (
            self._slow_count > _SYNC_WINDOW // 2
            or sum(map(len, payloads)) > _INLINE_BYTES
            or request.erase
        ):
            return False, None
        with _translate(self.directory, request.session_id):
            if not self._try_lock():
                return False, None
            try:
                return True, self._append_locked(request, payloads, cache=True)
            finally:
                self._unlock()

    def _append_sync(self, request: AppendRequest, payloads: list[bytes]) -> Event | None:
        with _translate(self.directory, request.session_id), self._locked():
            return self._append_locked(request, payloads, cache=False)

    def _append_locked(
        self, request: AppendRequest, payloads: list[bytes], *, cache: bool
    ) -> Event | None:
        """Check and write the batch (holds the lock); the original event of a replay.

        ``cache``: running on the event loop's thread, which alone may use
        (and change) the cache of open session files.
        """
        session_id = request.session_id
        self._finish_purge()
        catch_up.catch_up(self)
        catch_up.repair_intent(self)
        first = request.events[0]
        created = first.body if isinstance(first.body, SessionCreated) else None
        session = self._sessions.get(session_id)
        key = first.idempotency_key
        if key is not None:
            found = (
                self._created.get((created.user_id, key))
                if created is not None
                else (session, session.keys[key])
                if session is not None and key in session.keys
                else None
            )
            if found is not None:
                return self._read_event(*found)
        if created is not None:
            limit = request.max_open_sessions
            if limit is not None and self._open_count.get(created.user_id, 0) >= limit:
                raise SessionCapacityError(f"user {created.user_id!r}", "open sessions", limit)
        elif session is None:
            raise SessionNotFoundError(session_id)
        check_head(request, session.heads.get(request.branch) if session else None)
        if created is not None and session is not None:
            raise BranchExistsError(session_id, request.branch, None)
        if (
            session is not None
            and request.expected_head is None
            and request.max_branches is not None
            and len(session.heads) >= request.max_branches
        ):
            raise SessionCapacityError(f"session {session_id!r}", "branches", request.max_branches)
        if request.erase:
            assert session is not None
            self._erase_locked(request, session, payloads, cache)
            return None
        self._write(request, session, payloads, cache)
        return None

    def _erase_locked(
        self, request: AppendRequest, session: _Session, payloads: list[bytes], cache: bool
    ) -> None:
        """Append the batch and overwrite the erased events' lines (holds the lock).

        Each new line is padded with spaces to the old one's length, so every
        offset (``feed.log``, every process's index) stays right and no file is
        replaced under another process's open descriptor. The new lines go
        first to ``redact.redo`` (synced), then the batch is appended (its
        commit point), then the lines are written in place and synced, then the
        redo file is removed. A crash in between is finished at the next open
        or redaction: the redo is applied if the batch committed, dropped if not.
        """
        self._finish_erase()
        lines: list[tuple[int, bytes]] = []
        for erased in request.erase:
            found = index.find(self, erased.id)
            stored = self._read_event(*found) if found is not None else None
            check_erase(request, stored, erased)
            assert found is not None
            lines.append(self._erased_line(found[0], found[1], erased))
        redo = orjson.dumps(
            {
                "session": session.session_id,
                "batch": request.events[-1].id,
                "lines": [[offset, line.decode()] for offset, line in lines],
            }
        )
        tmp = self._redo_path.with_name(self._redo_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, redo)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._redo_path)
        _fsync_dir(self.directory)
        self._write(request, session, payloads, cache)
        self._finish_erase()

    def _erased_line(self, session: _Session, k: int, erased: Event) -> tuple[int, bytes]:
        """Line ``k``'s offset and its redacted form, padded to the old line's length."""
        start, end = session.starts[k], session.ends[k]
        old = self._pread(session, start, end - start, False)
        lineno = k + 2
        match = _LINE.match(old)
        if match is None:
            raise _damaged(session.path, lineno, "not an event line of this format", erased.id)
        line = old[: match.end()] + (encode_event if session.version == 1 else _stored)(erased)
        pad = len(old) - len(line) - 2
        if pad < 0:  # an Erased body and no salt are always shorter; be sure
            raise StoreError(f"Redacted line is longer than {erased.id!r} in {str(session.path)!r}")
        return start, line + b" " * pad + b"}\n"

    def _finish_erase(self) -> None:
        """Apply ``redact.redo`` if its batch committed, then remove it (holds the lock)."""
        try:
            redo = orjson.loads(self._redo_path.read_bytes())
        except FileNotFoundError:
            return
        except orjson.JSONDecodeError:
            redo = None  # written whole before its rename: never half there
        session = self._sessions.get(redo["session"]) if isinstance(redo, dict) else None
        if session is not None and redo["batch"] in self._by_id:
            fd = os.open(session.path, os.O_WRONLY | os.O_CLOEXEC)  # no O_APPEND: pwrite
            try:
                for offset, line in redo["lines"]:
                    data = line.encode()
                    k = _bisect(session.starts, offset)
                    if k < 0 or session.ends[k] - offset != len(data):
                        raise IntegrityError(
                            f"{str(self._redo_path)!r} names no line at byte {offset} "
                            f"of {str(session.path)!r}"
                        )
                    os.pwrite(fd, data, offset)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            snapshots.drop_snapshots(self, session.session_id)
        os.unlink(self._redo_path)

    def _write(
        self,
        request: AppendRequest,
        session: _Session | None,
        payloads: list[bytes],
        cache: bool,
    ) -> None:
        """Intent, session lines, sync, feed records, index (holds the lock)."""
        session_id = request.session_id
        path = self._sessions_dir / (session_id + _SUFFIX) if session is None else session.path
        new = session is None
        offset = 0 if session is None else session.size
        count = len(payloads)
        first_pos = self._n + 1
        status = self._status_field(session, request.status)
        version = FORMAT_VERSION if session is None else session.version
        if version == 1:
            payloads = [encode_event(e) for e in request.events]
            parent = b""
        else:
            last = session.ids[len(session.ids) - 1] if session is not None else None
            parent = _parent_field(request.events[0], last)  # the others follow their parent
        batched = count > 1 or version == 1  # version 2 leaves out a batch of one
        parts: list[bytes] = [_header_line(session_id)] if new else []
        records: list[bytes] = []
        pending: list[_Pending] = []
        at = offset + (len(parts[0]) if new else 0)
        for i, (event, payload) in enumerate(zip(request.events, payloads, strict=True), 1):
            line = b'{"pos":%d%s%s%s,"event":%s}\n' % (
                first_pos + i - 1,
                b',"batch":[%d,%d]' % (i, count) if batched else b"",
                status if i == count else b"",
                parent if i == 1 else b"",
                payload,
            )
            parts.append(line)
            records.append(_record(first_pos + i - 1, session_id, at, len(line)))
            root = event.body if i == 1 and isinstance(event.body, SessionCreated) else None
            head = _Head(
                event.id, event.session, event.branch, event.at, event.seq, event.idempotency_key
            )
            pending.append(_Pending(at, at + len(line), first_pos + i - 1, None, head, root))
            at += len(line)
        pending[-1].status = request.status
        assert self._intent is not None
        self._intent[:] = b"%s %014d %015d %09d\n" % (session_id.encode(), offset, first_pos, count)
        started = time.perf_counter()
        if cache and self._stale:
            purge_log.close_stale_fds(self)
        fd = self._fds.pop(session_id, -1) if cache else -1
        try:
            if fd < 0:
                flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
                if new:
                    with contextlib.suppress(FileNotFoundError):
                        # leftovers of a creation that died before its first record
                        scan.move_aside(self, path, 0, 1)
                    flags |= os.O_CREAT | os.O_EXCL
                fd = os.open(path, flags, 0o600)
            stat = os.fstat(fd)
            if stat.st_nlink == 0:
                # unlinked under this index (a purge it has not seen): never write there
                raise SessionNotFoundError(session_id)
            if stat.st_size != offset:
                # a dead writer's tail (the file stays the same: it is cut back)
                scan.move_aside(self, path, offset, len(session.ids) + 2 if session else 1)
            try:
                _write_all(fd, b"".join(parts))
                if self.fsync:
                    os.fsync(fd)
            except BaseException:
                # Never leave a partial batch behind a refused write.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, offset)
                    if new:
                        os.unlink(path)
                raise
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        if cache:
            self._fds[session_id] = fd  # the most recently used last
            if len(self._fds) > _MAX_FDS:
                oldest = next(iter(self._fds))
                os.close(self._fds.pop(oldest))
        else:
            os.close(fd)
        if new and self.fsync:
            _fsync_dir(self._sessions_dir)
        slow = time.perf_counter() - started > _INLINE_SYNC_SECONDS
        self._slow_count += slow - self._slow_syncs[0]
        self._slow_syncs.append(slow)
        _write_all(self._feed_fd, b"".join(records))
        if session is None:
            session = _Session(session_id, self._sessions_dir)
        index.apply(self, session, pending, len(session.ids) + 2)
        self._sessions[session_id] = session
        self._n = first_pos + count - 1

    @staticmethod
    def _status_field(session: _Session | None, status: str | None) -> bytes:
        """The ``status`` field of a batch's last line: version 2 writes only a change."""
        if status is None:
            return b""
        if session is None or session.version != 1:
            current = session.status if session is not None else "active"
            if status == current:
                return b""
        return b',"status":"%s"' % status.encode()

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
        self._check_open()
        if not requests:
            return []
        async with self._write_lock:
            self._check_open()
            with _translate(self.directory):
                done = await asyncio.to_thread(self._purge_sync, list(requests))
        purge_log.close_stale_fds(self)
        return done

    def _purge_sync(self, requests: list[PurgeRequest]) -> list[PurgeRecord]:
        with self._locked():
            self._finish_purge()
            catch_up.catch_up(self)
            catch_up.repair_intent(self)
            chosen: dict[str, tuple[PurgeRecord, _Session]] = {}
            for request in requests:
                record = request.record
                session = self._sessions.get(record.session_id)
                if session is None or (len(session.ids), session.last_at) != (
                    record.event_count,
                    record.last_activity_at,
                ):
                    continue  # gone, or written to since it was planned: kept
                chosen.setdefault(record.session_id, (record, session))
            if not chosen:
                return []
            lines = b"".join(
                msgspec.json.encode(
                    _PurgeLine(record=record, positions=_runs(self._positions(session)))
                )
                + b"\n"
                for record, session in chosen.values()
            )
            redo = msgspec.json.encode(
                _PurgeRedo(offset=os.fstat(self._purges_fd).st_size, lines=lines.decode())
            )
            tmp = self._purge_redo_path.with_name(self._purge_redo_path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, redo)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._purge_redo_path)
            _fsync_dir(self.directory)  # committed
            self._finish_purge()
            purge_log.catch_up_purges(self)
            return [record for record, _ in chosen.values()]

    def _positions(self, session: _Session) -> list[int]:
        """The feed positions of the session's indexed lines (read from its file)."""
        if not session.ids:
            return []
        data = self._pread(session, 0, session.size, False)
        positions: list[int] = []
        for k in range(len(session.ids)):
            match = _LINE.match(data, session.starts[k])
            if match is None:
                raise _damaged(session.path, k + 2, "not an event line of this format")
            positions.append(int(match[1]))
        return positions

    def _finish_purge(self) -> None:
        """Carry out ``purge.redo`` to the end, then remove it (holds the lock).

        Each step can be done again: the lines are written to ``purges.jsonl`` at
        the redo's offset unless they are there already, tombstones overwrite
        records, and files that are gone are not missed.
        """
        if not os.access(self._purge_redo_name, os.F_OK):
            return  # the common case, checked before every write: no exception to raise
        try:
            raw = self._purge_redo_path.read_bytes()
        except FileNotFoundError:
            return
        try:
            redo = msgspec.json.decode(raw, type=_PurgeRedo)
            lines = redo.lines.encode()
            marks = [_purge_mark_decoder.decode(line) for line in lines.splitlines()]
        except (msgspec.MsgspecError, UnicodeEncodeError) as exc:
            # renamed into place whole, after a sync: never half there
            raise IntegrityError(
                f"Damaged purge redo file {str(self._purge_redo_path)!r}: {exc}"
            ) from None
        fd = self._purges_fd
        if os.pread(fd, len(lines), redo.offset) != lines:
            os.ftruncate(fd, redo.offset)
            _write_all(fd, lines)
        os.fsync(fd)
        feed = os.open(self._feed_path, os.O_WRONLY | os.O_CLOEXEC)  # no O_APPEND: pwrite
        try:
            records = os.fstat(feed).st_size // _REC - 1
            for mark in marks:
                for first, last in mark.positions:
                    last = min(last, records)  # beyond: rebuilt at open from purges.jsonl
                    if first <= last:
                        tombs = b"".join(
                            _tombstone(p, mark.record.session_id) for p in range(first, last + 1)
                        )
                        os.pwrite(feed, tombs, first * _REC)
            os.fsync(feed)
        finally:
            os.close(feed)
        gone = {mark.record.session_id for mark in marks}
        folders = [self._sessions_dir, self.directory / "anchors", self.directory / "snapshots"]
        for folder in folders:
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(folder):
                    # the session file, torn tails moved aside, anchors, snapshots
                    if name[:36] in gone and name[36:37] == ".":
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(folder / name)
                _fsync_dir(folder)
        os.unlink(self._purge_redo_path)
        _fsync_dir(self.directory)
        for mark in marks:
            snapshots.drop_snapshots(self, mark.record.session_id)
        log.info("%s: %d session(s) purged", self._purges_path, len(marks))

    async def purges(
        self, *, user_id: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> PurgePage:
        self._check_open()
        with _translate(self._purges_path):
            data = await asyncio.to_thread(_read_if_there, self._purges_path)
        records: list[PurgeRecord] = []
        for n, line in enumerate(data[: data.rfind(b"\n") + 1].splitlines(), 1):
            try:
                record = _purge_line_decoder.decode(line).record
            except msgspec.MsgspecError as exc:
                raise IntegrityError(
                    f"Damaged line in {str(self._purges_path)!r}, line {n}: {exc}"
                ) from None
            if user_id is None or record.user_id == user_id:
                records.append(record)
        records.sort(key=lambda r: (r.purged_at, r.session_id), reverse=True)
        if cursor is not None:
            after = parse_cursor(cursor)
            records = [r for r in records if (r.purged_at, r.session_id) < after]
        page = records[: max(0, limit)]
        more = len(records) > len(page)
        return PurgePage(page, purge_cursor(page[-1]) if more and page else None)

    def _pread(self, session: _Session, start: int, size: int, cache: bool) -> bytes:
        """``size`` bytes of the session file from ``start``; ``cache``: on the loop's thread."""
        fd = self._fds.get(session.session_id, -1) if cache else -1
        if fd >= 0:
            return os.pread(fd, size, start)
        try:
            fd = os.open(session.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SessionNotFoundError(session.session_id) from None  # purged meanwhile
        try:
            return os.pread(fd, size, start)
        finally:
            os.close(fd)

    def _read_event(self, session: _Session, k: int) -> Event:
        """Line ``k`` of ``session``, checked against the index."""
        start = session.starts[k]
        return self._decode(session, k, self._pread(session, start, session.ends[k] - start, False))

    def _decode(self, session: _Session, k: int, line: bytes) -> Event:
        lineno = k + 2
        if len(line) != session.ends[k] - session.starts[k]:
            raise _damaged(session.path, lineno, "cut short", session.ids[k])
        parsed = _parse(line, session.path, lineno, session.version, _json(session.session_id))
        event = _event(parsed, session.path, lineno, session.ids[k - 1] if k else None)
        if event.id != session.ids[k] or event.session != session.session_id:
            raise _damaged(
                session.path,
                lineno,
                f"holds event {event.id!r} of session {event.session!r}, not {session.ids[k]!r}",
                session.ids[k],
            )
        return event

    def _read_range(
        self, session: _Session, first: int, stop: int, cache: bool = False
    ) -> list[Event]:
        """Lines ``first`` to ``stop - 1`` of ``session``, with one read."""
        starts, ends = session.starts, session.ends
        base = starts[first]
        data = self._pread(session, base, ends[stop - 1] - base, cache)
        events = _decode_page(data, session, first, stop)
        if events is not None:
            return events
        # Something is wrong: line by line, to name the line.
        return [
            self._decode(session, k, data[starts[k] - base : ends[k] - base])
            for k in range(first, stop)
        ]

    def _read_steps(
        self, session: _Session, first: int, stop: int, cache: bool = False
    ) -> list[_Step]:
        """``(id, seq, parent)`` of lines ``first`` to ``stop - 1`` of ``session``, with
        one read: the id from the index, seq and parent from the start of the line,
        nothing decoded or checked (``ancestors`` checks what a fold reads)."""
        starts, ends, ids = session.starts, session.ends, session.ids
        base = starts[first]
        data = self._pread(session, base, ends[stop - 1] - base, cache)
        match = _STEPS[session.version].match
        steps: list[_Step] = []
        for k in range(first, stop):
            found = match(data, starts[k] - base)
            if found is None:  # not as this code writes lines: decode it, or name the damage
                event = self._decode(session, k, data[starts[k] - base : ends[k] - base])
                steps.append((event.id, event.seq, event.parent))
                continue
            if found[1] is None:  # left out (version 2): the event of the line before
                parent = ids[k - 1] if k else None
            else:
                parent = found[2].decode() if found[2] else None
            steps.append((ids[k], int(found[3]), parent))
        return steps

    async def _lines_between(
        self,
        session: _Session,
        first: int,
        stop: int,
        read: Callable[[_Session, int, int, bool], list[_Item]],
    ) -> list[_Item]:
        """``read`` of lines ``first`` to ``stop - 1``: on the event loop when small."""
        if stop <= first:
            return []
        with _translate(session.path, session.session_id):
            if session.ends[stop - 1] - session.starts[first] <= _INLINE_BYTES:
                return read(session, first, stop, True)
            return await asyncio.to_thread(read, session, first, stop, False)

    async def _events_between(self, session: _Session, first: int, stop: int) -> list[Event]:
        return await self._lines_between(session, first, stop, self._read_range)

    async def get(self, event_id: str) -> Event:
        await catch_up.refresh(self)
        found = index.find(self, event_id)
        if found is None:
            raise EventNotFoundError(event_id)
        return (await self._events_between(found[0], found[1], found[1] + 1))[0]

    async def find_by_key(self, session_id: str, key: str) -> Event | None:
        await catch_up.refresh(self)
        session = self._sessions.get(session_id)
        if session is None or key not in session.keys:
            return None
        k = session.keys[key]
        return (await self._events_between(session, k, k + 1))[0]

    async def find_created(self, user_id: str, key: str) -> Event | None:
        await catch_up.refresh(self)
        found = self._created.get((user_id, key))
        if found is None:
            return None
        return (await self._events_between(found[0], found[1], found[1] + 1))[0]

    async def ancestors(self, event_id: str, limit: int | None = None) -> list[Event]:
        return await self._path(event_id, limit, self._read_range, _get_parent)

    async def path_index(self, event_id: str, limit: int) -> list[_Step]:
        """``(id, seq, parent)`` of up to ``limit`` events of the path from ``event_id``
        back, newest first, read from the lines' starts: no event is decoded or checked.

        For the fold engine's walk back to a snapshot (``projections.engine.PathIndex``),
        which reads the events it folds through ``ancestors``, with every check.
        """
        with gc_paused():
            return await self._path(event_id, limit, self._read_steps, _step_parent)

    async def _path(
        self,
        event_id: str,
        limit: int | None,
        read: Callable[[_Session, int, int, bool], list[_Item]],
        parent_of: Callable[[_Item], str | None],
    ) -> list[_Item]:
        """``read``'s item for each event of the path from ``event_id`` back, newest
        first: ``limit`` of them, or all to the root."""
        await catch_up.refresh(self)
        if limit is not None and limit <= 0:
            return []
        found = index.find(self, event_id)
        if found is None:
            raise EventNotFoundError(event_id)
        session, k = found
        # A path is mostly a run of consecutive lines (a branch's events follow
        # one another): read windows of lines ending at the next event wanted,
        # and follow the parents through the index. Line numbers fall strictly
        # along the walk, so a damaged parent link cannot make it loop.
        ids = session.ids
        out: list[_Item] = []
        while True:
            want = _PATH_WINDOW if limit is None else min(limit - len(out), _PATH_WINDOW)
            first = max(0, k - want + 1)
            lines = await self._lines_between(session, first, k + 1, read)
            parents = list(map(parent_of, lines))
            if parents[1:] == list(map(ids.__getitem__, range(first, k))):
                # The whole window is one chain (the usual case): taken at once.
                out.extend(reversed(lines[1:]))
                k = first
            while True:
                out.append(lines[k - first])
                if len(out) == limit:
                    return out
                parent = self._parent_line(session, k, parents[k - first])
                if parent is None:
                    return out
                k = parent
                if k < first:
                    break

    def _parent_line(self, session: _Session, k: int, parent_id: str | None) -> int | None:
        """The line of ``parent_id``, the parent of line ``k``: None at the root;
        IntegrityError when it is not an earlier line of the session."""
        if parent_id is None:
            return None
        if k and session.ids[k - 1] == parent_id:  # the usual: the line before
            return k - 1
        found = index.find(self, parent_id)
        if found is None or found[0] is not session or found[1] >= k:
            child = session.ids[k]
            raise IntegrityError(
                f"Parent of event {child!r} is missing from {str(session.path)!r}: {parent_id!r}",
                child,
            )
        return found[1]

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
            for event in await self._events_between(session, first, min(upper, first + page_size)):
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
                    events = self._read_range(session, first, stop_k, True)
            else:
                events = await self._events_between(session, first, stop_k)
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
