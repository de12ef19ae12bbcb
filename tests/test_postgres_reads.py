"""PostgreSQL reads of one session's events: rows that do not repeat their session.

``events_from``, ``ancestors`` and ``path_index`` select rows of one session and
check every decoded event against that session, not against a column sent with
each row; a walk back finds the session by the event id in its first statement.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from ledger.errors import EventNotFoundError, IntegrityError
from ledger.events import Event, TurnAdded
from ledger.testing import append_request, create_event, next_event
from stores.postgres import PostgresStore

asyncpg = pytest.importorskip("asyncpg")


@pytest.fixture
def schema() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def url(postgres_url: str, schema: str) -> str:
    return f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={schema}"


async def a_session(store: PostgresStore, turns: int, user: str = "user-1") -> list[Event]:
    events = [create_event(user, "agent-1")]
    for i in range(turns):
        events.append(next_event(events[-1], TurnAdded(role="user", content=f"turn {i}")))
    await store.append(append_request(events, None))
    return events


def counting(store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements the store runs from now on, in order."""
    run: list[str] = []
    fetch = store._fetch

    async def counted(sql: str, *args: Any) -> Any:
        run.append(sql)
        return await fetch(sql, *args)

    monkeypatch.setattr(store, "_fetch", counted)
    return run


async def test_a_walk_within_one_window_is_one_statement(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PostgresStore.from_url(url) as store:
        await check_one_statement(store, monkeypatch)


async def check_one_statement(store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> None:
    events = await a_session(store, 40)
    run = counting(store, monkeypatch)
    newest_first = events[::-1]
    assert await store.ancestors(events[30].id, limit=16) == newest_first[10:26]
    assert await store.path_index(events[-1].id, 8) == [
        (e.id, e.seq, e.parent) for e in newest_first[:8]
    ]
    assert await store.ancestors(events[5].id) == newest_first[35:]
    assert len(run) == 3


@pytest.mark.parametrize("unknown", ["e" * 64, "not hex", "E" * 64])
async def test_a_walk_from_an_unknown_id_is_event_not_found(url: str, unknown: str) -> None:
    async with PostgresStore.from_url(url) as store:
        await a_session(store, 3)
        for call in (store.ancestors(unknown), store.path_index(unknown, 5)):
            with pytest.raises(EventNotFoundError) as info:
                await call
            assert unknown in str(info.value)


async def test_a_row_filed_under_another_session_is_named_by_every_session_read(
    url: str, postgres_url: str, schema: str
) -> None:
    async with PostgresStore.from_url(url) as store:
        await check_stray_row(store, postgres_url, schema)


async def check_stray_row(store: PostgresStore, postgres_url: str, schema: str) -> None:
    # A copy of another session's event filed under this session's id: its own
    # id matches, only its session does not. No column of the row says so.
    ours = await a_session(store, 5, "user-1")
    theirs = await a_session(store, 5, "user-2")
    stray = theirs[3]
    conn = await asyncpg.connect(postgres_url, server_settings={"search_path": schema})
    try:
        await conn.execute(
            "UPDATE ledger_events SET data = (SELECT data FROM ledger_events WHERE id = "
            "decode($1, 'hex')), id = decode($1, 'hex') WHERE id = decode($2, 'hex')",
            stray.id,
            ours[3].id,
        )
    finally:
        await conn.close()

    async def replay(start: int) -> list[Event]:
        return [event async for event in store.events_from(ours[0].session, start)]

    # The id is stored twice now: a walk from it starts at the row written first, ours.
    for call in (replay(0), replay(2), store.ancestors(stray.id), store.read_feed(0)):
        with pytest.raises(IntegrityError) as info:
            await call
        assert stray.id in str(info.value)
        assert info.value.event_id == stray.id
    # The rows before it still read as they were.
    assert await store.ancestors(ours[2].id) == ours[2::-1]
    assert [event async for event in store.events_from(ours[0].session, 4)] == ours[4:]
