"""The tree projection: branches, heads, fork points and counts."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.events import (
    Body,
    Branched,
    Checkpointed,
    Closed,
    Event,
    Recorded,
    Restored,
    SessionCreated,
    TurnAdded,
    make_event,
    new_session_id,
)
from projections.base import fold
from projections.tree import TREE, BranchInfo, Tree


class Session:
    """Appends events the way the ledger does: on a branch, after its head."""

    def __init__(self) -> None:
        self.id = new_session_id()
        self.events: list[Event] = []
        self.heads: dict[str, Event] = {}
        self.clock = 1_000
        self.append("main", SessionCreated(user_id="u", agent="a"))

    def append(self, branch: str, body: Body, parent: Event | None = None) -> Event:
        if parent is None:
            parent = self.heads.get(branch)
        self.clock += 10
        event = make_event(
            session=self.id,
            parent=None if parent is None else parent.id,
            seq=0 if parent is None else parent.seq + 1,
            branch=branch,
            at=self.clock,
            actor="tester",
            body=body,
        )
        self.events.append(event)
        self.heads[branch] = event
        return event

    def turn(self, branch: str = "main", text: str = "hi") -> Event:
        return self.append(branch, TurnAdded(role="user", content=text))

    def branch(self, name: str, fork_point: Event) -> Event:
        return self.append(name, Branched(name=name, fork_point=fork_point.id), parent=fork_point)

    @property
    def root(self) -> Event:
        return self.events[0]


def test_the_empty_tree() -> None:
    tree = TREE.initial()
    assert tree == Tree()
    assert tree.root is None
    assert tree.branches == {}
    assert tree.branch_names() == []
    assert tree.event_count == 0
    assert TREE.name == "tree"
    assert TREE.version == 1


def test_main_only() -> None:
    s = Session()
    s.turn()
    last = s.turn()
    tree = fold(TREE, s.events)
    assert tree.session_id == s.id
    assert tree.root == s.root.id
    assert tree.branch_names() == ["main"]
    assert tree.branches["main"] == BranchInfo(
        name="main",
        head=last.id,
        fork_point=None,
        forked_from=None,
        created_at=s.root.at,
        head_at=last.at,
        event_count=3,
        head_seq=2,
    )
    assert tree.event_count == 3


def test_a_branch_from_the_middle_of_main() -> None:
    s = Session()
    middle = s.turn(text="one")
    s.turn(text="two")
    main_head = s.turn(text="three")
    branched = s.branch("alt", middle)
    alt_head = s.turn("alt")
    tree = fold(TREE, s.events)
    assert tree.branch_names() == ["main", "alt"]
    assert tree.branches["main"].head == main_head.id
    assert tree.branches["main"].event_count == 4
    alt = tree.branches["alt"]
    assert alt == BranchInfo(
        name="alt",
        head=alt_head.id,
        fork_point=middle.id,
        forked_from="main",
        created_at=branched.at,
        head_at=alt_head.at,
        event_count=2,
        head_seq=middle.seq + 2,
    )
    assert tree.root == s.root.id


def test_a_branch_of_a_branch() -> None:
    s = Session()
    s.turn()
    b1_fork = s.turn()
    s.branch("b1", b1_fork)
    b1_middle = s.turn("b1")
    s.turn("b1")
    s.branch("b2", b1_middle)
    s.turn("b2")
    s.branch("b3", s.root)
    tree = fold(TREE, s.events)
    assert tree.branch_names() == ["main", "b1", "b2", "b3"]
    assert tree.branches["b1"].forked_from == "main"
    assert tree.branches["b2"].fork_point == b1_middle.id
    assert tree.branches["b2"].forked_from == "b1"
    assert tree.branches["b2"].head_seq == b1_middle.seq + 2
    assert tree.branches["b3"].fork_point == s.root.id
    assert tree.branches["b3"].forked_from == "main"
    assert tree.branches["b3"].head_seq == 1
    assert tree.branch_of(b1_middle.id) == "b1"
    assert tree.branch_of(s.root.id) == "main"
    assert tree.branch_of("no-such-event") is None


def test_heads_and_counts_after_interleaved_appends() -> None:
    s = Session()
    s.branch("a", s.root)
    s.branch("b", s.root)
    expected = {"main": 1, "a": 1, "b": 1}
    for step in range(12):
        name = ("main", "a", "b", "a")[step % 4]
        s.turn(name, text=str(step))
        expected[name] += 1
        tree = fold(TREE, s.events)
        for branch, count in expected.items():
            info = tree.branches[branch]
            assert info.event_count == count
            assert info.head == s.heads[branch].id
            assert info.head_at == s.heads[branch].at
            assert info.head_seq == s.heads[branch].seq
    assert tree.event_count == len(s.events)


def test_a_restore_on_main_moves_mains_head_back() -> None:
    s = Session()
    entry = s.turn(text="good")
    checkpoint = s.append("main", Checkpointed(entry=entry.id, checksum="0" * 64, label="ok"))
    s.turn(text="bad")
    s.turn(text="worse")
    restored = s.append("main", Restored(checkpoint=checkpoint.id, entry=entry.id), parent=entry)
    tree = fold(TREE, s.events)
    main = tree.branches["main"]
    assert main.head == restored.id
    assert main.head_seq == entry.seq + 1
    assert main.event_count == 6
    assert main.fork_point is None
    assert list(tree.branches) == ["main"]
    after = s.turn()
    assert fold(TREE, [after], tree).branches["main"].head_seq == entry.seq + 2


def test_a_branch_forked_before_a_close_is_its_own_branch() -> None:
    s = Session()
    before = s.turn()
    s.append("main", Closed(reason="done"))
    s.branch("retry", before)
    tree = fold(TREE, s.events)
    assert tree.branches["retry"].forked_from == "main"
    assert tree.branches["main"].event_count == 3


def test_equal_creation_times_keep_creation_order() -> None:
    s = Session()
    for name in ("zeta", "alpha", "mid"):
        s.branch(name, s.root)
    same_time = [msgspec.structs.replace(e, at=5) for e in s.events]
    tree = fold(TREE, same_time)
    assert tree.branch_names() == ["main", "zeta", "alpha", "mid"]


def test_a_first_event_of_an_unknown_kind_still_starts_its_branch() -> None:
    # A store could hold a branch whose first event is not Branched (an import,
    # a bug elsewhere); the fold records it, forking at the event's parent.
    s = Session()
    fork = s.turn()
    odd = s.append("odd", Recorded(type="x"), parent=fork)
    tree = fold(TREE, s.events)
    assert tree.branches["odd"].fork_point == fork.id
    assert tree.branches["odd"].forked_from == "main"
    assert tree.branches["odd"].head == odd.id


def test_state_round_trips_through_encode_and_decode() -> None:
    s = Session()
    s.turn()
    s.branch("alt", s.events[1])
    s.turn("alt")
    s.turn()
    tree = fold(TREE, s.events)
    decoded = TREE.decode(TREE.encode(tree))
    assert decoded == tree
    assert decoded.branch_names() == tree.branch_names()
    assert decoded.branch_of(s.events[-2].id) == "alt"
    # A state resumed from a snapshot folds on as the original would.
    more = s.turn("alt")
    assert fold(TREE, [more], decoded) == fold(TREE, [more], tree)


def test_apply_does_not_mutate_its_state() -> None:
    s = Session()
    for _ in range(6):
        s.turn()
    before = fold(TREE, s.events)
    snapshot = TREE.encode(before)
    s.branch("alt", s.events[2])
    s.turn("alt")
    fold(TREE, s.events[-2:], before)
    assert TREE.encode(before) == snapshot


# Random sessions: ("turn", b) appends on branch number b; ("branch", i) forks a
# new branch at event number i; ("restore", b, i) restores branch number b to the
# i-th event of its current path.
operations = st.lists(
    st.one_of(
        st.tuples(st.just("turn"), st.integers(0, 10)),
        st.tuples(st.just("branch"), st.integers(0, 1_000)),
        st.tuples(st.just("restore"), st.integers(0, 10), st.integers(0, 1_000)),
    ),
    max_size=40,
)


def random_session(ops: list[tuple[object, ...]]) -> Session:
    s = Session()
    by_id = {s.root.id: s.root}
    for op in ops:
        names = list(s.heads)
        if op[0] == "turn":
            s.turn(names[int(str(op[1])) % len(names)])
        elif op[0] == "branch":
            fork = s.events[int(str(op[1])) % len(s.events)]
            s.branch(f"b{len(names)}", fork)
        else:
            name = names[int(str(op[1])) % len(names)]
            path = [s.heads[name]]
            while path[-1].parent is not None:
                path.append(by_id[path[-1].parent])
            entry = path[int(str(op[2])) % len(path)]
            s.append(name, Restored(checkpoint="c" * 64, entry=entry.id), parent=entry)
        by_id[s.events[-1].id] = s.events[-1]
    return s


@given(operations)
def test_the_tree_matches_the_heads_the_ledger_tracked(ops: list[tuple[object, ...]]) -> None:
    s = random_session(ops)
    tree = fold(TREE, s.events)
    assert list(tree.branches) == list(s.heads)
    for name, head in s.heads.items():
        info = tree.branches[name]
        assert info.head == head.id
        assert info.head_seq == head.seq
        assert info.event_count == sum(1 for e in s.events if e.branch == name)
    for event in s.events:
        assert tree.branch_of(event.id) == event.branch
        if isinstance(event.body, Branched):
            assert tree.branches[event.branch].forked_from == tree.branch_of(event.body.fork_point)
    assert tree.event_count == len(s.events)


@given(operations, st.data())
def test_folding_a_prefix_then_the_rest_equals_folding_the_whole(
    ops: list[tuple[object, ...]], data: st.DataObject
) -> None:
    events = random_session(ops).events
    split = data.draw(st.integers(0, len(events)), label="split")
    whole = fold(TREE, events)
    prefix = fold(TREE, events[:split])
    assert fold(TREE, events[split:], prefix) == whole
    assert fold(TREE, events[split:], TREE.decode(TREE.encode(prefix))) == whole


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 8, 9, 100])
def test_the_event_index_finds_every_event(count: int) -> None:
    s = Session()
    for _ in range(count):
        s.turn()
    tree = fold(TREE, s.events)
    assert all(tree.branch_of(e.id) == "main" for e in s.events)
    # The binary-counter layout: one level per set bit of the event count.
    assert len(tree.event_branches) == bin(len(s.events)).count("1")
