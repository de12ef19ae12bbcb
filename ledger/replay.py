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
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from typing import Any, TypeVar, overload

import msgspec

from ledger.errors import (
    BranchNotFoundError,
    EventNotFoundError,
    IntegrityError,
    SessionNotFoundError,
)
from ledger.events import Closed, Event, Expired, gc_paused
from projections.base import FOLD_RUN, Projection, fold
from stores.base import FeedStore

__all__ = [
    "MAX_PAUSE",
    "BranchDiff",
    "Callback",
    "branch_head",
    "diff_paths",
    "drive",
    "drive_pages",
    "events_of",
    "feed_end",
    "follow_branch",
    "open_path",
    "paced",
]

S = TypeVar("S")
_T = TypeVar("_T")

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
    events: Iterable[Event] | AsyncIterable[Event],
    speed: float | None,
    *,
    max_pause: float = MAX_PAUSE,
    sleep: Sleep = asyncio.sleep,
) -> AsyncIterator[Event]:
    """Yield ``events``, sleeping ``(at - previous at) / speed`` seconds before each,
    at most ``max_pause``; ``speed=None`` yields them as fast as possible."""
    if not isinstance(events, AsyncIterable):
        events = _each(events)
    previous: int | None = None
    async for event in events:
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
        # In runs, so that a projection's apply_many folds many events at once.
        state, apply_many, run = into.initial(), into.apply_many, []
        async for event in events:
            run.append(event)
            if len(run) == FOLD_RUN:
                state, run = apply_many(state, run), []
        return apply_many(state, run)
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


async def branch_head(store: FeedStore, session_id: str, branch: str) -> str:
    """The id of the branch's head as the store has it now: what a read starts from.

    Raises:
        SessionNotFoundError, BranchNotFoundError.
    """
    heads = await store.heads(session_id)
    if not heads:
        raise SessionNotFoundError(session_id)
    if branch not in heads:
        raise BranchNotFoundError(session_id, branch)
    return heads[branch]


async def open_path(store: FeedStore, session_id: str, head: str) -> AsyncIterator[list[Event]]:
    """The path from the session's root to ``head``, root first, in pages (lists).

    A session never forked nor restored (the usual one) holds nothing but that
    path, and then it is streamed as the store reads the session, page by page:
    in bounded memory however long it is. Else the path is walked back whole
    (``store.path``), one page. The test: the session holds ``head.seq + 1``
    events once ``head`` is known. Every store hands out positions in commit
    order, so each event of the session before ``head`` is one of those, and the
    stream ends with ``head``; anything appended since comes after it.

    Raises:
        EventNotFoundError: ``head`` is not an event of ``session_id``.
        IntegrityError: (while iterating) the stored session does not chain up to ``head``.
    """
    last = await store.get(head)
    if last.session != session_id:
        raise EventNotFoundError(head, session_id)
    if (await store.session(session_id)).event_count == last.seq + 1:
        return _stream_path(store, last)
    return _each([await store.path(head)])


async def _stream_path(store: FeedStore, head: Event) -> AsyncIterator[list[Event]]:
    session_id, left = head.session, head.seq + 1  # on a path, an event's seq is its index
    parent: str | None = None
    async for page in store.event_pages(session_id):
        page = page[:left]
        ids = [event.id for event in page]
        links = [parent, *ids[:-1]]
        if [event.parent for event in page] != links:  # each event must hang from the one before
            bad = next(i for i, event in enumerate(page) if event.parent != links[i])
            if bad:
                yield page[:bad]
            raise IntegrityError(
                f"Stored session {session_id!r} does not chain: event {ids[bad]!r} has "
                f"parent {page[bad].parent!r}, the event before it {links[bad]!r}",
                ids[bad],
            )
        yield page
        left -= len(page)
        if not left:
            if ids[-1] != head.id:
                raise IntegrityError(
                    f"Stored session {session_id!r} does not chain: event {ids[-1]!r} stands "
                    f"where its head {head.id!r} should",
                    ids[-1],
                )
            return
        parent = ids[-1]
    raise EventNotFoundError(head.id, session_id)  # purged meanwhile


async def events_of(pages: AsyncIterator[list[Event]]) -> AsyncIterator[Event]:
    """The events of ``pages``, one at a time."""
    async for page in pages:
        for event in page:
            yield event


async def drive_pages(
    pages: AsyncIterator[list[Event]], into: Projection[S] | Callback
) -> S | None:
    """``drive`` over pages of events: a projection folds each page at once."""
    if isinstance(into, Projection):
        # A fold reads millions of events and drops a state a page, none of them in a
        # cycle: paused, the collector does not scan the rest of the process's heap
        # again and again (beside 100,000 sessions held by a memory store, a fifth of
        # a SQLite replay's time). A page at a time: never while the read awaits, when
        # the application's other tasks run and must be collected as usual.
        state, apply_many = into.initial(), into.apply_many
        async for page in pages:
            with gc_paused():
                state = apply_many(state, page)
        return state
    await drive(events_of(pages), into)
    return None


async def _each(items: Iterable[_T]) -> AsyncIterator[_T]:
    for item in items:
        yield item


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
    # No gap, no duplicate: `before` is observed before the history's head is
    # read and `after` once it has been, so every event appended later has a
    # position above `after`, and every event of (before, after] committed either
    # before the head (skipped: on the history or abandoned by a restore) or
    # after it (new). On one branch, commit order is append order. The history
    # is the head's path, which never changes: it may be streamed afterwards.
    before = await feed_end(store) if start is None else start
    history = events_of(
        await open_path(store, session_id, await branch_head(store, session_id, branch))
    )
    after = await feed_end(store)
    head: Event | None = None
    async for head in paced(history, speed, max_pause=max_pause, sleep=sleep):
        yield head
    assert head is not None  # a path holds its root at least
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
