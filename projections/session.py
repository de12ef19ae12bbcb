"""The session-state projection: status, counters, metadata and checkpoints of a path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import blake3
import msgspec
from msgspec.structs import replace

from ledger.events import (
    Checkpointed,
    Closed,
    Erased,
    Event,
    Expired,
    MetadataSet,
    Resumed,
    SessionCreated,
    Suspended,
    TurnAdded,
    canonical,
)
from ledger.frozen import freeze
from projections.base import Projection

__all__ = [
    "ACTIVE",
    "CLOSED",
    "EXPIRED",
    "OPEN",
    "SESSION",
    "SUSPENDED",
    "Checkpoint",
    "SessionState",
    "state_checksum",
]

ACTIVE, SUSPENDED, CLOSED, EXPIRED = "active", "suspended", "closed", "expired"
OPEN = frozenset({ACTIVE, SUSPENDED})


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A labelled point of a path whose state can be restored."""

    id: str
    """The ``Checkpointed`` event's id."""
    entry: str
    """The event whose state the checkpoint captures (the head when it was taken)."""
    checksum: str
    label: str | None = None
    branch: str = "main"
    at: int = 0


class SessionState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The state of one session at one event: the fold of the path to it."""

    # gc=False: immutable and acyclic, as events are; a fold makes one per event,
    # and tracked ones would set off a collection every few hundred events.

    session_id: str
    user_id: str
    agent: str
    status: str
    branch: str
    head: str
    seq: int
    created_at: int
    last_activity_at: int
    event_count: int = 0
    turn_count: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    metadata: dict[str, Any] = {}
    """Read-only (a ``ledger.frozen.FrozenDict``): states are shared; ``dict()`` copies it."""
    checkpoints: tuple[Checkpoint, ...] = ()
    ttl_s: float | None = None

    @property
    def is_open(self) -> bool:
        return self.status in OPEN


_EMPTY = SessionState(
    session_id="",
    user_id="",
    agent="",
    status="new",
    branch="",
    head="",
    seq=-1,
    created_at=0,
    last_activity_at=0,
)

_STATUS_OF = {Suspended: SUSPENDED, Resumed: ACTIVE, Closed: CLOSED, Expired: EXPIRED}


def apply(state: SessionState, event: Event) -> SessionState:
    body = event.body
    # The common event first (a replay's hot loop: isinstance is quick on an exact
    # type). An erased turn is still a turn: its kept accounting folds as the original did.
    if isinstance(body, TurnAdded) or (isinstance(body, Erased) and body.original == "TurnAdded"):
        return _after_turns(
            state,
            event,
            1,
            state.tokens_in + body.tokens_in,
            state.tokens_out + body.tokens_out,
            state.cost + body.cost,
        )
    if isinstance(body, SessionCreated):
        return SessionState(
            session_id=event.session,
            user_id=body.user_id,
            agent=body.agent,
            status=ACTIVE,
            branch=event.branch,
            head=event.id,
            seq=event.seq,
            created_at=event.at,
            last_activity_at=event.at,
            event_count=1,
            metadata=freeze(body.metadata),
            ttl_s=body.ttl_s,
        )
    moved: dict[str, Any] = {
        "branch": event.branch,
        "head": event.id,
        "seq": event.seq,
        "last_activity_at": event.at,
        "event_count": state.event_count + 1,
    }
    if isinstance(body, Checkpointed):
        checkpoint = Checkpoint(
            id=event.id,
            entry=body.entry,
            checksum=body.checksum,
            label=body.label,
            branch=event.branch,
            at=event.at,
        )
        moved["checkpoints"] = (*state.checkpoints, checkpoint)
    elif isinstance(body, MetadataSet):
        merged = dict(state.metadata)
        for key, value in body.metadata.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        moved["metadata"] = freeze(merged)
    else:
        status = _STATUS_OF.get(type(body))
        if status is not None:
            moved["status"] = status
    return replace(state, **moved)


def apply_many(state: SessionState, events: Sequence[Event]) -> SessionState:
    """``apply``, event after event, with one new state per run of turns rather
    than one per turn: a replay's hot loop, where nearly every event is a turn."""
    last: Event | None = None  # the run's newest turn; None: no run open
    for event in events:
        body = event.body
        if isinstance(body, TurnAdded) or (
            isinstance(body, Erased) and body.original == "TurnAdded"
        ):
            if last is None:
                count, tokens_in, tokens_out, cost = (
                    0,
                    state.tokens_in,
                    state.tokens_out,
                    state.cost,
                )
            count += 1
            tokens_in += body.tokens_in
            tokens_out += body.tokens_out
            cost += body.cost  # summed in the same order as apply's: the same float
            last = event
            continue
        if last is not None:
            state = _after_turns(state, last, count, tokens_in, tokens_out, cost)
            last = None
        state = apply(state, event)
    if last is not None:
        state = _after_turns(state, last, count, tokens_in, tokens_out, cost)
    return state


def _after_turns(
    state: SessionState, last: Event, count: int, tokens_in: int, tokens_out: int, cost: float
) -> SessionState:
    """The state after ``count`` turns ending with ``last``, with these totals."""
    return replace(
        state,
        branch=last.branch,
        head=last.id,
        seq=last.seq,
        last_activity_at=last.at,
        event_count=state.event_count + count,
        turn_count=state.turn_count + count,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        cost=cost,
    )


class _SessionProjection(Projection[SessionState]):
    def decode(self, data: bytes) -> SessionState:
        # A snapshot's metadata, as read-only as the fold's (ledger.frozen)
        state = super().decode(data)
        return replace(state, metadata=freeze(state.metadata))


SESSION: Projection[SessionState] = _SessionProjection(
    "session",
    1,
    initial=lambda: _EMPTY,
    apply=apply,
    state_type=SessionState,
    apply_many=apply_many,
)


def state_checksum(state: SessionState, key: bytes | None = None) -> str:
    """A checkpoint's checksum: blake3 of the canonical state, a keyed MAC with a key."""
    data = canonical(state)
    digest = blake3.blake3(data, key=key) if key else blake3.blake3(data)
    return digest.hexdigest()
