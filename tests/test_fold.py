"""Laws of folding: a projection's ``apply_many`` is ``apply`` event after event,
and ``fold`` over any iterable, in runs or whole, is the same fold."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

import projections.base
from ledger.events import REDACTABLE, Event, TurnAdded, erase
from ledger.testing import create_event, next_event
from projections.base import Projection, fold
from projections.session import SESSION, SessionState
from tests.strategies import chains


def one_by_one(state: SessionState, events: list[Event]) -> SessionState:
    for event in events:
        state = SESSION.apply(state, event)
    return state


@st.composite
def paths(draw: st.DrawFn) -> list[Event]:
    """A chain, some of its turns and records redacted, and runs of plain turns in it."""
    chain = draw(chains(max_size=12))
    turns = draw(st.integers(min_value=0, max_value=6))
    for _ in range(turns):  # runs of turns: what apply_many folds into one state
        body = TurnAdded(
            role="user",
            content="x",
            tokens_in=draw(st.integers(0, 2**40)),
            tokens_out=draw(st.integers(0, 2**40)),
            cost=draw(st.floats(allow_nan=False, allow_infinity=False)),
        )
        chain.append(next_event(chain[-1], body))
    erased = draw(st.sets(st.integers(min_value=0, max_value=len(chain) - 1)))
    return [
        erase(event) if at in erased and event.kind in REDACTABLE else event
        for at, event in enumerate(chain)
    ]


@given(paths(), st.data())
def test_session_apply_many_is_apply_event_after_event(
    path: list[Event], data: st.DataObject
) -> None:
    assert SESSION.apply_many(SESSION.initial(), path) == one_by_one(SESSION.initial(), path)
    # From any state reached part way, over any rest of the path.
    cut = data.draw(st.integers(min_value=0, max_value=len(path)))
    middle = one_by_one(SESSION.initial(), path[:cut])
    assert SESSION.apply_many(middle, path[cut:]) == one_by_one(middle, path[cut:])


def test_apply_many_on_nothing_is_the_state_itself() -> None:
    state = SESSION.initial()
    assert SESSION.apply_many(state, []) is state


COUNT: Projection[int] = Projection(
    "count", 1, initial=lambda: 0, apply=lambda n, _event: n + 1, state_type=int
)


@given(chains(max_size=10))
def test_a_projection_without_apply_many_folds_one_by_one(path: list[Event]) -> None:
    assert COUNT.apply_many(0, path) == len(path)
    assert fold(COUNT, path) == len(path)


@given(chains(max_size=10), st.integers(min_value=1, max_value=4))
def test_fold_of_an_iterator_in_runs_equals_fold_of_the_list(path: list[Event], run: int) -> None:
    # Runs smaller than the path, so that the iterator is folded in several of them.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(projections.base, "FOLD_RUN", run)

        def each() -> Iterator[Event]:
            yield from path

        assert fold(SESSION, each()) == fold(SESSION, path) == one_by_one(SESSION.initial(), path)


def test_a_session_created_in_a_run_starts_the_state_over() -> None:
    root = create_event()
    turn = next_event(root, TurnAdded(role="user", content="hi", tokens_in=3))
    events = [root, turn, turn, root, turn]
    state = SESSION.apply_many(SESSION.initial(), events)
    assert state == one_by_one(SESSION.initial(), events)
    assert (state.turn_count, state.tokens_in, state.event_count) == (1, 3, 2)
