"""Retention: whole sessions deleted through a redo file, their positions kept."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from ledger.errors import IntegrityError
from stores.base import PurgePage, PurgeRecord, PurgeRequest, purge_page
from stores.jsonl import catch_up, purge_log, reads, snapshots
from stores.jsonl.feed_log import _REC, _tombstone
from stores.jsonl.files import _commit_file, _fsync_dir, _read_if_there, _translate, _write_all
from stores.jsonl.format import _LINE, _damaged
from stores.jsonl.index import _Session
from stores.jsonl.purge_log import _purge_line_decoder, _purge_mark_decoder, _PurgeLine

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore

log = logging.getLogger("stores.jsonl")


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


async def purge(store: JSONLStore, requests: Sequence[PurgeRequest]) -> list[PurgeRecord]:
    store._check_open()
    if not requests:
        return []
    async with store._write_lock:
        store._check_open()
        with _translate(store.directory):
            done = await asyncio.to_thread(purge_sync, store, list(requests))
    purge_log.close_stale_fds(store)
    return done


def purge_sync(store: JSONLStore, requests: list[PurgeRequest]) -> list[PurgeRecord]:
    with store._locked():
        finish_purge(store)
        catch_up.catch_up(store)
        catch_up.repair_intent(store)
        chosen: dict[str, tuple[PurgeRecord, _Session]] = {}
        for request in requests:
            record = request.record
            session = store._sessions.get(record.session_id)
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
                _PurgeLine(record=record, positions=_runs(positions(store, session)))
            )
            + b"\n"
            for record, session in chosen.values()
        )
        redo = msgspec.json.encode(
            _PurgeRedo(offset=os.fstat(store._purges_fd).st_size, lines=lines.decode())
        )
        _commit_file(store._purge_redo_path, redo, store.directory)  # committed
        finish_purge(store)
        purge_log.catch_up_purges(store)
        return [record for record, _ in chosen.values()]


def positions(store: JSONLStore, session: _Session) -> list[int]:
    """The feed positions of the session's indexed lines (read from its file)."""
    if not session.ids:
        return []
    data = reads.pread(store, session, 0, session.size, False)
    positions: list[int] = []
    for k in range(len(session.ids)):
        match = _LINE.match(data, session.starts[k])
        if match is None:
            raise _damaged(session.path, k + 2, "not an event line of this format")
        positions.append(int(match[1]))
    return positions


def finish_purge(store: JSONLStore) -> None:
    """Carry out ``purge.redo`` to the end, then remove it (holds the lock).

    Each step can be done again: the lines are written to ``purges.jsonl`` at
    the redo's offset unless they are there already, tombstones overwrite
    records, and files that are gone are not missed.
    """
    if not os.access(store._purge_redo_name, os.F_OK):
        return  # the common case, checked before every write: no exception to raise
    try:
        raw = store._purge_redo_path.read_bytes()
    except FileNotFoundError:
        return
    try:
        redo = msgspec.json.decode(raw, type=_PurgeRedo)
        lines = redo.lines.encode()
        marks = [_purge_mark_decoder.decode(line) for line in lines.splitlines()]
    except (msgspec.MsgspecError, UnicodeEncodeError) as exc:
        # renamed into place whole, after a sync: never half there
        raise IntegrityError(
            f"Damaged purge redo file {str(store._purge_redo_path)!r}: {exc}"
        ) from None
    fd = store._purges_fd
    if os.pread(fd, len(lines), redo.offset) != lines:
        os.ftruncate(fd, redo.offset)
        _write_all(fd, lines)
    os.fsync(fd)
    feed = os.open(store._feed_path, os.O_WRONLY | os.O_CLOEXEC)  # no O_APPEND: pwrite
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
    folders = [store._sessions_dir, store.directory / "anchors", store.directory / "snapshots"]
    for folder in folders:
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(folder):
                # the session file, torn tails moved aside, anchors, snapshots
                if name[:36] in gone and name[36:37] == ".":
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(folder / name)
            _fsync_dir(folder)
    os.unlink(store._purge_redo_path)
    _fsync_dir(store.directory)
    for mark in marks:
        snapshots.drop_snapshots(store, mark.record.session_id)
    log.info("%s: %d session(s) purged", store._purges_path, len(marks))


async def purges(
    store: JSONLStore, *, user_id: str | None = None, limit: int = 50, cursor: str | None = None
) -> PurgePage:
    store._check_open()
    with _translate(store._purges_path):
        data = await asyncio.to_thread(_read_if_there, store._purges_path)
    records: list[PurgeRecord] = []
    for n, line in enumerate(data[: data.rfind(b"\n") + 1].splitlines(), 1):
        try:
            record = _purge_line_decoder.decode(line).record
        except msgspec.MsgspecError as exc:
            raise IntegrityError(
                f"Damaged line in {str(store._purges_path)!r}, line {n}: {exc}"
            ) from None
        if user_id is None or record.user_id == user_id:
            records.append(record)
    return purge_page(records, limit, cursor)
