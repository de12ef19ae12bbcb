"""verify names the first bad event of a tampered SQLite store, whatever was changed."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import Ledger
from ledger.events import (
    Event,
    SessionCreated,
    TurnAdded,
    compute_body_digest,
    compute_id,
    decode_event,
    encode_event,
)
from stores.memory import MemoryStore


async def build(path: Path) -> tuple[str, list[str]]:
    """A session with turns, a checkpoint and a branch; its id and event ids in append order."""
    async with Ledger.open(f"sqlite:///{path}") as led:
        s = await led.create(user_id="u", agent="a")
        for i in range(4):
            await led.add_turn(s.session_id, role="user", content=f"turn {i}", tokens_in=i)
        cp = await led.checkpoint(s.session_id, label="four")
        await led.branch(s.session_id, "alt", at=cp.entry)
        await led.add_turn(s.session_id, role="user", content="on alt", branch="alt")
        await led.add_turn(s.session_id, role="user", content="turn 5")
        await led.restore(s.session_id, cp.id)
        return s.session_id, [e.id async for e in led.events(s.session_id)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[str]]:
    path = tmp_path_factory.mktemp("verify") / "pristine.db"
    session_id, ids = asyncio.run(build(path))
    return path, session_id, ids


def copy(pristine: Path, to: Path) -> Path:
    # A new directory each time: a stale -wal file beside a reused name would be replayed.
    target = Path(tempfile.mkdtemp(dir=to)) / "copy.db"
    shutil.copy(pristine, target)
    return target


def verify(path: Path, session_id: str) -> list[str | None]:
    async def run() -> list[str | None]:
        async with Ledger.open(f"sqlite:///{path}") as led:
            report = await led.verify(session_id)
            assert report.ok == (not report.problems)
            return [p.event_id for p in report.problems]

    return asyncio.run(run())


def rewrite(path: Path, event_id: str, data: bytes) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE events SET data = ? WHERE id = ?", (data, event_id))


def stored(path: Path, event_id: str) -> bytes:
    with sqlite3.connect(path) as db:
        data: bytes = db.execute("SELECT data FROM events WHERE id = ?", (event_id,)).fetchone()[0]
    return bytes(data)


def test_pristine_store_verifies(pristine: tuple[Path, str, list[str]]) -> None:
    path, session_id, _ = pristine
    assert verify(path, session_id) == []


def test_changed_content_is_named(pristine: tuple[Path, str, list[str]], tmp_path: Path) -> None:
    path, session_id, ids = pristine
    target = copy(path, tmp_path)
    turn = ids[2]
    rewrite(target, turn, stored(target, turn).replace(b"turn 1", b"turn 9"))
    assert verify(target, session_id)[0] == turn


def test_a_forged_event_breaks_its_child(
    pristine: tuple[Path, str, list[str]], tmp_path: Path
) -> None:
    """Recomputing a rewritten event's digest and id detaches every event after it."""
    path, session_id, ids = pristine
    target = copy(path, tmp_path)
    original = decode_event(stored(target, ids[2]))
    body = msgspec.structs.replace(original.body, content="forged")
    assert isinstance(body, TurnAdded)
    forged = msgspec.structs.replace(
        original,
        body=body,
        body_digest=compute_body_digest(
            original.salt, msgspec.json.encode(body, order="deterministic")
        ),
    )
    forged = msgspec.structs.replace(forged, id=compute_id(forged))
    with sqlite3.connect(target) as db:
        db.execute(
            "UPDATE events SET id = ?, data = ? WHERE id = ?",
            (forged.id, encode_event(forged), ids[2]),
        )
    problems = verify(target, session_id)
    assert problems and problems[0] == ids[3]  # its child's parent no longer exists


def test_a_deleted_event_is_named_through_its_child(
    pristine: tuple[Path, str, list[str]], tmp_path: Path
) -> None:
    path, session_id, ids = pristine
    target = copy(path, tmp_path)
    with sqlite3.connect(target) as db:
        db.execute("DELETE FROM events WHERE id = ?", (ids[1],))
    assert verify(target, session_id)[0] == ids[2]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_single_byte_change_is_caught(
    pristine: tuple[Path, str, list[str]], tmp_path: Path, data: st.DataObject
) -> None:
    path, session_id, ids = pristine
    target = copy(path, tmp_path)
    victim = data.draw(st.sampled_from(ids), label="event")
    raw = bytearray(stored(target, victim))
    at = data.draw(st.integers(0, len(raw) - 1), label="offset")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[at]), label="byte")
    raw[at] = new
    rewrite(target, victim, bytes(raw))
    problems = verify(target, session_id)
    assert problems, f"changing byte {at} of {victim} went unnoticed"
    assert problems[0] == victim, (ids.index(victim), at, bytes(raw), problems)


async def test_verify_of_every_session_reports_each_one_as_it_goes(tmp_path: Path) -> None:
    """``on_session`` (progress lines use it) sees one report per session; they add up."""
    async with Ledger.open(f"sqlite:///{tmp_path / 'many.db'}") as led:
        for n in range(3):
            s = await led.create(user_id="u", agent="a")
            for i in range(n):
                await led.add_turn(s.session_id, role="user", content=str(i))
        seen: list[tuple[int, int]] = []
        total = await led.verify(
            on_session=lambda r: seen.append((r.sessions_checked, r.events_checked))
        )
    assert sorted(seen) == [(1, 1), (1, 2), (1, 3)]
    assert (total.ok, total.sessions_checked, total.events_checked) == (True, 3, 6)


async def test_forks_deep_in_a_session_verify_from_the_states_kept_on_the_way() -> None:
    """A fork's state is folded from the nearest kept state, not from the root: the
    checkpoints after deep forks (their checksums cover that state) still verify, and
    a damaged event between a kept state and a fork point is still named."""
    from ledger.verify import KEEP_EVERY, verify_session
    from stores.memory import MemoryStore

    async with Ledger(MemoryStore()) as led:
        s = await led.create(user_id="u", agent="a")
        ids = [
            (await led.add_turn(s.session_id, role="user", content=f"t{i}", tokens_in=i)).id
            for i in range(2 * KEEP_EVERY + 50)
        ]
        for n, depth in enumerate((KEEP_EVERY - 1, KEEP_EVERY, 2 * KEEP_EVERY + 7)):
            name = f"b{n}"
            await led.branch(s.session_id, name, at=ids[depth - 1])
            await led.add_turn(s.session_id, role="user", content="x", branch=name, tokens_in=3)
            await led.checkpoint(s.session_id, branch=name)
        report = await verify_session(led.store, s.session_id, parallel=False)
        assert report.ok, report.problems
        assert report.events_checked == 1 + len(ids) + 3 * 3

        # Damage a turn between the last kept state and the deepest fork point.
        store = led.store
        assert isinstance(store, MemoryStore)
        victim = store._by_id[ids[2 * KEEP_EVERY + 3]]
        assert isinstance(victim.body, TurnAdded)
        forged = msgspec.structs.replace(
            victim, body=msgspec.structs.replace(victim.body, content="forged")
        )
        store._by_id[victim.id] = forged
        store._feed[store._feed.index(victim)] = forged
        report = await verify_session(store, s.session_id, parallel=False)
        assert report.first_bad == victim.id
        deep_fork = [p for p in report.problems if "its path goes through bad event" in p.message]
        assert [p.message for p in deep_fork] == [f"its path goes through bad event {victim.id!r}"]


# --- the walk's inline fold -------------------------------------------------------------


async def mixed_session(store: MemoryStore) -> tuple[str, list[Event]]:
    """A session of every kind a branch can take: turns, suspension, metadata, a checkpoint,
    a branch, a restore, a close."""
    led = Ledger(store)
    sid = (await led.create(user_id="u", agent="a")).session_id
    await led.add_turn(sid, role="user", content="one", tokens_in=3)
    await led.suspend(sid)
    await led.resume(sid)
    await led.set_metadata(sid, {"k": 1})
    cp = await led.checkpoint(sid, label="cp")
    await led.add_turn(sid, role="assistant", content="two", cost=0.5)
    await led.branch(sid, "alt", at=cp.entry)
    await led.add_turn(sid, role="user", content="on alt", branch="alt")
    await led.restore(sid, cp.id)
    await led.record(sid, "tool", {"x": 1})
    await led.close(sid, reason="done")
    return sid, [e async for e in led.events(sid)]


MUTATIONS = st.sampled_from(["seq+1", "seq-1", "at-1", "parent", "branch", "session", "kind"])


@settings(max_examples=60, deadline=None)
@given(index=st.integers(min_value=0), mutation=MUTATIONS)
def test_the_walks_inline_fold_reports_what_stepping_each_event_does(
    index: int, mutation: str
) -> None:
    from ledger.verify import _Walker

    async def run() -> None:
        async with MemoryStore() as store:
            await check(store)

    async def check(store: MemoryStore) -> None:
        sid, events = await mixed_session(store)
        at = index % len(events)
        event, before = events[at], events[at - 1]
        changed = {
            "seq+1": {"seq": event.seq + 1},
            "seq-1": {"seq": event.seq - 1},
            "at-1": {"at": before.at - 1},
            "parent": {"parent": before.parent},
            "branch": {"branch": "alt" if event.branch == "main" else "main"},
            "session": {"session": "another"},
            "kind": {"body": SessionCreated(user_id="u", agent="a")},
        }[mutation]
        events[at] = msgspec.structs.replace(event, **changed)  # type: ignore[arg-type]
        inline = _Walker(store, sid, None, content=False)
        walked = await inline.walk(events)
        stepped = _Walker(store, sid, None, content=False)
        for event in events:
            await stepped.step_fork(event) if stepped.forks(event) else stepped.step(event)
        assert walked == len(events)
        assert inline.done(None) == stepped.done(None)
        assert inline.heads == stepped.heads and inline.kept == stepped.kept

    asyncio.run(run())
