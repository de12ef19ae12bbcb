"""The scenarios, in the table's order: each is one small function, registered here.

To add one: write ``async def my_scenario(ctx) -> None`` that measures and
calls ``ctx.add(title, system, result, cost=..., ref=..., target=...)`` once
per system, and decorate it with ``@scenario("name", "title")``. ``ctx.guard``
turns one system's failure into its row; ``ctx.opened`` opens instances of
the systems that can run; ``datasets(ctx)`` gives the shared large stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import aiosqlite
import msgspec
import orjson

from bench.content import raw_content_bytes
from bench.context import Context
from bench.datasets import Dataset, datasets
from bench.harness import (
    Row,
    Skip,
    Target,
    fmt_bytes,
    fmt_rate,
    fmt_time,
    median,
    percentile,
    scenario,
)
from bench.peers import PEERS
from bench.systems import (
    LEDGER_BACKENDS,
    LedgerSystem,
    RawAsyncpg,
    RawFile,
    RawSqlite,
    System,
    Thread,
)
from bench.verify_apart import Answer, Request, verify_apart, verify_here
from ledger import Ledger
from ledger.anchors import Anchor, new_key
from ledger.config import LedgerConfig
from ledger.proofs import InclusionProof, check_proof
from projections.session import SESSION

__all__ = ["ALL", "LEDGERS", "RAWS"]

LEDGERS: tuple[System, ...] = tuple(LedgerSystem(b) for b in LEDGER_BACKENDS)
RAWS: tuple[System, ...] = (RawSqlite(), RawFile(), RawAsyncpg())
ALL: tuple[System, ...] = LEDGERS + RAWS + PEERS
SQLITE_ONE_TXN: Final = LedgerSystem("sqlite", one_txn=True)
RAW_OF = {"sqlite": "raw aiosqlite", "jsonl": "raw file", "postgres": "raw asyncpg"}

# Aixgo publishes these figures for its session manager (milliseconds per call).
AIXGO_MS = {"append": 5.0, "read 100": 10.0, "list 100": 20.0}
AIXGO = "Aixgo (documented)"

_decode = msgspec.json.Decoder().decode


def ref_of(system: System) -> str | None:
    """The row a system's ratio is taken against: a ledger's raw driver; a peer's ledger."""
    if system.ref is not None:
        return system.ref
    if system.role == "ledger":
        return RAW_OF.get(system.backend)
    if system.role == "peer":
        return f"ledger {system.backend}"
    return None


def at_most(ratio: float, text: str) -> Target:
    """The row's cost is at most ``ratio`` times its reference's."""

    def check(row: Row, rows: dict[str, Row]) -> bool | None:
        r = row.ratio(rows)
        return None if r is None else r <= ratio

    return Target(text, check)


def faster_than(seconds: float, text: str) -> Target:
    return Target(text, lambda row, rows: None if row.value is None else row.value < seconds)


def rate_above(rate: float, text: str) -> Target:
    return Target(text, lambda row, rows: None if row.value is None else row.value > rate)


def spread(samples: list[float]) -> str:
    return f"{fmt_time(median(samples))} / {fmt_time(percentile(samples, 99))}"


async def interleaved(
    ctx: Context,
    title: str,
    ops: dict[System, Callable[[int], Awaitable[Any]]],
    n: int,
    block: int = 10,
    warmup: int = 3,
) -> dict[System, list[float]]:
    """Seconds per call of each system's op, sampled in turns of ``block`` calls.

    Every system sees the same disk and the same moments of a busy machine; a
    system whose op fails leaves the rotation with its error as its row.
    """
    samples: dict[System, list[float]] = {s: [] for s in ops}
    live = dict(ops)
    for i in range(warmup):
        for system, op in list(live.items()):
            try:
                await op(i)
            except Exception as exc:
                ctx.fail(title, system.name, exc)
                del live[system]
    done = 0
    while done < n:
        for system, op in list(live.items()):
            try:
                for k in range(min(block, n - done)):
                    start = time.perf_counter()
                    await op(warmup + done + k)
                    samples[system].append(time.perf_counter() - start)
            except Exception as exc:
                ctx.fail(title, system.name, exc)
                del live[system]
        done += block
    return {s: samples[s] for s in live}


def aixgo_row(ctx: Context, title: str, what: str) -> None:
    ms = AIXGO_MS[what]
    ctx.add(title, AIXGO, f"{ms:g} ms (its documentation)", cost=ms / 1000, ref="ledger sqlite")


# --- writes --------------------------------------------------------------------------

APPEND_TARGETS = {
    "ledger jsonl": at_most(1.3, "≤ 1.3x raw file (issue 4)"),
    "ledger postgres": at_most(1.3, "≤ 1.3x raw asyncpg (issue 3)"),
}


@contextlib.asynccontextmanager
async def fresh_threads(ctx: Context, title: str) -> AsyncIterator[dict[System, Thread]]:
    """Every system opened afresh for ``title``, with one thread (a session) each."""
    async with ctx.opened(title, ALL) as instances:
        threads: dict[System, Thread] = {}
        for system, instance in instances.items():
            async with ctx.guard(title, system.name):
                threads[system] = await instance.thread()
        yield threads


def add_sampled(
    ctx: Context,
    title: str,
    results: dict[System, list[float]],
    targets: dict[str, Target],
    per_call: Callable[[float], str] = lambda p50: "",
) -> None:
    """One row per system: p50 / p99 of its samples, against its raw driver."""
    for system, samples in results.items():
        p50 = median(samples)
        ctx.add(
            title,
            system.name,
            spread(samples) + per_call(p50),
            cost=p50,
            ref=ref_of(system),
            target=targets.get(system.name),
        )


@scenario("append", "single durable append, p50 / p99")
async def single_append(ctx: Context) -> None:
    title = "single durable append, p50 / p99"
    turns = ctx.turns

    def op(thread: Thread) -> Callable[[int], Awaitable[None]]:
        return lambda i: thread.append(turns[i % len(turns)])

    async with fresh_threads(ctx, title) as threads:
        ops = {s: op(t) for s, t in threads.items()}
        results = await interleaved(ctx, title, ops, ctx.sizes.append_samples)
    add_sampled(ctx, title, results, APPEND_TARGETS)
    aixgo_row(ctx, title, "append")


def group_commit_target() -> Target:
    """Issue 6's group commit target: the same store committing each append alone is
    the baseline, doing the same work per append (the raw driver's row, a bare insert
    into a table without an index, is shown as the ratio beside it)."""

    def check(row: Row, rows: dict[str, Row]) -> bool | None:
        alone, es = rows.get(SQLITE_ONE_TXN.name), rows.get("eventsourcing sqlite")
        if row.cost is None or alone is None or es is None or not alone.cost or not es.cost:
            return None
        return alone.cost / row.cost >= 10 and es.cost / row.cost >= 5

    return Target(f"≥ 10x {SQLITE_ONE_TXN.name} and ≥ 5x eventsourcing sqlite (issue 6)", check)


async def _throughput(threads: list[Thread], turns: Sequence[Any], seconds: float) -> float:
    """Appends per second of ``threads`` appending at once until ``seconds`` have passed."""
    executor = (
        ThreadPoolExecutor(max_workers=len(threads)) if threads and threads[0].blocking else None
    )
    loop = asyncio.get_running_loop()
    deadline = time.perf_counter() + seconds
    counts = [0] * len(threads)

    async def run(i: int, thread: Thread) -> None:
        while time.perf_counter() < deadline:
            turn = turns[(counts[i] + i) % len(turns)]
            if executor is not None:
                await loop.run_in_executor(executor, thread.append_sync, turn)  # type: ignore[attr-defined]
            else:
                await thread.append(turn)
            counts[i] += 1

    start = time.perf_counter()
    try:
        await asyncio.gather(*(run(i, t) for i, t in enumerate(threads)))
    finally:
        if executor is not None:
            executor.shutdown()
    return sum(counts) / (time.perf_counter() - start)


@scenario("concurrent", "appends/s, N concurrent appenders (one session each)")
async def concurrent_appends(ctx: Context) -> None:
    for n in (1, 8, 64):
        title = f"appends/s, {n} concurrent appender{'s' if n > 1 else ''}"
        systems = (*ALL, SQLITE_ONE_TXN) if n == 64 else ALL
        async with ctx.opened(title, systems) as instances:
            for system, instance in instances.items():
                async with ctx.guard(title, system.name):
                    threads = [await instance.thread() for _ in range(n)]
                    with ctx.memory().measure() as probe:
                        rate = await _throughput(threads, ctx.turns, ctx.sizes.concurrency_seconds)
                    gated = n == 64 and system.name == "ledger sqlite"
                    target = group_commit_target() if gated else None
                    ctx.add(
                        title,
                        system.name,
                        fmt_rate(rate),
                        cost=1 / rate,
                        ref=ref_of(system),
                        target=target,
                        memory=probe.peak,
                        value=rate,
                    )


BATCH_TARGETS = {"ledger postgres": at_most(1.3, "≤ 1.3x raw asyncpg (issue 3)")}


@scenario("batch", "batch of 100 turns, one transaction: p50 / p99 per batch")
async def batch_append(ctx: Context) -> None:
    title = "batch of 100 turns, one transaction: p50 / p99 per batch"
    halves = (ctx.turns[:100], ctx.turns[100:200])

    def op(thread: Thread) -> Callable[[int], Awaitable[None]]:
        return lambda i: thread.append_batch(halves[i % 2])

    async with fresh_threads(ctx, title) as threads:
        ops = {s: op(t) for s, t in threads.items()}
        results = await interleaved(ctx, title, ops, ctx.sizes.batch_samples, block=2)
    add_sampled(ctx, title, results, BATCH_TARGETS, lambda p50: f" ({fmt_rate(100 / p50)} turns)")


# --- a conversation ------------------------------------------------------------------

READ_TARGETS = {"ledger jsonl": at_most(1.3, "≤ 1.3x raw file (issue 4)")}


@scenario("read", "read the last 100 turns of a 200-turn conversation, p50 / p99")
async def read_last(ctx: Context) -> None:
    title = f"read the last 100 turns of a {ctx.sizes.turns}-turn conversation, p50 / p99"
    threads: dict[System, Thread] = {}
    for system in ALL:
        async with ctx.guard(title, system.name):
            threads[system] = (await ctx.conversation(system))[1]

    async def check(thread: Thread) -> None:
        if (got := await thread.last(100)) != 100:
            raise AssertionError(f"read {got} turns, not 100")

    for thread in threads.values():
        await check(thread)

    def op(thread: Thread) -> Callable[[int], Awaitable[int]]:
        return lambda i: thread.last(100)

    ops = {s: op(t) for s, t in threads.items()}
    results = await interleaved(ctx, title, ops, ctx.sizes.read_samples)
    add_sampled(ctx, title, results, READ_TARGETS)
    aixgo_row(ctx, title, "read 100")


@scenario("bytes", "bytes on disk per turn of a 200-turn conversation")
async def bytes_per_turn(ctx: Context) -> None:
    title = f"bytes on disk per turn of a {ctx.sizes.turns}-turn conversation"
    raw = raw_content_bytes(ctx.turns)
    count = len(ctx.turns)
    ctx.add(
        title,
        "content (UTF-8)",
        f"{raw / count:,.0f} B/turn ({fmt_bytes(raw)})",
        cost=raw,
    )
    for system in ALL:
        async with ctx.guard(title, system.name):
            instance, _ = await ctx.conversation(system)
            await instance.close()
            full = await instance.footprint()
            if full is None:
                raise Skip("nothing on disk (in process)")
            empty = await system.open(ctx)  # the same system holding nothing
            await empty.close()
            stored = full - (await empty.footprint() or 0)
            target = (
                at_most(1.5, "≤ 1.5x the content (issue 6)") if system.role == "ledger" else None
            )
            ctx.add(
                title,
                system.name,
                f"{stored / count:,.0f} B/turn ({fmt_bytes(stored)})",
                cost=stored,
                ref="content (UTF-8)",
                target=target,
            )
    for key in [k for k in ctx.cache if k.startswith("conversation:")]:
        instance, _ = ctx.cache.pop(key)
        with contextlib.suppress(Exception):  # closed above already, or failing: measured
            await instance.close()


# --- the large session ---------------------------------------------------------------


async def each_dataset(ctx: Context, title: str) -> list[tuple[System, Dataset]]:
    """The ledger systems with their dataset; a row for each whose dataset failed."""
    built = await datasets(ctx)
    found = []
    for system in LEDGERS:
        reason = system.missing(ctx)
        dataset = built.get(system.backend)
        if reason or dataset is None:
            ctx.add(title, system.name, reason or "no dataset")
        elif isinstance(dataset, BaseException):
            ctx.fail(title, system.name, dataset)
        else:
            found.append((system, dataset))
    return found


@scenario("open", "open a store holding the datasets")
async def open_store_time(ctx: Context) -> None:
    title = "open a store holding the datasets (the large session and the listed sessions)"
    for system, dataset in await each_dataset(ctx, title):
        if system.backend == "memory":
            ctx.add(title, system.name, "(in process: nothing to open)")
            continue
        ctx.add(title, system.name, fmt_time(dataset.opened_in), cost=dataset.opened_in)


@scenario("state", "state at a random point of the large session")
async def state_at_random(ctx: Context) -> None:
    n = ctx.sizes.large_session
    first_title = f"first state() of a {n:,}-event session (folds it all, writes snapshots)"
    title = f"state at a random point of a {n:,}-event session, p50 / p99"
    for system, dataset in await each_dataset(ctx, title):
        folded = False
        async with ctx.guard(first_title, system.name):
            led = dataset.ledger()
            with ctx.memory().measure() as probe:
                state = await led.state(dataset.session)
            seconds = probe.seconds
            if state.seq != n - 1:
                raise AssertionError(f"state at depth {state.seq}, not {n - 1}")
            ctx.add(first_title, system.name, fmt_time(seconds), cost=seconds, memory=probe.peak)
            folded = True
        if not folded:  # without its snapshots every point would fold from the root
            ctx.add(title, system.name, "not measured: the first fold did not finish")
            continue
        async with ctx.guard(title, system.name):
            led = dataset.ledger()  # cold cache: only the stored snapshots help
            samples = []
            with ctx.memory().measure() as probe:
                for point in dataset.points:
                    start = time.perf_counter()
                    await led.state(dataset.session, at=point)
                    samples.append(time.perf_counter() - start)
            p99 = percentile(samples, 99)
            ctx.add(
                title,
                system.name,
                spread(samples),
                cost=median(samples),
                target=faster_than(0.005, "p99 < 5 ms (issue 6)"),
                memory=probe.peak,
                value=p99,
            )


REPLAY_TARGETS = {
    "ledger memory": rate_above(1_000_000, "> 1,000,000/s (issue 6)"),
    "ledger sqlite": rate_above(500_000, "> 500,000/s (issue 6)"),
    "ledger jsonl": rate_above(500_000, "> 500,000/s (issue 4)"),
}


async def _fold(dataset: Dataset) -> int:
    """``Ledger.replay`` into the session state: every event read and folded, no snapshot."""
    state = await Ledger(dataset.store).replay(dataset.session, into=SESSION)
    return state.event_count


async def _raw_replay(dataset: Dataset) -> int:
    """The raw driver reading the same rows (or lines), in pages, without parsing them."""
    count = 0
    if dataset.backend == "sqlite":
        path = dataset.url.removeprefix("sqlite:///")
        async with (
            aiosqlite.connect(path) as db,
            db.execute(
                "SELECT data FROM events WHERE session_id = ? ORDER BY position", (dataset.session,)
            ) as cursor,
        ):
            while rows := await cursor.fetchmany(1000):
                count += len(rows)
    elif dataset.backend == "jsonl":
        path = Path(dataset.url.removeprefix("jsonl:///"), "sessions", f"{dataset.session}.jsonl")
        with path.open("rb") as f:  # noqa: ASYNC230 - the floor: a plain buffered read
            f.readline()  # the header line
            while lines := f.readlines(1 << 20):
                count += len(lines)
    elif dataset.backend == "postgres":
        import asyncpg

        conn = await asyncpg.connect(dataset.url)
        try:
            position = -1
            while rows := await conn.fetch(
                "SELECT position, data FROM ledger_events WHERE session_id = $1 "
                "AND position > $2 ORDER BY position LIMIT 1000",
                dataset.session,
                position,
            ):
                count += len(rows)
                position = rows[-1][0]
        finally:
            await conn.close()
    else:
        raise Skip("no raw driver")
    return count


@scenario("replay", "full replay of the large session (Ledger.replay: read + fold)")
async def replay(ctx: Context) -> None:
    n = ctx.sizes.large_session
    title = f"full replay of a {n:,}-event session (Ledger.replay: read + fold)"
    for system, dataset in await each_dataset(ctx, title):
        async with ctx.guard(title, system.name):
            with ctx.memory().measure() as probe:
                count = await _fold(dataset)
            seconds = probe.seconds
            if count != n:
                raise AssertionError(f"folded {count} events, not {n}")
            ctx.add(
                title,
                system.name,
                fmt_rate(n / seconds),
                cost=seconds / n,
                ref=RAW_OF.get(system.backend),
                target=REPLAY_TARGETS.get(system.name),
                memory=probe.peak,
                value=n / seconds,
            )
        if system.backend in RAW_OF:
            raw = RAW_OF[system.backend]
            async with ctx.guard(title, raw):
                with ctx.memory().measure() as probe:
                    count = await _raw_replay(dataset)
                seconds = probe.seconds
                ctx.add(
                    title,
                    raw,
                    f"{fmt_rate(count / seconds)} (read only)",
                    cost=seconds / count,
                    memory=probe.peak,
                    value=count / seconds,
                )
    await _peer_replay(ctx, title)


async def _peer_replay(ctx: Context, title: str) -> None:
    """eventsourcing's ``select_events`` of one aggregate's events (a smaller session)."""
    m = ctx.sizes.peer_replay
    peers = [p for p in PEERS if p.name.startswith("eventsourcing")]
    async with ctx.opened(title, peers) as instances:
        for system, instance in instances.items():
            async with ctx.guard(title, system.name):
                thread: Any = await instance.thread()
                for start_at in range(0, m, 1000):
                    chunk = [ctx.turns[(start_at + i) % len(ctx.turns)] for i in range(1000)]
                    await asyncio.to_thread(thread.append_batch_sync, chunk[: m - start_at])
                with ctx.memory().measure() as probe:
                    stored = thread.recorder.select_events(thread.originator)
                    count = len([orjson.loads(s.state) for s in stored])
                seconds = probe.seconds
                ctx.add(
                    title,
                    system.name,
                    f"{fmt_rate(count / seconds)} ({count:,} events: select_events + JSON)",
                    cost=seconds / count,
                    ref=ref_of(system),
                    memory=probe.peak,
                    value=count / seconds,
                )


@scenario("feed", "catch-up read of the global feed")
async def feed(ctx: Context) -> None:
    title = "catch-up read of the whole global feed (read_feed, pages of 1,000)"
    for system, dataset in await each_dataset(ctx, title):
        async with ctx.guard(title, system.name):
            with ctx.memory().measure() as probe:
                position, count = 0, 0
                while items := await dataset.store.read_feed(position, 1000):
                    position = items[-1].position
                    count += len(items)
            seconds = probe.seconds
            expected = dataset.events + dataset.sessions
            if count != expected:
                raise AssertionError(f"read {count} feed items, not {expected}")
            target = (
                rate_above(200_000, "> 200,000/s (issue 3)")
                if system.backend == "postgres"
                else None
            )
            ctx.add(
                title,
                system.name,
                f"{fmt_rate(count / seconds)} ({count:,} events)",
                cost=seconds / count,
                target=target,
                memory=probe.peak,
                value=count / seconds,
            )


@scenario("verify", "verify the large session")
async def verify(ctx: Context) -> None:
    n = ctx.sizes.large_session
    title = (
        f"verify a {n:,}-event session (every id, digest, link and rule; "
        "in a process of its own, as `ledger verify`)"
    )
    ctx.notes.remarks.append(
        "Verify: each store is verified in a fresh process that opens it by its URL, as "
        "`ledger verify` is run (`bench/verify_apart.py`), timing the `verify` call alone; "
        "the memory store, which no other process can open, in the bench process."
    )
    for system, dataset in await each_dataset(ctx, title):
        async with ctx.guard(title, system.name):
            answer = await _verify(dataset, Request(dataset.url, dataset.session))
            report = answer.report
            if not report.ok or report.events_checked != n:
                raise AssertionError(
                    f"verify: {report.events_checked} events, {report.problems[:1]}"
                )
            ctx.add(
                title,
                system.name,
                fmt_rate(n / answer.seconds),
                cost=answer.seconds / n,
                target=rate_above(300_000, "> 300,000/s (issue 5)"),
                memory=answer.peak,
                value=n / answer.seconds,
            )


async def _verify(dataset: Dataset, request: Request) -> Answer:
    """``request``'s verify of ``dataset``: in a process of its own
    (``bench.verify_apart``), but for the memory store's, which lives in this one."""
    if dataset.backend != "memory":
        return await verify_apart(request)
    return await verify_here(
        Ledger(dataset.store, LedgerConfig(url=dataset.url, key=request.key)), request
    )


async def _raw_list(dataset: Dataset) -> Callable[[], Awaitable[int]] | None:
    """The same newest-first page read by the raw driver from the ledger's own table."""
    if dataset.backend == "sqlite":
        db = await aiosqlite.connect(dataset.url.removeprefix("sqlite:///"))
        dataset.extra["close"] = db.close

        async def sqlite_page() -> int:
            async with db.execute(
                "SELECT * FROM sessions ORDER BY last_activity_at DESC, session_id DESC LIMIT 100"
            ) as cursor:
                return len(list(await cursor.fetchall()))

        return sqlite_page
    if dataset.backend == "postgres":
        import asyncpg

        conn = await asyncpg.connect(dataset.url)
        dataset.extra["close"] = conn.close

        async def pg_page() -> int:
            rows = await conn.fetch(
                "SELECT * FROM ledger_sessions "
                "ORDER BY last_activity_at DESC, session_id DESC LIMIT 100"
            )
            return len(rows)

        return pg_page
    return None


@scenario("list", "list 100 of the sessions, newest first")
async def list_sessions(ctx: Context) -> None:
    m = ctx.sizes.sessions
    title = f"list 100 of {m:,} sessions, newest first, p50 / p99"
    for system, dataset in await each_dataset(ctx, title):
        async with ctx.guard(title, system.name):
            led = dataset.ledger()
            page = await led.sessions(limit=100)
            if len(page.items) != 100:
                raise AssertionError(f"a page of {len(page.items)} sessions")
            ops: dict[System, Callable[[int], Awaitable[Any]]] = {
                system: lambda i, led=led: led.sessions(limit=100)
            }
            raw_system = next((r for r in RAWS if r.backend == system.backend), None)
            raw_op = await _raw_list(dataset)
            if raw_system is not None and raw_op is not None:
                ops[raw_system] = lambda i, raw_op=raw_op: raw_op()
            try:
                results = await interleaved(ctx, title, ops, ctx.sizes.list_samples)
            finally:
                if "close" in dataset.extra:
                    await dataset.extra.pop("close")()
            for measured, samples in results.items():
                ctx.add(
                    title,
                    measured.name,
                    spread(samples),
                    cost=median(samples),
                    ref=ref_of(measured),
                )
    aixgo_row(ctx, title, "list 100")


# --- issue 5 (audit) ------------------------------------------------------------------

_KEY = new_key()
"""Every audit scenario signs with a key: anchors and proofs carry a MAC, checked each time."""


def keyed(dataset: Dataset) -> Ledger:
    """A fresh ledger over the dataset's store, with the bench key: cold caches."""
    return Ledger(dataset.store, LedgerConfig(url=dataset.url, key=_KEY.hex()))


@scenario("anchored", "verify the large session against an anchor")
async def verify_anchored(ctx: Context) -> None:
    n = ctx.sizes.large_session
    title = (
        f"verify a {n:,}-event session against an anchor (consistency proof + every check; "
        "in a process of its own)"
    )
    for system, dataset in await each_dataset(ctx, title):
        async with ctx.guard(title, system.name):
            anchor = await keyed(dataset).anchor(dataset.session, record=False)
            # Kept for the proof scenario: making an anchor reads the whole log again.
            dataset.extra["anchor"] = anchor
            # A cold ledger: the anchor's log is not reused.
            request = Request(dataset.url, dataset.session, _KEY.hex(), [anchor])
            answer = await _verify(dataset, request)
            report, checks = answer.report, answer.report.anchors
            if not report.ok or report.events_checked != n or len(checks) != 1:
                raise AssertionError(
                    f"verify: {report.events_checked} events, {report.problems[:1]}, {checks}"
                )
            if not checks[0].extended or checks[0].mac != "ok":
                raise AssertionError(f"the anchor did not check: {checks[0]}")
            ctx.add(
                title,
                system.name,
                fmt_rate(n / answer.seconds),
                cost=answer.seconds / n,
                target=rate_above(300_000, "> 300,000/s (issue 5)"),
                memory=answer.peak,
                value=n / answer.seconds,
            )


@scenario("proof", "inclusion proof and its check in the large session")
async def inclusion_proof(ctx: Context) -> None:
    n = ctx.sizes.large_session
    cold_title = f"first inclusion proof in a {n:,}-event session (reads its log, builds the tree)"
    title = f"inclusion proof at a random event of a {n:,}-event session (log in memory), p50 / p99"
    check_title = f"check_proof of an inclusion proof at {n:,} events (offline, MAC), p50 / p99"
    under_1ms = faster_than(0.001, "< 1 ms (issue 5)")
    for system, dataset in await each_dataset(ctx, title):
        proofs: list[InclusionProof] = []
        async with ctx.guard(title, system.name):
            led = keyed(dataset)  # cold: its first proof reads the log, which it then keeps
            anchor: Anchor | None = dataset.extra.get("anchor")  # from the anchored scenario
            with ctx.memory().measure() as probe:
                first = await led.prove(dataset.points[0], anchor=anchor)
            seconds = probe.seconds
            anchor = first.anchor
            ctx.add(cold_title, system.name, fmt_time(seconds), cost=seconds, memory=probe.peak)
            samples = []
            for point in dataset.points:
                start = time.perf_counter()
                proof = await led.prove(point, anchor=anchor)
                samples.append(time.perf_counter() - start)
                proofs.append(proof)
            p99 = percentile(samples, 99)
            ctx.add(
                title,
                system.name,
                spread(samples),
                cost=median(samples),
                target=Target(under_1ms.text, lambda row, rows, p99=p99: p99 < 0.001),
                value=p99,
            )
        if system.backend != "memory" or not proofs:
            continue  # the check is offline: the same for every store
        async with ctx.guard(check_title, "ledger.proofs"):
            samples = []
            for proof in proofs:
                start = time.perf_counter()
                checked = check_proof(proof, key=_KEY)
                samples.append(time.perf_counter() - start)
                if checked.mac != "ok" or checked.size != n:
                    raise AssertionError(f"check_proof: {checked}")
            p99 = percentile(samples, 99)
            ctx.add(
                check_title,
                "ledger.proofs",
                spread(samples),
                cost=median(samples),
                target=Target(under_1ms.text, lambda row, rows, p99=p99: p99 < 0.001),
                value=p99,
            )


@scenario("bundle", "export, and import, of a large session")
async def export_import(ctx: Context) -> None:
    n = ctx.sizes.large_session
    title = f"export a {n:,}-event session to a bundle file (Ledger.export)"
    path = ctx.root / "export.bundle"
    exported: int | None = None  # the export is the import's bundle
    for system, dataset in await each_dataset(ctx, title):
        if system.backend != "sqlite":
            continue
        # 23-34 s for 1,000,000 events on this machine, around one --limit: two,
        # so that a slow day still makes the bundle the import needs.
        async with ctx.guard(title, system.name, times=2):
            led = keyed(dataset)
            with ctx.memory().measure() as probe:
                report = await led.export(path, [dataset.session])
            seconds = probe.seconds
            if report.events != n:
                raise AssertionError(f"exported {report.events} events, not {n}")
            exported = n
            ctx.add(
                title,
                system.name,
                f"{fmt_rate(n / seconds)} ({fmt_bytes(report.bytes)})",
                cost=seconds / n,
                memory=probe.peak,
                value=n / seconds,
            )
    title = f"import a bundle of a {n:,}-event session into an empty store (Ledger.import_bundle)"
    # The usual migration, SQLite to PostgreSQL; into SQLite only without a server
    # (each import of 1,000,000 events takes about a minute of the run's ten).
    target = "postgres" if ctx.pg is not None else "sqlite"
    for system in LEDGERS:
        if system.backend != target:
            continue
        if reason := system.missing(ctx) or ("" if exported else "no bundle: the export failed"):
            ctx.add(title, system.name, reason)
            continue
        # Importing verifies every id, digest and root, then writes: 30-70 s for
        # 1,000,000 events here, past one --limit, so this measurement gets three.
        async with ctx.guard(title, system.name, times=3):
            if ctx.pg is not None and system.backend == "postgres":
                url = f"{ctx.pg.url}?schema={ctx.pg.new_schema()}"
            else:
                url = f"sqlite:///{ctx.root}/import-target.db"
            async with Ledger.open(url, key=_KEY) as led:
                with ctx.memory().measure() as probe:
                    imported = await led.import_bundle(path)
                seconds = probe.seconds
            if imported.written != n or not imported.authenticated:
                raise AssertionError(f"import: {imported.written} of {n} events written")
            ctx.add(
                title,
                system.name,
                fmt_rate(n / seconds),
                cost=seconds / n,
                memory=probe.peak,
                value=n / seconds,
            )
    path.unlink(missing_ok=True)
