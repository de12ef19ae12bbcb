"""The fold engine: the state of any projection at any event, cheaply.

A state is a pure function of the path to its event, so it can be cached by
event id forever. The engine keeps two layers of such states: an in-process LRU
and snapshots persisted by the store every ``snapshot_every`` events of depth.
To answer the state at an event it walks back at most ``snapshot_every``
ancestors to the nearest snapshot (or cached state), then folds forward.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from ledger.errors import EventNotFoundError
from ledger.events import Event
from projections.base import Projection

__all__ = ["FoldEngine", "SnapshotSource"]

S = TypeVar("S")


class SnapshotSource(Protocol):
    """What the engine needs from a store (every ``stores.base.EventStore`` has it)."""

    async def ancestors(self, event_id: str, limit: int | None = None) -> list[Event]: ...

    async def get_snapshot(self, session_id: str, key: str, event_id: str) -> bytes | None: ...

    async def put_snapshots(
        self, session_id: str, key: str, states: Sequence[tuple[str, bytes]]
    ) -> None: ...


class FoldEngine:
    def __init__(
        self, source: SnapshotSource, *, snapshot_every: int = 256, cache_size: int = 4096
    ) -> None:
        self.source = source
        self.snapshot_every = snapshot_every
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, str], Any] = OrderedDict()

    def remember(self, projection: Projection[S], session_id: str, event_id: str, state: S) -> None:
        """Cache a state computed elsewhere (the ledger folds each event it appends)."""
        key = (projection.key, session_id, event_id)
        self._cache[key] = state
        self._cache.move_to_end(key)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def cached(self, projection: Projection[S], session_id: str, event_id: str) -> S | None:
        # The session is part of the key so that a cached state never answers for
        # an event asked about under another session's id.
        state: S | None = self._cache.get((projection.key, session_id, event_id))
        return state

    def forget(self, session_id: str | None = None) -> None:
        """Drop the cached states of a session, or of all (after a redaction changed what
        a fold sees)."""
        if session_id is None:
            self._cache.clear()
            return
        for key in [key for key in self._cache if key[1] == session_id]:
            del self._cache[key]

    async def state_at(self, projection: Projection[S], session_id: str, event_id: str) -> S:
        """The projection's state right after ``event_id``, an event of ``session_id``.

        Raises ``EventNotFoundError`` when the event is unknown or of another session.
        """
        hit = self.cached(projection, session_id, event_id)
        if hit is not None:
            return hit
        every = self.snapshot_every
        pending: list[Event] = []
        base: S | None = None
        cursor: str | None = event_id
        while cursor is not None and base is None:
            try:
                chunk = await self.source.ancestors(cursor, limit=every)
            except EventNotFoundError:
                raise EventNotFoundError(event_id, session_id) from None
            if chunk[0].session != session_id:
                raise EventNotFoundError(event_id, session_id)
            for event in chunk:
                base = self.cached(projection, session_id, event.id)
                if base is None and event.seq % every == 0:
                    stored = await self.source.get_snapshot(session_id, projection.key, event.id)
                    base = None if stored is None else projection.decode(stored)
                if base is not None:
                    break
                pending.append(event)
            else:
                cursor = chunk[-1].parent
        state = projection.initial() if base is None else base
        snapshots: list[tuple[str, bytes]] = []
        apply = projection.apply
        for event in reversed(pending):
            state = apply(state, event)
            if event.seq % every == 0:
                snapshots.append((event.id, projection.encode(state)))
        if snapshots:
            await self.source.put_snapshots(session_id, projection.key, snapshots)
        self.remember(projection, session_id, event_id, state)
        return state
