"""Many rows in a few statements (``stores.sqlite_steps``): every row, in order."""

from __future__ import annotations

import contextlib
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stores.sqlite_steps import MAX_ROWS, chunks, execute_rows

rows_strategy = st.lists(
    st.tuples(st.integers(-(2**63), 2**63 - 1), st.text(max_size=8) | st.none()),
    max_size=3 * MAX_ROWS + 5,
)


@given(rows_strategy)
def test_chunks_cover_every_row_in_order_in_powers_of_two(rows: list[tuple[int, str]]) -> None:
    flat: list[object] = []
    sizes = []
    for count, params in chunks(iter(rows), len(rows)):
        assert len(params) == 2 * count
        sizes.append(count)
        flat.extend(params)
    assert flat == [value for row in rows for value in row]
    assert all(size & (size - 1) == 0 and 0 < size <= MAX_ROWS for size in sizes)
    assert sizes == sorted(sizes, reverse=True)
    # Whole chunks of MAX_ROWS, then one per bit of the rest: few steps for any count.
    assert len(sizes) == len(rows) // MAX_ROWS + bin(len(rows) % MAX_ROWS).count("1")


@settings(max_examples=40, deadline=None)
@given(rows_strategy)
def test_execute_rows_inserts_and_updates_every_row(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[int, str]]
) -> None:
    path = tmp_path_factory.mktemp("steps") / "t.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY AUTOINCREMENT, a INTEGER, b TEXT)")
        assert execute_rows(conn, "INSERT INTO t (a, b) VALUES {values}", 2, rows) == len(rows)
        assert conn.execute("SELECT a, b FROM t ORDER BY n").fetchall() == rows
        updates = [(n, f"row {n}") for n in range(1, len(rows) + 1, 2)]
        changed = execute_rows(
            conn,
            "UPDATE t SET b = v.column2 FROM (VALUES {values}) AS v WHERE n = v.column1",
            2,
            updates,
        )
        assert changed == len(updates)
        assert conn.execute("SELECT n, b FROM t WHERE n % 2 = 1 ORDER BY n").fetchall() == updates
