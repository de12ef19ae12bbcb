"""The fold engine: the state of any projection at any event, cheaply.

A state is a pure function of the path to its event, and an event's id commits
to that whole path, so a state can be cached by event id forever. The engine
keeps two layers of such states: an in-process LRU, and snapshots the store
persists at every event whose depth is a non-zero multiple of ``snapshot_every``.
To answer the state at an event it walks back at most ``snapshot_every``
ancestors to the nearest snapshot (or cached state), then folds forward.

Snapshots are written when a state at such a depth is computed: by the ledger
as it appends (``persist``), and by any read that had to fold past one.

A stored snapshot is sealed: ``digest(32 bytes) || encoded state``, the digest
being blake3 (keyed with the ledger's key when it has one) over the session,
the projection's key, the event id and the state. A snapshot that is cut short,
does not match its seal (damage, tampering, another key) or does not decode is
never used: the engine names it (logger ``projections.engine`` and
``FoldEngine.damaged``), folds from the events instead, which are the truth,
and writes the snapshot again. Reads therefore never depend on a snapshot
being right, only faster when it is.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import blake3
import msgspec

from ledger.errors import EventNotFoundError, IntegrityError
from ledger.events import Event, canonical, gc_paused
from projections.base import Projection

__all__ = ["FoldEngine", "PathIndex", "SnapshotSource", "open_snapshot", "seal_snapshot"]

S = TypeVar("S")

logger = logging.getLogger(__name__)

_SEAL_FORMAT: Final = "ledger-snapshot/1"
_DIGEST_SIZE: Final = 32


_HELD_EVENTS: Final = 16384
"""The most events of a path a fold keeps decoded while it walks back to its base."""

_INDEX_STEP: Final = 16384
"""Ids read at once by a walk back through a store's ``PathIndex``."""

_Chunk = tuple[str, int, list[Event] | None]
"""A run of a path's events: the newest one's id, how many, and the events unless dropped."""


@runtime_checkable
class PathIndex(Protocol):
    """What a store may add to make a long walk back cheap: a path read by its ids.

    ``path_index`` gives ``(id, seq, parent)`` of up to ``limit`` events of the
    path from ``event_id`` back, newest first, fewer at the root or where a
    parent is missing, without decoding or checking them: the engine folds only
    events it then reads through ``ancestors``, which checks them all.
    """

    async def path_index(self, event_id: str, limit: int) -> list[tuple[str, int, str | None]]: ...


class SnapshotSource(Protocol):
    """What the engine needs from a store (every ``stores.base.EventStore`` has it)."""

    async def ancestors(self, event_id: str, limit: int | None = None) -> list[Event]: ...

    async def get_snapshot(self, session_id: str, key: str, event_id: str) -> bytes | None: ...

    async def put_snapshots(
        self, session_id: str, key: str, states: Sequence[tuple[str, bytes]]
    ) -> None: ...


def _digest(session_id: str, key: str, event_id: str, state: bytes, mac_key: bytes | None) -> bytes:
    header = canonical([_SEAL_FORMAT, session_id, key, event_id])
    hasher = blake3.blake3(key=mac_key) if mac_key else blake3.blake3()
    hasher.update(header)
    hasher.update(state)
    return hasher.digest()


def seal_snapshot(
    session_id: str, key: str, event_id: str, state: bytes, mac_key: bytes | None = None
) -> bytes:
    """The stored form of an encoded state: its seal, then the state."""
    return _digest(session_id, key, event_id, state, mac_key) + state


def open_snapshot(
    session_id: str, key: str, event_id: str, stored: bytes, mac_key: bytes | None = None
) -> bytes | None:
    """The encoded state of a stored snapshot, or None when it does not match its seal."""
    if len(stored) <= _DIGEST_SIZE:
        return None
    state = stored[_DIGEST_SIZE:]
    if stored[:_DIGEST_SIZE] != _digest(session_id, key, event_id, state, mac_key):
        return None
    return state


class FoldEngine:
    """Answers ``state_at`` from the LRU, the nearest snapshot on the path, and a fold.

    A fold keeps at most ``held_events`` of the path's events decoded while it walks
    back to its base; the older ones it reads again as it folds forward.

    Args:
        source: The store.
        snapshot_every: Snapshot interval, in events of depth.
        cache_size: States kept in the in-process LRU.
        key: The ledger's key: snapshots are sealed with a keyed MAC instead of a digest.
    """

    def __init__(
        self,
        source: SnapshotSource,
        *,
        snapshot_every: int = 256,
        cache_size: int = 4096,
        key: bytes | None = None,
    ) -> None:
        self.source = source
        self.snapshot_every = snapshot_every
        self.cache_size = cache_size
        self._key = key
        self.held_events = _HELD_EVENTS
        self._cache: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self.damaged: list[tuple[str, str, str]] = []
        """(session, projection key, event id) of each damaged snapshot met and rebuilt."""

    def remember(self, projection: Projection[S], session_id: str, event_id: str, state: S) -> None:
        """Cache a state computed elsewhere (the ledger folds each event it appends)."""
        key, cache = (projection.key, session_id, event_id), self._cache
        if key in cache:  # a new key (an append's) goes in last: nothing to move
            cache.move_to_end(key)
        cache[key] = state
        if len(cache) > self.cache_size:
            cache.popitem(last=False)

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

    def due(self, event: Event) -> bool:
        """Whether the state right after ``event`` is one the store keeps.

        Not the root's: it folds from one event, and a create then costs one write.
        """
        return event.seq > 0 and event.seq % self.snapshot_every == 0

    async def persist(
        self, projection: Projection[S], session_id: str, states: Sequence[tuple[Event, S]]
    ) -> None:
        """Store the snapshots due among freshly computed ``(event, state after it)`` pairs."""
        rows = [
            (event.id, self._seal(projection, session_id, event.id, state))
            for event, state in states
            if self.due(event)
        ]
        if rows:
            await self.source.put_snapshots(session_id, projection.key, rows)

    def _seal(self, projection: Projection[S], session_id: str, event_id: str, state: S) -> bytes:
        encoded = projection.encode(state)
        return seal_snapshot(session_id, projection.key, event_id, encoded, self._key)

    async def _snapshot(
        self, projection: Projection[S], session_id: str, event_id: str
    ) -> S | None:
        """The stored state right after ``event_id``, or None (missing or damaged)."""
        stored = await self.source.get_snapshot(session_id, projection.key, event_id)
        if stored is None:
            return None
        encoded = open_snapshot(session_id, projection.key, event_id, bytes(stored), self._key)
        why = "does not match its seal"
        if encoded is not None:
            try:
                return projection.decode(encoded)
            except (msgspec.MsgspecError, TypeError, ValueError) as exc:
                why = f"does not decode ({exc})"
        logger.warning(
            "Damaged snapshot ignored and rebuilt: session %r, projection %r, event %r: %s",
            session_id,
            projection.key,
            event_id,
            why,
        )
        self.damaged.append((session_id, projection.key, event_id))
        return None

    async def _walk_back(
        self, projection: Projection[S], session_id: str, event_id: str
    ) -> tuple[S | None, str | None, list[_Chunk]]:
        """The nearest cached or stored state on the path to ``event_id`` (None: the
        root's), the id of its event, and the path's events after it as chunks,
        newest first."""
        every = self.snapshot_every
        index = self.source if isinstance(self.source, PathIndex) else None
        chunks: list[_Chunk] = []
        kept = 0
        cursor: str | None = event_id
        while cursor is not None:
            # One interval back usually reaches a snapshot. Past that the path has
            # none yet (a first fold): a store with a path index is walked by ids
            # alone and the fold reads the events once; any other store in bigger
            # reads, fewer trips.
            events: list[Event] | None = None
            if chunks and index is not None:
                steps = await index.path_index(cursor, _INDEX_STEP)
                oldest, parent = steps[-1][0], steps[-1][2]
                if len(steps) < _INDEX_STEP and parent is not None:
                    missing = f"Parent of event {oldest!r} is missing: {parent!r}"
                    raise IntegrityError(missing, oldest)
            else:
                limit = every if not chunks else every * 16
                try:
                    events = await self.source.ancestors(cursor, limit=limit)
                except EventNotFoundError:
                    raise EventNotFoundError(event_id, session_id) from None
                if events[0].session != session_id:
                    raise EventNotFoundError(event_id, session_id)
                steps = [(event.id, event.seq, event.parent) for event in events]
            found = await self._find_base(projection, session_id, steps)
            base, taken = (None, len(steps)) if found is None else found
            if taken:
                # Past the budget a chunk is dropped and read again when the fold
                # reaches it: a first fold of a long path holds a bounded number of
                # events, not the whole path (a decoded event costs about 1 KiB).
                hold = events is not None and kept + taken <= self.held_events
                chunks.append((cursor, taken, events[:taken] if events and hold else None))
                kept += taken if hold else 0
            if base is not None:
                return base, steps[taken][0], chunks
            cursor = steps[-1][2]
        return None, None, chunks

    async def _find_base(
        self, projection: Projection[S], session_id: str, steps: list[tuple[str, int, str | None]]
    ) -> tuple[S, int] | None:
        """The first cached or stored state at one of ``steps`` (a path's ``(id, seq,
        parent)``, newest first) and its index there, if any."""
        every, cache, pkey = self.snapshot_every, self._cache, projection.key
        for at, (event_id, seq, _) in enumerate(steps):  # hot on a long first fold
            base: S | None = cache.get((pkey, session_id, event_id))
            if base is None and seq % every == 0 and seq > 0:
                base = await self._snapshot(projection, session_id, event_id)
            if base is not None:
                return base, at
        return None

    async def _reread(self, start: str, count: int) -> list[Event]:
        """The ``count`` events of the path from ``start`` back, read again for the fold."""
        events = await self.source.ancestors(start, limit=count)
        if len(events) != count:  # a walk moments ago found them all: the store changed
            raise IntegrityError(f"Path changed while it was folded: {start!r}", start)
        return events

    async def state_at(self, projection: Projection[S], session_id: str, event_id: str) -> S:
        """The projection's state right after ``event_id``, an event of ``session_id``.

        Raises ``EventNotFoundError`` when the event is unknown or of another session.
        """
        hit = self.cached(projection, session_id, event_id)
        if hit is not None:
            return hit
        walk = self._walk_back(projection, session_id, event_id)
        base, parent, chunks = await walk
        state: S = projection.initial() if base is None else base
        snapshots: list[tuple[str, bytes]] = []
        every, apply_many = self.snapshot_every, projection.apply_many
        for start, count, kept in reversed(chunks):
            events = kept if kept is not None else await self._reread(start, count)
            # A long fold makes many objects: no collections while a chunk folds (but
            # while the next is read, the application's other tasks run as usual).
            with gc_paused():
                # Each chunk must hang from the state folded so far: a path index's
                # walk followed the stored parent columns, not the events' own links.
                oldest = events[-1]
                if oldest.parent != parent or oldest.session != session_id:
                    raise IntegrityError(
                        f"Stored path is broken at event {oldest.id!r}: its parent and "
                        f"session are {oldest.parent!r}, {oldest.session!r}; the path's "
                        f"{parent!r}, {session_id!r}",
                        oldest.id,
                    )
                parent = start
                ordered = events[::-1]
                done = 0
                # Folded in runs that end at each event a snapshot is due at (self.due).
                for at, event in enumerate(ordered):
                    if event.seq % every == 0 and event.seq > 0:
                        state = apply_many(state, ordered[done : at + 1])
                        done = at + 1
                        snapshots.append(
                            (event.id, self._seal(projection, session_id, event.id, state))
                        )
                state = apply_many(state, ordered[done:])
        if snapshots:
            await self.source.put_snapshots(session_id, projection.key, snapshots)
        self.remember(projection, session_id, event_id, state)
        return state
