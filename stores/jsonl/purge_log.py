"""What purges left behind, as every process reads it: ``purges.jsonl`` lines,
the sessions to forget, the feed positions that stay taken."""

from __future__ import annotations

import bisect
import contextlib
import os
from typing import TYPE_CHECKING

import msgspec

from ledger.errors import IntegrityError
from stores.base import PurgeRecord
from stores.jsonl import index
from stores.jsonl.feed_log import _TOMBSTONE
from stores.jsonl.files import _size

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore


class _PurgeLine(msgspec.Struct, kw_only=True):
    """A line of ``purges.jsonl``: the record, and the feed positions its events held."""

    record: PurgeRecord
    positions: list[tuple[int, int]]
    """``[first, last]`` runs of positions, which stay taken (tombstones in ``feed.log``)."""


class _PurgedIds(msgspec.Struct):
    session_id: str


class _PurgeMark(msgspec.Struct):
    """What another process needs of a ``purges.jsonl`` line: whom to forget."""

    record: _PurgedIds
    positions: list[tuple[int, int]]


_purge_line_decoder = msgspec.json.Decoder(_PurgeLine)
_purge_mark_decoder = msgspec.json.Decoder(_PurgeMark)


def purged_since(store: JSONLStore, start: int, end: int) -> set[str]:
    """The sessions of the ``purges.jsonl`` lines between bytes ``start`` and ``end``."""
    data = os.pread(store._purges_fd, end - start, start)
    gone: set[str] = set()
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        try:
            gone.add(_purge_mark_decoder.decode(line).record.session_id)
        except msgspec.MsgspecError as exc:
            raise IntegrityError(
                f"Damaged line in {str(store._purges_path)!r} after byte {start}: {exc}"
            ) from None
    return gone


def purges_behind(store: JSONLStore) -> bool:
    return _size(store._purges_fd) > store._purges_seen


def catch_up_purges(store: JSONLStore) -> None:
    """Forget the sessions other purges removed since the last look (holds ``_sync``)."""
    size = _size(store._purges_fd)
    if size <= store._purges_seen:
        return
    data = os.pread(store._purges_fd, size - store._purges_seen, store._purges_seen)
    end = data.rfind(b"\n") + 1  # a line still being written is not there yet
    for line in data[:end].splitlines():
        try:
            mark = _purge_mark_decoder.decode(line)
        except msgspec.MsgspecError as exc:
            raise IntegrityError(
                f"Damaged line in {str(store._purges_path)!r} after byte "
                f"{store._purges_seen}: {exc}"
            ) from None
        for run in mark.positions:
            bisect.insort(store._purged, (run[0], run[1]))
        index.forget(store, mark.record.session_id)
    store._purges_seen += end


def close_stale_fds(store: JSONLStore) -> None:
    """Close the cached descriptors of purged sessions (the event loop's thread only)."""
    while store._stale:
        fd = store._fds.pop(store._stale.pop(), -1)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def gone(store: JSONLStore, pos: int, raw: bytes) -> bool:
    """Whether feed position ``pos`` (record ``raw``) belonged to a purged session."""
    if _TOMBSTONE.fullmatch(raw):
        return int(raw[:15]) == pos
    i = bisect.bisect_right(store._purged, (pos, 1 << 62)) - 1
    return i >= 0 and store._purged[i][0] <= pos <= store._purged[i][1]


def purged_meanwhile(store: JSONLStore, pos: int) -> bool:
    """A session file was missing: whether a purge took position ``pos`` meanwhile."""
    catch_up_purges(store)
    return gone(store, pos, b"")
