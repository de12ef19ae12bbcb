"""PostgreSQL-specific tests, against the real server: catalog, processes, dropped connections.

The behaviour every store shares is in the contract suite (``ledger.testing``);
this module tests what only a server shared by many processes can get wrong.
Each test works in a schema of its own inside the run's database (see
``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stores.postgres
from ledger import Ledger
from ledger.errors import (
    ConfigError,
    ConflictError,
    EventNotFoundError,
    IntegrityError,
    InvalidEventError,
    StoreError,
)
from ledger.events import Event, TurnAdded, decode_stored, encode_event
from ledger.testing import append_request, branch_event, create_event, next_event
from projections.base import fold
from projections.engine import FoldEngine
from projections.session import SESSION
from stores import open_store
from stores.base import FeedItem
from stores.postgres import SCHEMA_VERSION, SESSION_TABLES, PostgresStore

asyncpg = pytest.importorskip("asyncpg")

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0


# --- helpers --------------------------------------------------------------------


def fresh_schema() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


def in_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


@pytest.fixture
def schema() -> str:
    return fresh_schema()


@pytest.fixture
def url(postgres_url: str, schema: str) -> str:
    """A store URL of this test's own: the run's database, a fresh schema."""
    return in_schema(postgres_url, schema)


@contextlib.asynccontextmanager
async def admin(postgres_url: str, schema: str | None = None) -> AsyncIterator[Any]:
    """A plain asyncpg connection to the run's database (in ``schema`` when given)."""
    settings = {"search_path": schema} if schema else {}
    conn = await asyncpg.connect(postgres_url, server_settings=settings)
    try:
        yield conn
    finally:
        await conn.close()


def create(user: str = "user-1", *, key: str | None = None) -> Event:
    return create_event(user, "agent-1", idempotency_key=key)


def turn(parent: Event, content: str = "hello", *, key: str | None = None) -> Event:
    return next_event(parent, TurnAdded(role="user", content=content), idempotency_key=key)


async def wait_until(predicate: Any, what: str) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def index_of(events: list[Event]) -> list[tuple[str, int, str | None]]:
    """What ``path_index`` gives for a path read by ``ancestors``."""
    return [(event.id, event.seq, event.parent) for event in events]


def no_driver_traceback(error: BaseException) -> bool:
    return error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


async def terminate_others(postgres_url: str) -> int:
    """Terminate every other connection to the run's database; how many."""
    async with admin(postgres_url) as conn:
        killed: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    return killed


# --- schema and catalog ------------------------------------------------------------


async def test_every_primary_key_and_unique_index_includes_session_id(
    url: str, postgres_url: str, schema: str
) -> None:
    async with PostgresStore.from_url(url):
        pass
    async with admin(postgres_url) as conn:
        tables = await conn.fetch(
            "SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relkind = 'r' ORDER BY c.relname",
            schema,
        )
        keys = await conn.fetch(
            "SELECT t.relname AS table_name, i.relname AS index_name, x.indisprimary, "
            "  array_agg(a.attname::text ORDER BY a.attname) AS columns "
            "FROM pg_index AS x "
            "JOIN pg_class AS t ON t.oid = x.indrelid "
            "JOIN pg_class AS i ON i.oid = x.indexrelid "
            "JOIN pg_namespace AS n ON n.oid = t.relnamespace "
            "JOIN pg_attribute AS a ON a.attrelid = t.oid AND a.attnum = ANY (x.indkey) "
            "WHERE n.nspname = $1 AND (x.indisunique OR x.indisprimary) "
            "GROUP BY t.relname, i.relname, x.indisprimary",
            schema,
        )
        constraints = await conn.fetch(
            "SELECT t.relname, k.conname, k.contype::text AS contype, "
            "  array(SELECT a.attname::text FROM pg_attribute AS a "
            "        WHERE a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey)) AS columns "
            "FROM pg_constraint AS k "
            "JOIN pg_class AS t ON t.oid = k.conrelid "
            "JOIN pg_namespace AS n ON n.oid = t.relnamespace "
            "WHERE n.nspname = $1 AND k.contype IN ('p', 'u')",
            schema,
        )
    # every table but the version table holds session data
    assert sorted(r["relname"] for r in tables) == sorted([*SESSION_TABLES, "ledger_schema"])
    assert keys, "no keys found"
    for key in keys:
        assert "session_id" in key["columns"], dict(key)
    primary = {k["table_name"] for k in keys if k["indisprimary"]}
    assert primary == set(SESSION_TABLES)
    # the constraints are the primary keys, and each holds session_id too
    for constraint in constraints:
        assert "session_id" in constraint["columns"], dict(constraint)
    assert {(c["relname"], c["contype"]) for c in constraints} == {(t, "p") for t in SESSION_TABLES}


async def test_schema_version_is_recorded_and_a_newer_one_refused(
    url: str, postgres_url: str, schema: str
) -> None:
    async with PostgresStore.from_url(url):
        pass
    async with admin(postgres_url, schema) as conn:
        assert await conn.fetchval("SELECT array_agg(version) FROM ledger_schema") == [
            SCHEMA_VERSION
        ]
        await conn.execute("INSERT INTO ledger_schema (version) VALUES ($1)", SCHEMA_VERSION + 1)
    store = PostgresStore.from_url(url)
    with pytest.raises(StoreError) as info:
        await store.open()
    message = str(info.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert "127.0.0.1:5432" in message and schema in message
    assert no_driver_traceback(info.value)


# Version 3's append functions, by their arguments: here stand-ins that fail if called.
_V3_FUNCTIONS = {
    "ledger_append": "text, text, text, text, text, text, bigint, bigint, "
    "text[], text[], bigint[], text[], bigint[], text[], bytea[]",
    "ledger_append_group": "text[], text[], text[], text[], text[], text[], bigint[], bigint[], "
    "integer[], text[], text[], bigint[], text[], bigint[], text[], bytea[]",
}


async def back_to_version(conn: Any, version: int) -> None:
    """Turn this code's tables back into what version 3 made (its columns, its
    indexes, its heads table, its functions) and record ``version``."""
    await conn.execute(
        """
        DROP FUNCTION ledger_append_group, ledger_append;
        ALTER TABLE ledger_events
            ALTER COLUMN session_id TYPE text USING session_id::text,
            ALTER COLUMN id TYPE text USING encode(id, 'hex'),
            ALTER COLUMN parent TYPE text USING encode(parent, 'hex'),
            ADD COLUMN branch text NOT NULL DEFAULT 'main',
            ADD COLUMN kind text NOT NULL DEFAULT 'TurnAdded',
            ADD COLUMN at bigint NOT NULL DEFAULT 0;
        CREATE TABLE ledger_heads (
            session_id text NOT NULL, branch text NOT NULL, head text NOT NULL,
            PRIMARY KEY (session_id, branch));
        INSERT INTO ledger_heads SELECT s.session_id, t.branch, t.head
            FROM ledger_sessions AS s, unnest(s.branches, s.heads) AS t(branch, head);
        ALTER TABLE ledger_sessions DROP COLUMN branches, DROP COLUMN heads;
        DROP INDEX ledger_sessions_activity, ledger_sessions_user;
        CREATE INDEX ledger_sessions_activity ON ledger_sessions (last_activity_at, session_id);
        CREATE INDEX ledger_sessions_user
            ON ledger_sessions (user_id, last_activity_at, session_id);
        DELETE FROM ledger_schema;
        """
    )
    for name, arguments in _V3_FUNCTIONS.items():
        await conn.execute(
            f"CREATE FUNCTION {name}({arguments}) RETURNS TABLE (o text) "
            f"LANGUAGE plpgsql AS $$ BEGIN RAISE 'a version {version} function'; END $$"
        )
    await conn.execute("INSERT INTO ledger_schema (version) VALUES ($1)", version)


async def versions_of(conn: Any) -> list[int]:
    versions: list[int] = await conn.fetchval(
        "SELECT array_agg(version ORDER BY version) FROM ledger_schema"
    )
    return versions


async def test_a_version_3_database_is_upgraded_in_place(
    url: str, postgres_url: str, schema: str
) -> None:
    root = create()
    small = turn(root, "small, plain JSON as version 3 wrote it", key="k-1")
    large = turn(small, "large, a zlib stream as version 3 wrote it " * 100)
    side = branch_event(small, "side")
    async with PostgresStore.from_url(url) as store:
        await store.append(append_request([root], None))
        await store.append(append_request([small, large], root.id))
        await store.append(append_request([side], None))
    async with admin(postgres_url, schema) as conn:
        await back_to_version(conn, 3)
        for event, data in (
            (small, encode_event(small)),
            (large, zlib.compress(encode_event(large), 1)),
        ):
            await conn.execute("UPDATE ledger_events SET data = $2 WHERE id = $1", event.id, data)
    async with PostgresStore.from_url(url) as store:
        assert await store.heads(root.session) == {"main": large.id, "side": side.id}
        assert [item.event for item in await store.read_feed()] == [root, small, large, side]
        assert [e async for e in store.events(root.session)] == [root, small, large, side]
        assert await store.ancestors(large.id) == [large, small, root]
        assert await store.get(large.id) == large
        replayed = await store.append(append_request([turn(large, "again", key="k-1")], large.id))
        assert replayed.replayed and replayed.events == [small]
        with pytest.raises(ConflictError):
            await store.append(append_request([turn(small, "stale")], small.id))
        after = turn(large, "after the upgrade")
        await store.append(append_request([after], large.id))
        await store.append(append_request([turn(side, "on side")], side.id))
        assert (await store.session(root.session)).event_count == 6
    async with admin(postgres_url, schema) as conn:
        columns = dict(
            await conn.fetch(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = 'ledger_events'::regclass AND attnum > 0 "
                "AND NOT attisdropped"
            )
        )
        heads_table = await conn.fetchval("SELECT to_regclass('ledger_heads')")
        functions = await conn.fetchval(
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'ledger_append%' "
            "AND pronamespace = current_schema()::regnamespace"
        )
        assert await versions_of(conn) == [3, SCHEMA_VERSION]
    assert columns == {
        "position": "bigint",
        "seq": "bigint",
        "session_id": "uuid",
        "id": "bytea",
        "parent": "bytea",
        "idempotency_key": "text",
        "data": "bytea",
    }
    assert heads_table is None
    assert functions == 2  # the old ones dropped, not left beside the new as overloads


@pytest.mark.parametrize("bad", ["id", "session"])
async def test_a_version_3_database_that_cannot_be_converted_is_refused_untouched(
    url: str, postgres_url: str, schema: str, bad: str
) -> None:
    root = create()
    async with PostgresStore.from_url(url) as store:
        await store.append(append_request([root], None))
    async with admin(postgres_url, schema) as conn:
        await back_to_version(conn, 3)
        column = "id" if bad == "id" else "session_id"
        await conn.execute(f"UPDATE ledger_events SET {column} = upper({column})")
    with pytest.raises(StoreError) as info:
        await PostgresStore.from_url(url).open()
    message = str(info.value)
    assert (
        f"schema version 3 to {SCHEMA_VERSION}" in message
        and root.id.upper()[:8] in message.upper()
    )
    assert no_driver_traceback(info.value)
    async with admin(postgres_url, schema) as conn:
        assert await versions_of(conn) == [3]
        assert await conn.fetchval("SELECT to_regclass('ledger_heads') IS NOT NULL")


async def test_processes_opening_a_version_3_database_at_once_upgrade_it_once(
    url: str, postgres_url: str, schema: str
) -> None:
    roots = [create(f"user-{n}") for n in range(3)]
    async with PostgresStore.from_url(url) as store:
        for root in roots:
            await store.append(append_request([root], None))
    async with admin(postgres_url, schema) as conn:
        await back_to_version(conn, 3)
    stores = [PostgresStore.from_url(url) for _ in range(6)]  # a pool, a connection each
    try:
        await asyncio.gather(*(s.open() for s in stores))
        for n, root in enumerate(roots):
            await stores[n].append(append_request([turn(root)], root.id))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    async with admin(postgres_url, schema) as conn:
        assert await versions_of(conn) == [3, SCHEMA_VERSION]


async def test_a_version_1_database_is_upgraded_in_place(
    url: str, postgres_url: str, schema: str
) -> None:
    root = create()
    first = turn(root, "plain, as version 1 wrote it")
    async with PostgresStore.from_url(url) as store:
        await store.append(append_request([root], None))
        await store.append(append_request([first], root.id))
    # Back to version 1's catalog: the key led by session_id, a second index on id.
    async with admin(postgres_url, schema) as conn:
        await back_to_version(conn, 1)
        await conn.execute(
            "ALTER TABLE ledger_events DROP CONSTRAINT ledger_events_pkey, "
            "ADD CONSTRAINT ledger_events_pkey PRIMARY KEY (session_id, id); "
            "CREATE INDEX ledger_events_id ON ledger_events (id)"
        )
    async with PostgresStore.from_url(url) as store:
        second = turn(first, "x" * 5000)
        await store.append(append_request([second], first.id))
        assert await store.get(first.id) == first
        assert [item.event for item in await store.read_feed()] == [root, first, second]
    async with admin(postgres_url, schema) as conn:
        versions = await conn.fetchval(
            "SELECT array_agg(version ORDER BY version) FROM ledger_schema"
        )
        key = await conn.fetchval(
            "SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_index AS x "
            "CROSS JOIN unnest(x.indkey) WITH ORDINALITY AS k(attnum, n) "
            "JOIN pg_attribute AS a ON a.attrelid = x.indrelid AND a.attnum = k.attnum "
            "WHERE x.indrelid = 'ledger_events'::regclass AND x.indisprimary"
        )
        id_index = await conn.fetchval("SELECT to_regclass('ledger_events_id')")
    assert versions == [1, SCHEMA_VERSION]
    assert key == ["id", "session_id"]
    assert id_index is None


async def test_a_version_2_database_gets_the_current_append_functions(
    url: str, postgres_url: str, schema: str
) -> None:
    root = create()
    async with PostgresStore.from_url(url) as store:
        await store.append(append_request([root], None))
    # Back to version 2: its functions (here stand-ins that fail if called), its row.
    async with admin(postgres_url, schema) as conn:
        await back_to_version(conn, 2)
    async with PostgresStore.from_url(url) as store:
        first = turn(root)
        await store.append(append_request([first], root.id))
        others = [create(f"user-{n}") for n in range(8)]
        await asyncio.gather(*(store.append(append_request([e], None)) for e in others))
        assert store.group_stats.largest > 1  # the group function ran too
        assert len(await store.read_feed()) == 2 + len(others)
    async with admin(postgres_url, schema) as conn:
        versions = await conn.fetchval(
            "SELECT array_agg(version ORDER BY version) FROM ledger_schema"
        )
    assert versions == [2, SCHEMA_VERSION]


# Version 4's append functions, by their arguments: here stand-ins that fail if called.
_V4_FUNCTIONS = {
    "ledger_append": "text, text, text, text, text, text, bigint, bigint, bigint, bigint, "
    "bytea[], bytea[], bigint[], text[], bytea[]",
    "ledger_append_group": "text[], text[], text[], text[], text[], text[], bigint[], bigint[], "
    "bigint[], bigint[], integer[], bytea[], bytea[], bigint[], text[], bytea[]",
}


async def test_a_version_4_database_gets_the_append_functions_taking_one_data_value(
    url: str, postgres_url: str, schema: str
) -> None:
    root = create()
    plain = turn(root, "plain")
    first = [plain, turn(plain, "large enough to be compressed " * 40)]
    async with PostgresStore.from_url(url) as store:
        await store.append(append_request([root], None))
        await store.append(append_request(first, root.id))
    # Back to version 4: its functions (stand-ins that fail if called), its row.
    async with admin(postgres_url, schema) as conn:
        await conn.execute("DROP FUNCTION ledger_append_group, ledger_append")
        for name, arguments in _V4_FUNCTIONS.items():
            await conn.execute(
                f"CREATE FUNCTION {name}({arguments}) RETURNS TABLE (o text) "
                "LANGUAGE plpgsql AS $$ BEGIN RAISE 'a version 4 function'; END $$"
            )
        await conn.execute("DELETE FROM ledger_schema; INSERT INTO ledger_schema VALUES (4)")
    async with PostgresStore.from_url(url) as store:
        batch = [turn(first[-1], "after the upgrade", key="k-5")]
        batch.append(turn(batch[-1], "and a large one " * 60))
        await store.append(append_request(batch, first[-1].id))
        others = [create(f"user-{n}") for n in range(8)]
        await asyncio.gather(*(store.append(append_request([e], None)) for e in others))
        assert store.group_stats.largest > 1  # the group function ran too
        replayed = await store.append(append_request([turn(batch[-1], key="k-5")], batch[-1].id))
        assert replayed.replayed and replayed.events == [batch[0]]
        assert [e async for e in store.events(root.session)] == [root, *first, *batch]
        assert await store.ancestors(batch[-1].id) == [*reversed(batch), *reversed(first), root]
    async with admin(postgres_url, schema) as conn:
        functions = await conn.fetch(
            "SELECT proname::text, pg_get_function_identity_arguments(oid) FROM pg_proc "
            "WHERE proname LIKE 'ledger_append%' AND pronamespace = current_schema()::regnamespace"
        )
        assert await versions_of(conn) == [4, SCHEMA_VERSION]
    assert sorted(name for name, _ in functions) == ["ledger_append", "ledger_append_group"]
    assert all("p_lengths" in arguments for _, arguments in functions)


async def test_events_from_600_bytes_are_stored_deflated_and_read_back_exactly(
    url: str, postgres_url: str, schema: str
) -> None:
    root = create()
    small = turn(root, "short")
    mid = turn(small, "the order shipment status " * 8)  # a short turn: ~650 bytes
    large = turn(mid, "the order shipment status " * 200)
    assert len(encode_event(small)) < 600 <= len(encode_event(mid))
    async with PostgresStore.from_url(url) as store:
        await store.append(append_request([root], None))
        await store.append(append_request([small, mid, large], root.id))
        async with admin(postgres_url, schema) as conn:
            rows = dict(await conn.fetch("SELECT encode(id, 'hex'), data FROM ledger_events"))
        assert rows[small.id] == encode_event(small)  # mostly its envelope: plain
        # Deflated with the stored form's dictionary, however short the content.
        assert len(rows[mid.id]) < len(encode_event(mid)) * 2 // 3
        assert len(rows[large.id]) < len(encode_event(large)) // 4
        assert decode_stored(rows[mid.id]) == mid
        assert decode_stored(rows[large.id]) == large
        assert await store.get(large.id) == large
        assert [item.event for item in await store.read_feed()] == [root, small, mid, large]
        assert [e async for e in store.events(root.session)] == [root, small, mid, large]
        assert (await store.ancestors(large.id))[0] == large


async def test_damaged_compressed_row_raises_integrity_error_naming_it(
    url: str, postgres_url: str, schema: str
) -> None:
    async with PostgresStore.from_url(url) as store:
        root = create()
        large = turn(root, "the order shipment status " * 200)
        await store.append(append_request([root, large], None))
        async with admin(postgres_url, schema) as conn:
            # One byte of the stream flipped: the inflated bytes fail its checksum.
            await conn.execute(
                "UPDATE ledger_events SET data = set_byte(data, 20, get_byte(data, 20) # 1) "
                "WHERE id = decode($1, 'hex')",
                large.id,
            )
        for call in (store.get(large.id), store.read_feed(0, 10)):
            with pytest.raises(IntegrityError) as info:
                await call
            assert large.id in str(info.value)
            assert info.value.event_id == large.id


async def test_foreign_tables_without_a_version_are_refused(
    url: str, postgres_url: str, schema: str
) -> None:
    async with admin(postgres_url) as conn:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'CREATE TABLE "{schema}".ledger_events (x int)')
    with pytest.raises(StoreError, match="no schema version"):
        await PostgresStore.from_url(url).open()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from ledger import Ledger

    async def main(url, mode, name, count):
        async with Ledger.open(url) as led:
            if mode == "own":
                sid = (await led.create(user_id=name, agent="pg-test")).session_id
                print("session", sid, flush=True)
            else:
                sid = mode
            for n in range(count):
                event = await led.add_turn(sid, role="user", content=f"{name} {n}")
                print(event.id, flush=True)  # acknowledged: printed after the commit

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
    """
)


def spawn(url: str, mode: str, name: str, count: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="error")
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, url, mode, name, str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def finish(procs: list[subprocess.Popen[str]]) -> list[list[str]]:
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        outputs.append(out.split())
    return outputs


def test_processes_creating_the_schema_at_once(url: str, postgres_url: str, schema: str) -> None:
    procs = [spawn(url, "own", f"p{n}", 2) for n in range(6)]
    outputs = finish(procs)
    assert all(words[0] == "session" for words in outputs)

    async def check() -> None:
        async with admin(postgres_url, schema) as conn:
            assert await conn.fetchval("SELECT count(*) FROM ledger_schema") == 1
            assert await conn.fetchval("SELECT count(*) FROM ledger_sessions") == 6
            assert await conn.fetchval("SELECT count(*) FROM ledger_events") == 6 * 3

    asyncio.run(check())


@pytest.mark.slow
def test_eight_processes_one_session_and_own_sessions(url: str) -> None:
    per_writer = 20

    async def setup() -> str:
        async with Ledger.open(url) as led:
            return (await led.create(user_id="shared", agent="pg-test")).session_id

    shared = asyncio.run(setup())
    procs = [spawn(url, shared, f"shared{n}", per_writer) for n in range(4)]
    procs += [spawn(url, "own", f"own{n}", per_writer) for n in range(4)]
    outputs = finish(procs)

    async def check() -> None:
        async with Ledger.open(url) as led:
            history = await led.history(shared)
            assert len(history) == 1 + 4 * per_writer
            assert all(b.parent == a.id for a, b in itertools.pairwise(history))
            assert list(await led.store.heads(shared)) == ["main"]
            assert (await led.verify(shared)).ok
            counts = collections.Counter(e.id for e in history)
            for ids in outputs[:4]:
                assert len(ids) == per_writer
                assert all(counts[i] == 1 for i in ids)
            for words in outputs[4:]:
                assert words[0] == "session"
                own = await led.history(words[1])
                assert [e.id for e in own[1:]] == words[2:]
                assert (await led.verify(words[1])).ok
            store = led.store
            feed = await store.read_feed(0, 10_000)
            assert len(feed) == 1 + 4 * per_writer + 4 * (1 + per_writer)
            assert len({i.event.id for i in feed}) == len(feed)
            positions = [i.position for i in feed]
            assert positions == sorted(set(positions))

    asyncio.run(check())


# --- dropped connections -------------------------------------------------------------


async def test_connection_terminated_mid_append_writes_nothing_and_retry_is_safe(
    url: str, postgres_url: str, schema: str
) -> None:
    async with PostgresStore.from_url(url) as store:
        root = create()
        await store.append(append_request([root], None))
        first = turn(root, "first try", key="k-1")
        batch = [first, next_event(first)]
        batch.append(next_event(batch[-1]))
        before = (await store.session(root.session), await store.heads(root.session))
        async with admin(postgres_url, schema) as blocker:
            # Hold the session's row lock: the append waits inside ledger_append.
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute(
                "SELECT 1 FROM ledger_sessions WHERE session_id = $1 FOR UPDATE", root.session
            )
            pending = asyncio.ensure_future(store.append(append_request(batch, root.id)))

            async def blocked_pid() -> int | None:
                # Inside a transaction pg_stat_activity is read once, then cached.
                await blocker.execute("SELECT pg_stat_clear_snapshot()")
                pid: int | None = await blocker.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE '%ledger_append%'"
                )
                return pid

            pid = await wait_until(blocked_pid, "the append to block")
            assert await blocker.fetchval("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises(StoreError) as info:
                await asyncio.wait_for(pending, TIMEOUT)
            await tx.rollback()
        message = str(info.value)
        assert "lost during an append" in message and root.session in message
        assert "127.0.0.1:5432" in message and "same idempotency key" in message
        assert no_driver_traceback(info.value)
        # nothing of the batch landed
        assert (await store.session(root.session), await store.heads(root.session)) == before
        assert await store.find_by_key(root.session, "k-1") is None
        # the retry with the same key lands once; a second retry replays it
        result = await store.append(append_request(batch, root.id))
        assert not result.replayed
        again = await store.append(append_request(batch, root.id))
        assert again.replayed and again.events == [first]
        events = [e async for e in store.events(root.session)]
        assert events == [root, *batch]


async def test_appends_go_on_after_the_writers_idle_connection_is_terminated(
    url: str, postgres_url: str
) -> None:
    # The group writer keeps a connection between appends: one the server closed
    # meanwhile is replaced before the next append, which must not fail for it.
    async with PostgresStore.from_url(url) as store:
        root = create()
        await store.append(append_request([root], None))
        head = root
        for n in range(3):
            assert await terminate_others(postgres_url) >= 1
            await asyncio.sleep(0.2)  # the client sees the socket closed
            event = turn(head, f"after termination {n}")
            await store.append(append_request([event], head.id))
            head = event
        assert [e.seq async for e in store.events(root.session)] == [0, 1, 2, 3]


async def test_a_pool_of_one_connection_serves_reads_between_appends(url: str) -> None:
    # The writer keeps no connection of its own then: reads would wait for ever.
    async with PostgresStore.from_url(url, pool_size=1) as store:
        root = create()
        await store.append(append_request([root], None))
        head = root
        for n in range(3):
            event = turn(head, f"turn {n}")
            await asyncio.wait_for(store.append(append_request([event], head.id)), TIMEOUT)
            assert await asyncio.wait_for(store.get(event.id), TIMEOUT) == event
            head = event


async def test_appends_under_random_terminations_land_whole_or_not_at_all(
    url: str, postgres_url: str
) -> None:
    async with PostgresStore.from_url(url) as store:
        root = create()
        await store.append(append_request([root], None))
        head = root
        lost = 0
        stop = asyncio.Event()

        async def killer() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.003 + 0.01 * (lost % 3))
                with contextlib.suppress(Exception):
                    await terminate_others(postgres_url)

        task = asyncio.ensure_future(killer())
        try:
            for n in range(40):
                batch = [turn(head, f"batch {n}", key=f"b{n}")]
                for _ in range(9):
                    batch.append(next_event(batch[-1]))
                while True:
                    try:
                        result = await store.append(append_request(batch, head.id))
                    except StoreError:
                        lost += 1
                        # whole or nothing: the batch's events are all there or none
                        found = await _retrying(store.find_by_key, root.session, f"b{n}")
                        count = await _retrying(_count, store, root.session)
                        expected_before = 1 + 10 * n
                        assert count in (expected_before, expected_before + 10)
                        assert (found is None) == (count == expected_before)
                        continue
                    assert result.events[0] == batch[0]
                    break
                head = batch[-1]
        finally:
            stop.set()
            await task
        events = [e async for e in store.events(root.session)]
        assert len(events) == 1 + 40 * 10
        assert len({e.id for e in events}) == len(events)
        assert all(b.parent == a.id for a, b in itertools.pairwise(events))
        assert await store.heads(root.session) == {"main": head.id}
        assert lost > 0, "no append was cut: the killer never hit one"


async def _retrying(fn: Any, *args: Any) -> Any:
    """Call ``fn`` until the connections stop being terminated under it."""
    for _ in range(200):
        try:
            return await fn(*args)
        except StoreError:
            await asyncio.sleep(0.01)
    raise AssertionError("the store never came back")


async def _count(store: PostgresStore, session_id: str) -> int:
    return len([e async for e in store.events(session_id)])


async def test_subscriber_survives_terminated_connections(url: str, postgres_url: str) -> None:
    async with (
        PostgresStore.from_url(url) as reader,
        PostgresStore.from_url(url) as writer,
    ):
        root = create()
        await writer.append(append_request([root], None))
        start = (await reader.read_feed(0, 10_000))[-1].position - 1
        got: list[FeedItem] = []
        total = 1 + 60

        async def follow() -> None:
            async for item in reader.subscribe(after=start):
                got.append(item)
                if len(got) == total:
                    return

        task = asyncio.ensure_future(follow())
        head = root
        kills = 0
        for n in range(60):
            event = turn(head, f"turn {n}", key=f"t{n}")
            while True:
                try:
                    await writer.append(append_request([event], head.id))
                except StoreError:
                    continue  # cut: retry with the same key (replays if it landed)
                break
            head = event
            if n % 10 == 5:
                kills += await terminate_others(postgres_url)
                await asyncio.sleep(0.05)
        await asyncio.wait_for(task, TIMEOUT)
        assert kills >= 6
        events = [item.event for item in got]
        assert events == [e async for e in writer.events(root.session)]
        assert len({e.id for e in events}) == total
        assert [i.position for i in got] == sorted({i.position for i in got})


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def private_server() -> Iterator[tuple[str, Callable[[], None]]]:
    """A throwaway PostgreSQL cluster of this test's own: its URL, and how to restart it.

    Restarting the shared server would cut off everyone else using it.
    """
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    # Not under pytest's tmp_path: the server's user must be able to reach it.
    home = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(home, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port, log = home / "data", _free_port(), str(home / "log")
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off"

    def pg_ctl(*args: str, check: bool = True) -> None:
        subprocess.run(
            [*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), *args],
            check=check,
            # the server must not inherit our pipes: its output goes to the log
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    try:
        subprocess.run(
            [
                *as_postgres,
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        pg_ctl("-o", options, "-l", log, "-w", "start")
        yield (
            f"postgresql://postgres@127.0.0.1:{port}/postgres",
            lambda: pg_ctl("-o", options, "-l", log, "-m", "fast", "-w", "restart"),
        )
    finally:
        try:
            pg_ctl("-m", "immediate", "-w", "stop", check=False)
        finally:
            shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
async def test_subscriber_survives_a_server_restart(
    private_server: tuple[str, Callable[[], None]],
) -> None:
    url, restart = private_server
    async with (
        PostgresStore.from_url(url) as reader,
        PostgresStore.from_url(url) as writer,
    ):
        root = create()
        await writer.append(append_request([root], None))
        got: list[FeedItem] = []
        total = 1 + 30

        async def follow() -> None:
            async for item in reader.subscribe(after=0):
                got.append(item)
                if len(got) == total:
                    return

        task = asyncio.ensure_future(follow())
        head = root
        for n in range(30):
            event = turn(head, f"turn {n}", key=f"t{n}")
            while True:
                try:
                    await writer.append(append_request([event], head.id))
                except StoreError:
                    await asyncio.sleep(0.05)
                    continue  # the server is away: retry with the same key
                break
            head = event
            if n in (10, 20):
                await asyncio.to_thread(restart)
        await asyncio.wait_for(task, TIMEOUT)
        events = [item.event for item in got]
        assert events == [e async for e in writer.events(root.session)]
        assert len({e.id for e in events}) == total
        assert [i.position for i in got] == sorted({i.position for i in got})


async def test_wait_for_feed_is_woken_by_another_store_through_notify(url: str) -> None:
    async with (
        PostgresStore.from_url(url) as reader,
        PostgresStore.from_url(url) as writer,
    ):
        reader.poll_interval = 10.0  # a poll would be far too late: only NOTIFY can wake it
        root = create()
        await writer.append(append_request([root], None))
        end = (await reader.read_feed(0, 10_000))[-1].position
        await reader.wait_for_feed(end, 0)  # starts the listener
        began = time.monotonic()
        waiting = asyncio.ensure_future(reader.wait_for_feed(end, 5.0))
        await asyncio.sleep(0.1)
        await writer.append(append_request([turn(root)], root.id))
        await asyncio.wait_for(waiting, TIMEOUT)
        assert time.monotonic() - began < 4.0


# --- bad data, bad URLs --------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "other_id"])
async def test_damaged_row_raises_integrity_error_naming_it(
    url: str, postgres_url: str, schema: str, damage: str
) -> None:
    async with PostgresStore.from_url(url) as store:
        root = create()
        await store.append(append_request([root], None))
        first = turn(root)
        await store.append(append_request([first], root.id))
        async with admin(postgres_url, schema) as conn:
            if damage == "garbage":
                await conn.execute(
                    "UPDATE ledger_events SET data = '\\x00ff'::bytea WHERE id = decode($1, 'hex')",
                    first.id,
                )
            else:
                await conn.execute(
                    "UPDATE ledger_events SET data = (SELECT data FROM ledger_events "
                    "WHERE id = decode($2, 'hex')) WHERE id = decode($1, 'hex')",
                    first.id,
                    root.id,
                )

        async def replay() -> list[Event]:
            return [event async for event in store.events(root.session)]

        # Pages are decoded as whole lists: the bad row among good ones is still named.
        for call in (
            store.get(first.id),
            store.read_feed(0, 10_000),
            replay(),
            store.ancestors(first.id),
        ):
            with pytest.raises(IntegrityError) as info:
                await call
            assert first.id in str(info.value)
            assert info.value.event_id == first.id


def _assert_clear(error: BaseException, *words: str) -> None:
    message = str(error)
    for word in words:
        assert word in message, message
    assert no_driver_traceback(error), "a driver traceback leaked"


async def test_refused_port_is_one_store_error_naming_host_and_database() -> None:
    store = open_store("postgresql://postgres@127.0.0.1:1/somedb?connect_timeout=5")
    with pytest.raises(StoreError) as info:
        await store.open()
    _assert_clear(info.value, "127.0.0.1:1", "'somedb'")


async def test_unknown_host_is_one_store_error_naming_host_and_database() -> None:
    store = open_store("postgresql://postgres@no-such-host.invalid:5432/somedb?connect_timeout=5")
    with pytest.raises(StoreError) as info:
        await store.open()
    _assert_clear(info.value, "no-such-host.invalid:5432", "'somedb'")


async def test_missing_database_is_one_store_error_naming_it(postgres_server: str) -> None:
    missing = f"ledger_missing_{uuid.uuid4().hex[:8]}"
    host = postgres_server.split("@")[-1].split("/")[0]
    store = open_store(f"postgresql://postgres@{host}/{missing}")
    with pytest.raises(StoreError) as info:
        await store.open()
    _assert_clear(info.value, missing, "does not exist", host)


async def test_ledger_open_on_a_bad_url_raises_the_store_error() -> None:
    with pytest.raises(StoreError) as info:
        await Ledger.open("postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=5")
    _assert_clear(info.value, "'nowhere'")


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("postgresql://h:notaport/db", {}),
        ("postgresql://h/db?pool_size=many", {}),
        ("postgresql://h/db?pool_size=0", {}),
        ("postgresql://h/db", {"pool_size": 0}),
        ("postgresql://h/db?connect_timeout=-1", {}),
        ("postgresql://h/db?schema=Bad-Name", {}),
    ],
)
def test_malformed_urls_and_options_are_config_errors(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        open_store(url, **options)


async def test_pool_size_from_the_url_and_from_keywords(url: str) -> None:
    store = open_store(f"{url}&pool_size=3")
    assert isinstance(store, PostgresStore) and store.pool_size == 3
    store = open_store(url, pool_size=2)
    assert isinstance(store, PostgresStore) and store.pool_size == 2
    async with store:
        # more concurrent work than connections: it queues, and all of it is done
        roots = [create(f"u{n}") for n in range(8)]
        await asyncio.gather(*(store.append(append_request([r], None)) for r in roots))
        for r in roots:
            assert await store.get(r.id) == r


def test_password_is_never_shown(postgres_server: str) -> None:
    store = open_store("postgresql://me:s3cret@127.0.0.1:1/db?connect_timeout=5")

    async def run() -> None:
        with pytest.raises(StoreError) as info:
            await store.open()
        assert "s3cret" not in str(info.value)

    asyncio.run(run())


# --- the command ----------------------------------------------------------------------


def test_ledger_demo_runs_on_postgres(url: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="error")
    env.pop("LEDGER_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "--store", url, "demo"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    verify = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "--store", url, "verify"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


# --- reads of a path: windows of the session's events ------------------------------


async def test_ancestors_in_small_windows_across_interleaved_branches(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Windows of 8 rows: main's path crosses many windows, and once the branches
    # interleave (1 main event to 5 alt ones) its windows are mostly alt's, so the
    # walk also takes the recursive fallback; every answer must still be exact.
    monkeypatch.setattr("stores.postgres._PATH_WINDOW", 8)
    async with PostgresStore.from_url(url) as store:
        root = create()
        main = [root]
        for _ in range(20):
            main.append(turn(main[-1]))
        await store.append(append_request(main, None))
        fork = branch_event(main[5], "alt")
        alt = [*main[:6], fork]
        await store.append(append_request([fork], None))
        for _ in range(12):
            head = main[-1]
            main.append(turn(head))
            await store.append(append_request([main[-1]], head.id))
            extra = [turn(alt[-1])]
            for _ in range(4):
                extra.append(turn(extra[-1]))
            await store.append(append_request(extra, alt[-1].id))
            alt.extend(extra)
        sql_run: collections.Counter[str] = collections.Counter()
        fetch = store._fetch

        async def counted(sql: str, *args: Any) -> Any:
            sql_run[sql] += 1
            return await fetch(sql, *args)

        monkeypatch.setattr(store, "_fetch", counted)
        for path in (main, alt):
            newest_first = list(reversed(path))
            for at in (len(path) - 1, len(path) // 2, 6, 0):
                expected = newest_first[len(path) - 1 - at :]
                assert await store.ancestors(path[at].id) == expected
                for limit in (1, 7, 8, 9, 30):
                    assert await store.ancestors(path[at].id, limit=limit) == expected[:limit]
                    assert await store.path_index(path[at].id, limit) == index_of(expected[:limit])
            assert await store.path(path[-1].id) == path
        # Both ways of reading were taken (the test would prove little otherwise).
        for sql in ("_WINDOW_SQL", "_CHAIN_SQL", "_INDEX_WINDOW_SQL", "_INDEX_CHAIN_SQL"):
            assert sql_run[getattr(stores.postgres, sql)] > 0, sql


@pytest.mark.parametrize("tampered", ["other", "missing"])
async def test_ancestors_name_a_tampered_parent_column(
    url: str, postgres_url: str, schema: str, tampered: str
) -> None:
    async with PostgresStore.from_url(url) as store:
        events = [create()]
        for _ in range(6):
            events.append(turn(events[-1]))
        await store.append(append_request(events, None))
        victim = events[4]
        parent = events[1].id if tampered == "other" else "f" * 64
        async with admin(postgres_url, schema) as conn:
            await conn.execute(
                "UPDATE ledger_events SET parent = decode($1, 'hex') WHERE id = decode($2, 'hex')",
                parent,
                victim.id,
            )
        with pytest.raises(IntegrityError) as info:
            await store.ancestors(events[-1].id)
        assert victim.id in str(info.value)
        # Above the tampered row the path reads as before.
        assert await store.ancestors(events[-1].id, limit=2) == [events[6], events[5]]


# --- path_index: the path by its ids, for the fold engine ---------------------------


async def _random_tree(store: PostgresStore, data: st.DataObject) -> list[Event]:
    """A session grown by random runs of appends on random branches and forks from
    any of its events; its events in append order."""
    root = create()
    await store.append(append_request([root], None))
    events, heads = [root], {"main": root}
    for step in range(data.draw(st.integers(1, 8), label="steps")):
        if data.draw(st.booleans(), label="fork"):
            fork_point = data.draw(st.sampled_from(events), label="fork point")
            batch = [branch_event(fork_point, f"b{step}")]
            expected_head = None
        else:
            head = heads[data.draw(st.sampled_from(sorted(heads)), label="branch")]
            batch, expected_head = [turn(head)], head.id
        for _ in range(data.draw(st.integers(0, 12), label="run")):
            batch.append(turn(batch[-1]))
        await store.append(append_request(batch, expected_head))
        events.extend(batch)
        heads[batch[-1].branch] = batch[-1]
    return events


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_path_index_is_the_ancestors_ids_seqs_and_parents(url: str, data: st.DataObject) -> None:
    window = data.draw(st.sampled_from([1, 2, 3, 5, 4096]), label="window")

    async def check() -> None:
        async with PostgresStore.from_url(url) as store:
            events = await _random_tree(store, data)
            by_id = {event.id: event for event in events}
            for event in events:
                path = [event]
                while path[-1].parent is not None:
                    path.append(by_id[path[-1].parent])
                for limit in (1, 2, 7, len(path), len(path) + 5):
                    got = await store.path_index(event.id, limit)
                    assert got == index_of(await store.ancestors(event.id, limit))
                    assert got == index_of(path[:limit])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("stores.postgres._PATH_WINDOW", window)
        asyncio.run(check())


async def test_path_index_of_an_unknown_id_or_no_limit(url: str) -> None:
    async with PostgresStore.from_url(url) as store:
        root = create()
        await store.append(append_request([root], None))
        unknown = "e" * 64
        with pytest.raises(EventNotFoundError) as info:
            await store.path_index(unknown, 10)
        assert unknown in str(info.value)
        assert await store.path_index(root.id, 0) == []
        assert await store.path_index(root.id, 1) == [(root.id, 0, None)]


async def _bulk_loaded(store: PostgresStore, n: int, branch_at: int) -> list[Event]:
    """A session of ``n`` events on main, a branch forked at ``branch_at`` with as
    many events after it interleaved in the table, and no snapshot: the branch's path."""
    root = create()
    main = [root]
    for _ in range(n - 1):
        main.append(turn(main[-1]))
    await store.append(append_request(main[:1], None))
    await store.append(append_request(main[1:branch_at], root.id))
    alt = [*main[:branch_at], branch_event(main[branch_at - 1], "alt")]
    await store.append(append_request(alt[-1:], None))
    for start in range(branch_at, n, 50):
        head = main[start - 1]
        await store.append(append_request(main[start : start + 50], head.id))
        more = [turn(alt[-1])]
        for _ in range(49):
            more.append(turn(more[-1]))
        await store.append(append_request(more, alt[-1].id))
        alt.extend(more)
    return alt


@pytest.mark.parametrize("window", [7, 4096])
async def test_a_first_fold_by_the_path_index_equals_the_fold_from_the_root(
    url: str, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    # Small steps of the engine's walk back, so it crosses many path_index calls
    # on a path that leaves main midway (interleaved with main in the table).
    monkeypatch.setattr("projections.engine._INDEX_STEP", 64)
    monkeypatch.setattr("stores.postgres._PATH_WINDOW", window)
    async with PostgresStore.from_url(url) as store:
        path = await _bulk_loaded(store, 1_200, branch_at=300)
        indexed: list[int] = []
        path_index = store.path_index

        async def counted(event_id: str, limit: int) -> list[tuple[str, int, str | None]]:
            steps = await path_index(event_id, limit)
            indexed.append(len(steps))
            return steps

        monkeypatch.setattr(store, "path_index", counted)
        engine = FoldEngine(store, snapshot_every=8)
        for at in (path[-1], path[700], path[299]):
            state = await engine.state_at(SESSION, at.session, at.id)
            assert state == fold(SESSION, path[: at.seq + 1])
        assert len(indexed) > len(path) // 64  # the walk went by the index


@pytest.mark.parametrize("tampered", ["skips", "missing"])
async def test_a_first_fold_by_the_path_index_names_a_bad_parent_column(
    url: str, postgres_url: str, schema: str, tampered: str
) -> None:
    async with PostgresStore.from_url(url) as store:
        root = create()
        events = [root]
        for _ in range(1_499):
            events.append(turn(events[-1]))
        await store.append(append_request(events, None))
        child = events[701]
        async with admin(postgres_url, schema) as conn:
            if tampered == "skips":  # the parent column skips one event
                await conn.execute(
                    "UPDATE ledger_events SET parent = decode($1, 'hex') "
                    "WHERE id = decode($2, 'hex')",
                    events[699].id,
                    child.id,
                )
            else:
                await conn.execute(
                    "DELETE FROM ledger_events WHERE id = decode($1, 'hex')", events[700].id
                )
        engine = FoldEngine(store, snapshot_every=8)
        with pytest.raises(IntegrityError) as info:
            await engine.state_at(SESSION, root.session, events[-1].id)
        assert child.id in str(info.value)


# --- ids as the tables keep them ----------------------------------------------------


async def test_ids_that_would_not_read_back_the_same_are_refused_and_nothing_written(
    url: str,
) -> None:
    async with PostgresStore.from_url(url) as store:
        root = create()
        upper_session = msgspec.structs.replace(root, session=root.session.upper())
        with pytest.raises(InvalidEventError) as info:
            await store.append(append_request([upper_session], None))
        assert root.session.upper() in str(info.value)
        for bad_id in ("not-hex", root.id.upper(), f"{root.id[:10]} {root.id[10:]}"):
            with pytest.raises(InvalidEventError) as info:
                await store.append(append_request([msgspec.structs.replace(root, id=bad_id)], None))
            assert repr(bad_id) in str(info.value)
        assert await store.read_feed() == []
        # Reads by such ids find nothing, as for any unknown id.
        assert [e async for e in store.events("not-a-uuid")] == []
        assert await store.find_by_key(root.session.upper(), "k") is None
        with pytest.raises(EventNotFoundError):
            await store.get("not-hex")
        with pytest.raises(EventNotFoundError):
            await store.ancestors(root.id.upper())


async def test_keys_reach_the_database_whether_a_batch_has_none_or_one_past_its_first(
    url: str, postgres_url: str, schema: str
) -> None:
    # A batch with no idempotency key sends NULL for all of its keys (stores.postgres
    # _keys_arg): the events are stored without any, and a key on a later event of
    # another batch, alone or in a group, is stored and found.
    async with PostgresStore.from_url(url) as store:
        root = create()
        await store.append(append_request([root], None))
        plain = [next_event(root)]
        plain.append(next_event(plain[-1]))
        await store.append(append_request(plain, root.id))
        keyed = [next_event(plain[-1])]
        keyed.append(next_event(keyed[-1], idempotency_key="later"))
        other_root = create()
        await store.append(append_request([other_root], None))
        other = [next_event(other_root)]
        results = await asyncio.gather(
            store.append(append_request(keyed, plain[-1].id)),
            store.append(append_request(other, other_root.id)),
        )
        assert [r.events for r in results] == [keyed, other]
        assert await store.find_by_key(root.session, "later") == keyed[-1]
        async with admin(postgres_url, schema) as conn:
            keys = await conn.fetch(
                "SELECT idempotency_key FROM ledger_events WHERE idempotency_key IS NOT NULL"
            )
        assert [row[0] for row in keys] == ["later"]
        assert [e async for e in store.events(root.session)] == [root, *plain, *keyed]


async def test_snapshot_writes_skip_the_flush_but_appends_after_them_still_wait(
    url: str,
) -> None:
    # put_snapshots turns synchronous_commit off for its own transaction only: the
    # store's one connection, which the next append uses, still waits for the flush.
    async with PostgresStore.from_url(url, pool_size=1) as store:
        root = create()
        await store.append(append_request([root], None))
        await store.put_snapshots(root.session, "session@1", [(root.id, b"state")])
        assert await store.get_snapshot(root.session, "session@1", root.id) == b"state"
        rows = await store._fetch("SELECT current_setting('synchronous_commit')")
        assert rows[0][0] == "on"
        second = turn(root)
        await store.append(append_request([second], root.id))
        assert await store.heads(root.session) == {"main": second.id}


@pytest.mark.parametrize("lengths", ["1", "1,2", "5,5,5,5"])
async def test_append_function_refuses_data_that_its_lengths_do_not_cut_exactly(
    url: str, postgres_url: str, schema: str, lengths: str
) -> None:
    # ledger_append takes a batch's stored events end to end with their lengths: a
    # call whose lengths do not cut the value into its events (a client bug) is
    # refused whole, rather than storing truncated or shifted events.
    root = create()
    async with PostgresStore.from_url(url) as store:
        await store.append(append_request([root], None))
    batch = [turn(root, "one")]
    batch.append(turn(batch[-1], "two"))
    args = list(stores.postgres._append_args(append_request(batch, root.id)))
    args[stores.postgres._LENGTHS_FIELD] = lengths
    async with admin(postgres_url, schema) as conn:
        with pytest.raises(asyncpg.RaiseError, match="data lengths"):
            await conn.fetch(stores.postgres._APPEND_SQL, *args)
        assert await conn.fetchval("SELECT count(*) FROM ledger_events") == 1
