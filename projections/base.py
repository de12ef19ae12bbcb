"""Projections: pure folds of a path of events.

A projection is a named, versioned pair (initial state, apply event). Its state
type must be a msgspec-encodable value (a frozen Struct is best) so that the
engine can snapshot it; ``apply`` must not mutate the state it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import msgspec

from ledger.events import Event

__all__ = ["Projection", "fold"]

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
    ) -> None:
        self.name = name
        self.version = version
        self.initial = initial
        self.apply = apply
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

    def __repr__(self) -> str:
        return f"Projection({self.name!r}, {self.version})"


def fold(projection: Projection[S], events: Iterable[Event], state: S | None = None) -> S:
    """Apply events in order, from ``state`` or the projection's initial state."""
    current = projection.initial() if state is None else state
    apply = projection.apply
    for event in events:
        current = apply(current, event)
    return current
