"""Sessions' Merkle logs, read from a store and kept for proofs.

Reading a long session costs seconds; a proof from a log already read costs
microseconds. ``SessionLogs`` keeps each session's log with an index from
event id to leaf, and reads a session again only when its event count moved
(or an event is not where the cached log says it is).
"""

from __future__ import annotations

import bisect
import itertools
import sys
from array import array

from ledger.errors import EventNotFoundError
from ledger.merkle import HASH_SIZE, MerkleLog, leaf_hash
from ledger.verify import PAGE
from stores.base import EventStore

__all__ = ["SessionLog", "SessionLogs", "read_log"]


class SessionLog:
    """One session's Merkle log, with an index from event id to leaf.

    The first lookup scans the packed ids (milliseconds at a million events):
    a one-off proof needs no index. The second builds a sorted index, for the
    many lookups that usually follow.
    """

    __slots__ = ("_ids", "_index", "_lookups", "heads", "log", "session_id")

    def __init__(
        self, session_id: str, ids: bytes | bytearray, heads: dict[str, str] | None = None
    ) -> None:
        self.session_id = session_id
        self.heads = heads or {}
        """Each branch's newest event (its head), in the log's append order."""
        self.log = MerkleLog.from_leaves(ids)
        self._ids = bytes(ids)
        self._index: array[int] | None = None
        self._lookups = 0

    @property
    def size(self) -> int:
        return self.log.size

    def index_of(self, event_id: str, *, kept: bool = False) -> int | None:
        """The leaf index of an event, or None when it is not in this log.

        ``kept``: the log was read for an earlier call (the many proofs that follow an
        anchor, say): indexed at once, so that only one lookup pays for the index.
        """
        wanted = bytes.fromhex(event_id)
        if len(wanted) != HASH_SIZE:
            return None
        self._lookups += 1
        if self._index is None and (self._lookups > 1 or kept):
            self._index = _sorted_index(self._ids)
        if self._index is None:
            return self._scan(wanted)
        index = self._index
        low = _low_mask(self.size)
        key = _prefix(wanted) & ~low
        at = bisect.bisect_left(index, key)
        while at < len(index) and index[at] & ~low == key:  # equal prefixes: check the leaf
            leaf = index[at] & low
            if self._ids[leaf * HASH_SIZE : (leaf + 1) * HASH_SIZE] == wanted:
                return leaf
            at += 1
        return None

    def _scan(self, wanted: bytes) -> int | None:
        at = self._ids.find(wanted)
        while at >= 0 and at % HASH_SIZE:  # found across two ids: look on
            at = self._ids.find(wanted, at + 1)
        return None if at < 0 else at // HASH_SIZE

    def holds(self, index: int, event_id: str) -> bool:
        return self.log.leaf(index) == leaf_hash(bytes.fromhex(event_id))


def _prefix(event_id: bytes) -> int:
    """The first 8 bytes of an id as a number, as ``_sorted_index`` reads them."""
    return int.from_bytes(event_id[:8], sys.byteorder)


def _low_mask(size: int) -> int:
    """The low bits of an index entry that hold a leaf number (of a log of ``size``)."""
    return (1 << max(1, (size - 1).bit_length())) - 1


def _sorted_index(ids: bytes) -> array[int]:
    """Each leaf's number in the low bits of its id's prefix (see ``_low_mask``), sorted."""
    low = _low_mask(len(ids) // HASH_SIZE)
    high = ~low & 0xFFFF_FFFF_FFFF_FFFF
    prefixes = memoryview(ids).cast("Q")[:: HASH_SIZE // 8]  # every id's first 8 bytes
    return array("Q", sorted(map(int.__or__, map(high.__and__, prefixes), itertools.count())))


async def read_log(store: EventStore, session_id: str) -> SessionLog:
    """The session's log as the store holds it now (its events in append order)."""
    ids = bytearray()
    heads: dict[str, str] = {}
    async for page in store.event_pages(session_id, page_size=PAGE):
        hexes = [event.id for event in page]
        ids += bytes.fromhex("".join(hexes))
        heads.update(zip([event.branch for event in page], hexes, strict=True))
    return SessionLog(session_id, ids, heads)


class SessionLogs:
    """A cache of sessions' logs, each read again when its event count moved.

    A log costs about 110 bytes per event (ids, tree levels, index): ``capacity``
    sessions are kept, the least recently used dropped first.
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._logs: dict[str, SessionLog] = {}

    async def get(self, store: EventStore, session_id: str) -> SessionLog:
        count = (await store.session(session_id)).event_count
        cached = self._logs.pop(session_id, None)
        if cached is None or cached.size != count:
            cached = await read_log(store, session_id)
        self._logs[session_id] = cached  # most recently used last
        while len(self._logs) > self.capacity:
            del self._logs[next(iter(self._logs))]
        return cached

    async def locate(
        self, store: EventStore, session_id: str, event_id: str, *, size: int | None = None
    ) -> tuple[SessionLog, int]:
        """The session's log and the event's index in it (read again if the cache is stale).

        ``size``: any cached log of at least this many events will do (a proof at an
        anchor checks the anchor's root against it), without asking the store.
        """
        cached = self._logs.get(session_id)
        if size is not None and cached is not None and cached.size >= size:
            index = cached.index_of(event_id, kept=True)
            if index is not None:
                return cached, index
        log = await self.get(store, session_id)
        index = log.index_of(event_id, kept=log is cached)
        if index is None:
            log = await read_log(store, session_id)
            self._logs[session_id] = log
            index = log.index_of(event_id)
        if index is None:
            raise EventNotFoundError(event_id, session_id)
        return log, index

    def forget(self, session_id: str) -> None:
        self._logs.pop(session_id, None)
