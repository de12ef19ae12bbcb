"""The large datasets, built once per run and shared by the reading scenarios.

Each store of the ledger gets the same data: one long session (a real chain:
``make_event`` hashes every event, so ``verify`` passes) and ``sizes.sessions``
more sessions for the listing. Building through ``Ledger.add_turn`` would take
an hour; the events are made once and bulk-loaded through the store API
(``store.append`` of 10,000 chained events per batch, each session's root
alone), with durability relaxed while loading (SQLite ``synchronous=normal``,
JSONL ``fsync=off``, PostgreSQL ``synchronous_commit=off``). The stores are
then closed and opened again with their defaults, and every reading scenario
runs on that reopened store.

One store after another, not all at once: in one process they contend for the
interpreter (the SQLite thread, the asyncpg protocol and the loop hand the GIL
to each other), and loading them at once took ~2.5x as long as one by one.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

from bench.content import chain
from bench.harness import fmt_rate, fmt_time
from bench.systems import gather_limited
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
    clock = time.perf_counter()
    session = new_session_id()
    events = list(chain(session, n, _CONTENT))
    making = time.perf_counter() - clock
    rng = random.Random(11)
    wanted = set(rng.sample(range(n), min(sizes.state_points, n)))
    points = [event.id for event in events if event.seq in wanted]
    # The root alone (it creates the session), then batches chained head to head.
    batches = [events[:1]] + [events[i : i + _BATCH] for i in range(1, n, _BATCH)]
    del events
    roots = _roots(sizes.sessions)
    result: dict[str, Dataset | BaseException] = {}
    loaded: dict[str, float] = {}
    listed: dict[str, float] = {}
    for backend, (url, options) in _urls(ctx).items():
        store: FeedStore | None = None
        try:
            store = open_store(url, **options)
            await store.open()
            begin = time.perf_counter()
            await _load_session(store, session, batches)
            loaded[backend] = n / (time.perf_counter() - begin)
            begin = time.perf_counter()
            # 64 at a time: the SQLite and PostgreSQL stores commit them in groups.
            await gather_limited(64, [store.append(r) for r in roots])
            listed[backend] = sizes.sessions / (time.perf_counter() - begin)
            opened_in = 0.0
            defaults = url.partition("?")[0]
            if backend != "memory":  # reopened with the store's defaults
                await store.close()
                store = open_store(defaults)
                begin = time.perf_counter()
                await store.open()
                opened_in = time.perf_counter() - begin
            result[backend] = Dataset(
                backend, defaults, store, session, n, points, sizes.sessions, opened_in
            )
        except Exception as exc:
            result[backend] = exc
            if store is not None:
                with contextlib.suppress(Exception):
                    await store.close()
    ctx.notes.remarks.append(
        f"Datasets: the {n:,}-event session was made at {fmt_rate(n / making)} "
        "(make_event: canonical encoding and two blake3 digests per event) and loaded at "
        + ", ".join(f"{fmt_rate(rate)} ({b})" for b, rate in loaded.items())
        + "."
    )
    ctx.notes.remarks.append(
        f"Datasets: {sizes.sessions:,} sessions for the listing were loaded at "
        + ", ".join(f"{fmt_rate(rate)} ({b})" for b, rate in listed.items())
        + " (one append each, 64 at a time); all datasets built in "
        + f"{fmt_time(time.perf_counter() - clock)}, one store after another."
    )
    ctx.cache["datasets"] = result
    return result


async def _load_session(store: FeedStore, session: str, batches: list[list[Event]]) -> None:
    head: str | None = None
    for events in batches:
        await store.append(
            AppendRequest(
                session_id=session,
                branch="main",
                expected_head=head,
                events=events,
                status="active" if head is None else None,
            )
        )
        head = events[-1].id


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
