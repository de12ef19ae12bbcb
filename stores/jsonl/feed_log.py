"""``feed.log``: its header, its fixed-width records and tombstones, the intent
record of ``lock``, and reading the file as a whole."""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Final

import orjson

from ledger.errors import IntegrityError, StoreError
from stores.jsonl.files import _fsync_dir, _size, _write_all

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore

log = logging.getLogger("stores.jsonl")


_FEED_FORMAT: Final = "session-ledger/jsonl-feed"
_FEED_VERSION: Final = 1
_REC: Final = 80
"""Width of a ``feed.log`` line (its header included)."""
_FEED_HEADER: Final = (
    orjson.dumps({"ledger": _FEED_FORMAT, "version": _FEED_VERSION}).ljust(_REC - 1) + b"\n"
)
_RECORD: Final = re.compile(rb"([0-9]{15}) ([0-9a-f-]{36}) ([0-9]{14}) ([0-9]{11})\n")
_WIDTHS: Final = (15, 36, 14, 11)
"""Widths of a record's fields (as ``_RECORD`` has them), each followed by a space, the last
by the newline."""
_DIGITS: Final = b"0123456789"
_ID_BYTES: Final = b"0123456789abcdef-"
_INTENT: Final = re.compile(rb"([0-9a-f-]{36}) ([0-9]{14}) ([0-9]{15}) ([0-9]{9})\n")
_INTENT_BYTES: Final = 78
"""Length of the intent record at the start of ``lock``."""
_TOMBSTONE: Final = re.compile(rb"([0-9]{15}) ([0-9a-f-]{36}) purged {20}\n")
"""A ``feed.log`` record whose event was purged (its position stays taken)."""


def _record(pos: int, session_id: str, offset: int, length: int) -> bytes:
    return b"%015d %s %014d %011d\n" % (pos, session_id.encode(), offset, length)


def _record_fields(data: bytes) -> list[bytes] | None:
    """The fields of ``data``'s records (``bytes.split``: four a record) if each is as
    ``_RECORD`` has it (so none a tombstone); else None.

    As strict as a regular expression of the whole run, for a third of its cost: a
    separator where each field ends, so each field lies in its place, at its full width
    (no whitespace in it), and holds only digits, or an id's bytes.
    """
    count, rest = divmod(len(data), _REC)
    fields = data.split()
    if rest or len(fields) != 4 * count:
        return None
    end = 0
    for i, width in enumerate(_WIDTHS):
        end += width
        separator = b"\n" if i == len(_WIDTHS) - 1 else b" "
        joined = b"".join(fields[i::4])
        if (
            data[end::_REC] != separator * count
            or len(joined) != width * count
            or joined.translate(None, _ID_BYTES if i == 1 else _DIGITS)
        ):
            return None
        end += 1
    return fields


def _tombstone(pos: int, session_id: str) -> bytes:
    return b"%015d %s purged%s\n" % (pos, session_id.encode(), b" " * 20)


def _mark_tombstones(feed: bytes, matched: bytearray) -> None:
    """Mark the positions of ``feed`` whose records are tombstones as accounted for."""
    at = feed.find(b" purged ", _REC)
    while at >= 0:
        start = at - at % _REC
        if _TOMBSTONE.fullmatch(feed[start : start + _REC]):
            matched[start // _REC] = 1
        at = feed.find(b" purged ", start + _REC)


def feed_total(store: JSONLStore) -> int:
    """How many records ``feed.log`` holds: its header checked, a record cut short dropped."""
    size = os.fstat(store._feed_fd).st_size
    if size == 0:
        _write_all(store._feed_fd, _FEED_HEADER)
        os.fsync(store._feed_fd)
        _fsync_dir(store.directory)
        return 0
    head = os.pread(store._feed_fd, _REC, 0)
    if head != _FEED_HEADER:
        try:
            version = orjson.loads(head).get("version")
        except (orjson.JSONDecodeError, AttributeError):
            version = None
        if isinstance(version, int) and version > _FEED_VERSION:
            raise StoreError(
                f"{str(store._feed_path)!r} has format version {version}, newer than this "
                f"code knows ({_FEED_VERSION}): upgrade the session ledger to open it"
            )
        raise IntegrityError(
            f"Damaged line in {str(store._feed_path)!r}, line 1: not a {_FEED_FORMAT} "
            "header (delete the file to rebuild it from the session files)"
        )
    whole = size - size % _REC
    if whole != size:
        # A record cut short by a power loss: records are written after the
        # session file is synced, so its line is there; it is rebuilt.
        os.ftruncate(store._feed_fd, whole)
        log.warning("%s: a record cut short was dropped", store._feed_path)
    return whole // _REC - 1


def read_feed_file(store: JSONLStore) -> bytes:
    total = feed_total(store)
    return os.pread(store._feed_fd, (total + 1) * _REC, 0)


def named_in_feed(store: JSONLStore, feed: bytes, session_id: str, offset: int) -> bool:
    """Whether a record of ``feed`` names this session at ``offset`` or after."""
    needle = b" %s " % session_id.encode()
    at = feed.find(needle, _REC)
    while at >= 0:
        start = at - at % _REC
        rec = _RECORD.fullmatch(feed[start : start + _REC])
        if rec is not None and int(rec[3]) >= offset:
            return True
        at = feed.find(needle, start + _REC)
    return False


def feed_behind(store: JSONLStore) -> int:
    """How many feed records other writers added since this process last looked."""
    return max(0, _size(store._feed_fd) // _REC - 1 - store._n)
