"""Replay, follow and diff over every selected backend; pacing with a recording sleep."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import (
    BranchNotFoundError,
    Closed,
    Event,
    EventNotFoundError,
    IntegrityError,
    Ledger,
    LedgerConfig,
    Projection,
    Restored,
    SessionNotFoundError,
    TurnAdded,
)
from ledger.events import Branched
from ledger.replay import diff_paths, feed_end, follow_branch, paced
from ledger.testing import TIMEOUT, append_request, create_event, next_event
from projections.session import SESSION
from stores.base import FeedStore, SessionQuery, SessionRow
from stores.memory import MemoryStore
from tests import tamper

MakeStore = Callable[[], FeedStore]


def ledger(make_store: MakeStore) -> Ledger:
    return Ledger(make_store(), LedgerConfig(url="memory://"))


async def everything(led: Ledger) -> dict[str, Any]:
    store = led.store
    sessions = (await store.sessions(SessionQuery(limit=10_000))).items
    return {
        "feed": await store.read_feed(0, 100_000),
        "rows": sessions,
        "heads": {s.session_id: await store.heads(s.session_id) for s in sessions},
    }


@dataclass
class Story:
    """main: root, t1, t2, cp, cancel, restored, t5; alt forks at cp.entry: branched, a1."""

    sid: str
    ids: dict[str, str]


async def story(led: Ledger) -> Story:
    s = await led.create(user_id="u", agent="a")
    sid = s.session_id
    ids = {"root": s.head}
    ids["t1"] = (await led.add_turn(sid, role="user", content="Hello")).id
    ids["t2"] = (await led.add_turn(sid, role="assistant", content="Hi!")).id
    cp = await led.checkpoint(sid, label="greeted")
    ids["cp"] = cp.id
    ids["cancel"] = (await led.add_turn(sid, role="user", content="Cancel it")).id
    ids["branched"] = (await led.branch(sid, "alt", at=cp.entry)).id
    ids["a1"] = (await led.add_turn(sid, role="user", content="Track it", branch="alt")).id
    ids["restored"] = (await led.restore(sid, cp.id)).id
    ids["t5"] = (await led.add_turn(sid, role="user", content="Thanks")).id
    return Story(sid, ids)


def ids_of(events: list[Event]) -> list[str]:
    return [event.id for event in events]


# ---------------------------------------------------------------------------- replay


async def test_replay_calls_back_each_event_of_the_path_in_order(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        st_ = await story(led)
        seen: list[Event] = []
        assert await led.replay(st_.sid, into=seen.append) is None
        i = st_.ids
        expected = ["root", "t1", "t2", "restored", "t5"]
        assert ids_of(seen) == [i[name] for name in expected]
        assert seen == await led.history(st_.sid)

        awaited: list[str] = []

        async def slow(event: Event) -> None:
            await asyncio.sleep(0)
            awaited.append(event.id)

        await led.replay(st_.sid, into=slow, branch="alt")
        assert awaited == [i[name] for name in ("root", "t1", "t2", "branched", "a1")]


async def test_replay_after_a_restore_skips_the_abandoned_events(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        st_ = await story(led)
        seen: list[Event] = []
        await led.replay(st_.sid, into=seen.append)
        assert st_.ids["cancel"] not in ids_of(seen)
        assert st_.ids["cp"] not in ids_of(seen)  # after the entry, so abandoned too
        restored = seen[-2]
        assert isinstance(restored.body, Restored)
        assert restored.body.checkpoint == st_.ids["cp"]
        assert restored.parent == seen[-3].id == st_.ids["t2"]  # the checkpoint's entry


async def test_replay_of_a_fork_replays_the_shared_history_first(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        st_ = await story(led)
        seen: list[Event] = []
        await led.replay(st_.sid, into=seen.append, branch="alt")
        assert [e.branch for e in seen] == ["main", "main", "main", "alt", "alt"]
        assert isinstance(seen[3].body, Branched)
        assert seen[3].parent == st_.ids["t2"]  # the checkpoint's entry


async def test_replay_into_a_projection_equals_project(make_store: MakeStore) -> None:
    def apply(turns: tuple[str, ...], event: Event) -> tuple[str, ...]:
        body = event.body
        return (*turns, str(body.content)) if isinstance(body, TurnAdded) else turns

    said = Projection("said", 1, initial=tuple, apply=apply, state_type=tuple[str, ...])
    async with ledger(make_store) as led:
        st_ = await story(led)
        for branch in ("main", "alt"):
            assert await led.replay(st_.sid, into=said, branch=branch) == await led.project(
                st_.sid, said, branch=branch
            )
            assert await led.replay(st_.sid, into=SESSION, branch=branch) == await led.state(
                st_.sid, branch=branch
            )
        at = st_.ids["cancel"]
        assert await led.replay(st_.sid, into=said, at=at) == ("Hello", "Hi!", "Cancel it")
        assert await led.replay(st_.sid, into=SESSION, at=at) == await led.state(st_.sid, at=at)


async def test_replay_with_speed_gives_the_same_events(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        st_ = await story(led)
        seen: list[Event] = []
        await led.replay(st_.sid, into=seen.append, speed=1e9, max_pause=0.001)
        assert seen == await led.history(st_.sid)


async def test_replay_of_unknown_session_or_branch(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        st_ = await story(led)
        before = await everything(led)
        seen: list[Event] = []
        with pytest.raises(SessionNotFoundError, match=r"Session not found: 'nope'"):
            await led.replay("nope", into=seen.append)
        with pytest.raises(BranchNotFoundError, match=rf"{st_.sid}.*'gone'"):
            await led.replay(st_.sid, into=seen.append, branch="gone")
        assert seen == []
        assert await everything(led) == before


async def linear(led: Ledger, turns: int) -> str:
    sid = (await led.create(user_id="u", agent="a")).session_id
    await led.add_turns(sid, [{"role": "user", "content": f"turn {n}"} for n in range(turns)])
    return sid


def count_path_walks(store: FeedStore) -> list[str]:
    """Record each ``store.path`` call (the whole-path read) on this store object."""
    walked: list[str] = []
    path = store.path

    async def recorded(event_id: str) -> list[Event]:
        walked.append(event_id)
        return await path(event_id)

    store.path = recorded  # type: ignore[method-assign]
    return walked


async def test_replay_of_a_linear_session_streams_it(make_store: MakeStore) -> None:
    """Never forked nor restored: read as the store streams the session, not walked
    back whole, and the same history, states and callbacks as a walk gives."""
    async with ledger(make_store) as led:
        sid = await linear(led, 40)
        history = await led.history(sid)
        walked = count_path_walks(led.store)
        seen: list[Event] = []
        await led.replay(sid, into=seen.append)
        assert seen == history and len(seen) == 41
        assert await led.replay(sid, into=SESSION) == await led.state(sid)
        paced_: list[Event] = []
        await led.replay(sid, into=paced_.append, speed=1e9, max_pause=0.001)
        assert paced_ == history
        assert walked == []
        # Replayed to an earlier event, the session holds more than its path: walked.
        at = history[10].id
        assert await led.replay(sid, into=SESSION, at=at) == await led.state(sid, at=at)
        assert walked == [at]


async def test_a_streamed_replay_ends_at_the_head_it_started_from(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        sid = await linear(led, 5)
        history = await led.history(sid)
        seen: list[Event] = []

        async def append_on(event: Event) -> None:
            seen.append(event)
            await led.add_turn(sid, role="assistant", content=f"after {event.seq}")

        await led.replay(sid, into=append_on)
        assert seen == history
        assert (await led.state(sid)).event_count == 2 * len(history)


async def test_replay_of_an_event_of_another_session_is_refused(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        sid, other = await linear(led, 2), await linear(led, 2)
        foreign = (await led.history(other))[-1].id
        with pytest.raises(EventNotFoundError, match=rf"{sid}.*{foreign}"):
            await led.replay(sid, into=SESSION, at=foreign)


async def test_a_streamed_replay_names_a_stored_session_out_of_order(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    async with Ledger.open(f"sqlite:///{path}") as led:
        sid = await linear(led, 6)
        ids = ids_of(await led.history(sid))
    tamper.swap_positions(path, ids[3], ids[4])
    async with Ledger.open(f"sqlite:///{path}") as led:
        seen: list[Event] = []
        with pytest.raises(IntegrityError, match=rf"{sid}.*{ids[4]}.*{ids[2]}") as caught:
            await led.replay(sid, into=seen.append)
        assert caught.value.event_id == ids[4]
        assert ids_of(seen) == ids[:3]  # what chained, and nothing after the break


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["turn", "checkpoint", "fork", "restore", "record"]), max_size=25))
def test_replay_folds_equal_project_at_every_event(steps: list[str]) -> None:
    """Law: for any tree and any event of it, replay(at=e) into a projection == project(at=e)."""

    async def run() -> None:
        async with Ledger(MemoryStore(), LedgerConfig(url="memory://")) as led:
            s = await led.create(user_id="u", agent="a")
            sid, branches, checkpoints = s.session_id, ["main"], []
            for n, step in enumerate(steps):
                branch = branches[n % len(branches)]
                if step == "turn":
                    await led.add_turn(sid, role="user", content=f"m{n}", branch=branch)
                elif step == "record":
                    await led.record(sid, "note", {"n": n}, branch=branch)
                elif step == "checkpoint":
                    checkpoints.append(await led.checkpoint(sid, branch=branch))
                elif step == "fork":
                    branches.append(f"b{n}")
                    await led.branch(sid, f"b{n}", from_branch=branch)
                elif checkpoints:
                    cp = checkpoints[n % len(checkpoints)]
                    await led.restore(sid, cp.id, branch=cp.branch)
            async for event in led.events(sid):
                replayed = await led.replay(sid, into=SESSION, at=event.id)
                assert replayed == await led.state(sid, at=event.id)
                path: list[Event] = []
                await led.replay(sid, into=path.append, at=event.id)
                assert path == await led.history(sid, at=event.id)
                assert path[-1] == event and path[0].parent is None

    asyncio.run(run())


# ---------------------------------------------------------------------------- pacing


async def test_paced_sleeps_the_scaled_gaps_capped() -> None:
    root = create_event(at=10_000_000_000)
    gaps_s = [0.0, 0.5, 3.0, 100.0, 0.25]
    chain = [root]
    for gap in gaps_s:
        chain.append(next_event(chain[-1], at=chain[-1].at + int(gap * 1e9)))
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    out = [e async for e in paced(chain, 2.0, max_pause=2.0, sleep=sleep)]
    assert out == chain
    assert slept == [0.25, 1.5, 2.0, 0.125]  # no sleep for a zero gap; 100 s capped

    slept.clear()
    assert [e async for e in paced(chain, None, sleep=sleep)] == chain
    assert slept == []  # no speed: as fast as possible


# ---------------------------------------------------------------------------- diff


async def test_diff_names_the_fork_point_and_what_each_branch_has_alone(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as led:
        st_ = await story(led)
        i = st_.ids
        d = await led.diff(st_.sid, "main", "alt")
        assert (d.session_id, d.a, d.b) == (st_.sid, "main", "alt")
        assert d.fork_point == i["t2"]
        assert ids_of(d.only_a) == [i["restored"], i["t5"]]
        assert ids_of(d.only_b) == [i["branched"], i["a1"]]
        swapped = await led.diff(st_.sid, "alt", "main")
        assert (swapped.only_a, swapped.only_b) == (d.only_b, d.only_a)

        same = await led.diff(st_.sid, "alt", "alt")
        assert (same.fork_point, same.only_a, same.only_b) == (i["a1"], [], [])


async def test_diff_when_one_branch_extends_the_other(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        await led.add_turn(s.session_id, role="user", content="hi")
        head = (await led.state(s.session_id)).head
        b = await led.branch(s.session_id, "b")
        d = await led.diff(s.session_id, "main", "b")
        assert d.fork_point == head
        assert d.only_a == []
        assert ids_of(d.only_b) == [b.id]


async def test_diff_of_unknown_session_or_branch(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        st_ = await story(led)
        before = await everything(led)
        with pytest.raises(SessionNotFoundError, match="'nope'"):
            await led.diff("nope", "main", "alt")
        with pytest.raises(BranchNotFoundError, match=rf"'{st_.sid}': 'zzz'"):
            await led.diff(st_.sid, "main", "zzz")
        with pytest.raises(BranchNotFoundError, match="'zzz'"):
            await led.diff(st_.sid, "zzz", "main")
        assert await everything(led) == before


def test_diff_paths_of_two_sessions_is_refused() -> None:
    a, b = create_event(), create_event()
    with pytest.raises(ValueError, match="different sessions"):
        diff_paths(a.session, "main", "main", [a], [b])


# ---------------------------------------------------------------------------- follow


async def test_feed_end_is_the_last_position(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        assert await feed_end(led.store) == 0
        s = await led.create(user_id="u", agent="a")
        assert await feed_end(led.store) == (await led.store.read_feed(0, 10))[-1].position
        for n in range(40):
            await led.add_turn(s.session_id, role="user", content=str(n))
            every = await led.store.read_feed(0, 1000)
            assert await feed_end(led.store) == every[-1].position


async def test_feed_end_with_a_writer_running(make_store: MakeStore) -> None:
    """Each answer is a committed position, at least the end seen before the call."""
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")

        async def write() -> None:
            for n in range(40):
                await led.add_turn(s.session_id, role="user", content=str(n))
                await asyncio.sleep(0)

        writer = asyncio.create_task(write())
        answers: list[tuple[int, int]] = []
        while not writer.done():
            seen = (await led.store.read_feed(0, 10_000))[-1].position
            answers.append((seen, await feed_end(led.store)))
            await asyncio.sleep(0)  # the memory store never waits: let the writer run
        await writer
        committed = {item.position for item in await led.store.read_feed(0, 10_000)}
        assert answers
        assert all(end >= seen and end in committed for seen, end in answers)


class Follower:
    """Collects what a follow yields, in a task; ``at_least(n)`` waits for n events."""

    def __init__(self, events: AsyncGenerator[Event, None]) -> None:
        self.events = events
        self.seen: list[Event] = []
        self._changed = asyncio.Condition()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with contextlib.aclosing(self.events) as events:
            async for event in events:
                async with self._changed:
                    self.seen.append(event)
                    self._changed.notify_all()

    async def at_least(self, n: int) -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.seen) >= n)

        await asyncio.wait_for(wait(), TIMEOUT)

    async def finished(self) -> list[Event]:
        await asyncio.wait_for(self.task, TIMEOUT)
        return self.seen


async def test_follow_prints_history_then_live_events_and_ends_when_closed(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as led:
        st_ = await story(led)
        other = await led.create(user_id="v", agent="a")
        history = await led.history(st_.sid)
        follower = Follower(led.follow(st_.sid))
        await follower.at_least(len(history))
        assert follower.seen == history
        await led.add_turn(st_.sid, role="assistant", content="live 1")
        await led.add_turn(st_.sid, role="user", content="elsewhere", branch="alt")
        await led.add_turn(other.session_id, role="user", content="another session")
        await led.add_turn(st_.sid, role="assistant", content="live 2")
        await led.close(st_.sid, reason="done")
        seen = await follower.finished()  # ends by itself after Closed
        assert seen == await led.history(st_.sid)
        assert isinstance(seen[-1].body, Closed)


async def test_follow_with_a_writer_running_has_no_gap_or_duplicate(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        sid = s.session_id
        started = asyncio.Event()

        async def write() -> None:
            for n in range(60):
                await led.add_turn(sid, role="user", content=f"m{n}")
                if n == 10:
                    started.set()
                await asyncio.sleep(0)
            await led.close(sid)

        writer = asyncio.create_task(write())
        await asyncio.wait_for(started.wait(), TIMEOUT)
        follower = Follower(led.follow(sid))
        await asyncio.wait_for(writer, TIMEOUT * 4)
        seen = await follower.finished()
        assert ids_of(seen) == ids_of(await led.history(sid))
        assert len(seen) == 62


async def test_follow_skips_what_a_restore_abandoned_before_the_history_was_read(
    make_store: MakeStore,
) -> None:
    """From feed position 0, every event is in the catch-up window: only the history
    comes out, not the abandoned turn, not the other branch, nothing twice."""
    async with ledger(make_store) as led:
        st_ = await story(led)
        follower = Follower(follow_branch(led.store, st_.sid, "main", start=0))
        history = await led.history(st_.sid)
        await follower.at_least(len(history))
        closed = await led.close(st_.sid)
        assert await follower.finished() == [*history, closed]


async def test_follow_yields_an_event_appended_while_the_history_is_read() -> None:
    """The race: an event commits after the feed end was taken and after the heads were
    read. It is not in the history, so the catch-up window must yield it."""

    class Racy(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.pending: list[Event] = []

        async def session(self, session_id: str) -> SessionRow:
            found = await super().session(session_id)
            if self.pending:
                late = self.pending.pop()
                # lands after the heads were read, before the second feed probe and
                # before the history is streamed (which must stop at the head read)
                await self.append(append_request([late], late.parent))
            return found

    store = Racy()
    async with Ledger(store, LedgerConfig(url="memory://")) as led:
        s = await led.create(user_id="u", agent="a")
        t1 = await led.add_turn(s.session_id, role="user", content="before")
        late = next_event(t1, TurnAdded(role="user", content="late"))
        store.pending.append(late)
        follower = Follower(led.follow(s.session_id))
        await follower.at_least(3)
        closed = await led.close(s.session_id)
        seen = await follower.finished()
        assert ids_of(seen) == [s.head, t1.id, late.id, closed.id]


async def test_follow_of_a_closed_branch_is_its_history(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        st_ = await story(led)
        await led.close(st_.sid, branch="alt")
        seen = [e async for e in led.follow(st_.sid, branch="alt")]
        assert seen == await led.history(st_.sid, branch="alt")


async def test_follow_of_unknown_session_or_branch(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        st_ = await story(led)
        before = await everything(led)
        with pytest.raises(SessionNotFoundError, match="'nope'"):
            await anext(led.follow("nope"))
        with pytest.raises(BranchNotFoundError, match="'zzz'"):
            await anext(led.follow(st_.sid, branch="zzz"))
        assert await everything(led) == before
