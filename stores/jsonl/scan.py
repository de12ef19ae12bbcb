"""Opening: scan every session file, check it against ``feed.log``, recover."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from ledger.errors import IntegrityError
from ledger.events import SessionCreated
from stores.jsonl import feed_log, index
from stores.jsonl.feed_log import _REC, _RECORD, _mark_tombstones, _record, _tombstone
from stores.jsonl.files import _fsync_dir, _lines, _write_all
from stores.jsonl.format import (
    _SESSION_ID,
    _SUFFIX,
    _check_header,
    _damaged,
    _event,
    _head,
    _json,
    _parse,
)
from stores.jsonl.index import _Pending, _Session
from stores.jsonl.purge_log import _purge_mark_decoder

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore

log = logging.getLogger("stores.jsonl")


def scan_all(store: JSONLStore) -> None:
    feed = feed_log.read_feed_file(store)
    total = len(feed) // _REC - 1
    matched = bytearray(total + 1)
    candidates: list[tuple[int, str, int, int]] = []
    names = sorted(os.listdir(store._sessions_dir))
    for name in names:
        session_id = name[: -len(_SUFFIX)]
        if not name.endswith(_SUFFIX) or not _SESSION_ID.fullmatch(session_id):
            continue  # torn tails moved aside, and anything a person left here
        scan_session(store, session_id, feed, total, matched, candidates)
    settle(store, feed, total, matched, candidates)


def settle(
    store: JSONLStore,
    feed: bytes,
    total: int,
    matched: bytearray,
    candidates: list[tuple[int, str, int, int]],
) -> None:
    """Check that every record of ``feed`` was matched, and write those of ``candidates``."""
    _mark_tombstones(feed, matched)
    missing = matched.find(0, 1)
    if missing > 0:
        rec = _RECORD.fullmatch(feed[missing * _REC : (missing + 1) * _REC])
        what = f"{rec[2].decode()}{_SUFFIX} at byte {int(rec[3])}" if rec else "a bad record"
        raise IntegrityError(
            f"Damaged line in {str(store._feed_path)!r}, line {missing + 1}: position "
            f"{missing} names {what}, which is missing, cut short or different"
        )
    candidates.sort()
    rebuilt = rebuilt_records(store, candidates, total)
    if rebuilt:
        # Synced lines whose records were lost (a crash or power loss
        # between the sync and the feed write): their records now.
        _write_all(store._feed_fd, b"".join(rebuilt))
        if store.fsync:
            os.fsync(store._feed_fd)
        log.info(
            "%s: %d feed record(s) rebuilt from the session files",
            store._feed_path,
            len(rebuilt),
        )
    store._n = total + len(rebuilt)


def scan_session(
    store: JSONLStore,
    session_id: str,
    feed: bytes,
    total: int,
    matched: bytearray,
    candidates: list[tuple[int, str, int, int]],
    session: _Session | None = None,
) -> None:
    """Index a session file's complete batches, check them against ``feed``, recover its tail.

    ``session``: its lines indexed so far (from the saved index): the scan
    goes on from where they end.
    """
    path = store._sessions_dir / (session_id + _SUFFIX)
    if session is None:
        session = _Session(session_id, store._sessions_dir)
    batch: list[_Pending] = []
    count = 0  # size of the batch being read
    last_pos = 0
    committed = session.size  # end of the last complete batch
    tail_line = len(session.ids) + 2 if session.ids else 1
    token = _json(session_id)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for lineno, (offset, line) in enumerate(_lines(fd, committed), tail_line):
            if not line.endswith(b"\n"):
                break  # cut short: the tail
            if lineno == 1:
                session.version = _check_header(line, path, session_id)
                continue
            parsed = _parse(line, path, lineno, session.version, token)
            if parsed.index != len(batch) + 1 or (batch and parsed.count != count):
                raise _damaged(path, lineno, f"batch [{parsed.index}, {parsed.count}] out of order")
            count = parsed.count
            if parsed.pos <= last_pos:
                raise _damaged(path, lineno, f"position {parsed.pos} after {last_pos}")
            last_pos = parsed.pos
            head = _head(parsed, path, lineno)
            if parsed.pos <= total and feed[parsed.pos * _REC : (parsed.pos + 1) * _REC] != _record(
                parsed.pos, session_id, offset, len(line)
            ):
                raise _damaged(
                    path,
                    lineno,
                    f"position {parsed.pos} does not match "
                    f"{str(store._feed_path)!r} line {parsed.pos + 1}",
                    head.id,
                )
            root: SessionCreated | None = None
            if not session.ids and not batch:
                body = _event(parsed, path, lineno).body
                if not isinstance(body, SessionCreated):
                    raise _damaged(
                        path, lineno, "a session's first event must be SessionCreated", head.id
                    )
                root = body
            end = offset + len(line)
            batch.append(_Pending(offset, end, parsed.pos, parsed.status, head, root))
            if parsed.index == parsed.count:
                for p in batch:
                    if p.pos <= total:
                        matched[p.pos] = 1
                    else:
                        candidates.append((p.pos, session_id, p.start, p.end - p.start))
                index.apply(store, session, batch, lineno - len(batch) + 1)
                committed = end
                tail_line = lineno + 1
                batch = []
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if committed < size:
        if feed_log.named_in_feed(store, feed, session_id, committed):
            raise _damaged(
                path,
                tail_line,
                f"an acknowledged event is missing or cut short "
                f"(named by {str(store._feed_path)!r})",
            )
        move_aside(store, path, committed, tail_line)
    if session.ids:
        store._sessions[session_id] = session


def move_aside(store: JSONLStore, path: Path, offset: int, lineno: int) -> None:
    """Move the bytes of ``path`` from ``offset`` to a ``.torn-<n>`` file beside it."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        tail = b"".join(line for _, line in _lines(fd, offset))
        n = 1
        while True:
            torn = path.with_name(f"{path.name}.torn-{n}")
            try:
                out = os.open(torn, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                n += 1
                continue
            break
        try:
            _write_all(out, tail)
            os.fsync(out)
        finally:
            os.close(out)
        _fsync_dir(path.parent)
        if offset == 0:
            os.unlink(path)
        else:
            os.ftruncate(fd, offset)
            os.fsync(fd)
    finally:
        os.close(fd)
    if offset == 0:
        _fsync_dir(path.parent)
    log.warning(
        "%s: %d byte(s) from line %d were never acknowledged (a write cut short by a "
        "crash); moved aside to %s",
        path,
        len(tail),
        lineno,
        torn,
    )
    store.recovered.append(torn)


def rebuilt_records(
    store: JSONLStore, candidates: list[tuple[int, str, int, int]], total: int
) -> list[bytes]:
    """The records to add after ``total`` for the unrecorded lines ``candidates``.

    Positions must follow on with no gap, except those of purged sessions
    (from ``purges.jsonl``), which get tombstones: after ``feed.log`` was
    deleted, every position a purge took is taken again, none handed out twice.
    """
    end = total + len(candidates)
    purged: dict[int, str] = {}
    gaps = bool(candidates) and candidates[-1][0] != end
    if gaps or (total == 0 and os.fstat(store._purges_fd).st_size):
        data = os.pread(store._purges_fd, os.fstat(store._purges_fd).st_size, 0)
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            try:
                mark = _purge_mark_decoder.decode(line)
            except msgspec.MsgspecError as exc:
                raise IntegrityError(
                    f"Damaged line in {str(store._purges_path)!r}: {exc}"
                ) from None
            for first, last in mark.positions:
                for p in range(max(first, total + 1), last + 1):
                    purged[p] = mark.record.session_id
    out: list[bytes] = []
    expected = total + 1
    for pos, session_id, offset, length in candidates:
        while expected < pos and expected in purged:
            out.append(_tombstone(expected, purged[expected]))
            expected += 1
        if pos != expected:
            raise IntegrityError(
                f"Damaged line in {str(store._sessions_dir / (session_id + _SUFFIX))!r}: "
                f"position {pos} is not in {str(store._feed_path)!r}, which ends at "
                f"{expected - 1}"
            )
        out.append(_record(pos, session_id, offset, length))
        expected += 1
    while expected in purged:
        out.append(_tombstone(expected, purged[expected]))
        expected += 1
    return out
