"""The systems a scenario measures: the ledger on each store, and the raw drivers.

A ``System`` opens ``Instance``\\ s (each with storage of its own: a file, a
directory or a PostgreSQL schema); an instance hands out ``Thread``\\ s, one
conversation each. Every system stores the same ``content.Turn``\\ s:

- the ledger appends turns with ``Ledger.add_turn`` and a batch with one
  ``store.append`` of events made by ``make_event`` (the facade has no batch
  call yet); it reads the last turns with ``Ledger.context(last=n)``;
- a raw driver writes ``Turn.data`` (the very bytes the ledger stores) with one
  statement or one write and nothing else, and reads them back decoded: the
  floor under the ledger.

Peers are in ``bench.peers``.
"""

from __future__ import annotations

import abc
import asyncio
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec
import orjson

from bench.content import Turn
from ledger import Ledger
from ledger.events import TurnAdded

__all__ = [
    "LEDGER_BACKENDS",
    "Instance",
    "LedgerSystem",
    "RawAsyncpg",
    "RawFile",
    "RawSqlite",
    "System",
    "Thread",
    "dir_bytes",
    "gather_limited",
    "remove",
    "sqlite_files_bytes",
]

LEDGER_BACKENDS = ("memory", "sqlite", "jsonl", "postgres")
_ROTATE = 50_000  # a ledger thread starts a new session below max_turns_per_session
_decode = msgspec.json.Decoder().decode


class Thread(abc.ABC):
    """One conversation of one system."""

    blocking = False
    """True when the calls block (a sync library): concurrent runs use threads."""

    @abc.abstractmethod
    async def append(self, turn: Turn) -> None: ...

    @abc.abstractmethod
    async def append_batch(self, turns: Sequence[Turn]) -> None: ...

    @abc.abstractmethod
    async def last(self, n: int) -> int:
        """Read the newest ``n`` turns, decoded; return how many were read."""


class SyncThread(Thread):
    """A thread of a blocking library: the async calls run it inline (no thread hop)."""

    blocking = True

    @abc.abstractmethod
    def append_sync(self, turn: Turn) -> None: ...

    @abc.abstractmethod
    def append_batch_sync(self, turns: Sequence[Turn]) -> None: ...

    @abc.abstractmethod
    def last_sync(self, n: int) -> int: ...

    async def append(self, turn: Turn) -> None:
        self.append_sync(turn)

    async def append_batch(self, turns: Sequence[Turn]) -> None:
        self.append_batch_sync(turns)

    async def last(self, n: int) -> int:
        return self.last_sync(n)


class Instance(abc.ABC):
    settings = ""
    """Durability and the other settings it runs with, as read back from it."""

    @abc.abstractmethod
    async def thread(self) -> Thread: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def footprint(self) -> int | None:
        """Bytes on disk (after ``close``); None for a system that keeps nothing on disk."""
        return None


class System(abc.ABC):
    name: str
    role: str  # "ledger", "raw" or "peer"
    backend: str  # "memory", "sqlite", "jsonl", "postgres"
    package = ""
    """For a peer: what to ``pip install``."""
    ref: str | None = None
    """The row this system's ratio is taken against, where not its role's usual one."""

    def missing(self, ctx: Any) -> str | None:
        """Why this system cannot run here (not installed, no server), or None."""
        if self.backend == "postgres" and ctx.pg is None:
            return "no PostgreSQL (--postgres-url)"
        return None

    @abc.abstractmethod
    async def open(self, ctx: Any) -> Instance: ...


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (or of the file itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sqlite_files_bytes(path: Path) -> int:
    """A closed SQLite database: the file and whatever WAL it left behind."""
    return sum(
        p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()
    )


# --- the ledger ----------------------------------------------------------------------


class LedgerThread(Thread):
    def __init__(self, led: Ledger, user: str) -> None:
        self.led = led
        self.user = user
        self.sid = ""
        self.count = 0

    async def start(self) -> LedgerThread:
        state = await self.led.create(user_id=self.user, agent="bench")
        self.sid, self.count = state.session_id, 0
        return self

    async def append(self, turn: Turn) -> None:
        if self.count >= _ROTATE:
            await self.start()
        await self.led.add_turn(
            self.sid,
            role=turn.role,
            content=turn.content,
            tokens_in=turn.tokens_in,
            tokens_out=turn.tokens_out,
        )
        self.count += 1

    async def append_batch(self, turns: Sequence[Turn]) -> None:
        if self.count + len(turns) > _ROTATE:
            await self.start()
        await self.led.add_turns(
            self.sid,
            [
                TurnAdded(
                    role=turn.role,
                    content=turn.content,
                    tokens_in=turn.tokens_in,
                    tokens_out=turn.tokens_out,
                )
                for turn in turns
            ],
        )
        self.count += len(turns)

    async def last(self, n: int) -> int:
        return len(await self.led.turns(self.sid, last=n))


class LedgerInstance(Instance):
    def __init__(self, led: Ledger, settings: str, size: Any) -> None:
        self.led = led
        self.settings = settings
        self._size = size
        self._threads = 0

    async def thread(self) -> Thread:
        self._threads += 1
        # One user per thread: the open-sessions-per-user limit stays out of the way.
        return await LedgerThread(self.led, f"bench-user-{self._threads}").start()

    async def close(self) -> None:
        await self.led.close()

    async def footprint(self) -> int | None:
        result: int | None = await self._size()
        return result


class LedgerSystem(System):
    """The ledger on one of its stores, with that store's default (durable) settings."""

    role = "ledger"

    def __init__(self, backend: str, *, one_txn: bool = False) -> None:
        self.backend = backend
        self.one_txn = one_txn
        self.name = f"ledger {backend}"
        if one_txn:
            # The same store without group commit: what grouping buys.
            self.name += ", 1 txn per append"
            self.ref = f"ledger {backend}"

    async def open(self, ctx: Any) -> Instance:
        where = ctx.fresh_path(self.name.replace(" ", "-"))
        size: Any
        if self.backend == "memory":
            url, settings = "memory://", "in process, no durability"

            async def size() -> int | None:
                return None

        elif self.backend == "sqlite":
            url = f"sqlite:///{where}.db"
            settings = "WAL, synchronous=full (default): fsync at each commit"
            if self.one_txn:
                url += "?group_size=1"
                settings += "; group_size=1: one transaction per append"

            async def size() -> int | None:
                return sqlite_files_bytes(Path(f"{where}.db"))

        elif self.backend == "jsonl":
            url = f"jsonl:///{where}"
            settings = "fsync=on (default): file (and new directory entries) fsynced per append"

            async def size() -> int | None:
                return dir_bytes(where)

        else:
            schema = ctx.pg.new_schema()
            url = f"{ctx.pg.url}?schema={schema}"
            settings = f"pool_size=10 (default), synchronous_commit={ctx.pg.synchronous_commit}"

            async def size() -> int | None:
                result: int = await ctx.pg.schema_bytes(schema)
                return result

        led = await Ledger.open(url)
        return LedgerInstance(led, settings, size)


# --- raw aiosqlite --------------------------------------------------------------------


class RawSqliteThread(Thread):
    def __init__(self, db: aiosqlite.Connection, lock: asyncio.Lock, session: str) -> None:
        self.db = db
        self.lock = lock  # one transaction per append, even with concurrent appenders
        self.session = session

    async def append(self, turn: Turn) -> None:
        async with self.lock:
            await self.db.execute(
                "INSERT INTO turns (session, data) VALUES (?, ?)", (self.session, turn.data)
            )
            await self.db.commit()

    async def append_batch(self, turns: Sequence[Turn]) -> None:
        async with self.lock:
            await self.db.executemany(
                "INSERT INTO turns (session, data) VALUES (?, ?)",
                [(self.session, t.data) for t in turns],
            )
            await self.db.commit()

    async def last(self, n: int) -> int:
        async with self.db.execute(
            "SELECT data FROM turns WHERE session = ? ORDER BY pos DESC LIMIT ?", (self.session, n)
        ) as cursor:
            rows = await cursor.fetchall()
        return len([_decode(row[0]) for row in reversed(list(rows))])


class RawSqliteInstance(Instance):
    settings = "WAL, synchronous=full: fsync at each commit (as the ledger's default)"

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path
        self.lock = asyncio.Lock()

    async def thread(self) -> Thread:
        return RawSqliteThread(self.db, self.lock, str(uuid.uuid4()))

    async def close(self) -> None:
        await self.db.close()

    async def footprint(self) -> int | None:
        return sqlite_files_bytes(self.path)


class RawSqlite(System):
    """aiosqlite: ``INSERT`` of the event's bytes and ``COMMIT``; one connection."""

    name = "raw aiosqlite"
    role = "raw"
    backend = "sqlite"

    async def open(self, ctx: Any) -> Instance:
        path = Path(f"{ctx.fresh_path('raw-sqlite')}.db")
        db = await aiosqlite.connect(path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute(
            "CREATE TABLE turns "
            "(pos INTEGER PRIMARY KEY, session TEXT NOT NULL, data BLOB NOT NULL)"
        )
        await db.execute("CREATE INDEX turns_session ON turns (session, pos)")
        await db.commit()
        return RawSqliteInstance(db, path)


# --- raw files -----------------------------------------------------------------------


class RawFileThread(Thread):
    """``open(path, "ab")``, write the lines, flush, ``os.fsync``: on the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    async def append(self, turn: Turn) -> None:
        self._write(turn.data + b"\n")

    async def append_batch(self, turns: Sequence[Turn]) -> None:
        self._write(b"".join(t.data + b"\n" for t in turns))

    async def last(self, n: int) -> int:
        lines = self.path.read_bytes().splitlines()[-n:]
        return len([orjson.loads(line) for line in lines])


class RawFileInstance(Instance):
    settings = "fsync after each write (as the ledger's JSONL default)"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._threads = 0

    async def thread(self) -> Thread:
        self._threads += 1
        path = self.directory / f"{self._threads}.jsonl"
        path.touch()
        return RawFileThread(path)

    async def close(self) -> None:
        pass

    async def footprint(self) -> int | None:
        return dir_bytes(self.directory)


class RawFile(System):
    name = "raw file"
    role = "raw"
    backend = "jsonl"

    async def open(self, ctx: Any) -> Instance:
        directory = ctx.fresh_path("raw-file")
        directory.mkdir()
        return RawFileInstance(directory)


# --- raw asyncpg ---------------------------------------------------------------------


class RawAsyncpgThread(Thread):
    def __init__(self, pool: Any, session: str) -> None:
        self.pool = pool
        self.session = session

    async def append(self, turn: Turn) -> None:
        await self.pool.execute(
            "INSERT INTO turns (session, data) VALUES ($1, $2)", self.session, turn.data
        )

    async def append_batch(self, turns: Sequence[Turn]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO turns (session, data) VALUES ($1, $2)",
                [(self.session, t.data) for t in turns],
            )

    async def last(self, n: int) -> int:
        rows = await self.pool.fetch(
            "SELECT data FROM turns WHERE session = $1 ORDER BY pos DESC LIMIT $2", self.session, n
        )
        return len([_decode(row[0]) for row in reversed(rows)])


class RawAsyncpgInstance(Instance):
    def __init__(self, pool: Any, ctx: Any, schema: str) -> None:
        self.pool = pool
        self.ctx = ctx
        self.schema = schema
        self.settings = (
            f"pool of 10, one INSERT per append (autocommit), "
            f"synchronous_commit={ctx.pg.synchronous_commit}"
        )

    async def thread(self) -> Thread:
        return RawAsyncpgThread(self.pool, str(uuid.uuid4()))

    async def close(self) -> None:
        await self.pool.close()

    async def footprint(self) -> int | None:
        result: int = await self.ctx.pg.schema_bytes(self.schema)
        return result


class RawAsyncpg(System):
    """asyncpg: ``INSERT`` of the event's bytes into a bytea column, a pool of 10."""

    name = "raw asyncpg"
    role = "raw"
    backend = "postgres"

    async def open(self, ctx: Any) -> Instance:
        import asyncpg

        schema = ctx.pg.new_schema()
        pool = await asyncpg.create_pool(
            ctx.pg.url, min_size=1, max_size=10, server_settings={"search_path": schema}
        )
        async with pool.acquire() as conn:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            await conn.execute(
                "CREATE TABLE turns (pos bigserial PRIMARY KEY, session text NOT NULL, "
                "data bytea NOT NULL)"
            )
            await conn.execute("CREATE INDEX turns_session ON turns (session, pos)")
        return RawAsyncpgInstance(pool, ctx, schema)


def remove(path: Path) -> None:
    """Best effort: a scenario's files once it has measured them."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


async def gather_limited(n: int, coros: Sequence[Any]) -> None:
    """Run coroutines ``n`` at a time."""
    semaphore = asyncio.Semaphore(n)

    async def one(coro: Any) -> None:
        async with semaphore:
            await coro

    await asyncio.gather(*(one(c) for c in coros))
