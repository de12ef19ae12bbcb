"""Every refused operation: its specific error, the ids in its message, and nothing written."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from ledger import (
    BranchExistsError,
    BranchNotFoundError,
    CheckpointNotFoundError,
    EventNotFoundError,
    EventTooLargeError,
    IntegrityError,
    InvalidEventError,
    Ledger,
    LedgerConfig,
    LedgerError,
    SessionCapacityError,
    SessionClosedError,
    SessionExpiredError,
    SessionNotFoundError,
    SessionSuspendedError,
    SessionTransitionError,
)
from stores.base import FeedStore
from tests.test_ledger import everything

KEY = "ab" * 32
OTHER_KEY = "cd" * 32
UNKNOWN = "f" * 64


@dataclass
class World:
    """A ledger at its limits, with a session in every state."""

    led: Ledger
    sid: str  # user u: 3 turns on main (the limit), a checkpoint (the limit), branch alt
    cp: str
    turn: str
    other: str  # user v, with a checkpoint of its own
    other_cp: str
    closed: str
    closed_cp: str
    suspended: str
    expired: str


async def build(store: FeedStore) -> World:
    config = LedgerConfig(
        url="memory://",
        key=KEY,
        max_turns_per_session=3,
        max_branches_per_session=2,
        max_checkpoints_per_session=1,
        max_open_sessions_per_user=1,
        max_event_bytes=4096,
    )
    led = Ledger(store, config)
    await store.open()
    s = await led.create(user_id="u", agent="a")
    t1 = await led.add_turn(s.session_id, role="user", content="one")
    await led.add_turn(s.session_id, role="assistant", content="two")
    cp = await led.checkpoint(s.session_id, label="two turns")
    await led.add_turn(s.session_id, role="user", content="three")
    await led.branch(s.session_id, "alt", at=cp.entry)
    other = await led.create(user_id="v", agent="a")
    other_cp = await led.checkpoint(other.session_id)
    closed = await led.create(user_id="c", agent="a")
    closed_cp = await led.checkpoint(closed.session_id)
    await led.close(closed.session_id)
    suspended = await led.create(user_id="s", agent="a")
    await led.suspend(suspended.session_id)
    expired = await led.create(user_id="e", agent="a", ttl_s=0.01)
    await asyncio.sleep(0.03)
    with pytest.raises(SessionExpiredError):
        await led.record(expired.session_id, "wake")  # appends Expired, refuses
    return World(
        led,
        s.session_id,
        cp.id,
        t1.id,
        other.session_id,
        other_cp.id,
        closed.session_id,
        closed_cp.id,
        suspended.session_id,
        expired.session_id,
    )


Case = Callable[[World], Awaitable[object]]

CASES: dict[str, tuple[Case, type[LedgerError], Callable[[World], list[str]]]] = {
    "unknown session": (
        lambda w: w.led.add_turn(UNKNOWN, role="user", content="x"),
        SessionNotFoundError,
        lambda w: [f"Session not found: {UNKNOWN!r}"],
    ),
    "unknown session state": (
        lambda w: w.led.state(UNKNOWN),
        SessionNotFoundError,
        lambda w: [UNKNOWN],
    ),
    "unknown branch": (
        lambda w: w.led.add_turn(w.sid, role="user", content="x", branch="nope"),
        BranchNotFoundError,
        lambda w: [w.sid, "'nope'"],
    ),
    "unknown checkpoint": (
        lambda w: w.led.restore(w.sid, UNKNOWN),
        CheckpointNotFoundError,
        lambda w: [w.sid, UNKNOWN],
    ),
    "a turn is not a checkpoint": (
        lambda w: w.led.restore(w.sid, w.turn),
        CheckpointNotFoundError,
        lambda w: [w.turn],
    ),
    "checkpoint of another session": (
        lambda w: w.led.restore(w.sid, w.other_cp),
        CheckpointNotFoundError,
        lambda w: [w.sid, w.other_cp],
    ),
    "unknown event for state": (
        lambda w: w.led.state(w.sid, at=UNKNOWN),
        EventNotFoundError,
        lambda w: [UNKNOWN],
    ),
    "event of another session": (
        lambda w: w.led.state(w.sid, at=w.other_cp),
        EventNotFoundError,
        lambda w: [w.sid, w.other_cp],
    ),
    "unknown fork point": (
        lambda w: w.led.branch(w.sid, "b2", at=UNKNOWN),
        EventNotFoundError,
        lambda w: [UNKNOWN],
    ),
    "write to a closed session": (
        lambda w: w.led.add_turn(w.closed, role="user", content="x"),
        SessionClosedError,
        lambda w: [w.closed],
    ),
    "restore on a closed branch": (
        lambda w: w.led.restore(w.closed, w.closed_cp),
        SessionClosedError,
        lambda w: [w.closed],
    ),
    "write to an expired session": (
        lambda w: w.led.add_turn(w.expired, role="user", content="x"),
        SessionExpiredError,
        lambda w: [w.expired],
    ),
    "turn on a suspended session": (
        lambda w: w.led.add_turn(w.suspended, role="user", content="x"),
        SessionSuspendedError,
        lambda w: [w.suspended],
    ),
    "invalid transition": (
        lambda w: w.led.resume(w.sid),
        SessionTransitionError,
        lambda w: [f"Invalid transition for session {w.sid!r}: 'active' -> 'active'"],
    ),
    "suspend a suspended session": (
        lambda w: w.led.suspend(w.suspended),
        SessionTransitionError,
        lambda w: [w.suspended, "'suspended' -> 'suspended'"],
    ),
    "turns limit": (
        lambda w: w.led.add_turn(w.sid, role="user", content="four"),
        SessionCapacityError,
        lambda w: [w.sid, "turns", "3"],
    ),
    "open sessions limit": (
        lambda w: w.led.create(user_id="u", agent="a"),
        SessionCapacityError,
        lambda w: ["'u'", "open sessions"],
    ),
    "branches limit": (
        lambda w: w.led.branch(w.sid, "third"),
        SessionCapacityError,
        lambda w: [w.sid, "branches"],
    ),
    "checkpoints limit": (
        lambda w: w.led.checkpoint(w.sid),
        SessionCapacityError,
        lambda w: [w.sid, "checkpoints"],
    ),
    "oversized event": (
        lambda w: w.led.add_turn(w.sid, role="user", content="x" * 5000, branch="alt"),
        EventTooLargeError,
        lambda w: [w.sid, "4096"],
    ),
    "content that is not JSON": (
        lambda w: w.led.add_turn(w.sid, role="user", content=object(), branch="alt"),
        InvalidEventError,
        lambda w: [w.sid, "JSON"],
    ),
    "a field of the wrong type": (
        lambda w: w.led.add_turn(w.sid, role="user", content="x", tokens_in="3", branch="alt"),  # type: ignore[arg-type]
        InvalidEventError,
        lambda w: [w.sid, "tokens_in"],
    ),
    "a branch name that exists": (
        lambda w: w.led.branch(w.sid, "alt"),
        BranchExistsError,
        lambda w: [w.sid, "'alt'"],
    ),
    "a branch name that escapes": (
        lambda w: w.led.branch(w.sid, "../x"),
        InvalidEventError,
        lambda w: [w.sid, "'../x'"],
    ),
    "a checkpoint whose checksum no longer matches": (
        lambda w: Ledger(w.led.store, LedgerConfig(url="memory://", key=OTHER_KEY)).restore(
            w.sid, w.cp, branch="alt"
        ),
        IntegrityError,
        lambda w: [w.sid, w.cp],
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
async def test_refused_and_nothing_written(make_store: Callable[[], FeedStore], case: str) -> None:
    operation, error, message_parts = CASES[case]
    world = await build(make_store())
    try:
        before = await everything(world.led)
        with pytest.raises(error) as info:
            await operation(world)
        assert type(info.value) is error
        for part in message_parts(world):
            assert part in str(info.value)
        assert await everything(world.led) == before
    finally:
        await world.led.close()
