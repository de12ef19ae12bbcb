"""The harness: the scenario registry, timing and memory probes, and the table.

A scenario is an ``async def (ctx) -> None`` registered with ``@scenario``; it
measures the systems it concerns and adds one row per system with
``ctx.add``. A scenario (or one system in it) that fails becomes a row naming
the error, and the run goes on.

Ratios. Every row has a *cost*: seconds per operation, seconds per event (the
inverse of a rate) or bytes. A row's ratio is its cost divided by the cost of
the row it names in the same scenario, so above 1 means slower or bigger than
that row: a ledger row names its raw driver, a peer's row names the ledger row
of the same backend.

Peak memory is the growth of the process's resident set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` before each measurement):
Python objects, SQLite's page cache and the drivers' buffers alike, at no cost
to the timings (tracemalloc would slow the code it measures). A database
server's own memory is not in it.
"""

from __future__ import annotations

import math
import re
import statistics
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SCENARIOS",
    "MemoryProbe",
    "Row",
    "Scenario",
    "Skip",
    "Target",
    "percentile",
    "scenario",
]


class Skip(Exception):
    """A system that cannot run this scenario: the row shows the reason, not an error."""


@dataclass(frozen=True)
class Target:
    """A goal from the issues, checked against the row's figures (None: not checkable)."""

    text: str
    check: Callable[[Row, dict[str, Row]], bool | None] = lambda row, rows: None


@dataclass
class Row:
    scenario: str
    system: str
    result: str
    cost: float | None = None
    """Seconds per op, seconds per event, or bytes: what ratios divide."""
    ref: str | None = None
    """The system (same scenario) this row's ratio is taken against."""
    target: Target | None = None
    memory: float | None = None
    """Peak resident-set growth, bytes."""
    value: float | None = None
    """The headline figure as a number (a rate, a time in seconds, bytes), for targets."""

    def ratio(self, rows: dict[str, Row]) -> float | None:
        other = rows.get(self.ref) if self.ref else None
        if other is None or self.cost is None or not other.cost:
            return None
        return self.cost / other.cost


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: Callable[[Any], Awaitable[None]]


SCENARIOS: list[Scenario] = []


def scenario(name: str, title: str) -> Callable[[Callable[[Any], Awaitable[None]]], Any]:
    """Register a scenario; the table shows them in registration order."""

    def register(fn: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        SCENARIOS.append(Scenario(name, title, fn))
        return fn

    return register


# --- timing --------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank: a real sample, never interpolated."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def fmt_time(seconds: float) -> str:
    """3 significant digits in the unit that reads best."""
    rounded = float(f"{seconds:.3g}")  # first: 999.6 µs reads 1 ms, not "1e+03 µs"
    if rounded >= 1000:
        return f"{seconds:,.0f} s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if rounded >= scale:
            return f"{rounded / scale:.3g} {unit}"
    return f"{rounded * 1e9:.3g} ns"


def fmt_rate(per_second: float) -> str:
    return f"{per_second:,.0f}/s"


def fmt_bytes(nbytes: float) -> str:
    if abs(nbytes) >= 2**20:
        return f"{nbytes / 2**20:.1f} MiB"
    if abs(nbytes) >= 2**10:
        return f"{nbytes / 2**10:.1f} KiB"
    return f"{nbytes:.0f} B"


class Clock:
    """A wall-clock stopwatch in seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# --- memory --------------------------------------------------------------------------


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            found = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(found.group(1)) if found else None


class MemoryProbe:
    """Peak resident-set growth over a ``with`` block (Linux; None elsewhere), and its
    wall time in ``seconds``."""

    def __init__(self) -> None:
        self.peak: float | None = None
        self.seconds = 0.0

    @contextmanager
    def measure(self) -> Iterator[MemoryProbe]:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            before = _status_kib("VmRSS")
        except OSError:
            before = None
        start = time.perf_counter()
        yield self
        self.seconds = time.perf_counter() - start
        after = _status_kib("VmHWM")
        if before is not None and after is not None:
            self.peak = max(0, after - before) * 1024.0


# --- errors --------------------------------------------------------------------------


def describe(exc: BaseException) -> str:
    """One line for the table: the exception's type and message, and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].name}:{frames[-1].lineno}" if frames else ""
    text = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")
    return (text[:300] + "...") if len(text) > 300 else text + where


@dataclass
class Notes:
    """Settings of every system that ran, and remarks, printed under the table."""

    settings: dict[str, str] = field(default_factory=dict)
    remarks: list[str] = field(default_factory=list)
