"""Projections: pure folds of a path of events.

A projection is a named, versioned pair (initial state, apply event). Its state
type must be a msgspec-encodable value (a frozen Struct is best) so that the
engine can snapshot it; ``apply`` must not mutate the state it is given.

A projection may also give ``apply_many``, the same fold over a run of events
made cheaper (building one state for many events rather than one per event); a
long fold then goes through it. It must equal ``apply`` event after event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Final, Generic, TypeVar

import msgspec

from ledger.events import Event

__all__ = ["FOLD_RUN", "Projection", "fold"]

S = TypeVar("S")


class Projection(Generic[S]):
    """A pure reducer with a name and a version (bump the version when ``apply`` changes).

    Example::

        tools = Projection(
            "tool-calls", 1, state_type=tuple[str, ...], initial=lambda: (),
            apply=lambda s, e: s + (e.body.data["tool"],)
                  if isinstance(e.body, Recorded) and e.body.type == "tool" else s,
        )
    """

    def __init__(
        self,
        name: str,
        version: int,
        *,
        initial: Callable[[], S],
        apply: Callable[[S, Event], S],
        state_type: type[S] | object,
        apply_many: Callable[[S, Sequence[Event]], S] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.initial = initial
        self.apply = apply
        self.apply_many = apply_many if apply_many is not None else self._one_by_one
        self.state_type = state_type
        self._key = f"{name}@{version}"  # on every cached read and append: made once
        # JSON rather than msgpack: event content may hold integers beyond 64 bits.
        self._decoder = msgspec.json.Decoder(state_type)
        self._encoder = msgspec.json.Encoder()

    @property
    def key(self) -> str:
        """Snapshot key: a new version never reads an old version's snapshots."""
        return self._key

    def encode(self, state: S) -> bytes:
        return self._encoder.encode(state)

    def decode(self, data: bytes) -> S:
        state: S = self._decoder.decode(data)
        return state

    def _one_by_one(self, state: S, events: Sequence[Event]) -> S:
        apply = self.apply
        for event in events:
            state = apply(state, event)
        return state

    def __repr__(self) -> str:
        return f"Projection({self.name!r}, {self.version})"


FOLD_RUN: Final = 1024
"""Events handed to ``apply_many`` at a time when folding an iterable of unknown length."""


def fold(projection: Projection[S], events: Iterable[Event], state: S | None = None) -> S:
    """Apply events in order, from ``state`` or the projection's initial state."""
    current = projection.initial() if state is None else state
    apply_many = projection.apply_many
    if isinstance(events, Sequence):
        return apply_many(current, events)
    iterator = iter(events)
    while run := list(islice(iterator, FOLD_RUN)):
        current = apply_many(current, run)
    return current
