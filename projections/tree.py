"""The tree of a session: its branches, their heads, fork points and counts.

Unlike the path projections, ``TREE`` folds *all* of a session's events in
append order, since a path shows one branch and the tree is every branch::

    tree = fold(TREE, session_events)
    for name in tree.branch_names():
        info = tree.branches[name]
        print(name, info.head, info.forked_from, info.event_count)

A branch starts at its first event: the root ``SessionCreated`` for ``main``, a
``Branched`` event for the others. Every event moves its own branch's head, a
``Restored`` one included: its parent is an older event, but its branch is the
branch it restores.
"""

from __future__ import annotations

from typing import TypeAlias

import msgspec

from ledger.events import Branched, Event, SessionCreated
from projections.base import Projection

__all__ = ["TREE", "BranchInfo", "Tree"]

# Which branch each event of the session was appended on, as a stack of frozen
# dicts whose sizes halve from bottom to top, merged like a binary counter
# (Bentley and Saxe's logarithmic method). A fold state must not be mutated,
# and copying one dict of every id on each event would make a fold quadratic;
# here an id is copied O(log n) times in its life, so an event costs amortized
# O(log n) copies and a lookup O(log n) probes. Lookups happen only when a
# branch starts. The layout depends only on the number of events, so a state
# folded in two steps equals one folded at once.
_Index: TypeAlias = tuple[dict[str, str], ...]


def _index_add(index: _Index, event_id: str, branch: str) -> _Index:
    levels = [*index, {event_id: branch}]
    while len(levels) > 1 and len(levels[-2]) <= len(levels[-1]):
        newer = levels.pop()
        levels[-1] = {**levels[-1], **newer}
    return tuple(levels)


def _index_get(index: _Index, event_id: str) -> str | None:
    for level in index:
        branch = level.get(event_id)
        if branch is not None:
            return branch
    return None


class BranchInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One branch: where it forked and where its head is now."""

    name: str
    head: str
    fork_point: str | None
    """The parent of the branch's first event; ``None`` for the root's branch."""
    forked_from: str | None
    """The branch the fork point was appended on (``None`` if it is not in the tree)."""
    created_at: int
    head_at: int
    event_count: int
    """Events appended with this branch name (its share of the tree, not its path length)."""
    head_seq: int


class Tree(msgspec.Struct, frozen=True, kw_only=True):
    """A session's branches; the empty tree (no event folded yet) has no root."""

    session_id: str = ""
    root: str | None = None
    branches: dict[str, BranchInfo] = {}
    event_branches: _Index = ()
    """Internal index of event id to branch; use ``branch_of``."""

    def branch_names(self) -> list[str]:
        """Branch names, oldest first (creation order breaks ties)."""
        # The dict keeps creation order (a branch is only ever replaced in
        # place), and sorted() is stable, so equal timestamps keep it.
        return sorted(self.branches, key=lambda name: self.branches[name].created_at)

    def branch_of(self, event_id: str) -> str | None:
        """The branch an event of this session was appended on, or ``None``."""
        return _index_get(self.event_branches, event_id)

    @property
    def event_count(self) -> int:
        """Every event folded into the tree."""
        return sum(info.event_count for info in self.branches.values())


def _initial() -> Tree:
    return Tree()


def _apply(tree: Tree, event: Event) -> Tree:
    name = event.branch
    current = tree.branches.get(name)
    if current is None:
        # A branch starts at its first event. Well-formed trees start one only at
        # SessionCreated or Branched; any other kind is taken as forking at its
        # parent, so that a fold never fails on what a store holds.
        body = event.body
        fork_point = body.fork_point if isinstance(body, Branched) else event.parent
        info = BranchInfo(
            name=name,
            head=event.id,
            fork_point=fork_point,
            forked_from=None if fork_point is None else tree.branch_of(fork_point),
            created_at=event.at,
            head_at=event.at,
            event_count=1,
            head_seq=event.seq,
        )
    else:
        info = msgspec.structs.replace(
            current,
            head=event.id,
            head_at=event.at,
            event_count=current.event_count + 1,
            head_seq=event.seq,
        )
    root = tree.root
    if root is None and (isinstance(event.body, SessionCreated) or event.parent is None):
        root = event.id
    # Copying the branch table is O(branches), which the ledger's limits bound.
    return Tree(
        session_id=tree.session_id or event.session,
        root=root,
        branches={**tree.branches, name: info},
        event_branches=_index_add(tree.event_branches, event.id, name),
    )


TREE: Projection[Tree] = Projection(
    "tree",
    1,
    initial=_initial,
    apply=_apply,
    state_type=Tree,
)
"""The tree of branches, folded over all of a session's events in append order."""
