"""Benchmarks of the session ledger: against raw aiosqlite and raw files, Aixgo's figures, peers.

Run ``python -m bench.run [--quick] [--out bench/RESULTS.md]``. Every figure of
the table is measured in the same run, on the same disk: per-operation times
are medians (and 95th percentiles) of ``time.perf_counter_ns`` samples taken
after warm-up calls. Nothing here asserts a timing: the table is the result.
Peers (``langgraph-checkpoint-sqlite``, ``openai-agents``) are measurement-only
extras: ``pip install langgraph-checkpoint-sqlite openai-agents``; a peer that
is not installed is skipped with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import os
import platform
import random
import sqlite3
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from ledger import Ledger
from ledger.events import SessionCreated, TurnAdded, encode_event, make_event, new_session_id
from projections.session import SESSION
from stores import open_store
from stores.base import AppendRequest, FeedStore

CONTENT = "Could you check the status of order 1234? It was due yesterday."
Op = Callable[[], Awaitable[Any]]
AIXGO_MS = {"create": 1.0, "append": 5.0, "read 100": 10.0, "checkpoint": 5.0, "list 100": 20.0}


@dataclass
class Row:
    name: str
    value: str
    unit: str
    compare: str = ""
    target: str = ""
    memory: str = ""


ROWS: list[Row] = []
NOTES: list[str] = []


def note(text: str) -> None:
    NOTES.append(text)
    print(f"note: {text}", flush=True)


def add(
    name: str, value: str, unit: str, compare: str = "", target: str = "", memory: str = ""
) -> None:
    ROWS.append(Row(name, value, unit, compare, target, memory))
    print(f"{name}: {value} {unit} {compare} {memory}", flush=True)


# --- timing --------------------------------------------------------------------------


async def sample(op: Callable[[], Awaitable[Any]], n: int, warmup: int = 10) -> list[float]:
    """Microseconds per call of ``op``, ``n`` samples after ``warmup`` calls."""
    for _ in range(warmup):
        await op()
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        await op()
        times.append((time.perf_counter_ns() - start) / 1000)
    return times


async def interleaved(
    ops: dict[str, Callable[[], Awaitable[Any]]], n: int, warmup: int = 10
) -> dict[str, list[float]]:
    """Sample each op in turn, ``n`` rounds: every op sees the same disk and the same moment."""
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(warmup):
        for op in ops.values():
            await op()
    for _ in range(n):
        for name, op in ops.items():
            times[name] += await sample(op, 1, 0)
    return times


def med(times: list[float]) -> float:
    return statistics.median(times)


def p95(times: list[float]) -> float:
    return statistics.quantiles(times, n=20)[-1] if len(times) > 1 else times[0]


def spread(times: list[float], scale: float = 1.0) -> str:
    """``median / p95`` in the unit ``scale`` gives (1000: ms from microseconds)."""
    return f"{med(times) / scale:.3g} / {p95(times) / scale:.3g}"


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


# --- building sessions fast ----------------------------------------------------------


async def build_session(
    store: FeedStore, n: int, batch: int = 1000, keep_ids: bool = False
) -> tuple[str, list[str]]:
    """A linear session of ``n`` events (a root and turns) appended in batches to ``store``."""
    sid = new_session_id()
    at = time.time_ns()
    root = make_event(
        session=sid,
        parent=None,
        seq=0,
        branch="main",
        at=at,
        actor="u",
        body=SessionCreated(user_id=f"bench-{sid[:8]}", agent="bench"),
    )
    await store.append(
        AppendRequest(
            session_id=sid, branch="main", expected_head=None, events=[root], status="active"
        )
    )
    ids = [root.id] if keep_ids else []
    head, seq = root.id, 0
    while seq < n - 1:
        events = []
        for _ in range(min(batch, n - 1 - seq)):
            seq += 1
            role = "user" if seq % 2 else "assistant"
            body = TurnAdded(role=role, content=f"{CONTENT} #{seq}", tokens_in=12, tokens_out=30)
            event = make_event(
                session=sid, parent=head, seq=seq, branch="main", at=at + seq, actor="u", body=body
            )
            events.append(event)
            head = event.id
        await store.append(
            AppendRequest(
                session_id=sid, branch="main", expected_head=events[0].parent, events=events
            )
        )
        if keep_ids:
            ids.extend(e.id for e in events)
    return sid, ids


# --- 1. durable add_turn against a raw aiosqlite insert + commit ----------------------


async def raw_connection(path: Path, synchronous: str) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute(f"PRAGMA synchronous={synchronous}")
    await db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    await db.commit()
    return db


async def bench_append(tmp: Path, n: int, synchronous: str) -> list[float]:
    """add_turn against raw insert+commit of the same bytes, interleaved op by op."""
    async with Ledger.open(
        f"sqlite:///{tmp}/append-{synchronous}.db", synchronous=synchronous
    ) as led:
        s = await led.create(user_id="u", agent="a")
        sid = s.session_id
        probe = make_event(
            session=sid,
            parent=s.head,
            seq=1,
            branch="main",
            at=time.time_ns(),
            actor="u",
            body=TurnAdded(role="user", content=CONTENT, tokens_in=12),
        )
        data = encode_event(probe)
        db = await raw_connection(tmp / f"raw-{synchronous}.db", synchronous)
        try:

            async def ledger_op() -> None:
                await led.add_turn(sid, role="user", content=CONTENT, tokens_in=12)

            async def raw_op() -> None:
                await db.execute("INSERT INTO t (data) VALUES (?)", (data,))
                await db.commit()

            times = await interleaved({"ours": ledger_op, "raw": raw_op}, n)
        finally:
            await db.close()
    ours, raw = times["ours"], times["raw"]
    label = "durable (FULL)" if synchronous == "full" else "synchronous=normal"
    add(
        f"add_turn, {label}",
        spread(ours),
        "µs median / p95",
        f"raw aiosqlite insert+commit {spread(raw)} µs; ratio {med(ours) / med(raw):.2f}x",
        "≤ 1.5x raw" if synchronous == "full" else "",
    )
    return ours


# --- 2. reading 100 turns ------------------------------------------------------------


async def bench_read_turns(tmp: Path, n: int) -> list[float]:
    url = f"sqlite:///{tmp}/turns.db"
    async with Ledger.open(url, synchronous="normal") as led:
        sid = (await led.create(user_id="u", agent="a")).session_id
        for i in range(100):
            await led.add_turn(
                sid, role="user" if i % 2 else "assistant", content=f"{CONTENT} #{i}"
            )
    cold: list[float] = []
    for _ in range(max(5, n // 20)):
        async with Ledger.open(url) as fresh:
            cold += await sample(lambda fresh=fresh: fresh.turns(sid), 1, 0)
    async with Ledger.open(url) as led:
        assert len(await led.turns(sid)) == 100
        warm = await sample(lambda: led.turns(sid), n)
    add(
        "turns() of 100 turns, fresh ledger (cold)",
        spread(cold, 1000),
        "ms median / p95",
        f"{len(cold)} fresh instances",
    )
    add("turns() of 100 turns, warm", spread(warm, 1000), "ms median / p95", "", "Aixgo 10 ms")
    return warm


# --- 3. state at a random point of a long session -----------------------------------


async def bench_state(tmp: Path, n: int, points: int) -> None:
    url = f"sqlite:///{tmp}/state.db"
    async with Ledger.open(url, synchronous="normal") as led:
        sid, ids = await build_session(led.store, n, keep_ids=True)
    rng = random.Random(7)
    async with Ledger.open(url) as led:
        start = time.perf_counter_ns()
        at = rng.choice(ids[n // 2 :])
        state = await led.state(sid, at=at)
        first = (time.perf_counter_ns() - start) / 1e6
    add(
        f"state(at=random) of a {n:,}-event session, first call",
        f"{first:.1f}",
        "ms",
        f"no snapshots yet: folds {state.seq:,} events from the root",
        "(none: a one-off)",
    )
    async with Ledger.open(url) as led:
        await led.state(sid)  # snapshots all along the path
    async with Ledger.open(url) as led:
        chosen = rng.sample(ids, points)
        it = iter(chosen)
        times = await sample(lambda: led.state(sid, at=next(it)), points, 0)
    add(
        f"state(at=random) of a {n:,}-event session, steady",
        spread(times, 1000),
        "ms median / p95",
        f"{points} distinct random points, snapshots present, cold LRU",
        "< 5 ms",
    )


# --- 4. replay and verify of a very long session -----------------------------------


async def replay(store: FeedStore, sid: str) -> int:
    state = SESSION.initial()
    apply = SESSION.apply
    async for event in store.events(sid):
        state = apply(state, event)
    return state.event_count


async def timed_with_memory(fn: Callable[[], Awaitable[Any]]) -> tuple[float, int, Any]:
    """Seconds of one untraced run, then the tracemalloc peak of a second, traced run."""
    gc.collect()
    start = time.perf_counter_ns()
    result = await fn()
    seconds = (time.perf_counter_ns() - start) / 1e9
    gc.collect()
    tracemalloc.start()
    await fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak, result


async def bench_replay(tmp: Path, n: int) -> None:
    url = f"sqlite:///{tmp}/replay.db"
    store = open_store(url, synchronous="normal")
    async with store:
        start = time.perf_counter_ns()
        sid, _ = await build_session(store, n)
        build = (time.perf_counter_ns() - start) / 1e9
    add(
        f"build {n:,} events (make_event + store.append, 1,000 per batch)",
        f"{n / build:,.0f}",
        "events/s",
        f"{build:.1f} s; synchronous=normal",
    )
    async with Ledger.open(url) as led:
        seconds, peak, count = await timed_with_memory(lambda: replay(led.store, sid))
        assert count == n, count
        add(
            f"replay {n:,} events (store.events + SESSION fold)",
            f"{n / seconds:,.0f}",
            "events/s",
            f"{seconds:.2f} s",
            "> 300,000/s",
            f"{mib(peak)} tracemalloc peak",
        )
        seconds, peak, report = await timed_with_memory(lambda: led.verify(sid))
        assert report.ok and report.events_checked == n, report
        add(
            f"verify {n:,} events",
            f"{n / seconds:,.0f}",
            "events/s",
            f"{seconds:.2f} s",
            "> 300,000/s",
            f"{mib(peak)} tracemalloc peak",
        )


# --- 4b. the JSONL store ------------------------------------------------------------


async def bench_jsonl_append(tmp: Path, n: int) -> None:
    """add_turn on the JSONL store (fsync on) against a raw append + fsync of the same bytes."""
    async with Ledger.open(f"jsonl:///{tmp}/jsonl-append") as led:
        s = await led.create(user_id="u", agent="a")
        sid = s.session_id
        probe = make_event(
            session=sid,
            parent=s.head,
            seq=1,
            branch="main",
            at=time.time_ns(),
            actor="u",
            body=TurnAdded(role="user", content=CONTENT, tokens_in=12),
        )
        line = b'{"pos":%d,"batch":[1,1],"event":%s}\n' % (2, encode_event(probe))
        raw_path = tmp / "raw-append.jsonl"

        async def ledger_op() -> None:
            await led.add_turn(sid, role="user", content=CONTENT, tokens_in=12)

        def raw_append() -> None:
            with open(raw_path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

        async def raw_op() -> None:
            raw_append()  # on the loop, as our small appends are

        times = await interleaved({"ours": ledger_op, "raw": raw_op}, n)
    ours, raw = times["ours"], times["raw"]
    add(
        "JSONL add_turn, fsync on",
        spread(ours),
        "µs median / p95",
        f"raw open('ab') + write + fsync of the same line {spread(raw)} µs; "
        f"ratio {med(ours) / med(raw):.2f}x",
        "≤ 1.3x raw",
    )


async def bench_jsonl_read_turns(tmp: Path, n: int) -> None:
    url = f"jsonl:///{tmp}/jsonl-turns"
    async with Ledger.open(url) as led:
        sid = (await led.create(user_id="u", agent="a")).session_id
        for i in range(100):
            await led.add_turn(
                sid, role="user" if i % 2 else "assistant", content=f"{CONTENT} #{i}"
            )
    path = tmp / "jsonl-turns" / "sessions" / f"{sid}.jsonl"

    def read_lines() -> None:
        with open(path, "rb") as f:
            [orjson.loads(line) for line in f.read().splitlines()[1:]]

    async def raw_read() -> None:
        read_lines()

    async with Ledger.open(url) as led:
        assert len(await led.turns(sid)) == 100
        times = await interleaved({"ours": lambda: led.turns(sid), "raw": raw_read}, n)
    ours, raw = times["ours"], times["raw"]
    add(
        "JSONL turns() of 100 turns, warm",
        spread(ours, 1000),
        "ms median / p95",
        f"raw read + orjson.loads of the 101 lines {spread(raw, 1000)} ms; "
        f"ratio {med(ours) / med(raw):.2f}x",
        "Aixgo 10 ms",
    )


async def bench_jsonl_replay(tmp: Path, n: int) -> None:
    url = f"jsonl:///{tmp}/jsonl-replay"
    store = open_store(url, fsync="off")
    async with store:
        start = time.perf_counter_ns()
        sid, _ = await build_session(store, n, batch=10_000)
        build = (time.perf_counter_ns() - start) / 1e9
    size = (tmp / "jsonl-replay" / "sessions" / f"{sid}.jsonl").stat().st_size
    add(
        f"JSONL build {n:,} events (make_event + store.append, 10,000 per batch)",
        f"{n / build:,.0f}",
        "events/s",
        f"{build:.1f} s; fsync off (building only); {mib(size)} file",
    )
    store = open_store(url)
    start = time.perf_counter_ns()
    await store.open()
    opening = (time.perf_counter_ns() - start) / 1e9
    try:
        add(
            f"JSONL open a store of {n:,} events (scan and index every line)",
            f"{n / opening:,.0f}",
            "events/s",
            f"{opening:.2f} s",
        )

        async def events() -> int:
            count = 0
            async for _ in store.events(sid):
                count += 1
            return count

        seconds, peak, count = await timed_with_memory(events)
        assert count == n, count
        add(
            f"JSONL replay {n:,} events (store.events)",
            f"{n / seconds:,.0f}",
            "events/s",
            f"{seconds:.2f} s",
            "> 500,000/s",
            f"{mib(peak)} tracemalloc peak",
        )
        gc.collect()
        start = time.perf_counter_ns()
        count = await replay(store, sid)
        seconds = (time.perf_counter_ns() - start) / 1e9
        assert count == n, count
        add(
            f"JSONL replay {n:,} events (store.events + SESSION fold)",
            f"{n / seconds:,.0f}",
            "events/s",
            f"{seconds:.2f} s",
        )
    finally:
        await store.close()


# --- 5. Aixgo's floor ---------------------------------------------------------------


async def bench_aixgo(
    tmp: Path, n: int, synchronous: str, append: list[float], read: list[float]
) -> None:
    async with Ledger.open(
        f"sqlite:///{tmp}/aixgo-{synchronous}.db", synchronous=synchronous
    ) as led:
        counter = iter(range(10**9))
        created: list[str] = []

        async def create() -> None:
            created.append(
                (await led.create(user_id=f"user-{next(counter)}", agent="a")).session_id
            )

        creates = await sample(create, max(n, 110))
        sid = created[0]
        for _ in range(10):
            await led.add_turn(sid, role="user", content=CONTENT)
        checkpoints = await sample(lambda: led.checkpoint(sid), min(n, 200))
        page = await led.sessions(limit=100)
        assert len(page.items) == 100
        lists = await sample(lambda: led.sessions(limit=100), n)
    figures = {
        "create": creates,
        "append": append,
        "read 100": read,
        "checkpoint": checkpoints,
        "list 100": lists,
    }
    label = "FULL" if synchronous == "full" else "normal"
    for what, times in figures.items():
        if what == "read 100" and synchronous != "full":
            continue
        aixgo = AIXGO_MS[what]
        ms = med(times) / 1000
        add(
            f"Aixgo floor: {what} ({label})"
            if what != "read 100"
            else "Aixgo floor: read 100 messages",
            spread(times, 1000),
            "ms median / p95",
            f"{aixgo / ms:.1f}x faster than Aixgo's {aixgo:g} ms",
            f"≤ {aixgo / 10:g} ms (10x)",
        )


# --- 6. peers -----------------------------------------------------------------------


async def langgraph_ops(tmp: Path, stack: contextlib.AsyncExitStack) -> dict[str, Op]:
    """langgraph's AsyncSqliteSaver: ``aput`` of a checkpoint holding one message."""
    try:
        from langgraph.checkpoint.base import empty_checkpoint
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    except ImportError:
        note("langgraph-checkpoint-sqlite is not installed: its row is skipped")
        return {}
    saver = await stack.enter_async_context(AsyncSqliteSaver.from_conn_string(str(tmp / "lg.db")))
    await saver.setup()
    (sync,) = await (await saver.conn.execute("PRAGMA synchronous")).fetchone()
    note(f"langgraph AsyncSqliteSaver: WAL, PRAGMA synchronous={sync} (2 = FULL), its defaults")
    config: dict[str, Any] = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}

    async def put() -> None:
        nonlocal config
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"messages": [{"role": "user", "content": CONTENT}]}
        config = await saver.aput(config, checkpoint, {"source": "loop", "step": 1}, {})

    return {"langgraph AsyncSqliteSaver.aput (1 message)": put}


async def agents_ops(
    tmp: Path, stack: contextlib.AsyncExitStack
) -> tuple[dict[str, Op], dict[str, Op]]:
    """OpenAI Agents SDK's SQLiteSession: ``add_items`` of one message, ``get_items`` of 100."""
    try:
        from agents.memory import SQLiteSession
    except ImportError:
        note("openai-agents is not installed: its rows are skipped")
        return {}, {}
    writer = SQLiteSession("w", tmp / "agents.db")
    reader = SQLiteSession("r", tmp / "agents.db")
    stack.callback(writer.close)
    stack.callback(reader.close)
    (sync,) = writer._get_connection().execute("PRAGMA synchronous").fetchone()
    note(f"openai-agents SQLiteSession: WAL, PRAGMA synchronous={sync} (2 = FULL), its defaults")
    await reader.add_items([{"role": "user", "content": f"{CONTENT} #{i}"} for i in range(100)])
    assert len(await reader.get_items()) == 100

    async def add_one() -> None:
        await writer.add_items([{"role": "user", "content": CONTENT}])

    return (
        {"openai-agents SQLiteSession.add_items (1 message)": add_one},
        {"openai-agents SQLiteSession.get_items (100)": reader.get_items},
    )


async def bench_peers(tmp: Path, n: int) -> None:
    """Peers' writes and reads, interleaved op by op with ours (durable, FULL)."""
    async with contextlib.AsyncExitStack() as stack:
        led = await stack.enter_async_context(Ledger.open(f"sqlite:///{tmp}/peers.db"))
        sid = (await led.create(user_id="u", agent="a")).session_id
        reader = (await led.create(user_id="u", agent="a")).session_id
        for i in range(100):
            await led.add_turn(reader, role="user", content=f"{CONTENT} #{i}")

        async def add_turn() -> None:
            await led.add_turn(sid, role="user", content=CONTENT)

        async def read() -> None:
            await led.turns(reader)

        lg = await langgraph_ops(tmp, stack)
        agents_write, agents_read = await agents_ops(tmp, stack)
        for ours, peers in (("add_turn", {**lg, **agents_write}), ("turns (100)", agents_read)):
            if not peers:
                continue
            op = add_turn if ours == "add_turn" else read
            times = await interleaved({ours: op, **peers}, n)
            mine = times.pop(ours)
            for name, theirs in times.items():
                add(
                    f"peer: {name}",
                    spread(theirs, 1000),
                    "ms median / p95",
                    f"ours ({ours}) in the same loop: {spread(mine, 1000)} ms; "
                    f"peer / ours = {med(theirs) / med(mine):.2f} (> 1: ours is faster)",
                )


# --- the table ----------------------------------------------------------------------


def table(args: argparse.Namespace, seconds: float) -> str:
    head = [
        "# Session ledger benchmarks",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"Python {platform.python_version()}; "
        f"SQLite {sqlite3.sqlite_version}; {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} cores; {'--quick' if args.quick else 'full'} run in {seconds:.0f} s "
        f"(`python -m bench.run{' --quick' if args.quick else ''}`).",
        "",
        "| benchmark | value | unit | comparison | target | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    lines = [
        f"| {r.name} | {r.value} | {r.unit} | {r.compare} | {r.target} | {r.memory} |" for r in ROWS
    ]
    notes = ["", *(f"- {text}" for text in NOTES)] if NOTES else []
    return "\n".join(head + lines + notes) + "\n"


async def main(args: argparse.Namespace) -> None:
    ops, points = (100, 50) if args.quick else (500, 200)
    long_n, replay_n = (10_000, 20_000) if args.quick else (100_000, 1_000_000)
    note(
        "Times are medians / 95th percentiles of per-call samples after warm-up. "
        "FULL fsyncs the WAL at each commit; 'normal' survives a process kill but not a power loss."
    )
    note(
        "Memory is the tracemalloc peak of Python allocations during a second, traced pass "
        "(the rate comes from the untraced pass); SQLite's page cache is not included."
    )
    with tempfile.TemporaryDirectory(prefix="ledger-bench-", dir=args.dir) as name:
        tmp = Path(name)
        durable = await bench_append(tmp, ops, "full")
        normal = await bench_append(tmp, ops, "normal")
        read = await bench_read_turns(tmp, ops)
        await bench_state(tmp, long_n, points)
        await bench_replay(tmp, replay_n)
        await bench_jsonl_append(tmp, ops)
        await bench_jsonl_read_turns(tmp, ops)
        await bench_jsonl_replay(tmp, replay_n)
        await bench_aixgo(tmp, ops, "full", durable, read)
        await bench_aixgo(tmp, ops, "normal", normal, read)
        await bench_peers(tmp, ops)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke run under a minute"
    )
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--dir", help="where the temporary databases go (default: the system's)")
    args = parser.parse_args()
    start = time.perf_counter()
    asyncio.run(main(args))
    text = table(args, time.perf_counter() - start)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    cli()
