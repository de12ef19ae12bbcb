"""What the ledger hands out and also keeps cannot be changed through the hand-out.

The fold engine caches session states and writes snapshots from them; the memory
store keeps the events its readers get. A caller changing a dict it was given
must not change the next read, a snapshot, or the store (``ledger.frozen``).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings

from ledger import Ledger
from ledger.config import LedgerConfig
from ledger.events import SessionCreated, TurnAdded, canonical, event_problem, make_event
from ledger.frozen import FrozenDict, FrozenList, freeze, freeze_event
from projections.session import SESSION, state_checksum
from stores.base import FeedStore
from stores.memory import MemoryStore
from tests.strategies import json_values

SESSION_ID = "00000000-0000-4000-8000-000000000000"

_DICT_CHANGES: list[Callable[[dict[str, Any]], object]] = [
    lambda d: d.__setitem__("k", 1),
    lambda d: d.__delitem__(next(iter(d), "k")),
    lambda d: d.update(k=1),
    lambda d: d.setdefault("k", 1),
    lambda d: d.pop("k", None),
    lambda d: d.popitem(),
    lambda d: d.clear(),
    lambda d: d.__ior__({"k": 1}),
]
_LIST_CHANGES: list[Callable[[list[Any]], object]] = [
    lambda v: v.append(1),
    lambda v: v.extend([1]),
    lambda v: v.insert(0, 1),
    lambda v: v.__setitem__(slice(0, 0), [1]),
    lambda v: v.__delitem__(slice(0, 1)),
    lambda v: v.pop(),
    lambda v: v.remove(1),
    lambda v: v.clear(),
    lambda v: v.sort(),
    lambda v: v.reverse(),
    lambda v: v.__iadd__([1]),
    lambda v: v.__imul__(2),
]


def _containers(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _containers(item)
    elif isinstance(value, list | tuple):
        if isinstance(value, list):
            yield value
        for item in value:
            yield from _containers(item)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_a_frozen_value_equals_encodes_as_and_copies_the_value(value: Any) -> None:
    frozen = freeze(value)
    assert frozen == value
    assert msgspec.json.encode(frozen, order="sorted") == msgspec.json.encode(value, order="sorted")
    before = msgspec.json.encode(value)
    for container in _containers(frozen):
        assert type(container) in (FrozenDict, FrozenList)
        changes = _DICT_CHANGES if isinstance(container, dict) else _LIST_CHANGES
        for change in changes:
            with pytest.raises(TypeError, match="read-only"):
                change(container)
    assert msgspec.json.encode(frozen) == before  # every change was refused whole
    if isinstance(value, dict | list) and value:
        assert frozen is not value and type(value) in (dict, list)  # the original stays as it was


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_a_frozen_value_survives_pickle_and_copy(value: Any) -> None:
    frozen = freeze(value)
    again = pickle.loads(pickle.dumps(frozen))
    assert again == value and type(again) is type(frozen)
    assert copy.deepcopy(frozen) == value and copy.copy(frozen) == value
    if isinstance(frozen, FrozenDict | FrozenList):
        changeable = frozen.copy()
        assert type(changeable) in (dict, list) and changeable == value


@settings(max_examples=100, deadline=None)
@given(json_values, json_values)
def test_freezing_an_event_keeps_its_id_and_digest(content: Any, meta: Any) -> None:
    body = TurnAdded(role="user", content=content, metadata={"m": meta}, tool_calls=[content])
    event = make_event(
        session=SESSION_ID, parent=None, seq=1, branch="main", at=1, actor="a", body=body
    )
    frozen = freeze_event(event)
    assert frozen == event and event_problem(frozen) is None
    assert canonical(frozen.body) == canonical(event.body)
    assert type(frozen.body.metadata) is FrozenDict and type(frozen.body.tool_calls) is FrozenList
    empty = make_event(
        session=SESSION_ID, parent=None, seq=1, branch="main", at=1, actor="a",
        body=TurnAdded(role="user", content="hi"),
    )  # fmt: skip
    assert freeze_event(empty) is empty  # nothing in it to freeze: left as it is
    assert event_problem(freeze_event(empty)) is None


def test_a_checkpoint_checksum_does_not_depend_on_the_metadata_being_frozen() -> None:
    body = SessionCreated(user_id="u", agent="a", metadata={"plan": {"tier": [1, 2]}})
    created = make_event(
        session=SESSION_ID, parent=None, seq=0, branch="main", at=1, actor="a", body=body
    )
    state = SESSION.apply(SESSION.initial(), created)
    assert type(state.metadata) is FrozenDict and type(state.metadata["plan"]) is FrozenDict
    plain = msgspec.structs.replace(
        state, metadata=msgspec.json.decode(msgspec.json.encode(state.metadata))
    )
    assert type(plain.metadata) is dict
    assert state_checksum(state) == state_checksum(plain)
    assert state_checksum(state, b"k" * 32) == state_checksum(plain, b"k" * 32)
    assert body.metadata == {"plan": {"tier": [1, 2]}}  # the event's own is not frozen
    assert type(body.metadata["plan"]) is dict


# --- every backend ------------------------------------------------------------------


async def test_a_caller_cannot_change_a_cached_state_nor_the_snapshots_written_from_it(
    make_store: Callable[[], FeedStore],
) -> None:
    config = LedgerConfig(snapshot_every=4)
    async with Ledger(make_store(), config) as led:
        created = await led.create(user_id="u", agent="a", metadata={"plan": "free", "tags": ["a"]})
        sid = created.session_id
        state = await led.state(sid)
        with pytest.raises(TypeError, match="read-only"):
            state.metadata["plan"] = "enterprise"
        with pytest.raises(TypeError, match="read-only"):
            state.metadata["tags"].append("b")
        with pytest.raises(TypeError, match="read-only"):
            created.metadata.update(plan="enterprise")
        turns = [await led.add_turn(sid, role="user", content=f"turn {i}") for i in range(10)]
        assert (await led.state(sid)).metadata == {"plan": "free", "tags": ["a"]}

        # A ledger of its own over the same store folds from the snapshots written
        # while the first one's states were handed out.
        fresh = Ledger(led.store, config)
        snapshot_at = turns[7]
        assert snapshot_at.seq == 8  # a multiple of snapshot_every: a snapshot is due after it
        assert await led.store.get_snapshot(sid, SESSION.key, snapshot_at.id) is not None
        again = await fresh.state(sid, at=snapshot_at.id)
        assert again.metadata == {"plan": "free", "tags": ["a"]} and again.turn_count == 8
        assert type(again.metadata) is FrozenDict and type(again.metadata["tags"]) is FrozenList
        assert (await fresh.verify(sid)).ok


async def test_the_memory_store_keeps_events_its_callers_cannot_change() -> None:
    async with Ledger(MemoryStore(), LedgerConfig()) as led:
        sid = (await led.create(user_id="u", agent="a")).session_id
        appended = await led.add_turn(
            sid, role="user", content={"text": "hi"}, metadata={"k": 1}, tool_calls=[{"n": 1}]
        )
        appended.body.content["text"] = "changed"  # the caller's own copy
        appended.body.tool_calls.append({"n": 2})
        stored = await led.store.get(appended.id)
        assert stored.body.content == {"text": "hi"} and stored.body.tool_calls == [{"n": 1}]
        with pytest.raises(TypeError, match="read-only"):
            stored.body.content["text"] = "changed"
        with pytest.raises(TypeError, match="read-only"):
            stored.body.tool_calls[0]["n"] = 2
        with pytest.raises(TypeError, match="read-only"):
            (await led.turns(sid))[-1].metadata["k"] = 2
        assert (await led.verify(sid)).ok
