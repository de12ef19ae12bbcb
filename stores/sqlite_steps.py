"""Many rows in a few SQLite statement steps: what a group commit writes and reads.

Python's ``sqlite3`` lets go of the GIL around every step of a statement (each
row an ``executemany`` writes, each row a cursor reads) and must take it back
afterwards, from the event loop's thread that runs Python meanwhile; and each
row costs Python work of its own. A group of 44 appends ran ~130 steps. So a
group's statements carry many rows each: a multi-row ``VALUES`` list per
insert or update, one aggregated row per read.

Rows go in chunks of a power of two, at most ``MAX_ROWS`` per statement: a few
steps for any count, and a handful of distinct statements for ``sqlite3``'s
statement cache. ``MAX_ROWS`` times a row's columns stays under 999, the
bound parameters of the oldest SQLite builds.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Iterable, Iterator, Sequence, Sized
from typing import Any, Final, cast

__all__ = ["MAX_ROWS", "chunks", "execute_rows", "statement"]

MAX_ROWS: Final = 64
"""The most rows one statement carries."""


@functools.cache
def statement(sql: str, width: int, count: int) -> str:
    """``sql`` with its ``{values}`` replaced by ``count`` rows of ``width``
    parameters: ``(?, ?), (?, ?)``."""
    row = "(" + ", ".join("?" * width) + ")"
    return sql.replace("{values}", ", ".join([row] * count))


def chunks(rows: Iterable[Sequence[Any]], count: int) -> Iterator[tuple[int, list[Any]]]:
    """The ``count`` rows of ``rows`` as (row count, flat parameters) chunks,
    largest first. Rows are taken as each chunk needs them: a chunk runs while
    the rows after it are still being made (``SQLiteStore``'s packing thread)."""
    taken = iter(rows)
    size = MAX_ROWS
    while count:
        while count < size:
            size //= 2
        yield size, [value for row in itertools.islice(taken, size) for value in row]
        count -= size


def execute_rows(
    conn: sqlite3.Connection,
    sql: str,
    width: int,
    rows: Iterable[Sequence[Any]],
    count: int | None = None,
) -> int:
    """Run ``sql`` (its ``{values}`` placeholder standing for a row list of
    ``width`` columns) over ``rows`` in a few statements; the rows it changed.
    ``count`` is how many rows there are, when ``rows`` has no length."""
    if count is None:
        count = len(cast(Sized, rows))
    changed = 0
    for size, params in chunks(rows, count):
        changed += conn.execute(statement(sql, width, size), params).rowcount
    return changed
