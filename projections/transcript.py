"""The transcript of a path: its conversational turns, and the window to send a model.

A path (root first) holds turns among other events; ``turns_of`` picks them out,
``TRANSCRIPT`` is the same thing as a snapshottable projection, and
``context_window`` trims a transcript to what fits a model's context::

    turns = turns_of(path)
    window = context_window(turns, last=20, max_tokens=8_000)

A path fold sees exactly one branch's history, so ``Branched`` and ``Restored``
need no special handling here: the turns a restore abandoned are simply not on
the new path.

A redacted turn (an erased ``TurnAdded``) stays in the transcript as a
placeholder: ``redacted=True``, ``role="redacted"``, ``content=None``, no name,
model, tool calls, turn id or metadata; its tokens and cost are kept.
``context_window`` leaves it out: there is nothing in it to send a model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from ledger.events import Erased, Event, TurnAdded
from projections.base import Projection

__all__ = ["REDACTED_ROLE", "TRANSCRIPT", "Turn", "context_window", "is_turn", "turns_of"]

REDACTED_ROLE = "redacted"
"""The ``role`` of a redacted turn's placeholder."""


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    """One conversational turn: a ``TurnAdded`` body with where and when it was appended."""

    event_id: str
    role: str
    content: Any
    name: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    model: str | None = None
    tool_calls: list[Any] = []
    turn_id: str | None = None
    metadata: dict[str, Any] = {}
    at: int
    branch: str
    seq: int
    redacted: bool = False
    """The turn's body was erased by a redaction: role and content are placeholders."""

    @property
    def tokens(self) -> int:
        """Tokens in plus tokens out."""
        return self.tokens_in + self.tokens_out

    @classmethod
    def from_event(cls, event: Event) -> Turn:
        """The turn a ``TurnAdded`` event records (a placeholder when it is redacted).

        Raises:
            ValueError: the event is of another kind.
        """
        if event.kind != "TurnAdded":
            raise ValueError(f"Not a TurnAdded event: {event.id!r} is {event.kind}")
        return _turn(event, event.body)


def _turn(event: Event, body: object) -> Turn:
    if not isinstance(body, TurnAdded):
        assert isinstance(body, Erased)
        return Turn(
            event_id=event.id,
            role=REDACTED_ROLE,
            content=None,
            tokens_in=body.tokens_in,
            tokens_out=body.tokens_out,
            cost=body.cost,
            at=event.at,
            branch=event.branch,
            seq=event.seq,
            redacted=True,
        )
    return Turn(
        event_id=event.id,
        role=body.role,
        content=body.content,
        name=body.name,
        tokens_in=body.tokens_in,
        tokens_out=body.tokens_out,
        cost=body.cost,
        model=body.model,
        tool_calls=body.tool_calls,
        turn_id=body.turn_id,
        metadata=body.metadata,
        at=event.at,
        branch=event.branch,
        seq=event.seq,
    )


def turns_of(events: Iterable[Event]) -> list[Turn]:
    """The turns of a path, in path order (linear: prefer it to folding ``TRANSCRIPT``).

    Example::

        [t.role for t in turns_of(path)]   # ['system', 'user', 'assistant']
    """
    return [_turn(event, event.body) for event in events if is_turn(event)]


def is_turn(event: Event) -> bool:
    """A turn, redacted or not: what ``turns_of`` keeps."""
    body = event.body
    return isinstance(body, TurnAdded) or (
        isinstance(body, Erased) and body.original == "TurnAdded"
    )


def _initial() -> tuple[Turn, ...]:
    return ()


def _apply(state: tuple[Turn, ...], event: Event) -> tuple[Turn, ...]:
    if not is_turn(event):
        return state
    body = event.body
    # A new tuple rather than a list append: apply must not mutate a state that a
    # snapshot or another caller may hold. The copy makes a cold fold quadratic
    # in turns, which the engine's snapshots bound to the tail of the path.
    return (*state, _turn(event, body))


TRANSCRIPT: Projection[tuple[Turn, ...]] = Projection(
    "transcript",
    1,
    initial=_initial,
    apply=_apply,
    state_type=tuple[Turn, ...],
)
"""The turns of a path as a projection; its state is a tuple of ``Turn``."""


def context_window(
    turns: Iterable[Turn],
    *,
    last: int | None = None,
    max_tokens: int | None = None,
    keep_system: bool = True,
    count_tokens: Callable[[Turn], int] | None = None,
) -> list[Turn]:
    """The turns to send a model: all system turns and the newest others that fit.

    The window over the non-system turns is contiguous: it is their newest
    ``last`` turns, cut at the first (going back in time) that does not fit in
    what is left of ``max_tokens``; an older turn is never taken to fill a gap
    that a newer one did not fit. The result keeps the original order.

    Redacted turns are left out before anything else: they have nothing to send.

    Args:
        turns: a transcript, oldest first.
        last: keep at most this many non-system turns (``None``: no limit).
        max_tokens: the token budget of the whole window, system turns included
            (``None``: no limit). When the system turns alone exceed it they are
            all kept anyway and nothing else is: dropping the instructions would
            change what the model does, overflowing the budget only costs.
        keep_system: pin the turns whose role is ``"system"``. When false they get
            no special treatment: they are windowed like any other turn.
        count_tokens: the size of a turn (for a tokenizer of your own); by
            default ``turn.tokens``, the tokens the turn recorded.

    Returns:
        The kept turns, in their original order.

    Raises:
        ValueError: ``last`` or ``max_tokens`` is negative.

    Example::

        context_window(turns, last=10, max_tokens=4_000)
        context_window(turns, max_tokens=4_000, count_tokens=lambda t: len(str(t.content)) // 4)
    """
    if last is not None and last < 0:
        raise ValueError(f"last must be >= 0, got {last}")
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    items = [turn for turn in turns if not turn.redacted]
    measure = count_tokens if count_tokens is not None else _recorded_tokens
    pinned = [keep_system and turn.role == "system" for turn in items]
    budget = None
    if max_tokens is not None:
        budget = max_tokens - sum(measure(t) for t, pin in zip(items, pinned, strict=True) if pin)
    kept = list(pinned)
    if budget is None or budget >= 0:
        taken = 0
        for index in range(len(items) - 1, -1, -1):
            if pinned[index]:
                continue
            if last is not None and taken >= last:
                break
            if budget is not None:
                size = measure(items[index])
                if size > budget:
                    break
                budget -= size
            kept[index] = True
            taken += 1
    return [turn for turn, keep in zip(items, kept, strict=True) if keep]


def _recorded_tokens(turn: Turn) -> int:
    return turn.tokens
