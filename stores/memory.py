"""An in-process store: for tests, examples and throwaway sessions. Nothing is kept."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import msgspec

from ledger.errors import (
    EventNotFoundError,
    SessionCapacityError,
    SessionNotFoundError,
)
from ledger.events import Event, SessionCreated
from ledger.frozen import freeze_event
from stores.base import (
    OPEN_STATUSES,
    AppendRequest,
    AppendResult,
    FeedItem,
    PurgePage,
    PurgeRecord,
    PurgeRequest,
    PurgeStore,
    SessionPage,
    SessionQuery,
    SessionRow,
    check_erase,
    check_head,
    page_cursor,
    parse_cursor,
    purge_page,
    validate_request,
)

__all__ = ["MemoryStore"]


class MemoryStore(PurgeStore):
    """Every structure a durable backend keeps, as dicts and lists in memory."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._feed: list[Event | None] = []  # position = index + 1; None: purged
        self._by_id: dict[str, Event] = {}
        self._by_session: dict[str, list[int]] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._created_keys: dict[tuple[str, str], str] = {}
        self._heads: dict[str, dict[str, str]] = {}
        self._rows: dict[str, SessionRow] = {}
        self._snapshots: dict[tuple[str, str, str], bytes] = {}
        self._purges: list[PurgeRecord] = []
        self._anchors: dict[str, list[bytes]] = {}
        self._appended: asyncio.Event | None = None  # made by a feed waiter, set by an append

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        """``memory://`` (any name after it is kept only for display)."""
        return cls(url)

    async def _open(self) -> None:
        pass

    async def _close(self) -> None:
        pass

    async def append(self, request: AppendRequest) -> AppendResult:
        self._check_open()
        validate_request(request)
        first = request.events[0]
        # No await between the checks and the writes: the append is atomic.
        if first.idempotency_key is not None:
            original = self._replayed(first)
            if original is not None:
                return AppendResult([original], replayed=True)
        creating = isinstance(first.body, SessionCreated)
        if creating:
            self._check_open_sessions(first, request.max_open_sessions)
        elif request.session_id not in self._rows:
            raise SessionNotFoundError(request.session_id)
        heads = self._heads.get(request.session_id, {})
        check_head(request, heads.get(request.branch))
        if (
            not creating
            and request.expected_head is None
            and request.max_branches is not None
            and len(heads) >= request.max_branches
        ):
            raise SessionCapacityError(
                f"session {request.session_id!r}", "branches", request.max_branches
            )
        for erased in request.erase:
            check_erase(request, self._by_id.get(erased.id), erased)
        self._write(request, creating)
        if request.erase:
            self._erase(request)
        if self._appended is not None:  # no lock or wake-up to pay when nobody waits
            self._appended.set()
            self._appended = None
        return AppendResult(list(request.events))

    def _replayed(self, first: Event) -> Event | None:
        assert first.idempotency_key is not None
        if isinstance(first.body, SessionCreated):
            found = self._created_keys.get((first.body.user_id, first.idempotency_key))
        else:
            found = self._keys.get((first.session, first.idempotency_key))
        return self._by_id[found] if found else None

    def _check_open_sessions(self, first: Event, limit: int | None) -> None:
        assert isinstance(first.body, SessionCreated)
        if limit is None:
            return
        user = first.body.user_id
        open_count = sum(
            1 for r in self._rows.values() if r.user_id == user and r.status in OPEN_STATUSES
        )
        if open_count >= limit:
            raise SessionCapacityError(f"user {user!r}", "open sessions", limit)

    def _write(self, request: AppendRequest, creating: bool) -> None:
        session_id = request.session_id
        positions = self._by_session.get(session_id)
        if positions is None:
            positions = self._by_session[session_id] = []
        # Kept read-only: every reader gets these very objects (ledger.frozen)
        for event in map(freeze_event, request.events):
            self._feed.append(event)
            self._by_id[event.id] = event
            positions.append(len(self._feed))
            if event.idempotency_key is not None:
                self._keys[(session_id, event.idempotency_key)] = event.id
        first, last = request.events[0], request.events[-1]
        self._heads.setdefault(session_id, {})[request.branch] = last.id
        if creating:
            assert isinstance(first.body, SessionCreated)
            if first.idempotency_key is not None:
                self._created_keys[(first.body.user_id, first.idempotency_key)] = first.id
            self._rows[session_id] = SessionRow(
                session_id=session_id,
                user_id=first.body.user_id,
                agent=first.body.agent,
                status=request.status or "active",
                created_at=first.at,
                last_activity_at=last.at,
                event_count=len(request.events),
            )
            return
        row = self._rows[session_id]
        self._rows[session_id] = msgspec.structs.replace(
            row,
            status=request.status or row.status,
            last_activity_at=max(row.last_activity_at, last.at),
            event_count=row.event_count + len(request.events),
        )

    def _erase(self, request: AppendRequest) -> None:
        """Put the redacted forms in place of the originals, and drop the session's snapshots."""
        session_id = request.session_id
        wanted = {erased.id: erased for erased in request.erase}  # Erased: no containers
        for position in self._by_session[session_id]:
            stored = self._feed[position - 1]
            erased = wanted.get(stored.id) if stored is not None else None
            if erased is not None:
                self._feed[position - 1] = erased
                self._by_id[erased.id] = erased
        for key in [k for k in self._snapshots if k[0] == session_id]:
            del self._snapshots[key]

    async def get(self, event_id: str) -> Event:
        self._check_open()
        try:
            return self._by_id[event_id]
        except KeyError:
            raise EventNotFoundError(event_id) from None

    async def find_by_key(self, session_id: str, key: str) -> Event | None:
        self._check_open()
        found = self._keys.get((session_id, key))
        return self._by_id[found] if found else None

    async def find_created(self, user_id: str, key: str) -> Event | None:
        self._check_open()
        found = self._created_keys.get((user_id, key))
        return self._by_id[found] if found else None

    async def ancestors(self, event_id: str, limit: int | None = None) -> list[Event]:
        self._check_open()
        out: list[Event] = []
        current: str | None = event_id
        while current is not None and (limit is None or len(out) < limit):
            event = self._by_id.get(current)
            if event is None:
                raise EventNotFoundError(current)
            out.append(event)
            current = event.parent
        return out

    def events(self, session_id: str, *, page_size: int = 1000) -> AsyncIterator[Event]:
        return self.events_from(session_id, 0, page_size=page_size)

    async def event_pages(
        self, session_id: str, start: int = 0, *, page_size: int = 1000
    ) -> AsyncIterator[list[Event]]:
        self._check_open()
        page_size = max(1, page_size)
        # The session's events as of now, by their index in the feed (position - 1).
        indexes = [p - 1 for p in self._by_session.get(session_id, ())]
        feed = self._feed
        for first in range(start, len(indexes), page_size):
            page = [
                event
                for event in map(feed.__getitem__, indexes[first : first + page_size])
                if event is not None  # None: purged meanwhile
            ]
            if page:
                yield page

    async def heads(self, session_id: str) -> dict[str, str]:
        self._check_open()
        return dict(self._heads.get(session_id, {}))

    async def session(self, session_id: str) -> SessionRow:
        self._check_open()
        try:
            return self._rows[session_id]
        except KeyError:
            raise SessionNotFoundError(session_id) from None

    async def sessions(self, query: SessionQuery) -> SessionPage:
        self._check_open()
        rows = [
            r
            for r in self._rows.values()
            if (query.user_id is None or r.user_id == query.user_id)
            and (query.agent is None or r.agent == query.agent)
            and (query.status is None or r.status == query.status)
        ]
        rows.sort(key=lambda r: (r.last_activity_at, r.session_id), reverse=True)
        if query.cursor is not None:
            after = parse_cursor(query.cursor)
            rows = [r for r in rows if (r.last_activity_at, r.session_id) < after]
        page = rows[: query.limit]
        more = len(rows) > query.limit
        return SessionPage(page, page_cursor(page[-1]) if more and page else None)

    async def get_snapshot(self, session_id: str, key: str, event_id: str) -> bytes | None:
        self._check_open()
        return self._snapshots.get((session_id, key, event_id))

    async def put_snapshots(
        self, session_id: str, key: str, states: Sequence[tuple[str, bytes]]
    ) -> None:
        self._check_open()
        for event_id, state in states:
            self._snapshots[(session_id, key, event_id)] = state

    async def put_anchor(self, session_id: str, anchor: bytes) -> None:
        self._check_open()
        self._anchors.setdefault(session_id, []).append(bytes(anchor))

    async def anchors(self, session_id: str) -> list[bytes]:
        self._check_open()
        return list(self._anchors.get(session_id, ()))

    async def read_feed(self, after: int = 0, limit: int = 1000) -> list[FeedItem]:
        self._check_open()
        items: list[FeedItem] = []
        position = max(after, 0)
        while position < len(self._feed) and len(items) < limit:
            event = self._feed[position]
            position += 1
            if event is not None:  # a purged session's events leave gaps
                items.append(FeedItem(position, event))
        return items

    # retention

    async def idle_sessions(
        self,
        before: int,
        *,
        user_id: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[SessionRow]:
        self._check_open()
        start = parse_cursor(after) if after is not None else (-(2**63), "")
        rows = [
            r
            for r in self._rows.values()
            if r.last_activity_at < before
            and (user_id is None or r.user_id == user_id)
            and (r.last_activity_at, r.session_id) > start
        ]
        rows.sort(key=lambda r: (r.last_activity_at, r.session_id))
        return rows[: max(0, limit)]

    async def purge(self, requests: Sequence[PurgeRequest]) -> list[PurgeRecord]:
        self._check_open()
        done: list[PurgeRecord] = []
        for request in requests:
            record = request.record
            row = self._rows.get(record.session_id)
            if row is None or (row.event_count, row.last_activity_at) != (
                record.event_count,
                record.last_activity_at,
            ):
                continue
            self._delete_session(row)
            self._anchors.pop(record.session_id, None)
            self._purges.append(record)
            done.append(record)
        return done

    def _delete_session(self, row: SessionRow) -> None:
        session_id = row.session_id
        for position in self._by_session.pop(session_id, ()):
            event = self._feed[position - 1]
            self._feed[position - 1] = None
            if event is not None:
                self._by_id.pop(event.id, None)
        for table in (self._keys, self._created_keys):
            for pair in [k for k, event_id in table.items() if event_id not in self._by_id]:
                del table[pair]
        self._heads.pop(session_id, None)
        del self._rows[session_id]
        for key in [k for k in self._snapshots if k[0] == session_id]:
            del self._snapshots[key]

    async def purges(
        self, *, user_id: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> PurgePage:
        self._check_open()
        records = [r for r in self._purges if user_id is None or r.user_id == user_id]
        return purge_page(records, limit, cursor)

    async def wait_for_feed(self, after: int, max_wait: float) -> None:
        if len(self._feed) > after:
            return
        if self._appended is None:
            self._appended = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._appended.wait(), max_wait)
