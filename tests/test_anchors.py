"""Anchors: issued, recorded and checked; every way a session can stop extending one is named."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import Ledger, LedgerConfig
from ledger.anchors import Anchor, decode_anchor, encode_anchor, key_id
from ledger.errors import AnchorError, IntegrityError, ProofError, SessionNotFoundError
from ledger.merkle import MerkleLog
from stores.base import FeedStore
from tests import tamper
from tests.test_ledger import everything

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


async def store_state(led: Ledger) -> dict[str, Any]:
    """All a store holds, anchors included."""
    state = await everything(led)
    state["anchors"] = {
        row.session_id: await led.store.anchors(row.session_id) for row in state["rows"]
    }
    return state


async def story(led: Ledger) -> tuple[str, list[str]]:
    """A session with turns, a checkpoint, a branch and a restore; its id and event ids."""
    s = await led.create(user_id="u", agent="a")
    sid = s.session_id
    await led.add_turn(sid, role="user", content="one")
    await led.add_turn(sid, role="assistant", content="two")
    cp = await led.checkpoint(sid, label="two")
    await led.add_turn(sid, role="user", content="three")
    await led.branch(sid, "alt", at=cp.entry)
    await led.add_turn(sid, role="user", content="on alt", branch="alt")
    await led.restore(sid, cp.id)
    return sid, [e.id async for e in led.events(sid)]


# --- every backend ------------------------------------------------------------------


def keyed(store: FeedStore, key: bytes | None) -> Ledger:
    return Ledger(store, LedgerConfig(url=store.url, key=key.hex() if key else None))


@pytest.mark.parametrize("key", [None, KEY], ids=["keyless", "keyed"])
async def test_an_anchor_is_recorded_and_extended_by_later_appends(
    make_store: Callable[[], FeedStore], key: bytes | None
) -> None:
    async with keyed(make_store(), key) as led:
        sid, ids = await story(led)
        anchor = await led.anchor(sid)
        assert anchor.size == len(ids) and anchor.session == sid
        assert (anchor.mac is not None) == (key is not None)
        assert anchor.key_id == (key_id(key) if key else None)
        assert await led.anchors(sid) == [anchor]
        await led.add_turn(sid, role="user", content="after the anchor")
        second = await led.anchor(sid, record=False)
        assert second.size == len(ids) + 1
        assert await led.anchors(sid) == [anchor]  # record=False keeps nothing

        report = await led.verify(sid, anchors=[second])
        assert report.ok, report.problems
        assert [(c.source, c.size, c.extended) for c in report.anchors] == [
            ("given", len(ids) + 1, True),
            ("recorded", len(ids), True),
        ]
        assert {c.mac for c in report.anchors} == {"ok" if key else "unsigned"}
        whole = await led.verify()  # every session: recorded anchors too
        assert whole.ok and len(whole.anchors) == 1


async def test_refused_anchors_name_what_failed_and_write_nothing(
    make_store: Callable[[], FeedStore],
) -> None:
    store = make_store()
    async with keyed(store, KEY) as led:
        sid, _ = await story(led)
        other = (await led.create(user_id="v", agent="a")).session_id
        anchor = await led.anchor(sid)
        other_anchor = await led.anchor(other)
        forged = msgspec.structs.replace(anchor, size=anchor.size - 1)
        foreign = keyed(store, OTHER_KEY)
        cases: list[tuple[Callable[[], Awaitable[object]], str, list[str]]] = [
            (lambda: led.verify(sid, anchors=[other_anchor]), "session", [other, sid]),
            (lambda: led.verify(sid, anchors=[forged]), "mac", ["MAC does not match", sid]),
            (lambda: led.prove_consistency(forged), "mac", ["MAC does not match"]),
            (
                lambda: foreign.verify(sid, anchors=[anchor]),
                "key",
                [key_id(KEY), key_id(OTHER_KEY), "Wrong key"],
            ),
            (lambda: led.verify(anchors=[anchor]), "session", ["one session"]),
        ]
        before = await store_state(led)
        for call, reason, parts in cases:
            with pytest.raises(AnchorError) as info:
                await call()
            assert info.value.reason == reason
            for part in parts:
                assert part in str(info.value)
            assert await store_state(led) == before
        with pytest.raises(SessionNotFoundError):
            await led.anchor("f" * 64)
        assert await store_state(led) == before


async def test_an_anchor_that_does_not_parse_is_named(tmp_path: Path) -> None:
    with pytest.raises(AnchorError, match=r"Not an anchor: 'a\.json'") as info:
        decode_anchor(b'{"session": "s", "size": -1}', source="'a.json'")
    assert info.value.reason == "format"
    good = Anchor(session="s", size=1, root="ab" * 32, at=1)
    with pytest.raises(AnchorError, match="Unknown anchor format 9"):
        decode_anchor(encode_anchor(msgspec.structs.replace(good, format=9)))
    with pytest.raises(AnchorError, match="key id but no MAC"):
        decode_anchor(encode_anchor(msgspec.structs.replace(good, key_id="ab" * 8)))
    for bad in (b"", b"[]", b'{"root": "zz"}', encode_anchor(good)[:-1], b"\xff"):
        with pytest.raises(AnchorError):
            decode_anchor(bad)
    assert decode_anchor(encode_anchor(good)) == good


# --- tampered SQLite files -----------------------------------------------------------


async def open_sqlite(path: Path, key: bytes | None = None) -> Ledger:
    return await Ledger.open(f"sqlite:///{path}", key=key)


async def built(path: Path, key: bytes | None = None) -> tuple[str, list[str], Anchor]:
    async with Ledger.open(f"sqlite:///{path}", key=key) as led:
        sid, ids = await story(led)
        anchor = await led.anchor(sid, record=False)  # kept elsewhere, by the user
        return sid, ids, anchor


async def verify(path: Path, sid: str, anchors: list[Anchor], key: bytes | None = None) -> Any:
    async with Ledger.open(f"sqlite:///{path}", key=key) as led:
        return await led.verify(sid, anchors=anchors)


async def test_a_truncated_tail_is_seen_only_with_an_anchor(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    sid, ids, anchor = await built(path)
    tamper.delete(path, ids[-2:][::-1])
    plain = await verify(path, sid, [])
    assert plain.ok  # the hash chain cannot see a cut tail
    report = await verify(path, sid, [anchor])
    assert not report.ok
    (problem,) = report.problems
    assert f"truncated to {len(ids) - 2} of {len(ids)} events" in problem.message
    assert sid in problem.message
    assert anchor.heads is not None
    assert f"the head of branch 'main' at the anchor, {anchor.heads['main']!r}, is gone" in (
        problem.message
    )
    assert report.anchors[0].extended is False


async def test_a_removed_branch_is_named(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    sid, ids, anchor = await built(path)
    alt = [e.id for _, e in tamper.rows(path, sid) if e.branch == "alt"]
    tamper.delete(path, alt[::-1])
    assert (await verify(path, sid, [])).ok
    report = await verify(path, sid, [anchor])
    message = report.problems[0].message
    assert f"truncated to {len(ids) - 2} of {len(ids)}" in message
    assert f"the head of branch 'alt' at the anchor, {alt[-1]!r}, is gone" in message
    assert "branch 'main'" not in message


async def test_a_reordering_is_named_and_narrowed_by_an_earlier_anchor(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    async with Ledger.open(f"sqlite:///{path}") as led:
        s = await led.create(user_id="u", agent="a")
        sid = s.session_id
        first = await led.add_turn(sid, role="user", content="one")
        early = await led.anchor(sid, record=False)  # 2 events
        second = await led.add_turn(sid, role="user", content="two")
        fork = await led.branch(sid, "alt", at=first.id)
        late = await led.anchor(sid, record=False)  # 4 events
    tamper.swap_positions(path, second.id, fork.id)  # both still follow their parents
    assert (await verify(path, sid, [])).ok  # a valid tree, in another append order
    report = await verify(path, sid, [early, late])
    assert [c.extended for c in report.anchors] == [True, False]
    (problem,) = report.problems
    assert "first 4 events no longer hash to the anchored root" in problem.message
    assert "rewritten, reordered or removed" in problem.message
    assert "the first 2 events still match an earlier anchor" in problem.message


async def test_a_forged_tail_passes_the_chain_but_not_the_anchor(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    async with Ledger.open(f"sqlite:///{path}") as led:
        s = await led.create(user_id="u", agent="a")
        for i in range(5):
            await led.add_turn(s.session_id, role="user", content=f"turn {i}")
        anchor = await led.anchor(s.session_id, record=False)
    sid = s.session_id

    def rewrite(event: Any) -> Any:
        body = msgspec.structs.replace(event.body, content="I never said that")
        return msgspec.structs.replace(event, body=body)

    tamper.forge_linear(path, sid, 2, rewrite)
    assert (await verify(path, sid, [])).ok  # every id and link recomputed: the chain agrees
    report = await verify(path, sid, [anchor])
    assert "first 6 events no longer hash to the anchored root" in report.problems[0].message


async def test_a_rewritten_event_is_named_by_the_chain_and_the_anchor(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    sid, ids, anchor = await built(path)
    position, event = tamper.rows(path, sid)[2]
    body = msgspec.structs.replace(event.body, content="changed")  # type: ignore[arg-type]
    forged = tamper.readdress(msgspec.structs.replace(event, body=body))
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE events SET id = ?, data = ? WHERE position = ?",
            (forged.id, msgspec.json.encode(forged), position),
        )
    report = await verify(path, sid, [anchor])
    assert report.first_bad == ids[3]  # the chain: the child's parent is gone
    last = report.problems[-1].message
    assert "no longer hash to the anchored root" in last
    assert "the first bad event, at index 3" in last and ids[3] in last


async def test_recorded_anchors_are_checked_by_every_verify(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    async with Ledger.open(f"sqlite:///{path}", key=KEY) as led:
        sid, ids = await story(led)
        await led.anchor(sid)
    tamper.delete(path, ids[-1:])
    report = await verify(path, sid, [], key=KEY)
    assert not report.ok
    assert "truncated" in report.problems[0].message
    assert report.anchors[0].source == "recorded"


async def test_a_tampered_recorded_anchor_is_a_forgery_under_a_key(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    async with Ledger.open(f"sqlite:///{path}", key=KEY) as led:
        sid, ids = await story(led)
        await led.anchor(sid)
    ((n, data),) = tamper.anchors_table(path, sid)
    anchor = decode_anchor(data)
    # Someone without the key cuts the tail and moves the recorded anchor along.
    tamper.delete(path, ids[-1:])
    async with Ledger.open(f"sqlite:///{path}") as keyless:
        moved = await keyless.anchor(sid, record=False)
    tamper.set_anchor(
        path, n, encode_anchor(msgspec.structs.replace(anchor, size=moved.size, root=moved.root))
    )
    report = await verify(path, sid, [], key=KEY)
    assert [c.mac for c in report.anchors] == ["mismatch"]
    assert "recorded anchor #1" in report.problems[0].message
    assert "MAC does not match" in report.problems[0].message
    # Without the key, only integrity: the moved anchor agrees with the cut session
    # (the one problem left is the keyed checkpoint, which cannot be checked).
    keyless = await verify(path, sid, [])
    assert [(c.mac, c.extended) for c in keyless.anchors] == [("unchecked", True)]
    assert [p.message for p in keyless.problems if "anchor" in p.message] == []


async def test_a_wrong_key_is_named_once_not_as_a_pile_of_checksums(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    async with Ledger.open(f"sqlite:///{path}", key=KEY) as led:
        sid, _ = await story(led)
        await led.anchor(sid)
    report = await verify(path, sid, [], key=OTHER_KEY)
    messages = [p.message for p in report.problems]
    assert len(messages) == 2, messages  # the one checkpoint, and the key
    assert f"under key {key_id(OTHER_KEY)} (a wrong key, or a forged checkpoint)" in messages[0]
    assert f"made under key {key_id(KEY)}" in messages[1]
    assert report.anchors[0].mac == "other-key"


async def test_prove_consistency_refuses_a_session_that_no_longer_extends(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    _, ids, anchor = await built(path)
    tamper.delete(path, ids[-1:])
    async with Ledger.open(f"sqlite:///{path}") as led:
        with pytest.raises(ProofError, match="does not extend") as info:
            await led.prove_consistency(anchor)
        assert info.value.reason == "extends"


# --- verify on two cores -------------------------------------------------------------


async def long_session(path: Path, n: int) -> tuple[str, list[str], Anchor]:
    """A session of ``n`` events (more than one worker chunk), with a branch and a checkpoint."""
    url = f"sqlite:///{path}"
    config = LedgerConfig(url=url, key=KEY.hex(), max_turns_per_session=0)
    async with Ledger.open(url, config=config, synchronous="normal") as led:
        sid = (await led.create(user_id="u", agent="a")).session_id
        for i in range(n - 4):
            await led.add_turn(sid, role="user", content=f"turn {i}")
        cp = await led.checkpoint(sid, label="late")
        await led.branch(sid, "alt", at=cp.entry)
        anchor = await led.anchor(sid, record=False)
        await led.add_turn(sid, role="user", content="after the anchor", branch="alt")
        return sid, [e.id async for e in led.events(sid)], anchor


async def both_ways(path: Path, sid: str, anchors: list[Anchor]) -> tuple[Any, Any]:
    from ledger.verify import verify_session

    async with Ledger.open(f"sqlite:///{path}", key=KEY) as led:
        one = await verify_session(led.store, sid, KEY, anchors, parallel=False)
        two = await verify_session(led.store, sid, KEY, anchors, parallel=True)
        return one, two


@pytest.fixture(scope="module")
def long_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[str], Anchor]:
    import asyncio

    path = tmp_path_factory.mktemp("long") / "long.db"
    from ledger.verify import CHUNK

    sid, ids, anchor = asyncio.run(long_session(path, 2 * CHUNK + 5))
    return path, sid, ids, anchor


async def test_verify_on_two_cores_reports_exactly_what_one_core_does(
    long_file: tuple[Path, str, list[str], Anchor], tmp_path: Path
) -> None:
    import shutil

    source, sid, ids, anchor = long_file
    path = tmp_path / "l.db"
    shutil.copy(source, path)
    one, two = await both_ways(path, sid, [anchor])
    assert one.ok and one == two
    assert two.anchors[0].extended and two.events_checked == len(ids)
    from ledger.verify import _walk_parallel

    async with Ledger.open(f"sqlite:///{path}") as led:  # the worker did run, and agreed
        walked = await _walk_parallel(led.store, sid, KEY, True)
    assert walked is not None
    checked, problems, log, _ = walked
    assert (checked, problems) == (len(ids), [])
    assert log is not None and log.root(anchor.size).hex() == anchor.root
    # A reordering: the worker sees nothing wrong, the structure check does.
    tamper.swap_positions(path, ids[100], ids[101])
    one, two = await both_ways(path, sid, [anchor])
    assert not one.ok and one == two and one.first_bad == ids[101]
    # A changed turn: the worker finds it, and the exact report is the one-core one.
    path = tmp_path / "l2.db"  # a fresh copy (the old one has its -wal beside it)
    shutil.copy(source, path)
    position, event = tamper.rows(path, sid)[5000]
    body = msgspec.structs.replace(event.body, content="changed")  # type: ignore[arg-type]
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE events SET data = ? WHERE position = ?",
            (msgspec.json.encode(msgspec.structs.replace(event, body=body)), position),
        )
    one, two = await both_ways(path, sid, [anchor])
    assert one == two and event.id in [p.event_id for p in two.problems]


def _every_second_call() -> Callable[[Any], bool]:
    """A ``Worker.busy`` that says False, True, False, ... to each worker."""

    def busy(worker: Any) -> bool:
        worker.calls = getattr(worker, "calls", 0) + 1
        return worker.calls % 2 == 0

    return busy


async def test_chunks_checked_by_the_caller_give_the_same_report_and_log(
    long_file: tuple[Path, str, list[str], Anchor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    from ledger.verify import CHUNK, _walk_parallel

    # Every second chunk (events CHUNK to 2 * CHUNK - 1 here) is checked by the caller:
    # it finds the worker busy then.
    monkeypatch.setattr("ledger.verify_worker.Worker.busy", _every_second_call())
    source, sid, ids, anchor = long_file
    path = tmp_path / "l.db"
    shutil.copy(source, path)
    one, two = await both_ways(path, sid, [anchor])
    assert one.ok and one == two and two.anchors[0].extended
    async with Ledger.open(f"sqlite:///{path}") as led:
        walked = await _walk_parallel(led.store, sid, KEY, True)
    assert walked is not None
    checked, problems, log, _ = walked
    assert (checked, problems) == (len(ids), [])
    assert log is not None and log.root(anchor.size).hex() == anchor.root
    assert log.root() == MerkleLog.from_leaves(b"".join(map(bytes.fromhex, ids))).root()
    # A changed turn in the caller's chunk: found there, and the report is the one-core one.
    position, event = tamper.rows(path, sid)[CHUNK + 7]
    body = msgspec.structs.replace(event.body, content="changed")  # type: ignore[arg-type]
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE events SET data = ? WHERE position = ?",
            (msgspec.json.encode(msgspec.structs.replace(event, body=body)), position),
        )
    async with Ledger.open(f"sqlite:///{path}") as led:
        assert await _walk_parallel(led.store, sid, KEY, True) is None
    one, two = await both_ways(path, sid, [anchor])
    assert one == two and two.first_bad == event.id


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_single_byte_change_gives_the_same_report_on_two_cores(
    long_file: tuple[Path, str, list[str], Anchor], tmp_path: Path, data: st.DataObject
) -> None:
    import asyncio
    import shutil
    import tempfile

    source, sid, _, anchor = long_file
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "l.db"  # no -wal of an earlier example
    shutil.copy(source, path)
    position, _ = data.draw(st.sampled_from(tamper.rows(path, sid)), label="event")
    with sqlite3.connect(path) as db:
        (stored,) = db.execute("SELECT data FROM events WHERE position = ?", (position,)).fetchone()
        raw = bytearray(stored)
        at = data.draw(st.integers(0, len(raw) - 1), label="offset")
        raw[at] = data.draw(
            st.sampled_from(b"0123456789abcdef").filter(lambda b: b != raw[at])
            | st.integers(0, 255).filter(lambda b: b != raw[at]),
            label="byte",
        )
        db.execute("UPDATE events SET data = ? WHERE position = ?", (bytes(raw), position))
    one, two = asyncio.run(both_ways(path, sid, [anchor]))
    assert not one.ok and one == two


async def test_verify_falls_back_to_one_core_without_a_worker(
    long_file: tuple[Path, str, list[str], Anchor], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    path, sid, _, anchor = long_file
    one, _ = await both_ways(path, sid, [anchor])
    monkeypatch.setattr(sys, "executable", str(path.parent / "no-such-python"))
    _, two = await both_ways(path, sid, [anchor])
    assert one == two and two.ok


async def test_verify_falls_back_to_one_core_when_the_worker_dies(
    long_file: tuple[Path, str, list[str], Anchor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from ledger.verify import _walk_parallel

    path, sid, _, anchor = long_file
    one, _ = await both_ways(path, sid, [anchor])
    # A "python" that starts, reads a little of its first request and exits.
    dying = tmp_path / "dying-python"
    dying.write_text("#!/bin/sh\nhead -c 100 >/dev/null\nexit 3\n")
    dying.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(dying))
    async with Ledger.open(f"sqlite:///{path}") as led:
        assert await _walk_parallel(led.store, sid, KEY, True) is None
    _, two = await both_ways(path, sid, [anchor])
    assert one == two and two.ok


# --- a long session split between two processes ----------------------------------------

SPLIT_CHUNK = 16
"""``ledger.verify.CHUNK`` in these tests: a session of a few dozen events splits."""


async def plain_tail_session(led: Ledger) -> str:
    """A checkpoint and a branch in the first half, then turns on both branches."""
    sid = (await led.create(user_id="u", agent="a")).session_id
    for i in range(3):
        await led.add_turn(sid, role="user", content=f"turn {i}", tokens_in=i)
    cp = await led.checkpoint(sid, label="three")
    await led.branch(sid, "alt", at=cp.entry)
    for i in range(45):
        await led.add_turn(
            sid, role="user", content=f"later {i}", branch=("main", "alt")[i % 3 == 0]
        )
    await led.suspend(sid, branch="alt")
    return sid


async def split_and_one_core(url: str, sid: str, anchors: list[Anchor]) -> tuple[Any, Any, Any]:
    """``_walk_split``'s result (None: not sure), and the reports on two cores and on one."""
    from ledger.verify import _walk_split, verify_session

    async with Ledger.open(url, key=KEY) as led:
        count = (await led.store.session(sid)).event_count
        split = await _walk_split(
            led.store, sid, KEY, True, count // 2 // SPLIT_CHUNK * SPLIT_CHUNK
        )
        two = await verify_session(led.store, sid, KEY, anchors, parallel=True)
        one = await verify_session(led.store, sid, KEY, anchors, parallel=False)
        return split, two, one


@pytest.fixture
def split_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, str, list[str], Anchor]:
    import asyncio

    monkeypatch.setattr("ledger.verify.CHUNK", SPLIT_CHUNK)

    async def build(path: Path) -> tuple[str, list[str], Anchor]:
        async with Ledger.open(f"sqlite:///{path}", key=KEY) as led:
            sid = await plain_tail_session(led)
            anchor = await led.anchor(sid, record=False)
            return sid, [e.id async for e in led.events(sid)], anchor

    path = tmp_path / "split.db"
    sid, ids, anchor = asyncio.run(build(path))
    return path, sid, ids, anchor


async def test_events_from_gives_the_session_from_any_start_on(
    make_store: Callable[[], FeedStore],
) -> None:
    async with make_store() as store:
        led = Ledger(store)
        sid = await plain_tail_session(led)
        other = (await led.create(user_id="v", agent="a")).session_id
        await led.add_turn(other, role="user", content="in between")
        await led.add_turn(sid, role="user", content="after the other session")
        every = [e async for e in store.events(sid)]
        for start in (0, 1, 7, len(every) - 1, len(every), len(every) + 3):
            tail = [e async for e in store.events_from(sid, start, page_size=3)]
            assert tail == every[start:], start
        assert [e async for e in store.events_from("no-such-session", 2)] == []


async def test_a_session_split_between_two_processes_reports_what_one_core_does(
    split_file: tuple[Path, str, list[str], Anchor],
) -> None:
    path, sid, ids, anchor = split_file
    split, two, one = await split_and_one_core(f"sqlite:///{path}", sid, [anchor])
    assert split is not None  # the worker was sure of the tail
    checked, problems, log, _ = split
    assert (checked, problems) == (len(ids), [])
    assert log.root() == MerkleLog.from_leaves(b"".join(map(bytes.fromhex, ids))).root()
    assert one.ok and one == two and two.anchors[0].extended


async def test_a_changed_turn_in_the_tail_is_named_as_one_core_names_it(
    split_file: tuple[Path, str, list[str], Anchor],
) -> None:
    path, sid, _, anchor = split_file
    position, event = tamper.rows(path, sid)[-5]
    body = msgspec.structs.replace(event.body, content="changed")  # type: ignore[arg-type]
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE events SET data = ? WHERE position = ?",
            (msgspec.json.encode(msgspec.structs.replace(event, body=body)), position),
        )
    split, two, one = await split_and_one_core(f"sqlite:///{path}", sid, [anchor])
    assert split is None and one == two and one.first_bad == event.id


async def test_reordered_events_in_the_tail_are_named_as_one_core_names_them(
    split_file: tuple[Path, str, list[str], Anchor],
) -> None:
    path, sid, ids, anchor = split_file
    tamper.swap_positions(path, ids[-3], ids[-2])  # two turns on main
    split, two, one = await split_and_one_core(f"sqlite:///{path}", sid, [anchor])
    assert split is None and not one.ok and one == two


@pytest.mark.parametrize("where", [-1, 0], ids=["last-of-the-head", "first-of-the-tail"])
async def test_an_event_gone_at_the_split_is_named_as_one_core_names_it(
    split_file: tuple[Path, str, list[str], Anchor], where: int
) -> None:
    path, sid, ids, anchor = split_file
    start = len(ids) // 2 // SPLIT_CHUNK * SPLIT_CHUNK
    tamper.delete(path, [ids[start + where]])  # the tail's first events no longer continue
    split, two, one = await split_and_one_core(f"sqlite:///{path}", sid, [anchor])
    assert split is None and not one.ok and one == two


async def test_a_tail_that_needs_the_state_before_it_is_walked_here(
    split_file: tuple[Path, str, list[str], Anchor],
) -> None:
    path, sid, ids, _ = split_file
    async with Ledger.open(f"sqlite:///{path}", key=KEY) as led:
        await led.resume(sid, branch="alt")  # the tail ends with a suspended branch resumed
        await led.checkpoint(sid, label="late")
        anchor = await led.anchor(sid, record=False)
    split, two, one = await split_and_one_core(f"sqlite:///{path}", sid, [anchor])
    assert split is None and one.ok and one == two and one.events_checked == len(ids) + 2


async def test_a_session_split_on_postgres_reports_what_one_core_does(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    monkeypatch.setattr("ledger.verify.CHUNK", SPLIT_CHUNK)
    url = f"{postgres_url}?schema=t_{uuid.uuid4().hex[:16]}"
    async with Ledger.open(url, key=KEY) as led:
        sid = await plain_tail_session(led)
        anchor = await led.anchor(sid, record=False)
    try:
        split, two, one = await split_and_one_core(url, sid, [anchor])
        assert split is not None and split[0] == one.events_checked
        assert one.ok and one == two and two.anchors[0].extended
    finally:
        await drop_schema(postgres_url, url)


@pytest.fixture
def jsonl_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path, str, Anchor]:
    """A JSONL store holding ``plain_tail_session``: its URL, session file, id and anchor."""
    import asyncio

    monkeypatch.setattr("ledger.verify.CHUNK", SPLIT_CHUNK)
    url = f"jsonl:///{tmp_path / 'j'}"

    async def build() -> tuple[str, Anchor]:
        async with Ledger.open(url, key=KEY) as led:
            sid = await plain_tail_session(led)
            return sid, await led.anchor(sid, record=False)

    sid, anchor = asyncio.run(build())
    return url, tmp_path / "j" / "sessions" / f"{sid}.jsonl", sid, anchor


async def test_a_jsonl_session_split_between_two_processes_reports_what_one_core_does(
    jsonl_split: tuple[str, Path, str, Anchor],
) -> None:
    url, _, sid, anchor = jsonl_split
    split, two, one = await split_and_one_core(url, sid, [anchor])
    assert split is not None and split[0] == one.events_checked  # read from the file there
    assert one.ok and one == two and two.anchors[0].extended


async def test_a_changed_turn_in_a_jsonl_tail_is_named_as_one_core_names_it(
    jsonl_split: tuple[str, Path, str, Anchor],
) -> None:
    url, path, sid, anchor = jsonl_split
    data = path.read_bytes()
    at = data.index(b'"later 40"')
    assert data.count(b'"later 40"') == 1 and at > len(data) // 2  # in the tail
    path.write_bytes(data.replace(b'"later 40"', b'"LATER 40"'))  # the same length
    line = data[: data.index(b"\n", at)].rpartition(b"\n")[2]
    changed = msgspec.json.decode(line)["event"]["id"]
    split, two, one = await split_and_one_core(url, sid, [anchor])
    assert split is None and one == two and one.first_bad == changed


async def test_a_run_of_jsonl_lines_is_read_only_as_the_index_names_it(
    jsonl_split: tuple[str, Path, str, Anchor],
) -> None:
    from stores.jsonl import read_session_lines

    url, _, sid, _ = jsonl_split
    async with Ledger.open(url) as led:
        every = [e async for e in led.store.events(sid)]
        lines = await led.store.session_lines(sid, 7)  # type: ignore[attr-defined]
        assert await led.store.session_lines(sid, len(every)) is None  # type: ignore[attr-defined]
    assert [e for page in read_session_lines(lines, 5) for e in page] == every[7:]
    wrong = msgspec.structs.replace(lines, ids=[*lines.ids[:9], every[3].id, *lines.ids[10:]])
    with pytest.raises(IntegrityError) as raised:
        [e for page in read_session_lines(wrong, 5) for e in page]
    assert raised.value.event_id == every[3].id and lines.path in str(raised.value)


async def drop_schema(postgres_url: str, url: str) -> None:
    import asyncpg

    schema = url.rpartition("schema=")[2]
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await conn.close()


# --- the stores' anchor records -------------------------------------------------------


async def test_a_sqlite_file_made_before_anchors_gets_their_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    async with Ledger.open(f"sqlite:///{path}") as led:
        sid, _ = await story(led)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE anchors")
    async with Ledger.open(f"sqlite:///{path}") as led:
        anchor = await led.anchor(sid)
        assert await led.anchors(sid) == [anchor]


async def test_a_postgres_schema_made_before_anchors_gets_their_table(postgres_url: str) -> None:
    import uuid

    import asyncpg

    schema = f"t_{uuid.uuid4().hex[:16]}"
    url = f"{postgres_url}?schema={schema}"
    async with Ledger.open(url) as led:
        sid, _ = await story(led)
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'DROP TABLE "{schema}".ledger_anchors')
    finally:
        await conn.close()
    async with Ledger.open(url) as led:
        anchor = await led.anchor(sid)
        assert await led.anchors(sid) == [anchor]


async def test_a_jsonl_anchor_line_cut_short_is_not_read_and_is_cut_off(tmp_path: Path) -> None:
    url = f"jsonl:///{tmp_path / 'j'}"
    async with Ledger.open(url) as led:
        sid, _ = await story(led)
        first = await led.anchor(sid)
    path = tmp_path / "j" / "anchors" / f"{sid}.jsonl"
    assert stat_mode(path) == 0o600 and stat_mode(path.parent) == 0o700
    with path.open("ab") as file:
        file.write(encode_anchor(first)[:40])  # a writer killed mid-line
    async with Ledger.open(url) as led:
        assert await led.anchors(sid) == [first]
        second = await led.anchor(sid)
        assert await led.anchors(sid) == [first, second]
    assert path.read_bytes() == encode_anchor(first) + b"\n" + encode_anchor(second) + b"\n"


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- the command -------------------------------------------------------------------------


def test_anchor_prove_and_log_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from ledger.cli import main
    from ledger.proofs import decode_proof

    for name in list(os.environ):
        if name.startswith("LEDGER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    store = ["--store", f"sqlite:///{tmp_path / 'l.db'}"]
    assert main([*store, "demo", "--json"]) == 0
    sid = json.loads(capsys.readouterr().out)["sessions"][0]
    assert main([*store, "anchor", sid, "--no-record"]) == 0  # the anchor itself, on stdout
    printed = decode_anchor(capsys.readouterr().out)
    assert printed.session == sid and printed.mac is None
    assert main([*store, "log", sid, "--json"]) == 0
    logged = json.loads(capsys.readouterr().out)
    assert logged["anchors"] == []
    assert main([*store, "anchor", sid, "--out", "a.json", "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["file"] == "a.json" and written["anchor"]["size"] == printed.size
    assert main([*store, "anchor", sid, "--out", "a.json"]) == 1  # never overwritten
    assert "Not overwriting 'a.json'" in capsys.readouterr().err
    assert main([*store, "log", sid, "--json"]) == 0
    assert [a["size"] for a in json.loads(capsys.readouterr().out)["anchors"]] == [printed.size]
    assert main([*store, "log", sid]) == 0
    assert f"[anchor {printed.size} events, unsigned]" in capsys.readouterr().out
    event = logged["events"][1]["id"]
    assert main([*store, "prove", event]) == 0
    proof = decode_proof(capsys.readouterr().out)
    assert proof.event.id == event and proof.index == 1
    assert main([*store, "verify", "--anchor", "a.json"]) == 1
    assert "needs a SESSION" in capsys.readouterr().err
    assert main([*store, "verify", sid, "--anchor", "missing.json"]) == 1
    assert "Cannot read the anchor file 'missing.json'" in capsys.readouterr().err
    assert main([*store, "prove", "f" * 64]) == 1
    assert f"Event not found: {'f' * 64!r}" in capsys.readouterr().err
