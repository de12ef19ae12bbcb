"""Writing a batch: intent, session lines, sync, feed records, index."""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Final

from ledger.errors import SessionNotFoundError
from ledger.events import SessionCreated, encode_event
from stores.base import AppendRequest
from stores.jsonl import index, purge_log, scan
from stores.jsonl.feed_log import _record
from stores.jsonl.files import _fsync_dir, _write_all
from stores.jsonl.format import _SUFFIX, FORMAT_VERSION, _Head, _header_line, _parent_field
from stores.jsonl.index import _Pending, _Session

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore


_INLINE_SYNC_SECONDS: Final = 0.002
"""Appends run on the event loop unless most recent writes + fsyncs took longer than this."""
_SYNC_WINDOW: Final = 16
"""The recent writes + fsyncs that decide: a slow disk is slow in most of them, while a
busy machine's stall (tens of ms now and then) is one, and must not send the next
appends through a worker thread (the hop costs about as much as the rest of the append)."""
_MAX_FDS: Final = 64
"""Session files kept open (for appends and small reads) by the event loop's thread."""


def write_batch(
    store: JSONLStore,
    request: AppendRequest,
    session: _Session | None,
    payloads: list[bytes],
    cache: bool,
) -> None:
    """Intent, session lines, sync, feed records, index (holds the lock)."""
    session_id = request.session_id
    path = store._sessions_dir / (session_id + _SUFFIX) if session is None else session.path
    new = session is None
    offset = 0 if session is None else session.size
    count = len(payloads)
    first_pos = store._n + 1
    status = status_field(session, request.status)
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
    assert store._intent is not None
    store._intent[:] = b"%s %014d %015d %09d\n" % (session_id.encode(), offset, first_pos, count)
    started = time.perf_counter()
    if cache and store._stale:
        purge_log.close_stale_fds(store)
    fd = store._fds.pop(session_id, -1) if cache else -1
    try:
        if fd < 0:
            flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
            if new:
                with contextlib.suppress(FileNotFoundError):
                    # leftovers of a creation that died before its first record
                    scan.move_aside(store, path, 0, 1)
                flags |= os.O_CREAT | os.O_EXCL
            fd = os.open(path, flags, 0o600)
        stat = os.fstat(fd)
        if stat.st_nlink == 0:
            # unlinked under this index (a purge it has not seen): never write there
            raise SessionNotFoundError(session_id)
        if stat.st_size != offset:
            # a dead writer's tail (the file stays the same: it is cut back)
            scan.move_aside(store, path, offset, len(session.ids) + 2 if session else 1)
        try:
            _write_all(fd, b"".join(parts))
            if store.fsync:
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
        store._fds[session_id] = fd  # the most recently used last
        if len(store._fds) > _MAX_FDS:
            oldest = next(iter(store._fds))
            os.close(store._fds.pop(oldest))
    else:
        os.close(fd)
    if new and store.fsync:
        _fsync_dir(store._sessions_dir)
    slow = time.perf_counter() - started > _INLINE_SYNC_SECONDS
    store._slow_count += slow - store._slow_syncs[0]
    store._slow_syncs.append(slow)
    _write_all(store._feed_fd, b"".join(records))
    if session is None:
        session = _Session(session_id, store._sessions_dir)
    index.apply(store, session, pending, len(session.ids) + 2)
    store._sessions[session_id] = session
    store._n = first_pos + count - 1


def status_field(session: _Session | None, status: str | None) -> bytes:
    """The ``status`` field of a batch's last line: version 2 writes only a change."""
    if status is None:
        return b""
    if session is None or session.version != 1:
        current = session.status if session is not None else "active"
        if status == current:
            return b""
    return b',"status":"%s"' % status.encode()
