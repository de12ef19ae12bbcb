"""PostgreSQL: a session's pages are read from its index in order, whatever the planner knows.

A table bulk-loaded where autovacuum is off has no statistics until someone runs
``ANALYZE``; the planner then guesses that a session holds a row or two, and (on
PostgreSQL 15, from some 30,000 rows) plans the page statement for its values as
a bitmap scan of the session's whole remaining range and a sort of it: at a
million events, 0.5 to 1.2 s for each page.
"""

from __future__ import annotations

import uuid
from typing import Final

import pytest

from ledger.events import Event, TurnAdded
from ledger.testing import append_request, create_event, next_event
from stores.postgres import _PAGE_SQL, PostgresStore, _fetch_in_index_order

asyncpg = pytest.importorskip("asyncpg")

BULK: Final = 30_000


@pytest.fixture
def url(postgres_url: str) -> str:
    schema = f"t_{uuid.uuid4().hex[:16]}"
    return f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={schema}"


async def bulk_session(store: PostgresStore, turns: int) -> list[Event]:
    events = [create_event("user-1", "agent-1")]
    for i in range(turns):
        events.append(next_event(events[-1], TurnAdded(role="user", content=f"turn {i}")))
    for at in range(0, len(events), 5000):
        head = events[at - 1].id if at else None
        await store.append(append_request(events[at : at + 5000], head))
    return events


async def test_a_page_is_planned_from_the_index_without_a_sort(url: str) -> None:
    async with PostgresStore.from_url(url) as store:
        events = await bulk_session(store, BULK)
        session = events[0].session
        async with store._pool.acquire() as conn:
            plan = await _fetch_in_index_order(
                conn, "EXPLAIN " + _PAGE_SQL, session, 0, 1 << 62, 8192
            )
        assert not any("Sort" in row[0] for row in plan), plan
        assert any("ledger_events_session_position" in row[0] for row in plan), plan
        pages = [page async for page in store.event_pages(session, 7, page_size=8192)]
        assert [len(page) for page in pages] == [8192, 8192, 8192, BULK + 1 - 7 - 3 * 8192]
        assert [event for page in pages for event in page] == events[7:]
