"""The append path's shortcuts give what the long way gives.

``make_event`` checks an event's size without encoding it when its body and
header leave room under the limit: the bound it relies on is a law here, and
the limit holds to the byte either way.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import Ledger
from ledger.errors import EventTooLargeError
from ledger.events import (
    ENVELOPE_BYTES,
    Event,
    TurnAdded,
    canonical,
    encode_event,
    event_header,
    make_event,
)
from tests.strategies import events


def _again(event: Event, max_bytes: int | None) -> Event:
    """``event`` made again from its fields (a new salt, of the same length)."""
    return make_event(
        session=event.session,
        parent=event.parent,
        seq=event.seq,
        branch=event.branch,
        at=event.at,
        actor=event.actor,
        body=event.body,
        idempotency_key=event.idempotency_key,
        max_bytes=max_bytes,
    )


@settings(max_examples=300)
@given(events())
def test_envelope_bound(event: Event) -> None:
    """An event's JSON is at most its body's canonical bytes, its header and the bound."""
    assert len(encode_event(event)) <= len(canonical(event.body)) + len(event_header(event)) + (
        ENVELOPE_BYTES
    )


@settings(max_examples=200)
@given(events(), st.integers(min_value=0, max_value=ENVELOPE_BYTES))
def test_size_limit_to_the_byte(event: Event, slack: int) -> None:
    """Refused exactly when the encoded event is over the limit, whatever the shortcut."""
    size = len(encode_event(event))
    assert len(encode_event(_again(event, size + slack))) == size
    with pytest.raises(EventTooLargeError) as refused:
        _again(event, size - 1)
    assert refused.value.size == size
    assert event.session in str(refused.value)


def test_far_under_the_limit_is_not_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shortcut is taken: an event well under the limit is never encoded to be sized."""
    import ledger.events

    def fail(event: Event) -> bytes:
        raise AssertionError("encoded to be sized")

    monkeypatch.setattr(ledger.events, "encode_event", fail)

    def make(max_bytes: int) -> Event:
        body = TurnAdded(role="user", content="x" * 900)
        return make_event(
            session="s",
            parent=None,
            seq=0,
            branch="main",
            at=1,
            actor="a",
            body=body,
            max_bytes=max_bytes,
        )

    make(4096)
    with pytest.raises(AssertionError, match="encoded to be sized"):
        make(1024)


async def test_memory_feed_waiters_woken_by_an_append() -> None:
    """The memory store wakes every feed waiter at an append, without a lock or a poll."""
    async with Ledger.open("memory://") as led:
        s = await led.create(user_id="u", agent="a")
        after = (await led.store.read_feed(0))[-1].position
        waiters = [asyncio.create_task(led.store.wait_for_feed(after, 3600)) for _ in range(2)]
        await asyncio.sleep(0)  # both are waiting now
        assert not any(w.done() for w in waiters)
        await led.add_turn(s.session_id, role="user", content="hi")
        # Woken, not timed out: an hour's wait would fail the bound.
        await asyncio.wait_for(asyncio.gather(*waiters), 60)
        # Something after ``after`` exists now: a new wait returns at once.
        await asyncio.wait_for(led.store.wait_for_feed(after, 3600), 60)


async def _gated(led: Any) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the ledger's store hold each append until ``gate`` is set; ``entered`` is set
    when an append is held."""
    gate, entered = asyncio.Event(), asyncio.Event()
    append = led.store.append

    async def held(request: Any) -> Any:
        entered.set()
        await gate.wait()
        return await append(request)

    led.store.append = held
    return gate, entered


async def test_branch_writers_take_turns() -> None:
    """Tasks appending to one branch at once all land, one after another, on the head
    the one before made; the branch is free again afterwards."""
    async with Ledger.open("memory://") as led:
        s = await led.create(user_id="u", agent="a")
        turns = await asyncio.gather(
            *(led.add_turn(s.session_id, role="user", content=str(i)) for i in range(20))
        )
        assert [t.body.content for t in turns] == [str(i) for i in range(20)]  # type: ignore[union-attr]
        assert [t.parent for t in turns] == [s.head] + [t.id for t in turns[:-1]]
        assert led._branch_writers == {}


@pytest.mark.parametrize("cancelled", ["holder", "waiter"])
async def test_cancelled_branch_writer_hands_on(cancelled: str) -> None:
    """A writer cancelled while it holds the branch, or while it waits for it, does not
    keep the others waiting: the rest land in arrival order and the branch is freed."""
    async with Ledger.open("memory://") as led:
        s = await led.create(user_id="u", agent="a")
        gate, entered = await _gated(led)
        tasks = [
            asyncio.create_task(led.add_turn(s.session_id, role="user", content=str(i)))
            for i in range(3)
        ]
        await entered.wait()  # task 0 holds the branch; 1 and 2 wait for it
        await asyncio.sleep(0)
        victim = tasks[0] if cancelled == "holder" else tasks[1]
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        gate.set()
        done = await asyncio.wait_for(asyncio.gather(*(t for t in tasks if t is not victim)), 60)
        assert [t.body.content for t in done] == (  # type: ignore[union-attr]
            ["1", "2"] if cancelled == "holder" else ["0", "2"]
        )
        assert done[1].parent == done[0].id
        assert led._branch_writers == {}
