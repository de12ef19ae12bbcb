"""An in-process store: for tests, examples and throwaway sessions. Nothing is kept."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from ledger.errors import (
    EventNotFoundError,
    SessionCapacityError,
    SessionNotFoundError,
)
from ledger.events import Event, SessionCreated
from stores.base import (
    OPEN_STATUSES,
    AppendRequest,
    AppendResult,
    FeedItem,
    FeedStore,
    SessionPage,
    SessionQuery,
    SessionRow,
    check_head,
    is_create,
    page_cursor,
    parse_cursor,
    validate_request,
)

__all__ = ["MemoryStore"]


class MemoryStore(FeedStore):
    """Every structure a durable backend keeps, as dicts and lists in memory."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._feed: list[Event] = []  # position = index + 1
        self._by_id: dict[str, Event] = {}
        self._by_session: dict[str, list[int]] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._created_keys: dict[tuple[str, str], str] = {}
        self._heads: dict[str, dict[str, str]] = {}
        self._rows: dict[str, SessionRow] = {}
        self._snapshots: dict[tuple[str, str, str], bytes] = {}
        self._anchors: dict[str, list[bytes]] = {}
        self._changed = asyncio.Condition()

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
        self._write(request)
        async with self._changed:
            self._changed.notify_all()
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

    def _write(self, request: AppendRequest) -> None:
        session_id = request.session_id
        for event in request.events:
            self._feed.append(event)
            self._by_id[event.id] = event
            self._by_session.setdefault(session_id, []).append(len(self._feed))
            if event.idempotency_key is not None:
                self._keys[(session_id, event.idempotency_key)] = event.id
        first, last = request.events[0], request.events[-1]
        self._heads.setdefault(session_id, {})[request.branch] = last.id
        if is_create(request):
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
        self._rows[session_id] = SessionRow(
            session_id=session_id,
            user_id=row.user_id,
            agent=row.agent,
            status=request.status or row.status,
            created_at=row.created_at,
            last_activity_at=max(row.last_activity_at, last.at),
            event_count=row.event_count + len(request.events),
        )

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

    async def events(self, session_id: str, *, page_size: int = 1000) -> AsyncIterator[Event]:
        self._check_open()
        for position in list(self._by_session.get(session_id, ())):
            yield self._feed[position - 1]

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
        start = max(after, 0)
        return [
            FeedItem(start + i + 1, event)
            for i, event in enumerate(self._feed[start : start + limit])
        ]

    async def wait_for_feed(self, after: int, max_wait: float) -> None:
        async with self._changed:
            if len(self._feed) > after:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max_wait)
