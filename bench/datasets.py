"""The large datasets, built once per run and shared by the reading scenarios.

Each store of the ledger gets the same data: one long session (a real chain:
``make_event`` hashes every event, so ``verify`` passes) and ``sizes.sessions``
more sessions for the listing. Building through ``Ledger.add_turn`` would take
an hour; the events are made once and bulk-loaded through the store API
(``store.append`` of 10,000 chained events per batch, each session's root
alone), every store at once, with durability relaxed while loading (SQLite
``synchronous=normal``, JSONL ``fsync=off``, PostgreSQL
``synchronous_commit=off``). The stores are then closed and opened again with
their defaults, and every reading scenario runs on that reopened store.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

from bench.content import chain
from bench.harness import fmt_rate, fmt_time
from bench.systems import LEDGER_BACKENDS, gather_limited
from ledger import Ledger
from ledger.events import Event, SessionCreated, make_event, new_session_id
from stores import open_store
from stores.base import AppendRequest, FeedStore

__all__ = ["Dataset", "datasets"]

_BATCH = 10_000
_CONTENT = "Could you check the status of order 1234? It was due yesterday."


@dataclass
class Dataset:
    """One store holding the long session and the sessions to list."""

    backend: str
    url: str
    store: FeedStore
    session: str
    events: int
    points: list[str]
    """Ids of events at random depths of the long session."""
    sessions: int
    opened_in: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def ledger(self) -> Ledger:
        """A fresh ledger over the open store: its caches start cold."""
        return Ledger(self.store)


def _urls(ctx: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each backend's URL, and the relaxed options it is loaded with."""
    base = ctx.root / "datasets"
    base.mkdir(exist_ok=True)
    urls: dict[str, tuple[str, dict[str, Any]]] = {
        "memory": ("memory://", {}),
        "sqlite": (f"sqlite:///{base}/ledger.db", {"synchronous": "normal"}),
        "jsonl": (f"jsonl:///{base}/jsonl", {"fsync": False}),
    }
    if ctx.pg is not None:
        # Any other query parameter goes to asyncpg, which makes it a server setting.
        urls["postgres"] = (f"{ctx.pg.url}?synchronous_commit=off", {})
    return urls


async def datasets(ctx: Any) -> dict[str, Dataset | BaseException]:
    """Build (once per run) and return each backend's dataset, or why it failed."""
    if "datasets" in ctx.cache:
        built: dict[str, Dataset | BaseException] = ctx.cache["datasets"]
        return built
    sizes = ctx.sizes
    n = sizes.large_session
    urls = _urls(ctx)
    stores: dict[str, FeedStore] = {}
    result: dict[str, Dataset | BaseException] = {}
    for backend in LEDGER_BACKENDS:
        if backend not in urls:
            continue
        url, options = urls[backend]
        try:
            store = open_store(url, **options)
            await store.open()
            stores[backend] = store
        except Exception as exc:
            result[backend] = exc
    rng = random.Random(11)
    wanted = set(rng.sample(range(n), min(sizes.state_points, n)))
    session = new_session_id()
    points: list[str] = []
    spent = dict.fromkeys(stores, 0.0)
    clock = time.perf_counter()
    making = 0.0
    batch: list[Event] = []
    head: str | None = None

    async def flush(events: list[Event], expected: str | None) -> None:
        request = AppendRequest(
            session_id=session,
            branch="main",
            expected_head=expected,
            events=events,
            status="active" if expected is None else None,
        )

        async def one(backend: str, store: FeedStore) -> None:
            begin = time.perf_counter()
            try:
                await store.append(request)
            except Exception as exc:
                result[backend] = exc
                del stores[backend]
            spent[backend] += time.perf_counter() - begin

        # At once: PostgreSQL works in its server and SQLite in its thread meanwhile.
        await asyncio.gather(*(one(b, s) for b, s in list(stores.items())))

    start = time.perf_counter()
    for event in chain(session, n, _CONTENT):
        if event.seq in wanted:
            points.append(event.id)
        batch.append(event)
        if event.seq == 0 or len(batch) == _BATCH:
            making += time.perf_counter() - start
            await flush(batch, head)
            head, batch = batch[-1].id, []
            start = time.perf_counter()
    if batch:
        making += time.perf_counter() - start
        await flush(batch, head)
    ctx.notes.remarks.append(
        f"Datasets: the {n:,}-event session was made at {fmt_rate(n / making)} "
        "(make_event: canonical encoding and two blake3 digests per event) and loaded at "
        + ", ".join(f"{fmt_rate(n / spent[b])} ({b})" for b in stores if spent[b])
        + "."
    )
    roots = _roots(sizes.sessions)

    async def load_roots(backend: str, store: FeedStore) -> None:
        begin = time.perf_counter()
        try:
            # 64 at a time: the SQLite and PostgreSQL stores commit them in groups.
            await gather_limited(64, [store.append(r) for r in roots])
        except Exception as exc:
            result[backend] = exc
            del stores[backend]
        spent[backend] = time.perf_counter() - begin

    await asyncio.gather(*(load_roots(b, s) for b, s in list(stores.items())))
    ctx.notes.remarks.append(
        f"Datasets: {sizes.sessions:,} sessions for the listing were loaded at "
        + ", ".join(f"{fmt_rate(sizes.sessions / spent[b])} ({b})" for b in stores)
        + " (one append each, 64 at a time, every store at once); all datasets built in "
        + f"{fmt_time(time.perf_counter() - clock)}."
    )
    for backend, store in stores.items():
        url = urls[backend][0].partition("?")[0]
        try:
            if backend != "memory":  # reopened with the store's defaults
                await store.close()
                store = open_store(url)
                begin = time.perf_counter()
                await store.open()
                opened_in = time.perf_counter() - begin
            else:
                opened_in = 0.0
            result[backend] = Dataset(
                backend, url, store, session, n, points, sizes.sessions, opened_in
            )
        except Exception as exc:
            result[backend] = exc
    ctx.cache["datasets"] = result
    return result


def _roots(count: int) -> list[AppendRequest]:
    requests = []
    at = time.time_ns()
    for i in range(count):
        sid = new_session_id()
        root = make_event(
            session=sid,
            parent=None,
            seq=0,
            branch="main",
            at=at + i,
            actor=f"user-{i % 1000}",
            body=SessionCreated(user_id=f"user-{i % 1000}", agent=f"agent-{i % 7}"),
        )
        requests.append(
            AppendRequest(
                session_id=sid, branch="main", expected_head=None, events=[root], status="active"
            )
        )
    return requests


async def close_datasets(ctx: Any) -> None:
    for dataset in ctx.cache.get("datasets", {}).values():
        if isinstance(dataset, Dataset):
            with contextlib.suppress(Exception):  # the end of the run: nothing to protect
                await dataset.store.close()
