"""Catching up with other processes: the feed records they added, a dead
writer's intent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Final

from ledger.events import SessionCreated
from stores.jsonl import feed_log, index, purge_log, scan, snapshots
from stores.jsonl.feed_log import _INTENT, _REC, _RECORD, _record
from stores.jsonl.files import _fsync_dir, _lines, _translate, _write_all
from stores.jsonl.format import (
    _LINE,
    _SESSION_ID,
    _SUFFIX,
    FORMAT_VERSION,
    _check_header,
    _damaged,
    _event,
    _head,
    _json,
    _parse,
)
from stores.jsonl.index import _Pending, _Session

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore

log = logging.getLogger("stores.jsonl")


_INLINE_RECORDS: Final = 256


def catch_up(store: JSONLStore) -> None:
    """Index every complete batch that ``feed.log`` names beyond ``_n`` (holds ``_sync``)."""
    purge_log.catch_up_purges(store)
    behind = feed_log.feed_behind(store)
    if not behind:
        return
    data = os.pread(store._feed_fd, behind * _REC, (store._n + 1) * _REC)
    records: list[tuple[int, str, int, int]] = []
    for i in range(len(data) // _REC):
        pos = store._n + 1 + i
        raw = data[i * _REC : (i + 1) * _REC]
        if purge_log.gone(store, pos, raw):
            records.append((pos, "", 0, 0))  # purged: a gap
            continue
        rec = _RECORD.fullmatch(raw)
        if rec is None or int(rec[1]) != pos or not _SESSION_ID.fullmatch(rec[2].decode()):
            raise _damaged(store._feed_path, pos + 1, "not a feed record of this format")
        records.append((pos, rec[2].decode(), int(rec[3]), int(rec[4])))
    start = 0
    while start < len(records):
        # one run of consecutive records of one session: one read
        session_id = records[start][1]
        stop = start + 1
        while stop < len(records) and records[stop][1] == session_id:
            stop += 1
        if not session_id:
            store._n = records[stop - 1][0]
        elif not index_run(store, records[start:stop]):
            return
        start = stop


def index_run(store: JSONLStore, run: list[tuple[int, str, int, int]]) -> bool:
    """Index the complete batches of one run of records; False when one is incomplete."""
    session_id = run[0][1]
    session = store._sessions.get(session_id)
    path = store._sessions_dir / (session_id + _SUFFIX)
    first_off = run[0][2]
    data = b""
    version = session.version if session is not None else FORMAT_VERSION
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = run[-1][2] + run[-1][3] - first_off
            data = os.pread(fd, size, first_off)
            if session is None:
                header = os.pread(fd, first_off, 0)
                version = _check_header(header, path, session_id)
        finally:
            os.close(fd)
    if not data and purge_log.purged_meanwhile(store, run[0][0]):
        store._n = run[-1][0]
        return True
    if session is None:
        session = _Session(session_id, store._sessions_dir)
        session.version = version
    token = _json(session_id)
    base_lineno = len(session.ids) + 2
    batch: list[_Pending] = []
    for lineno, (pos, _, offset, length) in enumerate(run, base_lineno):
        line = data[offset - first_off : offset - first_off + length]
        if len(line) != length or not line.endswith(b"\n"):
            raise _damaged(
                path,
                lineno,
                f"missing or cut short, though {str(store._feed_path)!r} line {pos + 1} names it",
            )
        parsed = _parse(line, path, lineno, version, token)
        if parsed.pos != pos or parsed.index != len(batch) + 1:
            raise _damaged(path, lineno, f"does not match {str(store._feed_path)!r} line {pos + 1}")
        head = _head(parsed, path, lineno)
        root: SessionCreated | None = None
        if not session.ids and not batch:
            body = _event(parsed, path, lineno).body
            if not isinstance(body, SessionCreated):
                raise _damaged(
                    path, lineno, "a session's first event must be SessionCreated", head.id
                )
            root = body
        batch.append(_Pending(offset, offset + length, pos, parsed.status, head, root))
        if b'"kind":"Redacted"' in line:  # another process redacted: (maybe) stale
            snapshots.drop_snapshots(store, session_id)
        if parsed.index == parsed.count:
            index.apply(store, session, batch, lineno - len(batch) + 1)
            store._sessions.setdefault(session_id, session)
            store._n = pos
            batch = []
    return not batch


def repair_intent(store: JSONLStore) -> None:
    """Finish or undo the write of a writer that died holding the lock (holds the lock)."""
    assert store._intent is not None
    if store._intent[52:67] != b"%015d" % (store._n + 1):
        return  # done (the common case), stale or no intent: what the checks below find
    raw = store._intent[:]
    intent = _INTENT.fullmatch(raw)
    if intent is None:
        return
    session_id = intent[1].decode()
    offset, first, count = int(intent[2]), int(intent[3]), int(intent[4])
    if first != store._n + 1 or not _SESSION_ID.fullmatch(session_id):
        return  # done, or stale
    path = store._sessions_dir / (session_id + _SUFFIX)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    records: list[bytes] = []
    try:
        size = os.fstat(fd).st_size
        if size <= offset:
            return
        session = store._sessions.get(session_id)
        lineno = (len(session.ids) + 2) if session else 1
        complete = True
        for n, (at, line) in enumerate(_lines(fd, offset)):
            if not line.endswith(b"\n"):
                complete = False
                break
            if offset == 0 and n == 0:
                continue  # the header of a new file
            match = _LINE.match(line)
            index = len(records) + 1
            if (
                match is None
                or int(match[1]) != first + len(records)
                or int(match[2] or 1) != index
                or int(match[3] or 1) != count
                or index > count
            ):
                complete = False
                break
            records.append(_record(first + len(records), session_id, at, len(line)))
        if complete and len(records) == count and store.fsync:
            # the writer died after its write and before its feed records: sync it
            os.fsync(fd)
            if offset == 0:
                _fsync_dir(path.parent)
    finally:
        os.close(fd)
    if complete and len(records) == count:
        _write_all(store._feed_fd, b"".join(records))
        log.info("%s: a batch written by a process that died was kept", path)
        catch_up(store)
    else:
        scan.move_aside(store, path, offset, lineno)


async def refresh(store: JSONLStore) -> None:
    """Catch up with other processes' appends before a read: cheap when there are none."""
    store._check_open()
    if store._stale:
        purge_log.close_stale_fds(store)
    with _translate(store._feed_path):
        behind = feed_log.feed_behind(store)
        if not behind and not purge_log.purges_behind(store):
            return
    if behind <= _INLINE_RECORDS:
        if store._sync.acquire(blocking=False):
            try:
                with _translate(store.directory):
                    catch_up(store)
            finally:
                store._sync.release()
        # else: this process is appending, and catches up as it does
        return
    await asyncio.to_thread(catch_up_blocking, store)


def catch_up_blocking(store: JSONLStore) -> None:
    with store._sync, _translate(store.directory):
        catch_up(store)
