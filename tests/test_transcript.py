"""The transcript projection and the context window."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.events import (
    Body,
    Checkpointed,
    Event,
    MetadataSet,
    Recorded,
    SessionCreated,
    TurnAdded,
    make_event,
    new_session_id,
)
from projections.base import fold
from projections.transcript import TRANSCRIPT, Turn, context_window, turns_of

ROLES = ("system", "user", "assistant", "tool")
# JSON takes integers of any size but msgpack (the snapshot format) only 64-bit ones.
ints = st.integers(-(2**63), 2**64 - 1)


def build_path(bodies: Sequence[Body], branch: str = "main") -> list[Event]:
    """A path rooted at a SessionCreated, each event chained to the one before."""
    session = new_session_id()
    events: list[Event] = []
    parent: str | None = None
    for seq, body in enumerate([SessionCreated(user_id="u", agent="a"), *bodies]):
        event = make_event(
            session=session,
            parent=parent,
            seq=seq,
            branch=branch,
            at=1_000 + seq,
            actor="tester",
            body=body,
        )
        events.append(event)
        parent = event.id
    return events


def turn(role: str = "user", tokens_in: int = 0, tokens_out: int = 0, n: int = 0) -> Turn:
    return Turn(
        event_id=f"e{n}",
        role=role,
        content=f"turn {n}",
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        at=n,
        branch="main",
        seq=n,
    )


def numbered(*specs: tuple[str, int]) -> list[Turn]:
    """Turns from (role, tokens) pairs, numbered in order."""
    return [turn(role, tokens_out=tokens, n=n) for n, (role, tokens) in enumerate(specs)]


turn_bodies = st.builds(
    TurnAdded,
    role=st.sampled_from(ROLES),
    content=st.one_of(st.text(max_size=10), st.dictionaries(st.text(max_size=3), ints)),
    tokens_in=st.integers(0, 500),
    tokens_out=st.integers(0, 500),
    cost=st.floats(0, 1, allow_nan=False),
    model=st.none() | st.just("m-1"),
    turn_id=st.none() | st.text(min_size=1, max_size=5),
)
other_bodies = st.one_of(
    st.builds(Recorded, type=st.sampled_from(["tool", "delta"]), data=ints),
    st.builds(MetadataSet, metadata=st.dictionaries(st.text(max_size=3), ints)),
    st.builds(Checkpointed, entry=st.just("x" * 64), checksum=st.just("y" * 64)),
)
paths = st.lists(st.one_of(turn_bodies, other_bodies), max_size=25).map(build_path)

turn_lists = st.lists(st.tuples(st.sampled_from(ROLES), st.integers(0, 50)), max_size=20).map(
    lambda specs: numbered(*specs)
)


# turns_of and the TRANSCRIPT fold


def test_turns_of_picks_the_turn_added_events_in_order() -> None:
    path = build_path(
        [
            TurnAdded(role="system", content="be brief"),
            Recorded(type="tool", data={"name": "search"}),
            TurnAdded(
                role="user",
                content={"text": "hi"},
                name="ann",
                tokens_in=3,
                tokens_out=4,
                cost=0.5,
                model="m-1",
                tool_calls=[{"id": 1}],
                turn_id="t1",
                metadata={"k": "v"},
            ),
            MetadataSet(metadata={"a": 1}),
            TurnAdded(role="assistant", content="hello"),
        ]
    )
    turns = turns_of(path)
    assert [t.event_id for t in turns] == [path[1].id, path[3].id, path[5].id]
    assert [t.role for t in turns] == ["system", "user", "assistant"]
    user = turns[1]
    assert user == Turn(
        event_id=path[3].id,
        role="user",
        content={"text": "hi"},
        name="ann",
        tokens_in=3,
        tokens_out=4,
        cost=0.5,
        model="m-1",
        tool_calls=[{"id": 1}],
        turn_id="t1",
        metadata={"k": "v"},
        at=path[3].at,
        branch="main",
        seq=3,
    )
    assert user.tokens == 7


def test_turns_of_an_empty_path_or_one_without_turns() -> None:
    assert turns_of([]) == []
    assert turns_of(build_path([Recorded(type="x")])) == []


def test_turn_from_event() -> None:
    path = build_path([TurnAdded(role="user", content="hi")])
    assert Turn.from_event(path[1]) == turns_of(path)[0]
    with pytest.raises(ValueError, match="Not a TurnAdded event"):
        Turn.from_event(path[0])


def test_transcript_is_named_and_versioned() -> None:
    assert TRANSCRIPT.name == "transcript"
    assert TRANSCRIPT.version == 1
    assert TRANSCRIPT.initial() == ()


@given(paths)
def test_transcript_fold_equals_turns_of(path: list[Event]) -> None:
    assert fold(TRANSCRIPT, path) == tuple(turns_of(path))


@given(paths, st.data())
def test_folding_a_prefix_then_the_rest_equals_folding_the_whole(
    path: list[Event], data: st.DataObject
) -> None:
    split = data.draw(st.integers(0, len(path)), label="split")
    whole = fold(TRANSCRIPT, path)
    prefix = fold(TRANSCRIPT, path[:split])
    assert fold(TRANSCRIPT, path[split:], prefix) == whole
    # The same holds through a snapshot: encode the prefix state and resume from it.
    assert fold(TRANSCRIPT, path[split:], TRANSCRIPT.decode(TRANSCRIPT.encode(prefix))) == whole


def test_apply_does_not_mutate_its_state() -> None:
    path = build_path([TurnAdded(role="user", content="a"), TurnAdded(role="user", content="b")])
    before = fold(TRANSCRIPT, path[:2])
    copy = msgspec.msgpack.decode(msgspec.msgpack.encode(before), type=tuple[Turn, ...])
    fold(TRANSCRIPT, path[2:], before)
    assert before == copy


# context_window


def test_no_limits_keeps_everything() -> None:
    turns = numbered(("system", 5), ("user", 5), ("assistant", 5))
    assert context_window(turns) == turns


def test_last_keeps_the_newest_non_system_turns_and_every_system_turn() -> None:
    turns = numbered(
        ("system", 1), ("user", 1), ("assistant", 1), ("system", 1), ("user", 1), ("assistant", 1)
    )
    window = context_window(turns, last=2)
    assert [t.event_id for t in window] == ["e0", "e3", "e4", "e5"]
    assert [t.event_id for t in context_window(turns, last=0)] == ["e0", "e3"]
    assert context_window(turns, last=100) == turns


def test_max_tokens_keeps_the_newest_turns_that_fit() -> None:
    turns = numbered(("system", 10), ("user", 30), ("assistant", 20), ("user", 25))
    # 10 for the system turn, then 25 and 20 fit in 60; 30 more does not.
    assert [t.event_id for t in context_window(turns, max_tokens=60)] == ["e0", "e2", "e3"]
    assert [t.event_id for t in context_window(turns, max_tokens=85)] == ["e0", "e1", "e2", "e3"]
    assert [t.event_id for t in context_window(turns, max_tokens=10)] == ["e0"]


def test_the_window_is_contiguous_it_never_skips_to_fit_an_older_turn() -> None:
    turns = numbered(("user", 1), ("assistant", 50), ("user", 5))
    # The 1-token turn would fit after the 50-token one is refused, but taking it
    # would leave a hole in the conversation.
    assert [t.event_id for t in context_window(turns, max_tokens=10)] == ["e2"]


def test_last_and_max_tokens_together_apply_both() -> None:
    turns = numbered(("user", 1), ("assistant", 1), ("user", 1), ("assistant", 50))
    assert [t.event_id for t in context_window(turns, last=3, max_tokens=100)] == [
        "e1",
        "e2",
        "e3",
    ]
    assert context_window(turns, last=3, max_tokens=10) == []
    assert [t.event_id for t in context_window(turns[:3], last=2, max_tokens=100)] == ["e1", "e2"]


def test_tokens_count_both_directions() -> None:
    turns = [turn("user", tokens_in=4, tokens_out=4, n=0), turn("user", tokens_in=3, n=1)]
    assert [t.event_id for t in context_window(turns, max_tokens=10)] == ["e1"]
    assert context_window(turns, max_tokens=11) == turns


def test_keep_system_off_windows_system_turns_like_any_other() -> None:
    turns = numbered(("system", 10), ("user", 1), ("assistant", 1))
    assert [t.event_id for t in context_window(turns, last=2, keep_system=False)] == ["e1", "e2"]
    assert context_window(turns, last=3, keep_system=False) == turns
    assert [t.event_id for t in context_window(turns, max_tokens=5, keep_system=False)] == [
        "e1",
        "e2",
    ]
    assert context_window(turns, max_tokens=12, keep_system=False) == turns


def test_system_turns_count_toward_the_budget() -> None:
    turns = numbered(("system", 8), ("user", 3), ("assistant", 2))
    assert [t.event_id for t in context_window(turns, max_tokens=10)] == ["e0", "e2"]


def test_system_turns_over_budget_are_all_kept_and_nothing_else() -> None:
    turns = numbered(("system", 30), ("user", 0), ("system", 30), ("assistant", 1))
    assert [t.event_id for t in context_window(turns, max_tokens=50)] == ["e0", "e2"]
    assert [t.event_id for t in context_window(turns, max_tokens=0)] == ["e0", "e2"]


def test_a_budget_exactly_spent_by_system_turns_still_takes_free_turns() -> None:
    turns = numbered(("system", 10), ("user", 0), ("assistant", 1))
    assert [t.event_id for t in context_window(turns, max_tokens=10)] == ["e0"]
    assert [t.event_id for t in context_window(turns[:2], max_tokens=10)] == ["e0", "e1"]


def test_custom_count_tokens() -> None:
    turns = [
        Turn(event_id=f"e{n}", role="user", content=text, at=n, branch="main", seq=n)
        for n, text in enumerate(["aaaa", "bb", "cccccc"])
    ]
    seen: list[str] = []

    def chars(t: Turn) -> int:
        seen.append(t.event_id)
        return len(t.content)

    assert [t.event_id for t in context_window(turns, max_tokens=8, count_tokens=chars)] == [
        "e1",
        "e2",
    ]
    # Counting stops at the first turn that does not fit: a tokenizer is not cheap.
    assert seen == ["e2", "e1", "e0"]
    assert context_window(turns, max_tokens=0, count_tokens=chars) == []


def test_accepts_any_iterable() -> None:
    turns = numbered(("user", 1), ("assistant", 1))
    assert context_window(iter(turns), last=1) == turns[1:]
    assert context_window((), last=3, max_tokens=3) == []


@pytest.mark.parametrize(
    ("last", "max_tokens", "message"),
    [
        (-1, None, "last must be >= 0"),
        (None, -1, "max_tokens must be >= 0"),
        (1, -5, "max_tokens must be >= 0"),
    ],
)
def test_negative_limits_are_refused(
    last: int | None, max_tokens: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        context_window(numbered(("user", 1)), last=last, max_tokens=max_tokens)


@given(
    turn_lists,
    st.none() | st.integers(0, 25),
    st.none() | st.integers(0, 400),
)
def test_window_is_the_system_turns_and_a_suffix_of_the_others_in_order(
    turns: list[Turn], last: int | None, max_tokens: int | None
) -> None:
    window = context_window(turns, last=last, max_tokens=max_tokens)
    ids = [t.event_id for t in window]
    system = [t for t in turns if t.role == "system"]
    others = [t for t in turns if t.role != "system"]
    kept_others = [t for t in window if t.role != "system"]
    # In the original order, every system turn kept.
    assert ids == [t.event_id for t in turns if t.event_id in set(ids)]
    assert [t for t in window if t.role == "system"] == system
    # The others form a suffix: a contiguous window ending at the newest turn.
    assert kept_others == (others[len(others) - len(kept_others) :] if kept_others else [])
    if last is not None:
        assert len(kept_others) <= last
    if max_tokens is not None:
        system_tokens = sum(t.tokens for t in system)
        total = system_tokens + sum(t.tokens for t in kept_others)
        if system_tokens > max_tokens:
            assert kept_others == []
        else:
            assert total <= max_tokens
    # Maximal: the next older turn was refused for a reason.
    if len(kept_others) < len(others):
        refused = others[len(others) - len(kept_others) - 1]
        by_count = last is not None and len(kept_others) == last
        by_budget = max_tokens is not None and (
            sum(t.tokens for t in system) + sum(t.tokens for t in kept_others) + refused.tokens
            > max_tokens
        )
        assert by_count or by_budget


@given(turn_lists, st.none() | st.integers(0, 25), st.none() | st.integers(0, 400))
def test_without_keep_system_the_window_is_a_suffix(
    turns: list[Turn], last: int | None, max_tokens: int | None
) -> None:
    window = context_window(turns, last=last, max_tokens=max_tokens, keep_system=False)
    assert window == (turns[len(turns) - len(window) :] if window else [])
    if last is not None:
        assert len(window) <= last
    if max_tokens is not None:
        assert sum(t.tokens for t in window) <= max_tokens
