"""The progress line, with a fake clock and a fake terminal (a StringIO that says it is a tty)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from io import StringIO

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.progress import Progress


class Terminal(StringIO):
    """A test double of a terminal: records what is written, says it is a tty."""

    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock()
    monkeypatch.setattr(Progress, "clock", fake)
    yield fake


def draws(text: str) -> list[str]:
    """The lines drawn, in order (each draw starts with a carriage return)."""
    return [part for part in text.split("\r") if part.strip()]


def test_nothing_during_the_first_second(clock: Clock) -> None:
    term = Terminal()
    with Progress("verifying", total=10, stream=term) as progress:
        for _ in range(5):
            clock.now += 0.19
            progress.advance()
        assert term.getvalue() == ""
    assert term.getvalue() == ""  # nothing drawn, so nothing to clear
    assert progress.count == 5


def test_draws_label_count_percentage_rate_and_eta(clock: Clock) -> None:
    term = Terminal()
    with Progress("verifying", total=200, stream=term) as progress:
        clock.now += 2.0
        progress.advance(50)
        (line,) = draws(term.getvalue())
        assert term.getvalue().startswith("\r")
        assert "\n" not in term.getvalue()
        assert line == "verifying  [#####               ]  50/200   25%  25.0/s  ETA 0:06"


def test_without_a_total_count_and_rate_only(clock: Clock) -> None:
    term = Terminal()
    with Progress("importing", stream=term) as progress:
        clock.now += 1.5
        progress.advance(3000)
    (line,) = draws(term.getvalue())
    assert line == "importing  3000  2.0k/s"


def test_at_most_ten_redraws_a_second(clock: Clock) -> None:
    term = Terminal()
    with Progress("x", total=10_000, stream=term) as progress:
        clock.now += 1.0
        for _ in range(1000):  # one second of work, an advance every millisecond
            clock.now += 0.001
            progress.advance()
        shown = draws(term.getvalue())
    assert 9 <= len(shown) <= 11
    assert shown[0].startswith("x  [")
    counts = [int(re.search(r"(\d+)/10000", line)[1]) for line in shown]  # type: ignore[index]
    assert counts == sorted(counts) and counts[-1] >= 900


def test_exit_clears_the_line(clock: Clock) -> None:
    term = Terminal()
    with Progress("verifying", total=5, stream=term) as progress:
        clock.now += 1.0
        progress.advance()
        drawn = term.getvalue()
    width = len(drawn) - 1
    assert term.getvalue() == drawn + "\r" + " " * width + "\r"


def test_a_shorter_line_rubs_out_the_longer_one(clock: Clock) -> None:
    term = Terminal()
    with Progress("n", stream=term) as progress:
        clock.now += 1.0
        progress.advance(1_000_000)  # "n  1000000  1.0M/s"
        clock.now += 999_999.0
        progress.advance(1)  # "n  1000001  1.0/s": shorter
        first, second = term.getvalue().split("\r")[1:3]
    assert len(second) == len(first)
    assert second == "n  1000001  1.0/s "


def test_never_writes_when_not_a_terminal(clock: Clock) -> None:
    plain = StringIO()
    with Progress("verifying", total=3, stream=plain) as progress:
        clock.now += 60.0
        progress.advance(3)
    assert plain.getvalue() == ""
    assert progress.count == 3


def test_enabled_overrides_the_terminal_check(clock: Clock) -> None:
    term, plain = Terminal(), StringIO()
    with (
        Progress("a", stream=term, enabled=False) as off,
        Progress("b", stream=plain, enabled=True) as on,
    ):
        clock.now += 2.0
        off.advance()
        on.advance()
    assert term.getvalue() == ""
    assert draws(plain.getvalue()) == ["b  1  0.5/s"]


def test_default_stream_is_stderr(clock: Clock, capsys: pytest.CaptureFixture[str]) -> None:
    with Progress("x", enabled=True) as progress:
        clock.now += 1.0
        progress.advance()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert draws(captured.err) == ["x  1  1.0/s"]


def test_long_runs_show_hours(clock: Clock) -> None:
    term = Terminal()
    with Progress("big", total=1_000_000, stream=term) as progress:
        clock.now += 10.0
        progress.advance(1)
    assert draws(term.getvalue())[0].endswith("0.1/s  ETA 2777:46:30")


@given(st.lists(st.floats(min_value=0.0, max_value=0.5), max_size=200))
def test_draws_wait_a_second_then_come_at_most_ten_a_second(steps: list[float]) -> None:
    clock = Clock()
    times: list[float] = []
    term = Terminal()
    original = Progress.clock
    Progress.clock = clock
    try:
        with Progress("p", total=len(steps) or None, stream=term) as progress:
            start = clock.now
            for step in steps:
                clock.now += step
                before = term.getvalue()
                progress.advance()
                if term.getvalue() != before:
                    times.append(clock.now)
    finally:
        Progress.clock = original
    assert all(t - start >= 1.0 for t in times)
    assert all(b - a >= 0.1 for a, b in itertools.pairwise(times))
    assert len(draws(term.getvalue())) == len(times)
