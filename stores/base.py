"""The storage contract every backend implements.

Two layers, as capabilities rather than optional methods that raise:

- ``EventStore``: one session's data. Atomic batch append with the branch-head
  compare-and-swap and idempotency keys; an event by id; the ancestors of an
  event; a session's events in append order; its branch heads; the paged
  listing of sessions (written in the same transaction as the append);
  projection snapshots; and the anchors the ledger issued (``ledger.anchors``).
- ``FeedStore(EventStore)``: adds a total order over all sessions, the global
  feed, that a reader can tail without ever skipping an event, and a live
  subscription to it.
- ``PurgeStore(FeedStore)``: adds retention: whole sessions deleted in bounded
  batches, each leaving a ``PurgeRecord`` (the feed then has gaps where they were).

Backends live beside this module (``memory``, ``sqlite``, ...); each maps its
driver's errors to the ledger's in one place. Users do not call stores: they
call ``ledger.Ledger``.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import operator
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self

import msgspec

from ledger.errors import (
    AlreadyRedactedError,
    BranchExistsError,
    ConflictError,
    EventNotFoundError,
    IntegrityError,
    InvalidEventError,
    StoreClosedError,
)
from ledger.events import Erased, Event, SessionCreated, event_problem

__all__ = [
    "OPEN_STATUSES",
    "AppendRequest",
    "AppendResult",
    "EventStore",
    "FeedItem",
    "FeedStore",
    "PurgePage",
    "PurgeRecord",
    "PurgeRequest",
    "PurgeStore",
    "SessionPage",
    "SessionQuery",
    "SessionRow",
    "check_ancestry",
    "check_erase",
    "check_head",
    "decode_checked",
    "decode_page",
]

OPEN_STATUSES = ("active", "suspended")


class AppendRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One atomic write: events chained on one branch of one session.

    ``expected_head`` is the compare-and-swap: the branch's head must be this
    event id when the batch commits, or ``None`` when the batch creates the
    branch (a ``SessionCreated`` or a ``Branched`` event). The first event's
    parent need not be the head: a ``Branched`` or ``Restored`` event points at
    its fork point or checkpoint entry.
    """

    session_id: str
    branch: str
    expected_head: str | None
    events: Sequence[Event]
    status: str | None = None
    """The session's listing status after the batch (None: unchanged)."""
    max_open_sessions: int | None = None
    """For a ``SessionCreated`` batch: refuse when the user has this many open sessions."""
    max_branches: int | None = None
    """For a batch that creates a branch: refuse when the session has this many."""
    erase: Sequence[Event] = ()
    """Stored events of this session to overwrite, in the batch's transaction, with
    their redacted form (``ledger.events.erase``: same id, an ``Erased`` body, no
    salt). Each must exist and not be erased yet, or nothing is written. The store
    also drops the session's snapshots (they may hold folded content) and makes
    the old bytes unreadable from its files as far as it can (see each backend)."""


class AppendResult(msgspec.Struct, frozen=True):
    events: list[Event]
    replayed: bool = False
    """True when the first event's idempotency key was used before: ``events``
    holds the original event and nothing was written."""


class SessionRow(msgspec.Struct, frozen=True, kw_only=True):
    """A session in the listing: kept by the store in the append's transaction."""

    session_id: str
    user_id: str
    agent: str
    status: str
    created_at: int
    last_activity_at: int
    event_count: int


class SessionQuery(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str | None = None
    agent: str | None = None
    status: str | None = None
    limit: int = 50
    cursor: str | None = None
    """From ``SessionPage.next_cursor``: the page after it."""


class SessionPage(msgspec.Struct, frozen=True):
    items: list[SessionRow]
    next_cursor: str | None = None


class FeedItem(msgspec.Struct, frozen=True):
    """An event with its position in the store's global commit order."""

    position: int
    event: Event


def check_head(request: AppendRequest, current: str | None) -> None:
    """The compare-and-swap every backend applies inside its write transaction."""
    if current == request.expected_head:
        return
    if request.expected_head is None:
        raise BranchExistsError(request.session_id, request.branch, current)
    raise ConflictError(request.session_id, request.branch, request.expected_head, current)


def validate_request(request: AppendRequest) -> None:
    """Structural checks before any I/O: one session, one branch, one chain."""
    if not request.events:
        raise InvalidEventError(f"Empty append for session {request.session_id!r}")
    for position, event in enumerate(request.events):
        if isinstance(event.body, SessionCreated) and (
            position != 0 or event.parent is not None or event.seq != 0 or event.branch != "main"
        ):
            raise InvalidEventError(
                f"SessionCreated {event.id!r} must be alone at the root of session "
                f"{request.session_id!r} (no parent, depth 0, branch 'main')"
            )
    previous: Event | None = None
    for event in request.events:
        if event.session != request.session_id or event.branch != request.branch:
            raise InvalidEventError(
                f"Event {event.id!r} does not belong to session {request.session_id!r} "
                f"branch {request.branch!r}"
            )
        if previous is not None and (event.parent != previous.id or event.seq != previous.seq + 1):
            raise InvalidEventError(f"Event {event.id!r} does not extend {previous.id!r}")
        previous = event
    for erased in request.erase:
        if (
            erased.session != request.session_id
            or not isinstance(erased.body, Erased)
            or event_problem(erased) is not None
        ):
            raise InvalidEventError(
                f"Not the redacted form of an event of session {request.session_id!r}: "
                f"{erased.id!r}"
            )


def check_erase(request: AppendRequest, stored: Event | None, erased: Event) -> None:
    """What every backend checks inside its write transaction before overwriting ``stored``.

    Raises:
        EventNotFoundError: no such event in the request's session.
        AlreadyRedactedError: its body is erased already.
        IntegrityError: the stored event's header differs from the redacted form's.
    """
    if stored is None or stored.session != request.session_id:
        raise EventNotFoundError(erased.id, request.session_id)
    if isinstance(stored.body, Erased):
        raise AlreadyRedactedError(erased.id)
    if stored.body_digest != erased.body_digest or stored.kind != erased.kind:
        raise IntegrityError(
            f"Stored event differs from its redacted form: {erased.id!r} "
            f"(session {request.session_id!r})",
            erased.id,
        )


# C-level getters: ``decode_checked`` runs once per page of a replay.
_row_id, _row_session, _row_data = (operator.itemgetter(i) for i in (1, 2, 3))
_event_id, _event_session = operator.attrgetter("id"), operator.attrgetter("session")


def decode_checked(
    datas: list[bytes],
    ids: list[str],
    sessions: list[str] | str,
    decode_all: Callable[[list[bytes]], list[Event]],
) -> list[Event] | None:
    """``decode_all(datas)``, or None unless every event decodes and has its row's id
    and session (``sessions``: one per row, or the one every row was selected by).

    The checks run on whole lists in C (a replay's hot loop); a caller that gets
    None goes row by row to name the bad one.
    """
    try:
        events = decode_all(datas)
    except Exception:
        return None
    if len(events) != len(ids) or list(map(_event_id, events)) != ids:
        return None
    found = list(map(_event_session, events))
    if isinstance(sessions, str):
        return events if found.count(sessions) == len(found) else None
    return events if found == sessions else None


def decode_page(
    rows: Sequence[Any],
    decode_all: Callable[[list[bytes]], list[Event]],
    decode_one: Callable[[Any], Event],
) -> list[Event]:
    """Rows ``(position, id, session_id, data, ...)`` decoded in one pass
    (``decode_checked``).

    On any failure of that pass the rows go through ``decode_one``, which either
    decodes a row or raises the error that names it.
    """
    events = decode_checked(
        list(map(_row_data, rows)),
        list(map(_row_id, rows)),
        list(map(_row_session, rows)),
        decode_all,
    )
    return [decode_one(row) for row in rows] if events is None else events


PathRows = Callable[[str, int, int], Awaitable[list[Any]]]
"""``(cursor, below, want)`` -> at most ``want`` rows ``(position, id, session_id,
column, parent)`` newest first, none at a position of ``below`` or above."""


async def walk_path(
    event_id: str, limit: int | None, window: PathRows, chain: PathRows, *, size: int
) -> list[Any]:
    r"""The rows of the parent path from ``event_id`` back, newest first: ``limit`` of
    them, or fewer at the root or where a parent is missing (the caller names that).

    A path is mostly a run of its session's events in append order (a branch's
    events follow one another), so it is read as ``window``\ s of the session's
    rows newest first from the cursor's row, an index range scan, and the parent
    links are followed in memory: far cheaper than one index seek per step
    (``size`` rows a window: a path of a million events takes 245 of 4,096). When
    a window was mostly other branches' rows, ``chain`` reads the next window's
    worth of the path by seeks. Positions fall strictly along the walk, so even a
    tampered parent column cannot make it loop. Raises ``EventNotFoundError``
    when the first window does not start at ``event_id`` (an unknown id).
    """
    chosen: list[Any] = []
    cursor: str | None = event_id
    below = 2**63 - 1
    sparse = False
    while cursor is not None and (limit is None or len(chosen) < limit):
        want = size if limit is None else min(limit - len(chosen), size)
        if sparse:
            rows = await chain(cursor, below, want)
            chosen.extend(rows)
            if len(rows) < want:
                break  # the root, or a parent missing
            cursor, below, sparse = rows[-1][4], rows[-1][0], False
            continue
        rows = await window(cursor, below, want)
        if not rows or rows[0][1] != cursor:
            break  # unknown, or a parent missing or out of order
        taken = len(chosen)
        for row in rows:
            if row[1] == cursor:
                chosen.append(row)
                cursor = row[4]
                if cursor is None or len(chosen) == limit:
                    break
        below = chosen[-1][0]
        sparse = len(chosen) - taken < len(rows) // 4
    if not chosen:
        raise EventNotFoundError(event_id)
    return chosen


def check_ancestry(events: list[Event], limit: int | None, where: str) -> list[Event]:
    """A backend's decoded ancestors, newest first: each the parent of the one before it.

    Raises ``IntegrityError`` naming the event whose stored parent link is broken
    or whose parent is missing from the store (``where`` says which store).
    """
    for child, parent in itertools.pairwise(events):
        if child.parent != parent.id or child.session != parent.session:
            raise IntegrityError(
                f"Stored event's parent column disagrees with its data: {child.id!r} {where}",
                child.id,
            )
    tail = events[-1]
    if tail.parent is not None and (limit is None or len(events) < limit):
        raise IntegrityError(
            f"Parent of event {tail.id!r} is missing {where}: {tail.parent!r}", tail.id
        )
    return events


def page_cursor(row: SessionRow) -> str:
    return f"{row.last_activity_at}:{row.session_id}"


def parse_cursor(cursor: str) -> tuple[int, str]:
    at, _, session_id = cursor.partition(":")
    try:
        return int(at), session_id
    except ValueError:
        raise InvalidEventError(f"Invalid session cursor: {cursor!r}") from None


def is_create(request: AppendRequest) -> bool:
    return isinstance(request.events[0].body, SessionCreated)


class EventStore(abc.ABC):
    """Per-session storage: what every backend implements."""

    url: str
    _opened: bool = False
    _closed: bool = False

    # lifecycle

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect and create the schema; idempotent."""
        if self._closed:
            raise StoreClosedError(f"Store is closed: {self.url!r}")
        if not self._opened:
            await self._open()
            self._opened = True

    async def close(self) -> None:
        if self._opened and not self._closed:
            self._closed = True
            await self._close()
        self._closed = True

    def _check_open(self) -> None:
        if not self._opened or self._closed:
            raise StoreClosedError(f"Store is not open: {self.url!r}")

    def __del__(self) -> None:
        if self._opened and not self._closed:
            warnings.warn(f"Store {self.url!r} was never closed", ResourceWarning, stacklevel=1)

    @abc.abstractmethod
    async def _open(self) -> None: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...

    # writes

    @abc.abstractmethod
    async def append(self, request: AppendRequest) -> AppendResult:
        """Write the batch whole or not at all.

        Raises:
            SessionNotFoundError: the session does not exist (and the batch does not create it).
            ConflictError: the branch head is not ``request.expected_head``.
            BranchExistsError: the batch creates a branch that exists.
            SessionCapacityError: ``max_open_sessions`` or ``max_branches`` is reached.
        """

    # reads

    @abc.abstractmethod
    async def get(self, event_id: str) -> Event:
        """The event with this id; raises ``EventNotFoundError``."""

    async def get_inline(self, event_id: str) -> Event:
        """``get`` for one of many quick single reads (a proof loop): a store whose
        reads hop to a thread may read on the caller's instead. Here ``get``."""
        return await self.get(event_id)

    @abc.abstractmethod
    async def find_by_key(self, session_id: str, key: str) -> Event | None:
        """The event of this session appended with this idempotency key."""

    @abc.abstractmethod
    async def find_created(self, user_id: str, key: str) -> Event | None:
        """The ``SessionCreated`` event this user appended with this idempotency key."""

    @abc.abstractmethod
    async def ancestors(self, event_id: str, limit: int | None = None) -> list[Event]:
        """The event and its ancestors, newest first, at most ``limit`` of them.

        Raises ``EventNotFoundError`` for an unknown id.
        """

    async def path(self, event_id: str) -> list[Event]:
        """The events from the session's root to this event."""
        events = await self.ancestors(event_id)
        events.reverse()
        return events

    @abc.abstractmethod
    def events(self, session_id: str, *, page_size: int = 1000) -> AsyncIterator[Event]:
        """Every event of the session in append order, read in pages."""

    @abc.abstractmethod
    async def heads(self, session_id: str) -> dict[str, str]:
        """Branch name to head event id; empty for an unknown session."""

    @abc.abstractmethod
    async def session(self, session_id: str) -> SessionRow:
        """The session's listing row; raises ``SessionNotFoundError``."""

    @abc.abstractmethod
    async def sessions(self, query: SessionQuery) -> SessionPage:
        """Sessions filtered by user, agent and status, newest activity first."""

    # snapshots: derived data, safe to lose

    @abc.abstractmethod
    async def get_snapshot(self, session_id: str, key: str, event_id: str) -> bytes | None: ...

    @abc.abstractmethod
    async def put_snapshots(
        self, session_id: str, key: str, states: Sequence[tuple[str, bytes]]
    ) -> None:
        """Keep encoded projection states keyed by (key, event id); overwrites are harmless."""

    # anchors: the tree heads the ledger issued, kept for audit (opaque bytes here)

    @abc.abstractmethod
    async def put_anchor(self, session_id: str, anchor: bytes) -> None:
        """Keep an encoded anchor of the session, after those already kept; durable."""

    @abc.abstractmethod
    async def anchors(self, session_id: str) -> list[bytes]:
        """The session's encoded anchors, in the order they were put."""

    async def events_from(
        self, session_id: str, start: int, *, page_size: int = 1000
    ) -> AsyncIterator[Event]:
        """``events`` from the session's ``start``-th event on (0: all of them), as of now:
        the events of ``event_pages``."""
        async for page in self.event_pages(session_id, start, page_size=page_size):
            for event in page:
                yield event

    async def event_pages(
        self, session_id: str, start: int = 0, *, page_size: int = 1000
    ) -> AsyncIterator[list[Event]]:
        """The session's events from its ``start``-th on, as of now, a page at a time:
        lists of at most ``page_size`` events, none empty.

        For a reader that works a page at a time (a projection's ``apply_many``),
        without a step through an iterator per event. Here by gathering ``events``
        past the first ``start``; a store that reads in pages, or can seek,
        overrides it (a second process then reads a long session's tail without
        its head).
        """
        page_size = max(1, page_size)
        page: list[Event] = []
        skipped = 0
        async for event in self.events(session_id, page_size=page_size):
            if skipped < start:
                skipped += 1
                continue
            page.append(event)
            if len(page) == page_size:
                yield page
                page = []
        if page:
            yield page


class FeedStore(EventStore):
    """A store with a global, gap-free commit order over all sessions."""

    poll_interval: float = 0.05

    @abc.abstractmethod
    async def read_feed(self, after: int = 0, limit: int = 1000) -> list[FeedItem]:
        """Events with a position greater than ``after``, in commit order.

        A position is never handed out to an event that becomes visible after
        a higher position was read, so a tailing reader never skips one.
        """

    async def wait_for_feed(self, after: int, max_wait: float) -> None:
        """Return when events after ``after`` may exist, or after ``max_wait``."""
        await asyncio.sleep(min(max_wait, self.poll_interval))

    async def subscribe(
        self,
        after: int = 0,
        *,
        session_id: str | None = None,
        kinds: Sequence[str] | None = None,
        page_size: int = 1000,
    ) -> AsyncGenerator[FeedItem, None]:
        """Catch up from ``after``, then follow new events as they commit."""
        wanted = set(kinds) if kinds else None
        position = after
        while True:
            self._check_open()
            items = await self.read_feed(position, page_size)
            for item in items:
                position = item.position
                if session_id is not None and item.event.session != session_id:
                    continue
                if wanted is not None and item.event.kind not in wanted:
                    continue
                yield item
            if len(items) < page_size:
                await self.wait_for_feed(position, 1.0)


class PurgeRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What is left of a purged session: who and what it was, and its last anchor."""

    session_id: str
    user_id: str
    agent: str
    status: str
    created_at: int
    last_activity_at: int
    event_count: int
    bytes: int
    """The encoded size of its events (``ledger.events.encode_event``), summed."""
    purged_at: int
    actor: str
    reason: str
    anchor: dict[str, Any]
    """The session's final anchor (``ledger.anchors.Anchor`` as a dict): its Merkle
    root over every event id, for checking that a copy kept elsewhere is this session."""


class PurgeRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Delete one session whole, if it is still as it was when the purge was planned."""

    record: PurgeRecord
    """Written when the session is deleted; its ``event_count`` and ``last_activity_at``
    must still be the session's, else it has moved on (a write landed) and is kept."""


class PurgePage(msgspec.Struct, frozen=True):
    items: list[PurgeRecord]
    next_cursor: str | None = None


def purge_cursor(record: PurgeRecord) -> str:
    return f"{record.purged_at}:{record.session_id}"


def purge_page(records: list[PurgeRecord], limit: int, cursor: str | None) -> PurgePage:
    """A page of purge records held in memory: most recent first, after ``cursor``."""
    records = sorted(records, key=lambda r: (r.purged_at, r.session_id), reverse=True)
    if cursor is not None:
        after = parse_cursor(cursor)
        records = [r for r in records if (r.purged_at, r.session_id) < after]
    page = records[: max(0, limit)]
    more = len(records) > len(page)
    return PurgePage(page, purge_cursor(page[-1]) if more and page else None)


class PurgeStore(FeedStore):
    """A store that can delete whole sessions for retention, and list what it deleted."""

    @abc.abstractmethod
    async def idle_sessions(
        self,
        before: int,
        *,
        user_id: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[SessionRow]:
        """Sessions whose last activity is older than ``before`` (ns), least recent first.

        ``after``: the ``page_cursor`` of the last row of the previous page.
        """

    @abc.abstractmethod
    async def purge(self, requests: Sequence[PurgeRequest]) -> list[PurgeRecord]:
        """Delete the sessions (events, heads, listing row, snapshots, keys) and write their
        records, all in one transaction; return the records of those deleted.

        A session that is gone, or whose event count or last activity moved since
        the request was planned, is left as it is and has no record. An append
        that commits after the purge raises ``SessionNotFoundError``.
        """

    @abc.abstractmethod
    async def purges(
        self, *, user_id: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> PurgePage:
        """Purge records, most recent first; ``page.next_cursor`` gives the next page."""
