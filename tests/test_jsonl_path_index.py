"""The JSONL store's ``path_index``: the fold engine's walk back, read without decoding.

It must give exactly ``(id, seq, parent)`` of what ``ancestors`` gives, on any tree
and window size; a line it cannot read at a glance is decoded (or named, when
damaged); and a first fold through it equals the fold from the root.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stores.jsonl.reads
from bench.content import chain
from ledger.errors import EventNotFoundError, IntegrityError
from ledger.events import Event, new_session_id
from projections.base import fold
from projections.engine import FoldEngine, PathIndex
from projections.session import SESSION
from stores.base import AppendRequest
from stores.jsonl import JSONLStore
from tests.test_jsonl import create, request, turn


def steps(events: Sequence[Event]) -> list[tuple[str, int, str | None]]:
    return [(e.id, e.seq, e.parent) for e in events]


async def grow_tree(store: JSONLStore, ops: Sequence[tuple[int, int, int]]) -> list[Event]:
    """A session whose branches fork and grow in turns, so their lines interleave.

    Each op ``(which, where, length)`` extends branch ``which`` (modulo the branches
    so far, one more meaning a new branch forked at event ``where``) by ``length``.
    """
    events = [create()]
    await store.append(request(events, None, status="active"))
    heads = {"main": events[0]}
    for which, where, length in ops:
        names = list(heads)
        if which % (len(names) + 1) == len(names):
            name, parent, expected = f"b{len(names)}", events[where % len(events)], None
        else:
            name = names[which % len(names)]
            parent = heads[name]
            expected = parent.id
        batch = [turn(parent, branch=name)]
        for _ in range(length - 1):
            batch.append(turn(batch[-1]))
        await store.append(request(batch, expected))
        heads[name] = batch[-1]
        events += batch
    return events


async def check_tree(ops: Sequence[tuple[int, int, int]], limits: Sequence[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with JSONLStore(Path(tmp)) as store:
            events = await grow_tree(store, ops)
            for event in events:
                whole = await store.ancestors(event.id)
                assert await store.path_index(event.id, 10**6) == steps(whole)
                for limit in limits:
                    expected = steps(await store.ancestors(event.id, limit))
                    assert await store.path_index(event.id, limit) == expected
                    assert expected == steps(whole)[: max(limit, 0)]


tree_ops = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 200), st.integers(1, 6)), max_size=25
)


@pytest.mark.parametrize("window", [1, 2, 5, 4096])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=tree_ops, limits=st.lists(st.integers(-1, 40), min_size=1, max_size=4))
def test_path_index_is_the_ids_seqs_and_parents_of_ancestors(
    window: int, ops: list[tuple[int, int, int]], limits: list[int]
) -> None:
    # Small windows put window edges and other branches' lines all along the walk.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stores.jsonl.reads, "_PATH_WINDOW", window)
        asyncio.run(check_tree(ops, limits))


@pytest.mark.parametrize(
    ("limit", "expected"), [(0, []), (1, [9]), (3, [9, 8, 7]), (10, list(range(9, -1, -1)))]
)
async def test_path_index_gives_at_most_limit_events_newest_first(
    tmp_path: Path, limit: int, expected: list[int]
) -> None:
    async with JSONLStore(tmp_path) as store:
        events = [create()]
        await store.append(request(events, None, status="active"))
        events += [turn(events[0])]
        for _ in range(8):
            events.append(turn(events[-1]))
        await store.append(request(events[1:], events[0].id))
        got = await store.path_index(events[-1].id, limit)
        assert got == steps([events[seq] for seq in expected])
        assert await store.path_index(events[-1].id, 10**6) == steps(events[::-1])


async def test_path_index_of_an_unknown_event_raises_event_not_found(tmp_path: Path) -> None:
    async with JSONLStore(tmp_path) as store:
        root = create()
        await store.append(request([root], None, status="active"))
        with pytest.raises(EventNotFoundError, match="no-such-event"):
            await store.path_index("no-such-event", 10)


async def six_events(store: JSONLStore) -> list[Event]:
    events = [create()]
    await store.append(request(events, None, status="active"))
    events += [turn(events[0])]
    for _ in range(4):
        events.append(turn(events[-1]))
    await store.append(request(events[1:], events[0].id))
    return events


def rewrite(store: JSONLStore, event: Event, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` (as long) in ``event``'s line, under the open store."""
    path = store.directory / "sessions" / f"{event.session}.jsonl"
    data = path.read_bytes()
    start = data.rindex(b"\n", 0, data.index(b'"id":"%s"' % event.id.encode())) + 1
    end = data.index(b"\n", start)
    line = data[start:end]
    assert len(old) == len(new) and old in line
    path.write_bytes(data[:start] + line.replace(old, new, 1) + data[end:])


async def test_a_line_in_another_field_order_is_decoded_not_misread(tmp_path: Path) -> None:
    # The same event with its seq and branch swapped: a valid line, but not as this
    # code writes one, so it is decoded, and gives the same step.
    async with JSONLStore(tmp_path) as store:
        events = await six_events(store)
        e = events[3]
        rewrite(store, e, b'"seq":3,"branch":"main"', b'"branch":"main","seq":3')
        assert await store.path_index(events[-1].id, 100) == steps(events[::-1])


async def test_a_damaged_line_on_the_path_is_named(tmp_path: Path) -> None:
    async with JSONLStore(tmp_path) as store:
        events = await six_events(store)
        rewrite(store, events[3], b'"seq":3,', b'"seq":x,')
        with pytest.raises(IntegrityError, match=r"Damaged line in .*, line 5"):
            await store.path_index(events[-1].id, 100)


async def test_a_broken_parent_link_is_named_as_ancestors_names_it(tmp_path: Path) -> None:
    # A fork's parent (written out: not the line before) now names a later event: the
    # walk must not follow it.
    async with JSONLStore(tmp_path) as store:
        events = await six_events(store)
        fork = turn(events[2], branch="side")
        await store.append(request([fork], None))
        later = turn(events[-1])  # after the fork's line: its parent written out too
        await store.append(request([later], events[-1].id))
        rewrite(store, fork, events[2].id.encode(), later.id.encode())
        with pytest.raises(IntegrityError) as by_index:
            await store.path_index(fork.id, 100)
        with pytest.raises(IntegrityError) as by_ancestors:
            await store.ancestors(fork.id, 100)
        assert str(by_index.value) == str(by_ancestors.value)
        assert fork.id in str(by_index.value)


class CountingJSONLStore(JSONLStore):
    """A real JSONL store that counts the steps its path index gives."""

    indexed = 0

    async def path_index(self, event_id: str, limit: int) -> list[tuple[str, int, str | None]]:
        found = await super().path_index(event_id, limit)
        self.indexed += len(found)
        return found


@pytest.mark.parametrize("held", [0, 100, 10**9])
async def test_a_first_fold_through_the_path_index_equals_the_fold_from_the_root(
    tmp_path: Path, held: int
) -> None:
    sid = new_session_id()
    events = list(chain(sid, 1_500, "a turn"))
    async with CountingJSONLStore(tmp_path) as store:
        assert isinstance(store, PathIndex)
        await store.append(
            AppendRequest(
                session_id=sid,
                branch="main",
                expected_head=None,
                events=events[:1],
                status="active",
            )
        )
        await store.append(
            AppendRequest(
                session_id=sid, branch="main", expected_head=events[0].id, events=events[1:]
            )
        )
        # A branch forked at depth 700, its lines after all of main's.
        fork = [turn(events[700], branch="side")]
        for _ in range(40):
            fork.append(turn(fork[-1]))
        await store.append(request(fork, None))
        for head, path in ((events[-1], events), (fork[-1], events[:701] + fork)):
            engine = FoldEngine(store, snapshot_every=8)
            engine.held_events = held
            assert await engine.state_at(SESSION, sid, head.id) == fold(SESSION, path)
        assert store.indexed > 1_000  # the walks went through the path index
