"""Sessions' Merkle logs, read from a store and kept for proofs.

Reading a long session costs seconds; a proof from a log already read costs
microseconds. ``SessionLogs`` keeps each session's log with an index from
event id to leaf, and reads a session again only when its event count moved
(or an event is not where the cached log says it is).
"""

from __future__ import annotations

import bisect
from array import array

from ledger.errors import EventNotFoundError
from ledger.merkle import HASH_SIZE, MerkleLog, leaf_hash
from stores.base import EventStore

__all__ = ["SessionLog", "SessionLogs", "read_log"]

_PREFIX = 8  # bytes of an id that sort the index; equal prefixes are told apart by the leaf


class SessionLog:
    """One session's Merkle log, with the ids of its leaves sorted for lookup."""

    __slots__ = ("_ids", "_keys", "_order", "heads", "log", "session_id")

    def __init__(
        self, session_id: str, ids: bytes | bytearray, heads: dict[str, str] | None = None
    ) -> None:
        self.session_id = session_id
        self.heads = heads or {}
        """Each branch's newest event (its head), in the log's append order."""
        self.log = MerkleLog.from_leaves(ids)
        self._ids = bytes(ids)
        self._keys: array[int] | None = None
        self._order: array[int] | None = None

    @property
    def size(self) -> int:
        return self.log.size

    def index_of(self, event_id: str) -> int | None:
        """The leaf index of an event, or None when it is not in this log."""
        if self._keys is None or self._order is None:
            self._build_index()
            assert self._keys is not None and self._order is not None
        wanted = bytes.fromhex(event_id)
        key = int.from_bytes(wanted[:_PREFIX])
        at = bisect.bisect_left(self._keys, key)
        while at < len(self._keys) and self._keys[at] == key:
            index = self._order[at]
            if self._ids[index * HASH_SIZE : (index + 1) * HASH_SIZE] == wanted:
                return index
            at += 1
        return None

    def _build_index(self) -> None:
        ids = self._ids
        prefixes = array(
            "Q", (int.from_bytes(ids[i : i + _PREFIX]) for i in range(0, len(ids), 32))
        )
        order = sorted(range(len(prefixes)), key=prefixes.__getitem__)
        self._order = array("Q", order)
        self._keys = array("Q", (prefixes[i] for i in order))

    def holds(self, index: int, event_id: str) -> bool:
        return self.log.leaf(index) == leaf_hash(bytes.fromhex(event_id))


async def read_log(store: EventStore, session_id: str) -> SessionLog:
    """The session's log as the store holds it now (its events in append order)."""
    ids = bytearray()
    heads: dict[str, str] = {}
    async for event in store.events(session_id):
        ids += bytes.fromhex(event.id)
        heads[event.branch] = event.id
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
            index = cached.index_of(event_id)
            if index is not None:
                return cached, index
        log = await self.get(store, session_id)
        index = log.index_of(event_id)
        if index is None:
            log = await read_log(store, session_id)
            self._logs[session_id] = log
            index = log.index_of(event_id)
        if index is None:
            raise EventNotFoundError(event_id, session_id)
        return log, index

    def forget(self, session_id: str) -> None:
        self._logs.pop(session_id, None)
