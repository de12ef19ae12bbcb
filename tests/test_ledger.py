"""The Ledger facade over every selected backend: the user's story, lifecycle, limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from ledger import (
    Branched,
    Checkpointed,
    ConfigError,
    ConflictError,
    EventNotFoundError,
    Expired,
    InvalidEventError,
    Ledger,
    LedgerConfig,
    Projection,
    Recorded,
    Restored,
    SessionCapacityError,
    SessionClosedError,
    SessionExpiredError,
    SessionNotFoundError,
    SessionState,
    SessionSuspendedError,
    SessionTransitionError,
    StoreClosedError,
    TurnAdded,
)
from ledger.events import Event
from projections.session import state_checksum
from stores.base import FeedStore, SessionQuery

MakeStore = Callable[[], FeedStore]


def ledger(make_store: MakeStore, **settings: Any) -> Ledger:
    return Ledger(make_store(), LedgerConfig(url="memory://", **settings))


async def everything(led: Ledger) -> dict[str, Any]:
    """All a store holds, to prove that a refused operation changed none of it."""
    store = led.store
    sessions = (await store.sessions(SessionQuery(limit=10_000))).items
    return {
        "feed": await store.read_feed(0, 100_000),
        "rows": sessions,
        "heads": {s.session_id: await store.heads(s.session_id) for s in sessions},
    }


async def test_the_story_of_a_session(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="user-42", agent="assistant", metadata={"topic": "support"})
        t1 = await led.add_turn(s.session_id, role="user", content="Hello!", tokens_in=3)
        await led.add_turn(
            s.session_id, role="assistant", content="Hi, how can I help?", tokens_out=7, model="m1"
        )
        cp = await led.checkpoint(s.session_id, label="greeted")
        cancel = await led.add_turn(s.session_id, role="user", content="Cancel my order")
        alt = await led.branch(s.session_id, "alt", at=cp.entry)
        await led.add_turn(s.session_id, role="user", content="Track my order", branch="alt")
        restored = await led.restore(s.session_id, cp.id)
        await led.suspend(s.session_id)
        await led.resume(s.session_id)
        closed = await led.close(s.session_id)

        assert (
            s.status == "active" and s.user_id == "user-42" and s.metadata == {"topic": "support"}
        )
        st = await led.state(s.session_id)
        assert st.status == "closed" and st.head == closed.id and st.branch == "main"
        assert st.turn_count == 2 and st.tokens_in == 3 and st.tokens_out == 7
        old = await led.state(s.session_id, at=t1.id)
        assert (old.turn_count, old.status, old.head) == (1, "active", t1.id)

        assert isinstance(restored.body, Restored) and restored.parent == cp.entry
        assert isinstance(alt.body, Branched) and alt.parent == cp.entry
        alt_state = await led.state(s.session_id, branch="alt")
        assert alt_state.status == "active" and alt_state.turn_count == 3

        main_turns = [t.content for t in await led.turns(s.session_id)]
        assert main_turns == ["Hello!", "Hi, how can I help?"]
        alt_turns = [t.content for t in await led.turns(s.session_id, branch="alt")]
        assert alt_turns == ["Hello!", "Hi, how can I help?", "Track my order"]
        # Nothing was deleted: the abandoned turn is still in the tree.
        assert cancel.id in [e.id async for e in led.events(s.session_id)]

        tree = await led.tree(s.session_id)
        assert set(tree.branches) == {"main", "alt"}
        assert tree.branches["alt"].fork_point == cp.entry
        assert tree.branches["main"].head == closed.id

        report = await led.verify(s.session_id)
        assert report.ok, report.problems
        assert report.events_checked == 11 and not report.keyed


async def test_history_is_the_path_from_the_root(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        t1 = await led.add_turn(s.session_id, role="user", content="one")
        t2 = await led.add_turn(s.session_id, role="user", content="two")
        history = await led.history(s.session_id)
        assert [e.id for e in history] == [s.head, t1.id, t2.id]
        assert [e.id for e in await led.history(s.session_id, at=t1.id)] == [s.head, t1.id]
        assert [e.seq for e in history] == [0, 1, 2]


async def test_record_and_a_registered_projection(make_store: MakeStore) -> None:
    def apply(tools: tuple[str, ...], event: Event) -> tuple[str, ...]:
        body = event.body
        if isinstance(body, Recorded) and body.type == "tool_call":
            return (*tools, body.data["tool"])
        return tools

    tools = Projection("tools", 1, initial=tuple, apply=apply, state_type=tuple[str, ...])
    async with ledger(make_store) as led:
        led.register(tools)
        s = await led.create(user_id="u", agent="a")
        first = await led.record(s.session_id, "tool_call", {"tool": "search", "q": "x"})
        await led.record(s.session_id, "state_delta", {"x": 1})
        await led.record(s.session_id, "tool_call", {"tool": "fetch"})
        assert await led.project(s.session_id, "tools") == ("search", "fetch")
        assert await led.project(s.session_id, tools, at=first.id) == ("search",)


async def test_metadata_merges_and_removes(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a", metadata={"a": 1, "b": 2})
        await led.set_metadata(s.session_id, {"b": None, "c": [3]})
        assert (await led.state(s.session_id)).metadata == {"a": 1, "c": [3]}


async def test_lifecycle_transitions(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        sid = s.session_id
        with pytest.raises(SessionTransitionError) as info:
            await led.resume(sid)
        assert str(info.value) == f"Invalid transition for session {sid!r}: 'active' -> 'active'"
        await led.suspend(sid)
        with pytest.raises(SessionSuspendedError, match=sid):
            await led.add_turn(sid, role="user", content="x")
        with pytest.raises(SessionTransitionError, match="'suspended' -> 'suspended'"):
            await led.suspend(sid)
        await led.checkpoint(sid)  # allowed while suspended
        await led.resume(sid)
        before_close = await led.add_turn(sid, role="user", content="x")
        await led.close(sid, reason="done")
        for write in (
            led.add_turn(sid, role="user", content="y"),
            led.suspend(sid),
            led.resume(sid),
            led.close(sid),
            led.checkpoint(sid),
            led.record(sid, "t"),
        ):
            with pytest.raises(SessionClosedError, match=sid):
                await write
        # Closed is terminal for the branch only: a branch forked before it is active.
        await led.branch(sid, "again", at=before_close.id)
        await led.add_turn(sid, role="user", content="z", branch="again")
        assert (await led.state(sid, branch="again")).status == "active"
        assert (await led.state(sid)).status == "closed"
        assert (await led.verify(sid)).ok


async def test_idle_session_expires_on_next_write(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a", ttl_s=0.01)
        await asyncio.sleep(0.05)
        with pytest.raises(SessionExpiredError, match=s.session_id):
            await led.add_turn(s.session_id, role="user", content="late")
        state = await led.state(s.session_id)
        assert state.status == "expired"
        history = await led.history(s.session_id)
        assert isinstance(history[-1].body, Expired) and len(history) == 2
        with pytest.raises(SessionExpiredError):
            await led.add_turn(s.session_id, role="user", content="later")
        assert len(await led.history(s.session_id)) == 2
        assert (await led.store.session(s.session_id)).status == "expired"
        assert (await led.verify(s.session_id)).ok


async def test_sweeper_expires_idle_sessions(make_store: MakeStore) -> None:
    async with ledger(make_store, session_ttl_s=0.01) as led:
        idle = await led.create(user_id="u", agent="a")
        await asyncio.sleep(0.05)
        fresh = await led.create(user_id="u", agent="a", ttl_s=60)
        assert await led.expire_idle() == [idle.session_id]
        assert (await led.state(idle.session_id)).status == "expired"
        assert (await led.state(fresh.session_id)).status == "active"


async def test_auto_checkpoint_every_n_turns(make_store: MakeStore) -> None:
    async with ledger(make_store, auto_checkpoint_every=2) as led:
        s = await led.create(user_id="u", agent="a")
        turns = [await led.add_turn(s.session_id, role="user", content=str(i)) for i in range(5)]
        state = await led.state(s.session_id)
        assert [c.entry for c in state.checkpoints] == [turns[1].id, turns[3].id]
        assert [c.label for c in state.checkpoints] == ["auto-2", "auto-4"]
        # A checkpoint follows its turn directly; add_turn returns the turn itself.
        history = await led.history(s.session_id)
        kinds = [e.kind for e in history]
        assert kinds.count("Checkpointed") == 2 and kinds[3] == "Checkpointed"
        assert all(t.kind == "TurnAdded" for t in turns)
        await led.restore(s.session_id, state.checkpoints[0].id)
        assert (await led.state(s.session_id)).turn_count == 2


async def test_add_turns_appends_them_in_one_append(make_store: MakeStore) -> None:
    async with ledger(make_store, auto_checkpoint_every=2) as led:
        s = await led.create(user_id="u", agent="a")
        first = await led.add_turn(s.session_id, role="user", content="0")
        turns = await led.add_turns(
            s.session_id,
            [
                {"role": "assistant", "content": "1", "tokens_out": 4, "tool_calls": ("t",)},
                TurnAdded(role="tool", content={"result": 2}, name="search"),
                {"role": "user", "content": "3"},
            ],
        )
        assert [t.body.content for t in turns] == ["1", {"result": 2}, "3"]  # type: ignore[attr-defined]
        assert turns[0].body == TurnAdded(
            role="assistant", content="1", tokens_out=4, tool_calls=["t"]
        )
        assert all(t.kind == "TurnAdded" for t in turns)
        # Chained after the head, with the auto checkpoints of turns 2 and 4 between them.
        history = await led.history(s.session_id)
        assert [e.kind for e in history[1:]] == [
            "TurnAdded", "TurnAdded", "Checkpointed", "TurnAdded", "TurnAdded", "Checkpointed",
        ]  # fmt: skip
        assert [e.id for e in history if e.kind == "TurnAdded"] == [first.id] + [
            t.id for t in turns
        ]
        # One append: the three turns and their checkpoints have consecutive feed positions.
        feed = await led.store.read_feed(0, 100)
        positions = [item.position for item in feed if item.event.id in {e.id for e in history[2:]}]
        assert positions == list(range(positions[0], positions[0] + 5))
        state = await led.state(s.session_id)
        assert state.turn_count == 4 and state.tokens_out == 4
        assert await led.add_turns(s.session_id, []) == []
        assert (await led.state(s.session_id)).head == state.head


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"role": "user", "content": object()}, "not JSON-encodable"),
        ({"role": "user", "content": "x", "colour": "red"}, "turn 1 "),
        ({"content": "no role"}, "turn 1 "),
        ({"role": "user", "content": "x", "tool_calls": 3}, "turn 1 "),
        ("just text", "turn 1 "),
    ],
)
async def test_add_turns_with_a_bad_turn_writes_none(
    make_store: MakeStore, bad: Any, message: str
) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        before = await everything(led)
        with pytest.raises(InvalidEventError, match=message) as info:
            await led.add_turns(s.session_id, [{"role": "user", "content": "fine"}, bad])
        assert s.session_id in str(info.value)
        assert await everything(led) == before


async def test_add_turns_is_refused_whole(make_store: MakeStore) -> None:
    async with ledger(make_store, max_turns_per_session=3) as led:
        s = await led.create(user_id="u", agent="a")
        await led.add_turn(s.session_id, role="user", content="1")
        before = await everything(led)
        two = [{"role": "user", "content": "2"}, {"role": "user", "content": "3"}]
        three = [*two, {"role": "user", "content": "4"}]
        with pytest.raises(SessionCapacityError, match=s.session_id):
            await led.add_turns(s.session_id, three)
        with pytest.raises(ConflictError, match=s.session_id):
            await led.add_turns(s.session_id, two, expected_head=s.head)
        with pytest.raises(SessionNotFoundError, match="no-such-session"):
            await led.add_turns("no-such-session", two)
        assert await everything(led) == before
        assert len(await led.add_turns(s.session_id, two)) == 2  # the limit itself is fine
        await led.close(s.session_id)
        with pytest.raises(SessionClosedError):
            await led.add_turns(s.session_id, [{"role": "user", "content": "late"}])


async def test_add_turns_retried_returns_the_original_turns(make_store: MakeStore) -> None:
    async with ledger(make_store, auto_checkpoint_every=2) as led:
        s = await led.create(user_id="u", agent="a")
        batch = [{"role": "user", "content": str(i)} for i in range(3)]
        turns = await led.add_turns(s.session_id, batch, idempotency_key="b-1")
        await led.add_turn(s.session_id, role="user", content="later")
        before = await everything(led)
        assert await led.add_turns(s.session_id, batch, idempotency_key="b-1") == turns
        assert await everything(led) == before


async def test_get_or_create_returns_the_latest_active_session(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        first = await led.get_or_create("u", "a")
        again = await led.get_or_create("u", "a")
        assert again.session_id == first.session_id
        other_agent = await led.get_or_create("u", "b")
        assert other_agent.session_id != first.session_id
        await led.close(first.session_id)
        fresh = await led.get_or_create("u", "a")
        assert fresh.session_id != first.session_id and fresh.status == "active"


async def test_sessions_listing_newest_activity_first(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        ids = [(await led.create(user_id="u", agent="a")).session_id for _ in range(3)]
        await led.add_turn(ids[0], role="user", content="bump")
        await led.close(ids[1])
        page = await led.sessions(user_id="u")
        assert [r.session_id for r in page.items] == [ids[1], ids[0], ids[2]]
        closed = await led.sessions(user_id="u", status="closed")
        assert [r.session_id for r in closed.items] == [ids[1]]
        first = await led.sessions(user_id="u", limit=2)
        rest = await led.sessions(user_id="u", limit=2, cursor=first.next_cursor)
        assert [r.session_id for r in first.items + rest.items] == [ids[1], ids[0], ids[2]]
        assert rest.next_cursor is None


async def test_idempotent_retries_return_the_original(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a", idempotency_key="c-1")
        assert (await led.create(user_id="u", agent="a", idempotency_key="c-1")) == s
        t = await led.add_turn(s.session_id, role="user", content="hi", idempotency_key="k-1")
        before = await everything(led)
        again = await led.add_turn(s.session_id, role="user", content="hi", idempotency_key="k-1")
        assert again == t
        assert await everything(led) == before
        # A retry after the session moved on and closed still answers with the original.
        await led.close(s.session_id)
        assert (
            await led.add_turn(s.session_id, role="user", content="hi", idempotency_key="k-1") == t
        )


async def test_expected_head_is_a_compare_and_swap(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        t1 = await led.add_turn(s.session_id, role="user", content="1", expected_head=s.head)
        before = await everything(led)
        with pytest.raises(ConflictError) as info:
            await led.add_turn(s.session_id, role="user", content="2", expected_head=s.head)
        assert info.value.current == t1.id and t1.id in str(info.value)
        assert await everything(led) == before


async def test_writers_of_another_ledger_are_seen_through_the_head_swap(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as one:
        two = Ledger(one.store, one.config)  # its own head cache and fold engine
        s = await one.create(user_id="u", agent="a")
        await one.add_turn(s.session_id, role="user", content="1")
        await two.add_turn(s.session_id, role="user", content="2")  # two learns the head
        await one.add_turn(s.session_id, role="user", content="3")  # one's head is stale: retried
        contents = [t.content for t in await one.turns(s.session_id)]
        assert contents == ["1", "2", "3"]
        assert (await one.verify(s.session_id)).ok


async def test_ten_concurrent_writers_keep_every_turn_once(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")

        async def writer(n: int) -> list[str]:
            return [
                (await led.add_turn(s.session_id, role="user", content=f"{n}-{i}")).id
                for i in range(10)
            ]

        acked = [i for ids in await asyncio.gather(*(writer(n) for n in range(10))) for i in ids]
        history = await led.history(s.session_id)
        assert sorted(e.id for e in history[1:]) == sorted(acked)
        assert len({e.id for e in history}) == len(history) == 101
        assert list(await led.store.heads(s.session_id)) == ["main"]
        assert (await led.verify(s.session_id)).ok


async def test_state_at_any_point_comes_from_snapshots_and_folds(make_store: MakeStore) -> None:
    async with ledger(make_store, snapshot_every=4) as led:
        s = await led.create(user_id="u", agent="a")
        ids = [
            (await led.add_turn(s.session_id, role="user", content=i, tokens_in=i)).id
            for i in range(30)
        ]
        # A second ledger on the same store starts with an empty cache: the first
        # query folds and persists snapshots, the later ones start from them.
        fresh = Ledger(led.store, led.config)
        for n, event_id in reversed(list(enumerate(ids))):
            state = await fresh.state(s.session_id, at=event_id)
            assert (state.turn_count, state.tokens_in, state.head) == (
                n + 1,
                sum(range(n + 1)),
                event_id,
            )
        snapshot = await led.store.get_snapshot(s.session_id, "session@1", ids[3])
        assert snapshot is not None  # seq 4 is a multiple of snapshot_every


async def test_keyed_checksums_are_macs(make_store: MakeStore) -> None:
    key = "11" * 32
    async with ledger(make_store, key=key) as led:
        s = await led.create(user_id="u", agent="a")
        cp = await led.checkpoint(s.session_id)
        assert (await led.verify(s.session_id)).keyed
        assert (await led.verify(s.session_id)).ok
        state = await led.state(s.session_id, at=cp.entry)
        assert cp.checksum == state_checksum(state, bytes.fromhex(key))
        assert cp.checksum != state_checksum(state)


async def test_closed_ledger_refuses(make_store: MakeStore) -> None:
    led = ledger(make_store)
    async with led:
        s = await led.create(user_id="u", agent="a")
    with pytest.raises(StoreClosedError):
        await led.add_turn(s.session_id, role="user", content="x")


def test_config_from_environment() -> None:
    config = LedgerConfig.from_env(
        {
            "LEDGER_MAX_TURNS_PER_SESSION": "5",
            "LEDGER_SESSION_TTL_S": "1.5",
            "LEDGER_URL": "memory://",
        }
    )
    assert config.max_turns_per_session == 5 and config.session_ttl_s == 1.5
    assert config.url == "memory://"
    with pytest.raises(ConfigError, match="LEDGER_MAX_TURNS_PER_SESSION: 'many'"):
        LedgerConfig.from_env({"LEDGER_MAX_TURNS_PER_SESSION": "many"})
    with pytest.raises(ConfigError, match="max_event_bytes"):
        LedgerConfig(max_event_bytes=-1)
    with pytest.raises(ConfigError, match="key"):
        LedgerConfig(key="abc")
    with pytest.raises(ConfigError, match="Unknown store URL"):
        Ledger.open("ftp://nowhere")


async def test_open_reads_url_and_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEDGER_URL", "memory://")
    monkeypatch.setenv("LEDGER_MAX_BRANCHES_PER_SESSION", "7")
    async with Ledger.open() as led:
        assert led.store.url == "memory://" and led.config.max_branches_per_session == 7
    led = await Ledger.open("memory://")
    try:
        assert isinstance(await led.create(user_id="u", agent="a"), SessionState)
    finally:
        await led.close()


async def test_checkpoint_events_record_their_entry(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        t = await led.add_turn(s.session_id, role="user", content="x")
        cp = await led.checkpoint(s.session_id, label="l")
        event = await led.get(cp.id)
        assert isinstance(event.body, Checkpointed)
        assert (event.body.entry, event.body.label, event.parent) == (t.id, "l", t.id)


@pytest.mark.durable
async def test_reads_see_what_another_ledger_over_the_same_store_appended(
    make_store: MakeStore,
) -> None:
    # Two ledgers over one store's data, as two processes have: each caches the
    # heads it wrote, and a read must not start from that cache.
    async with ledger(make_store) as here, ledger(make_store) as there:
        s = await here.create(user_id="u", agent="a")
        mine = await here.add_turn(s.session_id, role="user", content="from here")
        theirs = await there.add_turn(s.session_id, role="assistant", content="from there")

        state = await here.state(s.session_id)
        assert (state.head, state.turn_count) == (theirs.id, 2)
        assert [e.id for e in await here.history(s.session_id)][-2:] == [mine.id, theirs.id]
        assert [t.content for t in await here.turns(s.session_id)] == ["from here", "from there"]
        fork = await here.branch(s.session_id, "alt")
        assert fork.parent == theirs.id
        # A write planned on the stale cached head is corrected by the compare-and-swap.
        last = await here.add_turn(s.session_id, role="user", content="again from here")
        assert last.parent == theirs.id


async def test_turns_last_is_the_tail_of_all_turns_on_any_branch_and_point(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        sid = s.session_id
        for i in range(40):
            turn = await led.add_turn(sid, role="user" if i % 2 else "assistant", content=f"t{i}")
            if i % 7 == 0:
                await led.record(sid, type="tool", data={"i": i})
            if i == 20:
                middle = turn
        await led.redact(middle.id, reason="personal data")
        alt = await led.branch(sid, "alt", at=middle.id)
        await led.add_turn(sid, role="user", content="on alt", branch="alt")
        for branch, at in (("main", None), ("alt", None), ("main", middle.id), ("main", alt.id)):
            every = await led.turns(sid, branch=branch, at=at)
            for last in (0, 1, 2, 5, 16, 17, 33, len(every), len(every) + 3):
                got = await led.turns(sid, branch=branch, at=at, last=last)
                assert got == (every[-last:] if last else []), (branch, at, last)
        with pytest.raises(ValueError, match="-1"):
            await led.turns(sid, last=-1)
        other = await led.create(user_id="u2", agent="a")
        with pytest.raises(EventNotFoundError):
            await led.turns(other.session_id, at=middle.id, last=3)
