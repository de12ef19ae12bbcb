"""The benchmark harness runs: scenarios at toy sizes, no timing asserted.

Runs without the peers and without PostgreSQL (``pg=None``), as in CI.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from bench.context import Context, Sizes
from bench.datasets import close_datasets
from bench.harness import SCENARIOS, Row, fmt_time
from bench.run import render
from bench.scenarios import replay, state_at_random, verify

TOY = Sizes(large_session=300, state_points=5, sessions=20, peer_replay=50, turns=20)


def rows_of(ctx: Context, title_start: str) -> dict[str, Row]:
    return {r.system: r for r in ctx.rows if r.scenario.startswith(title_start)}


async def test_dataset_scenarios_run_on_every_local_store(tmp_path: Path) -> None:
    ctx = Context(sizes=TOY, root=tmp_path, pg=None, quick=True)
    try:
        await state_at_random(ctx)
        await replay(ctx)
        await verify(ctx)
    finally:
        await close_datasets(ctx)

    for title in ("state at a random point", "full replay", "verify"):
        rows = rows_of(ctx, title)
        for backend in ("memory", "sqlite", "jsonl"):
            row = rows[f"ledger {backend}"]
            assert not row.result.startswith("error"), row
            assert row.cost is not None and row.cost > 0, row
        assert rows["ledger postgres"].result == "no PostgreSQL (--postgres-url)"
    # The raw drivers read the very rows the ledger replayed: a ratio is there.
    replayed = rows_of(ctx, "full replay")
    assert replayed["ledger sqlite"].ratio(replayed) is not None
    assert replayed["ledger jsonl"].ratio(replayed) is not None

    page = render(ctx, 1.0, "python -m bench --quick")
    assert "| scenario | system | result | ratio | target | peak memory |" in page
    assert "**full replay of a 300-event session (Ledger.replay: read + fold)**" in page


def test_every_scenario_is_registered_once() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(names) == len(set(names))
    assert {"append", "concurrent", "batch", "read", "bytes", "state", "replay"} <= set(names)
    assert {"feed", "verify", "list"} <= set(names)


@given(st.floats(min_value=1e-12, max_value=999))
def test_a_time_reads_as_at_most_three_digits_in_its_unit(seconds: float) -> None:
    number, unit = fmt_time(seconds).split(" ")
    assert "e" not in number and 0 < float(number) < 1000, fmt_time(seconds)
    assert unit in ("s", "ms", "µs", "ns")


def test_a_time_just_under_a_unit_reads_in_that_unit() -> None:
    assert fmt_time(0.0009996) == "1 ms"
    assert fmt_time(0.0012345) == "1.23 ms"
    assert fmt_time(9.9996e-7) == "1 µs"
    assert fmt_time(1234.5) == "1,234 s"
