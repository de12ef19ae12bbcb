"""Run every scenario, print the table and write it to ``bench/results.md``.

``python -m bench [--quick] [--only NAMES] [--out PATH] [--postgres-url URL]``
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import platform
import sqlite3
import tempfile
import time
from pathlib import Path

from bench import scenarios as _scenarios  # noqa: F401 - registers the scenarios
from bench.context import Context, Postgres, Sizes
from bench.datasets import close_datasets
from bench.harness import SCENARIOS, Row, describe, fmt_bytes

__all__ = ["main", "render"]

DEFAULT_OUT = Path(__file__).with_name("results.md")
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def _ratio_text(row: Row, rows: dict[str, Row]) -> str:
    ratio = row.ratio(rows)
    return "" if ratio is None else f"{ratio:.2f}x {row.ref}"


def _target_text(row: Row, rows: dict[str, Row]) -> str:
    if row.target is None:
        return ""
    met = row.target.check(row, rows)
    mark = {True: " ✓", False: " ✗ missed", None: ""}[met]
    return row.target.text + mark


def render(ctx: Context, seconds: float, command: str) -> str:
    """The markdown page: the header, the table, the settings and the remarks."""
    pg = f"PostgreSQL {ctx.pg.version}; " if ctx.pg is not None else ""
    lines = [
        "# Session ledger benchmarks",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}; {pg}"
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores; "
        f"{'quick' if ctx.quick else 'full'} run in {seconds:.0f} s (`{command}`).",
        "",
        "| scenario | system | result | ratio | target | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    by_scenario: dict[str, dict[str, Row]] = {}
    for row in ctx.rows:
        by_scenario.setdefault(row.scenario, {})[row.system] = row
    grouped: dict[str, list[Row]] = {}  # scenarios in order of their first row
    for row in ctx.rows:
        grouped.setdefault(row.scenario, []).append(row)
    for scenario_title, group in grouped.items():
        rows = by_scenario[scenario_title]
        for i, row in enumerate(group):
            title = f"**{scenario_title}**" if i == 0 else ""
            memory = "" if row.memory is None else fmt_bytes(row.memory)
            lines.append(
                f"| {title} | {row.system} | {row.result} | {_ratio_text(row, rows)} | "
                f"{_target_text(row, rows)} | {memory} |"
            )
    lines += [
        "",
        "- **ratio**: this row's cost (time per call, time per event, or bytes) divided by the "
        "named row's, in the same run: above 1 is slower or bigger. A ledger row is compared "
        "with its raw driver, a peer with the ledger on the same backend.",
        "- **p50 / p99**: median and 99th percentile of per-call times, sampled in turns "
        "between the systems so that each sees the same disk and the same moments.",
        "- **peak memory**: growth of the process's peak resident set during that "
        "measurement (VmHWM reset through /proc/self/clear_refs): Python objects, SQLite's "
        "page cache and driver buffers; not a database server's memory.",
        "",
        "Settings each system ran with (durability included):",
        "",
        *(f"- {name}: {text}" for name, text in sorted(ctx.notes.settings.items())),
    ]
    if ctx.notes.remarks:
        lines += ["", *(f"- {text}" for text in ctx.notes.remarks)]
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> Context:
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.limit is not None:
        sizes = dataclasses.replace(sizes, limit_seconds=args.limit)
    wanted = set(args.only.split(",")) if args.only else None
    unknown = (wanted or set()) - {s.name for s in SCENARIOS}
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="ledger-bench-", dir=args.dir) as scratch:
        pg: Postgres | None = None
        remarks: list[str] = []
        if args.postgres_url.lower() != "none":
            pg = Postgres(args.postgres_url)
            try:
                await pg.start()
            except Exception as exc:
                remarks.append(f"PostgreSQL skipped: {describe(exc)}")
                pg = None
        ctx = Context(sizes=sizes, root=Path(scratch), pg=pg, quick=args.quick)
        ctx.notes.remarks += remarks
        try:
            for chosen in SCENARIOS:
                if wanted is not None and chosen.name not in wanted:
                    continue
                print(f"{chosen.name}: {chosen.title}", flush=True)
                start = time.perf_counter()
                try:
                    await chosen.run(ctx)
                except Exception as exc:
                    ctx.add(chosen.title, "(scenario)", f"error: {describe(exc)}")
                print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)
        finally:
            await close_datasets(ctx)
            if pg is not None:
                try:
                    await pg.stop()
                except Exception as exc:
                    print(f"could not drop {pg.name}: {describe(exc)}")
    return ctx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="The ledger on every store against the raw drivers and the peers, "
        "in one run; writes the table to bench/results.md.",
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke run (< 1 min)")
    parser.add_argument(
        "--only", help=f"comma-separated scenarios: {','.join(s.name for s in SCENARIOS)}"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: %(default)s")
    parser.add_argument(
        "--limit",
        type=float,
        help="seconds one system may spend on one measurement before it is stopped "
        "(default: 30, or 20 with --quick)",
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--dir", help="scratch directory for the files (default: the system's)")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("LEDGER_BENCH_POSTGRES_URL", DEFAULT_PG),
        help="a server where a database can be created and dropped, or 'none' "
        "(default: $LEDGER_BENCH_POSTGRES_URL or %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ctx = asyncio.run(run(args))
    seconds = time.perf_counter() - start
    command = "python -m bench" + (" --quick" if args.quick else "")
    if args.only:
        command += f" --only {args.only}"
    text = render(ctx, seconds, command)
    print()
    print(text)
    if not args.no_write:
        args.out.write_text(text)
        print(f"written to {args.out}")
    print(f"total: {seconds:.0f} s")


if __name__ == "__main__":
    main()
