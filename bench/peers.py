"""The peers, driven through their public APIs with their documented defaults.

- eventsourcing (``eventsourcing``, ``eventsourcing[postgres]``): its
  application recorders (``SQLiteApplicationRecorder``,
  ``PostgresApplicationRecorder``), the layer an event-sourced application
  writes through. One turn is one ``StoredEvent`` whose state is the turn's
  JSON (what its JSON transcoder makes of a domain event holding role and
  content); ``insert_events`` is one transaction; the last turns are
  ``select_events(desc=True, limit=n)``.
- LangGraph's checkpointers (``langgraph-checkpoint-sqlite``,
  ``langgraph-checkpoint-postgres``): a conversation is stored as a graph with
  an ``add_messages`` channel stores it: each step ``aput``\\ s a checkpoint
  holding the whole message list so far (the Postgres saver keeps it as a new
  blob version of the ``messages`` channel). Only the checkpoint is written,
  not the pending writes a graph also saves: a lower bound of what they write.
  Their cost grows with the conversation, so a thread holds at most
  ``max_turns`` (200) messages and the next one starts a new thread. Reading
  is ``aget_tuple`` of the latest checkpoint.
- The OpenAI Agents SDK's ``SQLiteSession``: ``add_items`` and
  ``get_items(limit=n)``.

Each instance reads back and reports the durability it runs with.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.util
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.content import Turn
from bench.systems import Instance, SyncThread, System, Thread, sqlite_files_bytes

__all__ = ["PEERS"]

_SYNC = {0: "off", 1: "normal", 2: "full", 3: "extra"}


class Peer(System):
    role = "peer"
    modules: tuple[str, ...] = ()

    def missing(self, ctx: Any) -> str | None:
        for module in self.modules:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                return f"not installed (pip install '{self.package}')"
        return super().missing(ctx)


def _pg_conninfo(url: str) -> dict[str, Any]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "user": parts.username or "postgres",
        "password": parts.password or "",
        "dbname": parts.path.lstrip("/") or "postgres",
    }


# --- eventsourcing -------------------------------------------------------------------


def _stored_event(originator: uuid.UUID, version: int, turn: Turn) -> Any:
    from eventsourcing.persistence import StoredEvent

    state = orjson.dumps(
        {
            "role": turn.role,
            "content": turn.content,
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
        }
    )
    return StoredEvent(
        originator_id=originator,
        originator_version=version,
        topic="bench.conversation:Conversation.TurnAdded",
        state=state,
    )


class EventsourcingThread(SyncThread):
    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder
        self.originator = uuid.uuid4()
        self.version = 0

    def append_sync(self, turn: Turn) -> None:
        self.version += 1
        self.recorder.insert_events([_stored_event(self.originator, self.version, turn)])

    def append_batch_sync(self, turns: Sequence[Turn]) -> None:
        first = self.version + 1
        self.version += len(turns)
        self.recorder.insert_events(
            [_stored_event(self.originator, first + i, t) for i, t in enumerate(turns)]
        )

    def last_sync(self, n: int) -> int:
        stored = self.recorder.select_events(self.originator, desc=True, limit=n)
        return len([orjson.loads(s.state) for s in reversed(stored)])


class EventsourcingInstance(Instance):
    def __init__(self, recorder: Any, datastore: Any, size: Any, settings: str) -> None:
        self.recorder = recorder
        self.datastore = datastore
        self._size = size
        self.settings = settings

    async def thread(self) -> Thread:
        return EventsourcingThread(self.recorder)

    async def close(self) -> None:
        self.datastore.close()

    async def footprint(self) -> int | None:
        result: int | None = await self._size()
        return result


class EventsourcingSqlite(Peer):
    name = "eventsourcing sqlite"
    backend = "sqlite"
    package = "eventsourcing"
    modules = ("eventsourcing",)

    async def open(self, ctx: Any) -> Instance:
        from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

        path = Path(f"{ctx.fresh_path('es-sqlite')}.db")
        datastore = SQLiteDatastore(str(path))
        recorder = SQLiteApplicationRecorder(datastore)
        recorder.create_table()
        with datastore.transaction(commit=False) as cursor:
            cursor.execute("PRAGMA journal_mode")
            journal = cursor.fetchone()[0]
            cursor.execute("PRAGMA synchronous")
            sync = _SYNC.get(cursor.fetchone()[0], "?")

        async def size() -> int:
            return sqlite_files_bytes(path)

        settings = (
            f"SQLiteApplicationRecorder, its defaults: journal_mode={journal}, "
            f"synchronous={sync}, pool_size=5"
        )
        return EventsourcingInstance(recorder, datastore, size, settings)


class EventsourcingPostgres(Peer):
    name = "eventsourcing postgres"
    backend = "postgres"
    package = "eventsourcing[postgres]"
    modules = ("eventsourcing", "psycopg", "psycopg_pool")

    async def open(self, ctx: Any) -> Instance:
        from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

        schema = ctx.pg.new_schema()
        await ctx.pg.execute(f'CREATE SCHEMA "{schema}"')
        info = _pg_conninfo(ctx.pg.url)
        # pool_size 10 like the ledger's (its default is 1: this is not slower).
        datastore = PostgresDatastore(
            info["dbname"],
            info["host"],
            info["port"],
            info["user"],
            info["password"],
            schema=schema,
            pool_size=10,
        )
        recorder = PostgresApplicationRecorder(datastore)
        await asyncio.to_thread(recorder.create_table)

        async def size() -> int:
            result: int = await ctx.pg.schema_bytes(schema)
            return result

        settings = (
            "PostgresApplicationRecorder: pool_size=10 (default 1), table lock per insert "
            f"(its design), synchronous_commit={ctx.pg.synchronous_commit}"
        )
        return EventsourcingInstance(recorder, datastore, size, settings)


# --- LangGraph -----------------------------------------------------------------------


class LangGraphThread(Thread):
    def __init__(self, saver: Any, max_turns: int) -> None:
        self.saver = saver
        self.max_turns = max_turns
        self._new()

    def _new(self) -> None:
        self.thread_id = str(uuid.uuid4())
        self.messages: list[dict[str, str]] = []
        self.config: dict[str, Any] = {
            "configurable": {"thread_id": self.thread_id, "checkpoint_ns": ""}
        }
        self.version: Any = None

    async def _step(self, new: list[dict[str, str]]) -> None:
        from langgraph.checkpoint.base import empty_checkpoint

        if len(self.messages) + len(new) > self.max_turns:
            self._new()
        self.messages.extend(new)
        self.version = self.saver.get_next_version(self.version, None)
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"messages": list(self.messages)}
        checkpoint["channel_versions"] = {"messages": self.version}
        metadata: Any = {"source": "loop", "step": len(self.messages), "parents": {}}
        self.config = await self.saver.aput(
            self.config, checkpoint, metadata, {"messages": self.version}
        )

    async def append(self, turn: Turn) -> None:
        await self._step([turn.message()])

    async def append_batch(self, turns: Sequence[Turn]) -> None:
        await self._step([t.message() for t in turns])

    async def last(self, n: int) -> int:
        config = {"configurable": {"thread_id": self.thread_id, "checkpoint_ns": ""}}
        found = await self.saver.aget_tuple(config)
        return len(found.checkpoint["channel_values"]["messages"][-n:])


class LangGraphInstance(Instance):
    def __init__(self, saver: Any, stack: contextlib.AsyncExitStack, size: Any, settings: str):
        self.saver = saver
        self.stack = stack
        self._size = size
        self.settings = settings

    async def thread(self) -> Thread:
        return LangGraphThread(self.saver, 200)

    async def close(self) -> None:
        await self.stack.aclose()

    async def footprint(self) -> int | None:
        result: int | None = await self._size()
        return result


class LangGraphSqlite(Peer):
    name = "langgraph sqlite"
    backend = "sqlite"
    package = "langgraph-checkpoint-sqlite"
    modules = ("langgraph.checkpoint.sqlite",)

    async def open(self, ctx: Any) -> Instance:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        path = Path(f"{ctx.fresh_path('lg-sqlite')}.db")
        stack = contextlib.AsyncExitStack()
        saver = await stack.enter_async_context(AsyncSqliteSaver.from_conn_string(str(path)))
        await saver.setup()
        async with saver.conn.execute("PRAGMA journal_mode") as cursor:
            journal = (await cursor.fetchone())[0]
        async with saver.conn.execute("PRAGMA synchronous") as cursor:
            sync = _SYNC.get((await cursor.fetchone())[0], "?")

        async def size() -> int:
            return sqlite_files_bytes(path)

        settings = (
            f"AsyncSqliteSaver.from_conn_string, its defaults: journal_mode={journal}, "
            f"synchronous={sync}"
        )
        return LangGraphInstance(saver, stack, size, settings)


class LangGraphPostgres(Peer):
    name = "langgraph postgres"
    backend = "postgres"
    package = "langgraph-checkpoint-postgres psycopg[binary,pool]"
    modules = ("langgraph.checkpoint.postgres", "psycopg")

    async def open(self, ctx: Any) -> Instance:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

        schema = ctx.pg.new_schema()
        await ctx.pg.execute(f'CREATE SCHEMA "{schema}"')
        info = _pg_conninfo(ctx.pg.url)
        conninfo = (
            f"host={info['host']} port={info['port']} user={info['user']} "
            f"dbname={info['dbname']} options='-c search_path={schema}'"
        )
        if info["password"]:
            conninfo += f" password={info['password']}"
        stack = contextlib.AsyncExitStack()
        saver = await stack.enter_async_context(AsyncPostgresSaver.from_conn_string(conninfo))
        await saver.setup()

        async def size() -> int:
            result: int = await ctx.pg.schema_bytes(schema)
            return result

        settings = (
            "AsyncPostgresSaver.from_conn_string, its defaults: one connection, autocommit, "
            f"synchronous_commit={ctx.pg.synchronous_commit}"
        )
        return LangGraphInstance(saver, stack, size, settings)


# --- OpenAI Agents SDK ---------------------------------------------------------------


class AgentsThread(Thread):
    def __init__(self, session: Any) -> None:
        self.session = session

    async def append(self, turn: Turn) -> None:
        await self.session.add_items([turn.message()])

    async def append_batch(self, turns: Sequence[Turn]) -> None:
        await self.session.add_items([t.message() for t in turns])

    async def last(self, n: int) -> int:
        return len(await self.session.get_items(limit=n))


class AgentsInstance(Instance):
    def __init__(self, path: Path) -> None:
        from agents.memory import SQLiteSession

        self.path = path
        self.sessions: list[Any] = []
        probe = self._session()  # creates the file and its tables, as a first session does
        connection = probe._get_connection()
        journal = connection.execute("PRAGMA journal_mode").fetchone()[0]
        sync = _SYNC.get(connection.execute("PRAGMA synchronous").fetchone()[0], "?")
        self.settings = f"SQLiteSession, its defaults: journal_mode={journal}, synchronous={sync}"
        assert isinstance(probe, SQLiteSession)

    def _session(self) -> Any:
        from agents.memory import SQLiteSession

        session = SQLiteSession(str(uuid.uuid4()), self.path)
        self.sessions.append(session)
        return session

    async def thread(self) -> Thread:
        return AgentsThread(self._session())

    async def close(self) -> None:
        for session in self.sessions:
            session.close()

    async def footprint(self) -> int | None:
        return sqlite_files_bytes(self.path)


class AgentsSqlite(Peer):
    name = "openai-agents sqlite"
    backend = "sqlite"
    package = "openai-agents"
    modules = ("agents",)

    async def open(self, ctx: Any) -> Instance:
        return AgentsInstance(Path(f"{ctx.fresh_path('agents-sqlite')}.db"))


PEERS: tuple[System, ...] = (
    EventsourcingSqlite(),
    EventsourcingPostgres(),
    LangGraphSqlite(),
    LangGraphPostgres(),
    AgentsSqlite(),
)
