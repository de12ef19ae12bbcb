"""The saved index: what a scan would find, kept from the last close."""

from __future__ import annotations

import array
import os
from typing import TYPE_CHECKING, Final

import msgspec

from stores.base import OPEN_STATUSES
from stores.jsonl import catch_up, feed_log, purge_log, scan
from stores.jsonl.feed_log import _REC
from stores.jsonl.files import _clock_tick, _write_all
from stores.jsonl.format import _SESSION_ID, _SUFFIX
from stores.jsonl.index import _LINE_BITS, _Session

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore


_INDEX_FORMAT: Final = "session-ledger/jsonl-index"
_INDEX_VERSION: Final = 2
_INDEX_FROM: Final = 10_000
"""Events from which a store saves its index at close (fewer are scanned in ~50 ms)."""


class _SavedSession(msgspec.Struct, array_like=True):
    """A session in ``index``: its ``_Session``, and its file's stat when saved."""

    session_id: str
    stat: tuple[int, ...]  # (device, inode, size, mtime in ns), or () to scan it whole
    starts: bytes  # array("q").tobytes()
    ends: bytes
    ids: list[str]
    heads: dict[str, str]
    keys: dict[str, int]
    user_id: str
    agent: str
    status: str
    created_at: int
    last_at: int
    create_key: str | None
    version: int


class _SavedIndex(msgspec.Struct):
    """``index``: what the scan at open would find, as of feed position ``records``."""

    format: str
    version: int
    records: int
    last_record: bytes  # feed.log's record at ``records``: the same feed.log
    purges_seen: int
    sessions: list[_SavedSession]


_index_decoder = msgspec.msgpack.Decoder(_SavedIndex)


def load_index(store: JSONLStore) -> bool:
    """Open from ``index``: scan only what changed since it was saved. False: scan all.

    A session file is taken as saved when its device, inode, size and
    modification time are those saved (and that time was older than the
    save: a file changed later in the same clock tick would look the
    same); one that grew is scanned from its saved end; any other is
    scanned whole. Anything else (no index, another version, a feed that
    no longer holds the saved last record, a saved file gone or shorter)
    means a full scan, which names any damage.
    """
    try:
        saved = _index_decoder.decode(store._index_path.read_bytes())
    except (FileNotFoundError, msgspec.MsgspecError):
        return False
    if saved.format != _INDEX_FORMAT or saved.version != _INDEX_VERSION:
        return False
    total = feed_log.feed_total(store)
    records = saved.records
    if records > total or (
        records and os.pread(store._feed_fd, _REC, records * _REC) != saved.last_record
    ):
        return False
    purges_size = os.fstat(store._purges_fd).st_size
    if purges_size < saved.purges_seen:
        return False
    purged = purge_log.purged_since(store, saved.purges_seen, purges_size)
    files = {
        entry.name[: -len(_SUFFIX)]: entry.stat()
        for entry in os.scandir(store._sessions_dir)
        if entry.name.endswith(_SUFFIX) and _SESSION_ID.fullmatch(entry.name[: -len(_SUFFIX)])
    }
    taken: list[tuple[_SavedSession, bool]] = []  # and whether it grew
    for entry in saved.sessions:
        if entry.session_id in purged:
            continue
        st = files.pop(entry.session_id, None)
        size = len(entry.ends) and array.array("q", entry.ends[-8:])[0]
        if st is None or st.st_size < size:
            return False  # acknowledged lines gone: the full scan names them
        now = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if tuple(entry.stat) == now:
            taken.append((entry, st.st_size > size))
        elif entry.stat and tuple(entry.stat[:2]) == now[:2] and st.st_size > entry.stat[2]:
            if not ends_a_line(store, entry.session_id, size):
                return False
            taken.append((entry, True))  # appended to since: scanned from its saved end
        else:
            files[entry.session_id] = st  # rewritten, or saved while it changed: scanned whole
    for entry, _ in taken:
        restore(store, entry)
    store._purges_seen = saved.purges_seen
    purge_log.catch_up_purges(store)
    grown = [entry.session_id for entry, grew in taken if grew]
    if not grown and not files and total == records:
        store._n = total
        store._loaded = (total, store._purges_seen)
        return True
    feed = feed_log.read_feed_file(store)
    matched = bytearray(total + 1)
    matched[: records + 1] = b"\x01" * (records + 1)  # as the saved index found them
    candidates: list[tuple[int, str, int, int]] = []
    for session_id in grown:
        session = store._sessions[session_id]
        scan.scan_session(store, session_id, feed, total, matched, candidates, session)
    for session_id in sorted(files):
        scan.scan_session(store, session_id, feed, total, matched, candidates)
    scan.settle(store, feed, total, matched, candidates)
    return True


def ends_a_line(store: JSONLStore, session_id: str, size: int) -> bool:
    """Whether the session file's byte ``size - 1`` still ends a line."""
    fd = os.open(store._sessions_dir / (session_id + _SUFFIX), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, 1, size - 1) == b"\n"
    finally:
        os.close(fd)


def restore(store: JSONLStore, entry: _SavedSession) -> None:
    """Index a session as the saved index has it (holds the lock)."""
    session = _Session(entry.session_id, store._sessions_dir)
    session.starts = array.array("q", entry.starts)
    session.ends = array.array("q", entry.ends)
    session.ids = dict(enumerate(entry.ids))
    session.heads = entry.heads
    session.keys = entry.keys
    session.user_id, session.agent, session.status = entry.user_id, entry.agent, entry.status
    session.created_at, session.last_at = entry.created_at, entry.last_at
    session.create_key = entry.create_key
    session.version = entry.version
    session.number = len(store._numbered)
    store._numbered.append(session)
    where = session.number << _LINE_BITS
    store._by_id.update(zip(entry.ids, range(where, where + len(entry.ids)), strict=True))
    if entry.create_key is not None:
        store._created.setdefault((entry.user_id, entry.create_key), (session, 0))
    if entry.status in OPEN_STATUSES:
        store._open_count[entry.user_id] = store._open_count.get(entry.user_id, 0) + 1
    store._sessions[entry.session_id] = session


def save_index(store: JSONLStore) -> None:
    """Write ``index``: this process's index, and each session file as it is now.

    Derived data, never synced: a lost or damaged index means a full scan.
    Not written when a session file is missing (purged meanwhile, or
    removed by hand): the full scan at the next open sorts that out.
    """
    with store._sync:
        catch_up.catch_up(store)
        if len(store._by_id) < _INDEX_FROM:
            store._index_path.unlink(missing_ok=True)  # a scan is as quick
            return
        if store._loaded == (store._n, store._purges_seen):
            return  # as loaded: the saved index is still this one
        tmp = store._index_path.with_name(f"{store._index_path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        written = False
        try:
            fresh = _clock_tick(fd)
            entries: list[_SavedSession] = []
            for session in store._sessions.values():
                try:
                    st = os.stat(session.path)
                except FileNotFoundError:
                    return
                stat = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                entries.append(
                    _SavedSession(
                        session_id=session.session_id,
                        # a file changed in the tick of the save: never taken as saved
                        stat=stat if st.st_mtime_ns < fresh else (),
                        starts=session.starts.tobytes(),
                        ends=session.ends.tobytes(),
                        ids=list(session.ids.values()),
                        heads=session.heads,
                        keys=session.keys,
                        user_id=session.user_id,
                        agent=session.agent,
                        status=session.status,
                        created_at=session.created_at,
                        last_at=session.last_at,
                        create_key=session.create_key,
                        version=session.version,
                    )
                )
            last = os.pread(store._feed_fd, _REC, store._n * _REC) if store._n else b""
            saved = _SavedIndex(
                format=_INDEX_FORMAT,
                version=_INDEX_VERSION,
                records=store._n,
                last_record=last,
                purges_seen=store._purges_seen,
                sessions=entries,
            )
            _write_all(fd, msgspec.msgpack.encode(saved))
            written = True
        finally:
            os.close(fd)
            if not written:
                os.unlink(tmp)
        os.replace(tmp, store._index_path)
