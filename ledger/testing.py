"""The store contract suite, shipped so that an outside backend can run it too.

Use it from a test module::

    from ledger.testing import StoreContract

    class TestMyStore(StoreContract):
        durable = True                      # data survives close and reopen

        @pytest.fixture
        def make_store(self, tmp_path):
            return lambda: MyStore(tmp_path / "data")   # a new, unopened store over the same data

and enable the plugin (it runs ``async def`` tests) with
``pytest_plugins = ["ledger.testing"]`` in a ``conftest.py``.

Two layers, as in ``stores.base``: ``EventStoreContract`` holds what every
``EventStore`` promises; ``StoreContract`` adds the global feed of a
``FeedStore``. The helpers ``create_event``, ``next_event``, ``branch_event``,
``turns``, ``append_request``, ``redaction_event`` and ``erase_request`` build
valid chains, for these tests and for anyone else's.

Every test uses fresh random session and user ids and measures the feed from
where it stood when the test began, so the suite also runs against a shared,
non-empty database.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
import pytest

from ledger.errors import (
    AlreadyRedactedError,
    BranchExistsError,
    ConflictError,
    EventNotFoundError,
    InvalidEventError,
    SessionCapacityError,
    SessionNotFoundError,
    StoreClosedError,
)
from ledger.events import (
    Body,
    Branched,
    Closed,
    Event,
    Recorded,
    Redacted,
    SessionCreated,
    Suspended,
    TurnAdded,
    compute_id,
    erase,
    make_event,
    new_session_id,
)
from stores.base import (
    AppendRequest,
    AppendResult,
    EventStore,
    FeedItem,
    FeedStore,
    SessionQuery,
    SessionRow,
)

__all__ = [
    "TIMEOUT",
    "EventStoreContract",
    "StoreContract",
    "append_request",
    "branch_event",
    "create_event",
    "erase_request",
    "next_event",
    "pytest_pyfunc_call",
    "redaction_event",
    "turns",
]

TIMEOUT = 5.0
"""Seconds any single wait may take before the test fails (a broken backend must not hang)."""

T = TypeVar("T")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests in a fresh event loop (no plugin dependency needed)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs: dict[str, Any] = {name: pyfuncitem.funcargs[name] for name in names}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


# Building data ---------------------------------------------------------------


def create_event(
    user_id: str = "user-1",
    agent: str = "agent-1",
    *,
    session: str | None = None,
    at: int | None = None,
    actor: str | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    branch: str = "main",
) -> Event:
    """A session's root: a ``SessionCreated`` event (a new random session unless given)."""
    return make_event(
        session=session or new_session_id(),
        parent=None,
        seq=0,
        branch=branch,
        at=time.time_ns() if at is None else at,
        actor=actor or user_id,
        body=SessionCreated(user_id=user_id, agent=agent, metadata=metadata or {}),
        idempotency_key=idempotency_key,
    )


def next_event(
    parent: Event,
    body: Body | None = None,
    *,
    branch: str | None = None,
    at: int | None = None,
    actor: str | None = None,
    idempotency_key: str | None = None,
) -> Event:
    """The event after ``parent`` (on its branch unless given); a ``TurnAdded`` by default.

    ``at`` defaults to one nanosecond after the parent, so a chain's times increase.
    """
    seq = parent.seq + 1
    return make_event(
        session=parent.session,
        parent=parent.id,
        seq=seq,
        branch=parent.branch if branch is None else branch,
        at=parent.at + 1 if at is None else at,
        actor=parent.actor if actor is None else actor,
        body=TurnAdded(role="user", content=f"turn {seq}") if body is None else body,
        idempotency_key=idempotency_key,
    )


def branch_event(
    fork_point: Event,
    name: str,
    *,
    at: int | None = None,
    actor: str | None = None,
    idempotency_key: str | None = None,
) -> Event:
    """The ``Branched`` event that starts branch ``name`` at ``fork_point``."""
    return next_event(
        fork_point,
        Branched(name=name, fork_point=fork_point.id),
        branch=name,
        at=at,
        actor=actor,
        idempotency_key=idempotency_key,
    )


def turns(parent: Event, count: int, *, branch: str | None = None) -> list[Event]:
    """``count`` chained ``TurnAdded`` events after ``parent``, on ``branch`` or the parent's."""
    out: list[Event] = []
    for _ in range(count):
        parent = next_event(parent, branch=branch if not out else None)
        out.append(parent)
    return out


def redaction_event(parent: Event, *erased: Event, reason: str = "test") -> Event:
    """A ``Redacted`` event after ``parent`` naming the first of ``erased``."""
    return next_event(parent, Redacted(event=erased[0].id, reason=reason))


def erase_request(
    redaction: Event, expected_head: str | None, erased: Sequence[Event]
) -> AppendRequest:
    """The request appending ``redaction`` and overwriting ``erased`` with their redacted form."""
    return AppendRequest(
        session_id=redaction.session,
        branch=redaction.branch,
        expected_head=expected_head,
        events=[redaction],
        erase=[erase(e) for e in erased],
    )


def append_request(
    events: Sequence[Event],
    expected_head: str | None,
    *,
    status: str | None = None,
    max_open_sessions: int | None = None,
    max_branches: int | None = None,
) -> AppendRequest:
    """The request appending ``events`` on the session and branch of the first one."""
    return AppendRequest(
        session_id=events[0].session,
        branch=events[0].branch,
        expected_head=expected_head,
        events=list(events),
        status=status,
        max_open_sessions=max_open_sessions,
        max_branches=max_branches,
    )


# Private test helpers ---------------------------------------------------------


async def _within(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, TIMEOUT)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def _session(
    store: EventStore,
    *,
    n_turns: int = 0,
    user_id: str | None = None,
    agent: str = "agent-1",
    at: int | None = None,
    status: str | None = None,
) -> list[Event]:
    """Create a session (and append ``n_turns`` turns in a second batch); return its events."""
    root = create_event(user_id or _unique("user"), agent, at=at)
    await store.append(append_request([root], None, status=status))
    chain = turns(root, n_turns)
    if chain:
        await store.append(append_request(chain, root.id))
    return [root, *chain]


def _pending(awaitable: Awaitable[T], tasks: list[asyncio.Future[Any]]) -> asyncio.Future[T]:
    """Start waiting now (bounded by TIMEOUT); the caller cancels ``tasks`` when done."""
    task = asyncio.ensure_future(_within(awaitable))
    tasks.append(task)
    return task


async def _cancel(tasks: list[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


async def _listing(store: EventStore, query: SessionQuery) -> list[SessionRow]:
    """Every row of a listing, following its cursors."""
    rows: list[SessionRow] = []
    page = await store.sessions(query)
    rows.extend(page.items)
    pages = 1
    while page.next_cursor is not None:
        pages += 1
        assert pages < 1000, "the listing's cursor never ends"
        page = await store.sessions(
            SessionQuery(
                user_id=query.user_id,
                agent=query.agent,
                status=query.status,
                limit=query.limit,
                cursor=page.next_cursor,
            )
        )
        rows.extend(page.items)
    return rows


async def _feed_from(store: FeedStore, after: int, limit: int = 1000) -> list[FeedItem]:
    items: list[FeedItem] = []
    while True:
        page = await store.read_feed(after, limit)
        if not page:
            return items
        items.extend(page)
        after = page[-1].position


async def _feed_end(store: FeedStore) -> int:
    """The position of the newest event in the feed (0 when it is empty)."""
    items = await _feed_from(store, 0)
    return items[-1].position if items else 0


async def _snapshot_of(store: EventStore, session_id: str) -> tuple[object, ...]:
    """Everything a refused write must leave unchanged for one session."""
    try:
        row: SessionRow | None = await store.session(session_id)
    except SessionNotFoundError:
        row = None
    listing = await _listing(store, SessionQuery(user_id=row.user_id, limit=1000)) if row else []
    return (
        await store.heads(session_id),
        await _collect(store.events(session_id, page_size=2)),
        row,
        listing,
    )


class EventStoreContract:
    """What every ``EventStore`` promises (see the docstrings of ``stores.base``).

    A subclass provides a ``make_store`` fixture: a zero-argument callable that
    returns a new, unopened store over the same data at each call.
    """

    durable: bool = False
    """True when data survives close and reopen (the reopen tests are skipped otherwise)."""

    # append and get

    async def test_append_then_get_returns_equal_events(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root = create_event("user-rt", "agent-rt", metadata={"k": [1, 2.5, None, "x"]})
            result = await store.append(append_request([root], None))
            assert result == AppendResult([root], replayed=False)
            body = TurnAdded(
                role="assistant",
                content={"text": "hé", "parts": [1, 2.0, True, None]},
                name="bot",
                tokens_in=3,
                tokens_out=5,
                cost=0.25,
                model="m-1",
                tool_calls=[{"name": "search", "args": {"q": "x"}}],
                turn_id="t-1",
                metadata={"a": {"b": []}},
            )
            chain = [
                next_event(root, body, idempotency_key="k-1"),
            ]
            chain.append(next_event(chain[-1], Recorded(type="tool", data=[{"x": 1}])))
            chain.append(next_event(chain[-1], Suspended(reason="lunch")))
            result = await store.append(append_request(chain, root.id))
            assert result.events == chain
            assert not result.replayed
            for event in [root, *chain]:
                got = await store.get(event.id)
                assert got == event
                assert type(got.body) is type(event.body)

    async def test_get_unknown_id_raises_event_not_found_naming_it(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            await _session(store)
            missing = "0" * 64
            with pytest.raises(EventNotFoundError) as info:
                await store.get(missing)
            assert missing in str(info.value)
            assert info.value.event_id == missing

    async def test_get_inline_is_get(self, make_store: Callable[[], EventStore]) -> None:
        async with make_store() as store:
            events = await _session(store, n_turns=2)
            for event in events:
                assert await store.get_inline(event.id) == event
            missing = "0" * 64
            with pytest.raises(EventNotFoundError) as info:
                await store.get_inline(missing)
            assert info.value.event_id == missing

    # the compare-and-swap

    async def test_stale_expected_head_raises_conflict_naming_current_head(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, first = await _session(store, n_turns=1)
            second = next_event(first)
            await store.append(append_request([second], first.id))
            stale = next_event(first)  # built on a head that has moved
            with pytest.raises(ConflictError) as info:
                await store.append(append_request([stale], first.id))
            error = info.value
            assert type(error) is ConflictError
            assert error.current == second.id
            assert error.expected == first.id
            assert error.session_id == root.session
            assert error.branch == "main"
            assert second.id in str(error)
            assert root.session in str(error)

    async def test_conflict_writes_nothing(self, make_store: Callable[[], EventStore]) -> None:
        async with make_store() as store:
            events = await _session(store, n_turns=2)
            before = await _snapshot_of(store, events[0].session)
            stale = turns(events[1], 3)
            with pytest.raises(ConflictError):
                await store.append(append_request(stale, events[1].id))
            assert await _snapshot_of(store, events[0].session) == before
            for event in stale:
                with pytest.raises(EventNotFoundError):
                    await store.get(event.id)

    async def test_expected_head_on_a_branch_that_does_not_exist_conflicts(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, first = await _session(store, n_turns=1)
            orphan = next_event(first, branch="nowhere")
            with pytest.raises(ConflictError) as info:
                await store.append(append_request([orphan], first.id))
            assert info.value.current is None
            assert await store.heads(root.session) == {"main": first.id}

    async def test_creating_an_existing_branch_raises_branch_exists(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, first = await _session(store, n_turns=1)
            alt = branch_event(first, "alt")
            await store.append(append_request([alt], None))
            before = await _snapshot_of(store, root.session)
            again = branch_event(root, "alt")
            with pytest.raises(BranchExistsError) as info:
                await store.append(append_request([again], None))
            assert "alt" in str(info.value)
            assert root.session in str(info.value)
            assert info.value.current == alt.id
            assert await _snapshot_of(store, root.session) == before

    async def test_creating_an_existing_session_raises_branch_exists(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, _ = await _session(store, n_turns=1)
            before = await _snapshot_of(store, root.session)
            twin = create_event("someone-else", "agent-2", session=root.session)
            with pytest.raises(BranchExistsError):
                await store.append(append_request([twin], None))
            assert await _snapshot_of(store, root.session) == before

    async def test_second_root_of_a_session_is_refused_on_any_branch(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        # A session is a tree with one root: a SessionCreated for a session that
        # exists must not be accepted on a new branch name either (it would
        # replace the session's listing row and give the tree a second root).
        async with make_store() as store:
            root, _ = await _session(store, n_turns=1)
            before = await _snapshot_of(store, root.session)
            twin = create_event("someone-else", "agent-2", session=root.session, branch="other")
            with pytest.raises((ConflictError, InvalidEventError)):
                await store.append(append_request([twin], None))
            assert await _snapshot_of(store, root.session) == before

    async def test_append_to_unknown_session_raises_session_not_found(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            ghost_root = create_event(_unique("user"))  # never appended
            turn = next_event(ghost_root)
            with pytest.raises(SessionNotFoundError) as info:
                await store.append(append_request([turn], ghost_root.id))
            assert ghost_root.session in str(info.value)
            fork = branch_event(ghost_root, "alt")
            with pytest.raises(SessionNotFoundError):
                await store.append(append_request([fork], None))
            assert await store.heads(ghost_root.session) == {}
            assert await _collect(store.events(ghost_root.session)) == []
            with pytest.raises(SessionNotFoundError):
                await store.session(ghost_root.session)

    async def test_unknown_session_row_raises_session_not_found_naming_it(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            missing = new_session_id()
            with pytest.raises(SessionNotFoundError) as info:
                await store.session(missing)
            assert missing in str(info.value)

    # batches

    async def test_batch_is_all_or_nothing(self, make_store: Callable[[], EventStore]) -> None:
        async with make_store() as store:
            root, *_ = await _session(store)
            good = turns(root, 2)
            bad = next_event(root)  # does not extend good[-1]
            before = await _snapshot_of(store, root.session)
            with pytest.raises(InvalidEventError):
                await store.append(append_request([*good, bad], root.id))
            assert await _snapshot_of(store, root.session) == before
            for event in good:
                with pytest.raises(EventNotFoundError):
                    await store.get(event.id)
            # the same events in a valid batch all land, in order
            whole = turns(root, 4)
            await store.append(append_request(whole, root.id))
            assert await _collect(store.events(root.session)) == [root, *whole]
            assert await store.heads(root.session) == {"main": whole[-1].id}

    async def test_broken_chain_is_invalid_and_writes_nothing(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, first = await _session(store, n_turns=1)
            a = next_event(first)
            wrong_parent = next_event(first)  # parent is first, not a
            before = await _snapshot_of(store, root.session)
            with pytest.raises(InvalidEventError):
                await store.append(append_request([a, wrong_parent], first.id))
            # right parent, wrong depth
            wrong_seq = next_event(a)
            draft = msgspec.structs.replace(wrong_seq, seq=wrong_seq.seq + 1)
            wrong_seq = msgspec.structs.replace(draft, id=compute_id(draft))
            with pytest.raises(InvalidEventError):
                await store.append(append_request([a, wrong_seq], first.id))
            assert await _snapshot_of(store, root.session) == before

    async def test_mixed_sessions_or_branches_are_invalid_and_write_nothing(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            one = await _session(store, n_turns=1)
            two = await _session(store, n_turns=1)
            before = (
                await _snapshot_of(store, one[0].session),
                await _snapshot_of(store, two[0].session),
            )
            mine = next_event(one[-1])
            theirs = next_event(two[-1])
            with pytest.raises(InvalidEventError):
                await store.append(append_request([mine, theirs], one[-1].id))
            # an event of another session under this session's request
            with pytest.raises(InvalidEventError):
                await store.append(
                    AppendRequest(
                        session_id=one[0].session,
                        branch="main",
                        expected_head=two[-1].id,
                        events=[theirs],
                    )
                )
            other_branch = next_event(mine, branch="elsewhere")
            with pytest.raises(InvalidEventError):
                await store.append(append_request([mine, other_branch], one[-1].id))
            after = (
                await _snapshot_of(store, one[0].session),
                await _snapshot_of(store, two[0].session),
            )
            assert after == before

    async def test_empty_batch_is_invalid(self, make_store: Callable[[], EventStore]) -> None:
        async with make_store() as store:
            root, *_ = await _session(store)
            before = await _snapshot_of(store, root.session)
            with pytest.raises(InvalidEventError) as info:
                await store.append(
                    AppendRequest(
                        session_id=root.session, branch="main", expected_head=root.id, events=[]
                    )
                )
            assert root.session in str(info.value)
            assert await _snapshot_of(store, root.session) == before

    # idempotency

    async def test_same_idempotency_key_replays_original_and_writes_nothing(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, first = await _session(store, n_turns=1)
            original = next_event(first, idempotency_key="retry-me")
            result = await store.append(append_request([original], first.id))
            assert not result.replayed
            before = await _snapshot_of(store, root.session)
            # a retry: a rebuilt event (new salt, so a new id) with the same key,
            # sent against the head the client saw before its first attempt
            retry = next_event(first, idempotency_key="retry-me")
            assert retry.id != original.id
            result = await store.append(append_request([retry], first.id))
            assert result.replayed
            assert result.events == [original]
            assert await _snapshot_of(store, root.session) == before
            with pytest.raises(EventNotFoundError):
                await store.get(retry.id)

    async def test_idempotency_keys_are_per_session(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            one = await _session(store)
            two = await _session(store)
            a = next_event(one[0], idempotency_key="same")
            b = next_event(two[0], idempotency_key="same")
            assert not (await store.append(append_request([a], one[0].id))).replayed
            assert not (await store.append(append_request([b], two[0].id))).replayed
            assert await store.find_by_key(one[0].session, "same") == a
            assert await store.find_by_key(two[0].session, "same") == b

    async def test_session_created_idempotency_is_by_user_and_key(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            user = _unique("user")
            original = create_event(user, "agent-1", idempotency_key="create-1")
            result = await store.append(append_request([original], None))
            assert not result.replayed
            assert await store.find_created(user, "create-1") == original
            # a retry builds a new session id; the store answers with the first one
            retry = create_event(user, "agent-1", idempotency_key="create-1")
            assert retry.session != original.session
            result = await store.append(append_request([retry], None))
            assert result.replayed
            assert result.events == [original]
            with pytest.raises(SessionNotFoundError):
                await store.session(retry.session)
            assert await store.heads(retry.session) == {}
            rows = await _listing(store, SessionQuery(user_id=user))
            assert [r.session_id for r in rows] == [original.session]
            # another user may use the same key
            other = create_event(_unique("user"), "agent-1", idempotency_key="create-1")
            assert not (await store.append(append_request([other], None))).replayed
            assert await store.find_created(user, "create-1") == original
            assert await store.find_created(user, "other-key") is None
            assert await store.find_created(_unique("user"), "create-1") is None

    async def test_replay_ignores_capacity_limits(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            user = _unique("user")
            original = create_event(user, "agent-1", idempotency_key="k")
            await store.append(append_request([original], None))
            retry = create_event(user, "agent-1", idempotency_key="k")
            result = await store.append(append_request([retry], None, max_open_sessions=1))
            assert result.replayed
            assert result.events == [original]

    async def test_find_by_key(self, make_store: Callable[[], EventStore]) -> None:
        async with make_store() as store:
            root, first = await _session(store, n_turns=1)
            a = next_event(first, idempotency_key="a")
            b = next_event(a)
            c = next_event(b, idempotency_key="c")
            await store.append(append_request([a, b, c], first.id))
            assert await store.find_by_key(root.session, "a") == a
            assert await store.find_by_key(root.session, "c") == c
            assert await store.find_by_key(root.session, "b") is None
            assert await store.find_by_key(new_session_id(), "a") is None

    # history

    async def test_ancestors_are_newest_first_and_respect_limit(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            events = await _session(store, n_turns=5)
            head = events[-1]
            assert await store.ancestors(head.id) == list(reversed(events))
            assert await store.ancestors(head.id, limit=3) == list(reversed(events))[:3]
            assert await store.ancestors(head.id, limit=1) == [head]
            assert await store.ancestors(head.id, limit=100) == list(reversed(events))
            assert await store.ancestors(events[2].id) == list(reversed(events[:3]))
            assert await store.ancestors(events[0].id) == [events[0]]

    async def test_ancestors_of_unknown_id_raise_event_not_found(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            missing = "f" * 64
            with pytest.raises(EventNotFoundError) as info:
                await store.ancestors(missing)
            assert missing in str(info.value)

    async def test_path_is_root_first(self, make_store: Callable[[], EventStore]) -> None:
        async with make_store() as store:
            events = await _session(store, n_turns=4)
            assert await store.path(events[-1].id) == events
            assert await store.path(events[0].id) == [events[0]]

    async def test_history_across_a_fork(self, make_store: Callable[[], EventStore]) -> None:
        async with make_store() as store:
            root, t1, t2, t3 = await _session(store, n_turns=3)
            fork = branch_event(t1, "alt")  # parent is on main
            alt = [fork, *turns(fork, 2)]
            await store.append(append_request(alt, None))
            assert await store.path(alt[-1].id) == [root, t1, *alt]
            assert await store.ancestors(alt[-1].id, limit=4) == [alt[2], alt[1], fork, t1]
            # main is untouched by the fork
            assert await store.path(t3.id) == [root, t1, t2, t3]
            assert await store.heads(root.session) == {"main": t3.id, "alt": alt[-1].id}
            # a fork of the fork
            deeper = branch_event(alt[1], "alt.2")
            await store.append(append_request([deeper], None))
            assert await store.path(deeper.id) == [root, t1, fork, alt[1], deeper]

    async def test_events_in_append_order_across_pages(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, *chain = await _session(store, n_turns=6)
            fork = branch_event(chain[1], "alt")
            alt = [fork, *turns(fork, 2)]
            await store.append(append_request(alt, None))
            more = turns(chain[-1], 2)
            await store.append(append_request(more, chain[-1].id))
            expected = [root, *chain, *alt, *more]
            for page_size in (1, 2, 3, 1000):
                got = await _collect(store.events(root.session, page_size=page_size))
                assert got == expected, f"page_size={page_size}"

    async def test_events_of_interleaved_sessions_stay_apart(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            a = await _session(store)
            b = await _session(store)
            for _ in range(4):
                a.append(next_event(a[-1]))
                await store.append(append_request([a[-1]], a[-2].id))
                b.append(next_event(b[-1]))
                await store.append(append_request([b[-1]], b[-2].id))
            assert await _collect(store.events(a[0].session, page_size=2)) == a
            assert await _collect(store.events(b[0].session, page_size=2)) == b
            assert await _collect(store.events(new_session_id(), page_size=2)) == []

    async def test_event_pages_are_the_events_from_any_start_in_pages(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, *chain = await _session(store, n_turns=6)
            other = await _session(store, n_turns=1)  # interleaved, never in the pages
            fork = branch_event(chain[1], "alt")
            await store.append(append_request([fork, *turns(fork, 2)], None))
            expected = await _collect(store.events(root.session))
            assert len(expected) == 10 and other[0] not in expected
            for page_size in (1, 3, 4, 1000):
                for start in (0, 1, 9, 10, 11):
                    pages = await _collect(
                        store.event_pages(root.session, start, page_size=page_size)
                    )
                    assert all(0 < len(page) <= page_size for page in pages)
                    got = [event for page in pages for event in page]
                    assert got == expected[start:], f"page_size={page_size}, start={start}"
            assert await _collect(store.event_pages(new_session_id())) == []

    async def test_heads_per_branch(self, make_store: Callable[[], EventStore]) -> None:
        async with make_store() as store:
            root, *_ = await _session(store)
            assert await store.heads(root.session) == {"main": root.id}
            main = turns(root, 2)
            await store.append(append_request(main, root.id))
            fork = branch_event(root, "alt")
            await store.append(append_request([fork], None))
            assert await store.heads(root.session) == {"main": main[-1].id, "alt": fork.id}
            alt = turns(fork, 3)
            await store.append(append_request(alt, fork.id))
            assert await store.heads(root.session) == {"main": main[-1].id, "alt": alt[-1].id}
            assert await store.heads(new_session_id()) == {}

    # the sessions listing

    async def test_listing_row_tracks_events_and_activity(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            user = _unique("user")
            root = create_event(user, "agent-x", at=1_000)
            await store.append(append_request([root], None))
            row = await store.session(root.session)
            assert row == SessionRow(
                session_id=root.session,
                user_id=user,
                agent="agent-x",
                status="active",
                created_at=1_000,
                last_activity_at=1_000,
                event_count=1,
            )
            chain = [next_event(root, at=2_000)]
            chain.append(next_event(chain[-1], at=3_000))
            await store.append(append_request(chain, root.id))
            fork = branch_event(root, "alt", at=5_000)
            await store.append(append_request([fork], None))
            row = await store.session(root.session)
            assert row.event_count == 4
            assert row.last_activity_at == 5_000
            assert row.created_at == 1_000
            # activity never moves backwards, even for an event stamped earlier
            late = next_event(chain[-1], at=4_000)
            await store.append(append_request([late], chain[-1].id))
            row = await store.session(root.session)
            assert row.event_count == 5
            assert row.last_activity_at == 5_000
            assert await _listing(store, SessionQuery(user_id=user)) == [row]

    async def test_listing_status_follows_append_request_status(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            user = _unique("user")
            root, first = await _session(store, user_id=user, n_turns=1)
            pause = next_event(first, Suspended())
            await store.append(append_request([pause], first.id, status="suspended"))
            assert (await store.session(root.session)).status == "suspended"
            note = next_event(pause, Recorded(type="note"))
            await store.append(append_request([note], pause.id))  # status: unchanged
            assert (await store.session(root.session)).status == "suspended"
            end = next_event(note, Closed(reason="done"))
            await store.append(append_request([end], note.id, status="closed"))
            row = await store.session(root.session)
            assert row.status == "closed"
            assert row.event_count == 5
            closed = await _listing(store, SessionQuery(user_id=user, status="closed"))
            assert [r.session_id for r in closed] == [root.session]
            assert await _listing(store, SessionQuery(user_id=user, status="active")) == []

    async def test_listing_filters_by_user_agent_and_status(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            alice, bob = _unique("alice"), _unique("bob")
            planner, coder = _unique("planner"), _unique("coder")
            a1 = (await _session(store, user_id=alice, agent=planner))[0]
            a2 = (await _session(store, user_id=alice, agent=coder, status="suspended"))[0]
            b1 = (await _session(store, user_id=bob, agent=planner))[0]

            async def ids(**filters: Any) -> set[str]:
                return {r.session_id for r in await _listing(store, SessionQuery(**filters))}

            assert await ids(user_id=alice) == {a1.session, a2.session}
            assert await ids(user_id=bob) == {b1.session}
            assert await ids(agent=planner) == {a1.session, b1.session}
            assert await ids(agent=coder) == {a2.session}
            assert await ids(user_id=alice, agent=planner) == {a1.session}
            assert await ids(user_id=alice, status="suspended") == {a2.session}
            assert await ids(user_id=alice, status="active") == {a1.session}
            assert await ids(user_id=bob, agent=coder) == set()
            assert await ids(user_id=_unique("nobody")) == set()
            for row in await _listing(store, SessionQuery(user_id=alice)):
                assert row.user_id == alice

    async def test_listing_is_newest_activity_first(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            user = _unique("user")
            old = await _session(store, user_id=user, at=10_000)
            mid = await _session(store, user_id=user, at=20_000)
            new = await _session(store, user_id=user, at=30_000)
            rows = await _listing(store, SessionQuery(user_id=user))
            assert [r.session_id for r in rows] == [s[0].session for s in (new, mid, old)]
            # activity on the oldest session moves it to the front
            bump = next_event(old[0], at=40_000)
            await store.append(append_request([bump], old[0].id))
            rows = await _listing(store, SessionQuery(user_id=user))
            assert [r.session_id for r in rows] == [s[0].session for s in (old, new, mid)]
            assert [r.last_activity_at for r in rows] == [40_000, 30_000, 20_000]

    async def test_listing_cursor_visits_every_row_exactly_once(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            user = _unique("user")
            created: list[str] = []
            # several sessions share a timestamp: the cursor must break ties
            for i in range(11):
                events = await _session(store, user_id=user, at=1_000 + (i // 3))
                created.append(events[0].session)
            for limit in (1, 2, 4, 11, 50):
                first = await store.sessions(SessionQuery(user_id=user, limit=limit))
                assert len(first.items) == min(limit, 11)
                assert (first.next_cursor is None) == (limit >= 11)
                rows = await _listing(store, SessionQuery(user_id=user, limit=limit))
                ids = [r.session_id for r in rows]
                assert sorted(ids) == sorted(created), f"limit={limit}"
                assert len(set(ids)) == len(ids), f"limit={limit}"
                keys = [r.last_activity_at for r in rows]
                assert keys == sorted(keys, reverse=True), f"limit={limit}"

    # capacity

    async def test_max_open_sessions_counts_active_and_suspended_only(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            user = _unique("user")
            await _session(store, user_id=user)
            await _session(store, user_id=user, status="suspended")
            await _session(store, user_id=user, status="closed")
            await _session(store, user_id=user, status="expired")
            rows_before = await _listing(store, SessionQuery(user_id=user))
            refused = create_event(user, "agent-1")
            with pytest.raises(SessionCapacityError) as info:
                await store.append(append_request([refused], None, max_open_sessions=2))
            assert user in str(info.value)
            assert info.value.limit == 2
            assert await _listing(store, SessionQuery(user_id=user)) == rows_before
            assert await store.heads(refused.session) == {}
            with pytest.raises(EventNotFoundError):
                await store.get(refused.id)
            # a third open session fits under a limit of three
            allowed = create_event(user, "agent-1")
            await store.append(append_request([allowed], None, max_open_sessions=3))
            assert (await store.session(allowed.session)).status == "active"
            # other users are not counted
            other = create_event(_unique("user"), "agent-1")
            await store.append(append_request([other], None, max_open_sessions=1))

    async def test_closing_a_session_frees_its_open_slot(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            user = _unique("user")
            root, *_ = await _session(store, user_id=user)
            with pytest.raises(SessionCapacityError):
                await store.append(
                    append_request([create_event(user, "a")], None, max_open_sessions=1)
                )
            end = next_event(root, Closed())
            await store.append(append_request([end], root.id, status="closed"))
            await store.append(append_request([create_event(user, "a")], None, max_open_sessions=1))

    async def test_max_branches_refuses_a_new_branch_and_writes_nothing(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, first = await _session(store, n_turns=1)
            fork = branch_event(first, "alt")
            await store.append(append_request([fork], None, max_branches=2))
            before = await _snapshot_of(store, root.session)
            third = branch_event(root, "third")
            with pytest.raises(SessionCapacityError) as info:
                await store.append(append_request([third], None, max_branches=2))
            assert root.session in str(info.value)
            assert info.value.limit == 2
            assert await _snapshot_of(store, root.session) == before
            with pytest.raises(EventNotFoundError):
                await store.get(third.id)
            # appending to an existing branch is not creating one
            more = next_event(fork)
            await store.append(append_request([more], fork.id, max_branches=2))
            await store.append(append_request([third], None, max_branches=3))
            assert set(await store.heads(root.session)) == {"main", "alt", "third"}

    # snapshots

    async def test_snapshots_put_get_overwrite_and_missing(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, first = await _session(store, n_turns=1)
            sid = root.session
            assert await store.get_snapshot(sid, "state:1", root.id) is None
            await store.put_snapshots(sid, "state:1", [(root.id, b"\x00zero"), (first.id, b"one")])
            assert await store.get_snapshot(sid, "state:1", root.id) == b"\x00zero"
            assert await store.get_snapshot(sid, "state:1", first.id) == b"one"
            assert await store.get_snapshot(sid, "state:2", first.id) is None
            assert await store.get_snapshot(new_session_id(), "state:1", first.id) is None
            await store.put_snapshots(sid, "state:1", [(first.id, b"one, again")])
            assert await store.get_snapshot(sid, "state:1", first.id) == b"one, again"
            await store.put_snapshots(sid, "state:1", [])
            assert await store.get_snapshot(sid, "state:1", root.id) == b"\x00zero"

    # anchors

    async def test_anchors_are_kept_per_session_in_the_order_put(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            (root, *_), (other, *_) = await _session(store), await _session(store)
            assert await store.anchors(root.session) == []
            for data in (b'{"size":1}', b'{"size":3}', b'{"size":2}'):
                await store.put_anchor(root.session, data)
            await store.put_anchor(other.session, b'{"size":9}')
            await store.put_anchor(root.session, b'{"size":1}')  # a repeat is kept again
            assert await store.anchors(root.session) == [
                b'{"size":1}',
                b'{"size":3}',
                b'{"size":2}',
                b'{"size":1}',
            ]
            assert await store.anchors(other.session) == [b'{"size":9}']
            assert await store.anchors(new_session_id()) == []
        if self.durable:
            async with make_store() as store:
                assert len(await store.anchors(root.session)) == 4
                assert await store.anchors(other.session) == [b'{"size":9}']

    # lifecycle

    async def test_every_method_raises_store_closed_after_close(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        store = make_store()
        await store.open()
        try:
            root, first = await _session(store, n_turns=1)
        finally:
            await store.close()
        await store.close()  # closing twice is harmless
        await self._assert_unusable(store, root, first)
        with pytest.raises(StoreClosedError):
            await store.open()

    async def test_every_method_raises_store_closed_before_open(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        store = make_store()
        root = create_event()
        await self._assert_unusable(store, root, next_event(root))

    async def _assert_unusable(self, store: EventStore, root: Event, first: Event) -> None:
        sid = root.session
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.append(append_request([next_event(first)], first.id)),
            lambda: store.append(append_request([create_event()], None)),
            lambda: store.get(root.id),
            lambda: store.find_by_key(sid, "k"),
            lambda: store.find_created("user-1", "k"),
            lambda: store.ancestors(first.id),
            lambda: store.path(first.id),
            lambda: _collect(store.events(sid)),
            lambda: store.heads(sid),
            lambda: store.session(sid),
            lambda: store.sessions(SessionQuery()),
            lambda: store.get_snapshot(sid, "k", root.id),
            lambda: store.put_snapshots(sid, "k", [(root.id, b"x")]),
            lambda: store.put_anchor(sid, b"{}"),
            lambda: store.anchors(sid),
            *self._more_calls(store),
        ]
        for call in calls:
            with pytest.raises(StoreClosedError):
                await _within(call())

    def _more_calls(self, store: EventStore) -> list[Callable[[], Awaitable[object]]]:
        return []

    async def test_async_with_opens_and_closes(self, make_store: Callable[[], EventStore]) -> None:
        store = make_store()
        async with store as entered:
            assert entered is store
            await _session(store)
        with pytest.raises(StoreClosedError):
            await store.heads(new_session_id())

    async def test_open_is_idempotent(self, make_store: Callable[[], EventStore]) -> None:
        async with make_store() as store:
            root, *_ = await _session(store)
            await store.open()
            assert await store.get(root.id) == root

    # durability

    @pytest.mark.durable
    async def test_everything_survives_close_and_reopen(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        if not self.durable:
            pytest.skip("not durable: data does not outlive the store")
        user = _unique("user")
        async with make_store() as store:
            root = create_event(user, "agent-d", at=1_000, idempotency_key="create")
            await store.append(append_request([root], None))
            main = [next_event(root, at=2_000, idempotency_key="t1")]
            main.append(next_event(main[-1], at=3_000))
            await store.append(append_request(main, root.id))
            fork = branch_event(main[0], "alt", at=4_000)
            await store.append(append_request([fork], None))
            pause = next_event(main[-1], Suspended(), at=5_000)
            await store.append(append_request([pause], main[-1].id, status="suspended"))
            row = await store.session(root.session)
        async with make_store() as store:
            for event in (root, *main, fork, pause):
                assert await store.get(event.id) == event
            assert await _collect(store.events(root.session, page_size=2)) == [
                root,
                *main,
                fork,
                pause,
            ]
            assert await store.heads(root.session) == {"main": pause.id, "alt": fork.id}
            assert await store.path(fork.id) == [root, main[0], fork]
            assert await store.session(root.session) == row
            assert await _listing(store, SessionQuery(user_id=user)) == [row]
            assert await store.find_by_key(root.session, "t1") == main[0]
            assert await store.find_created(user, "create") == root
            # the compare-and-swap and idempotency still hold after reopening
            with pytest.raises(ConflictError) as info:
                await store.append(append_request([next_event(main[-1])], main[-1].id))
            assert info.value.current == pause.id
            replay = await store.append(
                append_request([next_event(root, idempotency_key="t1")], root.id)
            )
            assert replay.replayed
            assert replay.events == [main[0]]
            resumed = next_event(pause, at=6_000)
            await store.append(append_request([resumed], pause.id))
        async with make_store() as store:
            assert await store.heads(root.session) == {"main": resumed.id, "alt": fork.id}
            assert (await store.session(root.session)).event_count == 6

    # redaction: the erase of an append request

    async def test_erase_overwrites_events_with_their_redacted_form(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, first, second = await _session(store, n_turns=2)
            record = next_event(second, Recorded(type="note", data={"secret": 1}))
            await store.append(append_request([record], second.id))
            redaction = redaction_event(record, first)
            result = await store.append(erase_request(redaction, record.id, [first]))
            assert result.events == [redaction]
            gone = erase(first)
            assert await store.get(first.id) == gone
            assert await _collect(store.events(root.session, page_size=2)) == [
                root,
                gone,
                second,
                record,
                redaction,
            ]
            assert await store.path(redaction.id) == [root, gone, second, record, redaction]
            assert (await store.heads(root.session))["main"] == redaction.id
            both = redaction_event(redaction, second, record)
            await store.append(erase_request(both, redaction.id, [second, record]))
            assert await store.get(second.id) == erase(second)
            assert await store.get(record.id) == erase(record)
            if isinstance(store, FeedStore):
                feed = {item.event.id: item.event for item in await _feed_from(store, 0)}
                assert feed[first.id] == gone and feed[record.id] == erase(record)

    async def test_erase_of_an_unknown_event_writes_nothing(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, turn = await _session(store, n_turns=1)
            stranger = next_event(turn)  # never appended
            before = await _snapshot_of(store, root.session)
            redaction = redaction_event(turn, stranger)
            with pytest.raises(EventNotFoundError) as info:
                await store.append(erase_request(redaction, turn.id, [stranger]))
            assert repr(stranger.id) in str(info.value)
            assert repr(root.session) in str(info.value)
            assert await _snapshot_of(store, root.session) == before

    async def test_a_second_erase_of_an_event_writes_nothing(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, turn = await _session(store, n_turns=1)
            first = redaction_event(turn, turn)
            await store.append(erase_request(first, turn.id, [turn]))
            before = await _snapshot_of(store, root.session)
            with pytest.raises(AlreadyRedactedError, match=repr(turn.id)):
                await store.append(erase_request(redaction_event(first, turn), first.id, [turn]))
            assert await _snapshot_of(store, root.session) == before

    async def test_erase_with_a_stale_head_writes_nothing(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, turn, head = await _session(store, n_turns=2)
            before = await _snapshot_of(store, root.session)
            with pytest.raises(ConflictError):
                await store.append(erase_request(redaction_event(turn, turn), turn.id, [turn]))
            assert await _snapshot_of(store, root.session) == before
            assert await store.get(turn.id) == turn
            assert (await store.heads(root.session))["main"] == head.id

    async def test_erase_requests_of_the_wrong_shape_are_invalid(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, turn = await _session(store, n_turns=1)
            _, foreign = await _session(store, n_turns=1)
            before = await _snapshot_of(store, root.session)
            bad = [
                turn,  # not erased
                msgspec.structs.replace(erase(turn), salt="0" * 32),
                erase(foreign),  # another session's
            ]
            for target in bad:
                request = msgspec.structs.replace(
                    erase_request(redaction_event(turn, turn), turn.id, []), erase=[target]
                )
                with pytest.raises(InvalidEventError, match=repr(target.id)):
                    await store.append(request)
            assert await _snapshot_of(store, root.session) == before

    async def test_erase_drops_that_sessions_snapshots_only(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        async with make_store() as store:
            root, turn = await _session(store, n_turns=1)
            other, _ = await _session(store, n_turns=1)
            await store.put_snapshots(root.session, "p@1", [(turn.id, b"state")])
            await store.put_snapshots(other.session, "p@1", [(other.id, b"kept")])
            await store.append(erase_request(redaction_event(turn, turn), turn.id, [turn]))
            assert await store.get_snapshot(root.session, "p@1", turn.id) is None
            assert await store.get_snapshot(other.session, "p@1", other.id) == b"kept"

    @pytest.mark.durable
    async def test_an_erase_survives_close_and_reopen(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        if not self.durable:
            pytest.skip("not durable: data does not outlive the store")
        async with make_store() as store:
            root, turn, last = await _session(store, n_turns=2)
            redaction = redaction_event(last, turn)
            await store.append(erase_request(redaction, last.id, [turn]))
        async with make_store() as store:
            assert await _collect(store.events(root.session)) == [
                root,
                erase(turn),
                last,
                redaction,
            ]
            with pytest.raises(AlreadyRedactedError):
                await store.append(
                    erase_request(redaction_event(redaction, turn), redaction.id, [turn])
                )

    # concurrency

    async def test_concurrent_appends_with_retry_form_one_linear_chain(
        self, make_store: Callable[[], EventStore]
    ) -> None:
        writers = 10
        async with make_store() as store:
            root, *_ = await _session(store)
            start = asyncio.Barrier(writers)
            conflicts = 0

            async def writer(n: int) -> Event:
                nonlocal conflicts
                first_try = True
                while True:
                    head_id = (await store.heads(root.session))["main"]
                    head = await store.get(head_id)
                    event = next_event(head, TurnAdded(role="user", content=f"writer {n}"))
                    if first_try:
                        # every writer has read the same head before anyone writes
                        await start.wait()
                        first_try = False
                    try:
                        await store.append(append_request([event], head_id))
                    except ConflictError:
                        conflicts += 1
                        continue
                    return event

            written = await _within(asyncio.gather(*(writer(n) for n in range(writers))))
            assert conflicts >= writers - 1
            chain = await _collect(store.events(root.session))
            assert len(chain) == writers + 1
            heads = await store.heads(root.session)
            assert set(heads) == {"main"}
            path = await store.path(heads["main"])
            assert path == chain
            for parent, child in itertools.pairwise(path):
                assert child.parent == parent.id
                assert child.seq == parent.seq + 1
            contents = sorted(e.body.content for e in path[1:] if isinstance(e.body, TurnAdded))
            assert contents == sorted(f"writer {n}" for n in range(writers))
            assert sorted(e.id for e in written) == sorted(e.id for e in path[1:])
            assert (await store.session(root.session)).event_count == writers + 1


class StoreContract(EventStoreContract):
    """What every ``FeedStore`` promises: the per-session contract plus the global feed."""

    def _more_calls(self, store: EventStore) -> list[Callable[[], Awaitable[object]]]:
        assert isinstance(store, FeedStore)

        async def first_of_subscription() -> FeedItem:
            subscription = store.subscribe()
            try:
                return await anext(subscription)
            finally:
                await subscription.aclose()

        return [lambda: store.read_feed(0), first_of_subscription]

    async def test_feed_positions_increase_in_commit_order(
        self, make_store: Callable[[], FeedStore]
    ) -> None:
        async with make_store() as store:
            start = await _feed_end(store)
            a = await _session(store, n_turns=2)
            b = await _session(store, n_turns=1)
            a_more = turns(a[-1], 2)
            await store.append(append_request(a_more, a[-1].id))
            b_more = next_event(b[-1])
            await store.append(append_request([b_more], b[-1].id))
            committed = [*a, *b, *a_more, b_more]
            items = await _feed_from(store, start)
            assert [item.event for item in items] == committed
            positions = [item.position for item in items]
            assert all(p > start for p in positions)
            assert all(x < y for x, y in itertools.pairwise(positions))

    async def test_feed_pages_with_after_and_limit(
        self, make_store: Callable[[], FeedStore]
    ) -> None:
        async with make_store() as store:
            start = await _feed_end(store)
            one = await _session(store, n_turns=3)
            two = await _session(store, n_turns=3)
            whole = await _feed_from(store, start)
            assert [i.event for i in whole] == [*one, *two]
            for limit in (1, 2, 3, 5):
                paged: list[FeedItem] = []
                after = start
                while True:
                    page = await store.read_feed(after, limit)
                    assert len(page) <= limit
                    if not page:
                        break
                    paged.extend(page)
                    after = page[-1].position
                assert paged == whole, f"limit={limit}"
            # after a position: exactly the items past it
            middle = whole[3].position
            assert await store.read_feed(middle, 1000) == whole[4:]
            assert await store.read_feed(whole[-1].position, 1000) == []

    async def test_feed_holds_every_event_exactly_once(
        self, make_store: Callable[[], FeedStore]
    ) -> None:
        async with make_store() as store:
            start = await _feed_end(store)
            root, *chain = await _session(store, n_turns=3)
            fork = branch_event(chain[0], "alt")
            await store.append(append_request([fork, *turns(fork, 2)], None))
            replay = next_event(chain[-1], idempotency_key="once")
            await store.append(append_request([replay], chain[-1].id))
            again = next_event(chain[-1], idempotency_key="once")
            assert (await store.append(append_request([again], chain[-1].id))).replayed
            stale = next_event(chain[-1])
            with pytest.raises(ConflictError):
                await store.append(append_request([stale], chain[-1].id))
            session_events = await _collect(store.events(root.session))
            feed = [item.event for item in await _feed_from(store, start, limit=2)]
            assert feed == session_events
            assert len({e.id for e in feed}) == len(feed) == 8

    async def test_subscribe_catches_up_then_follows(
        self, make_store: Callable[[], FeedStore]
    ) -> None:
        async with make_store() as store:
            start = await _feed_end(store)
            events = await _session(store, n_turns=2)
            subscription = store.subscribe(after=start)
            tasks: list[asyncio.Future[Any]] = []
            try:
                caught_up = [await _within(anext(subscription)) for _ in events]
                assert [item.event for item in caught_up] == events
                later = next_event(events[-1])
                # ask for the next item first, so a subscriber already waiting is woken
                pending = _pending(anext(subscription), tasks)
                await store.append(append_request([later], events[-1].id))
                item = await pending
                assert item.event == later
                assert item.position > caught_up[-1].position
            finally:
                await _cancel(tasks)
                await subscription.aclose()

    async def test_subscribe_from_a_position_skips_what_came_before(
        self, make_store: Callable[[], FeedStore]
    ) -> None:
        async with make_store() as store:
            start = await _feed_end(store)
            events = await _session(store, n_turns=3)
            items = await _feed_from(store, start)
            subscription = store.subscribe(after=items[1].position)
            try:
                got = [await _within(anext(subscription)) for _ in range(2)]
            finally:
                await subscription.aclose()
            assert got == items[2:]
            assert [i.event for i in got] == events[2:]

    async def test_subscribe_filters_by_session_and_kind(
        self, make_store: Callable[[], FeedStore]
    ) -> None:
        async with make_store() as store:
            start = await _feed_end(store)
            mine = await _session(store, n_turns=1)
            other = await _session(store, n_turns=1)
            by_session = store.subscribe(after=start, session_id=mine[0].session)
            by_kind = store.subscribe(after=start, kinds=["Closed"])
            tasks: list[asyncio.Future[Any]] = []
            try:
                first = [await _within(anext(by_session)) for _ in mine]
                assert [i.event for i in first] == mine
                pending_session = _pending(anext(by_session), tasks)
                pending_kind = _pending(anext(by_kind), tasks)
                # interleave: the other session's events must be filtered out
                noise = next_event(other[-1])
                await store.append(append_request([noise], other[-1].id))
                end_other = next_event(noise, Closed(reason="other"))
                await store.append(append_request([end_other], noise.id, status="closed"))
                turn = next_event(mine[-1])
                await store.append(append_request([turn], mine[-1].id))
                end_mine = next_event(turn, Closed(reason="mine"))
                await store.append(append_request([end_mine], turn.id, status="closed"))
                assert (await pending_session).event == turn
                assert (await _within(anext(by_session))).event == end_mine
                assert (await pending_kind).event == end_other
                assert (await _within(anext(by_kind))).event == end_mine
            finally:
                await _cancel(tasks)
                await by_session.aclose()
                await by_kind.aclose()

    @pytest.mark.durable
    async def test_feed_positions_keep_increasing_after_reopen(
        self, make_store: Callable[[], FeedStore]
    ) -> None:
        if not self.durable:
            pytest.skip("not durable: data does not outlive the store")
        async with make_store() as store:
            start = await _feed_end(store)
            events = await _session(store, n_turns=2)
            before = await _feed_from(store, start)
        async with make_store() as store:
            assert await _feed_from(store, start) == before
            later = next_event(events[-1])
            await store.append(append_request([later], events[-1].id))
            after = await _feed_from(store, before[-1].position)
            assert [i.event for i in after] == [later]
            assert after[0].position > before[-1].position
