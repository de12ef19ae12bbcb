"""Replay: a branch's history driven through a callback or a projection, paced, followed, diffed.

A branch's history is the parent path from the root to its head, so:

- a branch other than ``main`` replays the history it shares with the branch it
  forked from first (up to the fork point), then its ``Branched`` event, then its
  own events;
- after a restore, the path jumps from the checkpoint's entry to the
  ``Restored`` event: the events the restore abandoned are not replayed (they
  stay in the tree, and ``ledger log`` shows them); the ``Restored`` event
  itself marks where the branch went back.

Following a branch (``follow_branch``) yields that history and then every event
appended to the branch afterwards, with no gap and no duplicate between the
two, and ends after the branch is closed or expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar, overload

import msgspec

from ledger.errors import BranchNotFoundError, SessionNotFoundError
from ledger.events import Closed, Event, Expired
from projections.base import Projection, fold
from stores.base import FeedStore

__all__ = [
    "MAX_PAUSE",
    "BranchDiff",
    "Callback",
    "diff_paths",
    "drive",
    "feed_end",
    "follow_branch",
    "paced",
]

S = TypeVar("S")

MAX_PAUSE = 2.0
"""Longest pause, in seconds, between two events of a paced replay (a user who left for
an hour does not stall the replay for an hour)."""

Callback = Callable[[Event], Any]
"""Called with each event; may return an awaitable (an ``async def``), which is awaited."""

Sleep = Callable[[float], Awaitable[object]]


class BranchDiff(msgspec.Struct, frozen=True, kw_only=True):
    """Two branches of a session: where their histories part, and what each has alone."""

    session_id: str
    a: str
    b: str
    fork_point: str
    """The last event both histories share (a branch's head when the other extends it)."""
    only_a: list[Event]
    """The events on ``a``'s history after the fork point, in order."""
    only_b: list[Event]


def diff_paths(
    session_id: str, a: str, b: str, path_a: list[Event], path_b: list[Event]
) -> BranchDiff:
    """Compare two root-to-head paths of one session (ids commit to their ancestry, so
    the paths agree up to the fork point and never again)."""
    common = 0
    for event_a, event_b in zip(path_a, path_b, strict=False):
        if event_a.id != event_b.id:
            break
        common += 1
    if common == 0:
        raise ValueError(f"Paths of different sessions: {path_a[0].id!r}, {path_b[0].id!r}")
    return BranchDiff(
        session_id=session_id,
        a=a,
        b=b,
        fork_point=path_a[common - 1].id,
        only_a=path_a[common:],
        only_b=path_b[common:],
    )


async def paced(
    events: Iterable[Event],
    speed: float | None,
    *,
    max_pause: float = MAX_PAUSE,
    sleep: Sleep = asyncio.sleep,
) -> AsyncIterator[Event]:
    """Yield ``events``, sleeping ``(at - previous at) / speed`` seconds before each,
    at most ``max_pause``; ``speed=None`` yields them as fast as possible."""
    previous: int | None = None
    for event in events:
        if speed is not None and previous is not None:
            pause = min((event.at - previous) / 1e9 / speed, max_pause)
            if pause > 0:
                await sleep(pause)
        previous = event.at
        yield event


@overload
async def drive(events: Iterable[Event] | AsyncIterator[Event], into: Projection[S]) -> S: ...


@overload
async def drive(events: Iterable[Event] | AsyncIterator[Event], into: Callback) -> None: ...


async def drive(
    events: Iterable[Event] | AsyncIterator[Event], into: Projection[S] | Callback
) -> S | None:
    """Feed ``events`` in order to a projection (returns its folded state) or to a
    callback, sync or async (returns ``None``)."""
    if isinstance(into, Projection):
        if not isinstance(events, AsyncIterator):
            return fold(into, events)
        state = into.initial()
        async for event in events:
            state = into.apply(state, event)
        return state
    if isinstance(events, AsyncIterator):
        async for event in events:
            await _call(into, event)
    else:
        for event in events:
            await _call(into, event)
    return None


async def _call(callback: Callback, event: Event) -> None:
    result = callback(event)
    if inspect.isawaitable(result):
        await result


async def feed_end(store: FeedStore) -> int:
    """The end of the global feed (0 when empty), in O(log n) reads of one item.

    It is a committed position at least as high as every position visible when
    the call began (higher when events commit meanwhile); since positions are
    handed out in commit order, any event not yet visible then gets a higher one.
    """

    async def first_after(position: int) -> int | None:
        items = await store.read_feed(position, 1)
        return items[0].position if items else None

    low = await first_after(0)
    if low is None:
        return 0
    step = 1
    while (found := await first_after(low + step)) is not None:
        low, step = found, step * 2
    high = low + step  # nothing after it: the end is in [low, high]
    while low < high:
        middle = (low + high) // 2
        found = await first_after(middle)
        if found is None:
            high = middle
        else:
            low = found
    return low


async def _branch_path(store: FeedStore, session_id: str, branch: str) -> list[Event]:
    heads = await store.heads(session_id)
    if not heads:
        raise SessionNotFoundError(session_id)
    if branch not in heads:
        raise BranchNotFoundError(session_id, branch)
    return await store.path(heads[branch])


def _ends_branch(event: Event) -> bool:
    """Closed and expired are terminal: nothing more is ever appended to the branch."""
    return isinstance(event.body, Closed | Expired)


async def follow_branch(
    store: FeedStore,
    session_id: str,
    branch: str = "main",
    *,
    speed: float | None = None,
    max_pause: float = MAX_PAUSE,
    start: int | None = None,
    sleep: Sleep = asyncio.sleep,
) -> AsyncGenerator[Event, None]:
    """The branch's history (paced by ``speed``), then each event appended to it, live.

    Ends after a ``Closed`` or ``Expired`` event of the branch (at once when its
    history ends with one); otherwise runs until the consumer stops. ``start``
    is a feed position known to have committed before the call (default: the
    end of the feed, found with ``feed_end``).

    Raises:
        SessionNotFoundError, BranchNotFoundError.
    """
    # No gap, no duplicate: `before` is observed before the history is read and
    # `after` once it has been, so every event appended later has a position
    # above `after`, and every event of (before, after] committed either before
    # the history's head (skipped: on the history or abandoned by a restore) or
    # after it (new). On one branch, commit order is append order.
    before = await feed_end(store) if start is None else start
    history = await _branch_path(store, session_id, branch)
    after = await feed_end(store)
    async for event in paced(history, speed, max_pause=max_pause, sleep=sleep):
        yield event
    head = history[-1]
    if _ends_branch(head):
        return
    window: list[Event] = []
    position = before
    while position < after:
        items = await store.read_feed(position, min(after - position, 1000))
        if not items:
            break
        for item in items:
            if item.position > after:
                break
            if item.event.session == session_id and item.event.branch == branch:
                window.append(item.event)
        position = items[-1].position
    ids = [event.id for event in window]
    new = window[ids.index(head.id) + 1 :] if head.id in ids else window
    for event in new:
        yield event
        if _ends_branch(event):
            return
    async with contextlib.aclosing(store.subscribe(after, session_id=session_id)) as feed:
        async for item in feed:
            if item.event.branch != branch:
                continue
            yield item.event
            if _ends_branch(item.event):
                return
