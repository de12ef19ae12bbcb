"""What every scenario gets: sizes, a scratch directory, the PostgreSQL database, the rows."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench.content import Turn, conversation
from bench.harness import MemoryProbe, Notes, Row, Skip, Target, describe
from bench.systems import Instance, System, Thread

__all__ = ["Context", "Postgres", "Sizes"]


@dataclass(frozen=True)
class Sizes:
    """How much each scenario does: the full run, or ``--quick``.

    The sampled scenarios take seconds: enough samples that a p99 is not the
    slowest few calls, and that ratios near a target are not moved by one stall.
    """

    append_samples: int = 600
    concurrency_seconds: float = 1.0
    batch_samples: int = 100
    read_samples: int = 200
    turns: int = 200
    large_session: int = 1_000_000
    state_points: int = 200
    sessions: int = 100_000
    peer_replay: int = 50_000
    list_samples: int = 100
    limit_seconds: float = 30.0
    """The most one system may spend on one measurement; past it, it is stopped."""

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            append_samples=20,
            concurrency_seconds=0.2,
            batch_samples=4,
            read_samples=20,
            large_session=10_000,
            state_points=20,
            sessions=1_000,
            peer_replay=2_000,
            list_samples=20,
            limit_seconds=20.0,
        )


class Postgres:
    """A database of this run's own (``ledger_bench_<random>``), dropped at the end."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.name = f"ledger_bench_{uuid.uuid4().hex[:12]}"
        parts = urlsplit(admin_url)
        self.url = urlunsplit(parts._replace(path=f"/{self.name}", query=""))
        self.synchronous_commit = "?"
        self.version = "?"
        self._schemas = itertools.count(1)
        self._conn: Any = None

    async def start(self) -> None:
        import asyncpg

        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await admin.close()
        self._conn = await asyncpg.connect(self.url)
        self.synchronous_commit = await self._conn.fetchval("SHOW synchronous_commit")
        self.version = await self._conn.fetchval("SHOW server_version")

    async def stop(self) -> None:
        import asyncpg

        if self._conn is not None:
            await self._conn.close()
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await admin.close()

    def new_schema(self) -> str:
        return f"b{next(self._schemas)}_{uuid.uuid4().hex[:8]}"

    async def execute(self, sql: str, *args: Any) -> Any:
        return await self._conn.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetch(sql, *args)

    async def schema_bytes(self, schema: str) -> int:
        """Every table of a schema with its indexes and TOAST, and its sequences."""
        size = await self._conn.fetchval(
            "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relkind IN ('r', 'S', 'm')",
            schema,
        )
        return int(size)


@dataclass
class Context:
    sizes: Sizes
    root: Path
    pg: Postgres | None
    quick: bool = False
    rows: list[Row] = field(default_factory=list)
    notes: Notes = field(default_factory=Notes)
    cache: dict[str, Any] = field(default_factory=dict)
    """Datasets and conversations shared between scenarios."""
    _paths: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.turns = conversation(self.sizes.turns)

    def fresh_path(self, label: str) -> Path:
        """A path nothing uses yet, under the run's scratch directory."""
        return self.root / f"{next(self._paths)}-{label}"

    def add(
        self,
        scenario: str,
        system: str,
        result: str,
        *,
        cost: float | None = None,
        ref: str | None = None,
        target: Target | None = None,
        memory: float | None = None,
        value: float | None = None,
    ) -> Row:
        row = Row(scenario, system, result, cost, ref, target, memory, value)
        self.rows.append(row)
        print(f"  {scenario} | {system}: {result}", flush=True)
        return row

    def fail(self, scenario: str, system: str, exc: BaseException) -> None:
        if isinstance(exc, Skip):
            self.add(scenario, system, str(exc))
        else:
            self.add(scenario, system, f"error: {describe(exc)}")

    @contextlib.asynccontextmanager
    async def guard(self, scenario: str, system: str, *, times: float = 1) -> AsyncIterator[None]:
        """A failure of one system in one scenario becomes its row; the rest goes on.

        So does a measurement that outlasts ``times`` x ``sizes.limit_seconds``: it
        is cancelled.
        """
        limit = times * self.sizes.limit_seconds
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            self.add(scenario, system, f"stopped: over {limit:g} s")
        except Exception as exc:
            self.fail(scenario, system, exc)

    @contextlib.asynccontextmanager
    async def opened(
        self, scenario: str, systems: Sequence[System]
    ) -> AsyncIterator[dict[System, Instance]]:
        """Open an instance of each system that can run; a row for each that cannot."""
        instances: dict[System, Instance] = {}
        try:
            for system in systems:
                reason = system.missing(self)
                if reason:
                    self.add(scenario, system.name, reason)
                    continue
                async with self.guard(scenario, system.name):
                    instances[system] = await system.open(self)
                    self.notes.settings.setdefault(system.name, instances[system].settings)
            yield instances
        finally:
            for instance in instances.values():
                with contextlib.suppress(Exception):
                    await instance.close()

    async def conversation(self, system: System) -> tuple[Instance, Thread]:
        """The ``sizes.turns``-turn conversation of ``system``, appended turn by turn (cached)."""
        key = f"conversation:{system.name}"
        if key not in self.cache:
            reason = system.missing(self)
            if reason:
                raise Skip(reason)
            instance = await system.open(self)
            self.notes.settings.setdefault(system.name, instance.settings)
            try:
                thread = await instance.thread()
                for turn in self.turns:
                    await thread.append(turn)
            except BaseException:
                await instance.close()
                raise
            self.cache[key] = (instance, thread)
        result: tuple[Instance, Thread] = self.cache[key]
        return result

    def memory(self) -> MemoryProbe:
        return MemoryProbe()
