"""JSONL-specific tests: the files on disk, their format, permissions and recovery.

The behaviour every store shares is in the contract suite (``ledger.testing``);
crashes, processes and damage of every durable store are in ``test_crash.py``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ledger import Ledger
from ledger.config import LedgerConfig
from ledger.errors import (
    ConfigError,
    IntegrityError,
    InvalidEventError,
    SessionNotFoundError,
    StoreError,
)
from ledger.events import (
    Event,
    SessionCreated,
    TurnAdded,
    encode_event,
    make_event,
    new_session_id,
)
from stores import open_store
from stores.base import AppendRequest, PurgeRecord, PurgeRequest, SessionRow
from stores.jsonl import FORMAT, FORMAT_VERSION, JSONLStore, retention


def create(user: str = "user-1", *, session: str | None = None) -> Event:
    return make_event(
        session=session or new_session_id(),
        parent=None,
        seq=0,
        branch="main",
        at=time.time_ns(),
        actor=user,
        body=SessionCreated(user_id=user, agent="agent-1"),
    )


def turn(parent: Event, content: Any = "hello", *, branch: str | None = None) -> Event:
    return make_event(
        session=parent.session,
        parent=parent.id,
        seq=parent.seq + 1,
        branch=branch or parent.branch,
        at=time.time_ns(),
        actor="user-1",
        body=TurnAdded(role="user", content=content),
    )


def request(events: list[Event], expected_head: str | None, **kw: Any) -> AppendRequest:
    return AppendRequest(
        session_id=events[0].session,
        branch=events[0].branch,
        expected_head=expected_head,
        events=events,
        **kw,
    )


async def new_session(store: JSONLStore, turns: int = 0) -> list[Event]:
    chain = [create()]
    await store.append(request(chain, None))
    for n in range(turns):
        chain.append(turn(chain[-1], f"turn {n}"))
        await store.append(request([chain[-1]], chain[-2].id))
    return chain


async def collect(store: JSONLStore, session_id: str) -> list[Event]:
    return [e async for e in store.events(session_id, page_size=3)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


def session_file(root: Path, session_id: str) -> Path:
    return root / "sessions" / f"{session_id}.jsonl"


def stored(event: Event) -> bytes:
    """``event`` as a version 2 line holds it: the event model's JSON less its session,
    its parent and its default values."""
    fields = msgspec.json.decode(encode_event(event))
    del fields["session"], fields["parent"]
    for name, default in (("idempotency_key", None), ("format", 1)):
        if fields[name] == default:
            del fields[name]
    return msgspec.json.encode(fields)


def line(pos: int, event: Event, after: Event | None, batch: str = "") -> bytes:
    """A version 2 event line after the line of ``after`` (``batch``: ``',"batch":[i,n]'``
    when not a batch of one): its parent is written unless it is ``after`` (or none)."""
    parent = b"" if event.parent == (after and after.id) else b',"parent":"%s"' % event.parent
    return b'{"pos":%d%s%s,"event":%s}\n' % (pos, batch.encode(), parent, stored(event))


def read_plainly(path: Path) -> list[Any]:
    """A person's view: plain text, one JSON object per line."""
    with open(path) as f:
        return [json.loads(line) for line in f]


# --- the format ---------------------------------------------------------------


async def test_files_are_readable_json_lines(root: Path) -> None:
    async with JSONLStore(root) as store:
        chain = await new_session(store, turns=2)
        pause = turn(chain[-1])
        await store.append(request([pause], chain[-1].id, status="suspended"))
        chain.append(pause)
    path = session_file(root, chain[0].session)
    lines = read_plainly(path)
    assert lines[0] == {"ledger": FORMAT, "version": FORMAT_VERSION, "session": chain[0].session}
    events = lines[1:]
    assert [line["event"]["id"] for line in events] == [e.id for e in chain]
    assert [line["pos"] for line in events] == [1, 2, 3, 4]
    assert not any("batch" in line for line in events)  # each a batch of one
    assert events[-1]["status"] == "suspended"
    assert "status" not in events[1]
    # the event model's own JSON, less the session, the parent of a linear run, defaults
    assert path.read_bytes().splitlines()[1:] == [
        line(1, chain[0], None).rstrip(),
        line(2, chain[1], chain[0]).rstrip(),
        line(3, chain[2], chain[1]).rstrip(),
        b'{"pos":4,"status":"suspended","event":%s}' % stored(chain[3]),
    ]
    assert not {"session", "parent", "idempotency_key", "format"} & set(events[1]["event"])
    feed = (root / "feed.log").read_bytes()
    assert len(feed) == 80 * 5
    assert json.loads(feed[:80]) == {"ledger": "session-ledger/jsonl-feed", "version": 1}
    assert feed[80:].split(b"\n")[0].split()[1] == chain[0].session.encode()


async def test_a_batch_is_marked_as_one(root: Path) -> None:
    async with JSONLStore(root) as store:
        (first,) = await new_session(store)
        batch = [turn(first, "a")]
        batch.append(turn(batch[-1], "b"))
        await store.append(request(batch, first.id))
    lines = [json.loads(x) for x in session_file(root, first.session).read_text().splitlines()]
    assert [x.get("batch") for x in lines[1:]] == [None, [1, 2], [2, 2]]


async def test_permissions(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    async with JSONLStore(root) as store:
        (first,) = await new_session(store)
    for folder in (root, root / "sessions"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (root / "feed.log", root / "lock", session_file(root, first.session)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "bad", ["../escape", "a/b", "a\\b", "x\x00y", "..", "ABCDEF", "not-a-uuid"]
)
async def test_session_ids_that_could_escape_are_refused(root: Path, bad: str) -> None:
    async with JSONLStore(root) as store:
        event = create(session=bad)
        with pytest.raises(InvalidEventError):
            await store.append(request([event], None))
    assert os.listdir(root / "sessions") == []


@pytest.mark.parametrize("bad", ["..", "a/b", "a\\b", "x\x00y", "../main"])
async def test_branch_names_that_could_escape_are_refused(root: Path, bad: str) -> None:
    async with JSONLStore(root) as store:
        (first,) = await new_session(store)
        with pytest.raises(InvalidEventError):
            await store.append(request([turn(first, branch=bad)], None))
        assert await store.heads(first.session) == {"main": first.id}


async def test_unknown_status_is_refused(root: Path) -> None:
    async with JSONLStore(root) as store:
        (first,) = await new_session(store)
        with pytest.raises(InvalidEventError):
            await store.append(request([turn(first)], first.id, status='x","y'))


# --- options --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "options", "fsync"),
    [
        ("jsonl:///x", {}, True),
        ("jsonl:///x?fsync=off", {}, False),
        ("jsonl:///x?fsync=0", {}, False),
        ("jsonl:///x?fsync=on", {}, True),
        ("jsonl:///x?fsync=off", {"fsync": True}, True),
        ("jsonl:///x", {"fsync": "no"}, False),
        ("jsonl:///x", {"fsync": False}, False),
    ],
)
def test_fsync_option(url: str, options: dict[str, Any], fsync: bool) -> None:
    assert JSONLStore.from_url(url, **options).fsync is fsync


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("jsonl://x", {}),
        ("jsonl:///", {}),
        ("jsonl:///x?fsync=maybe", {}),
        ("jsonl:///x?sync=off", {}),
        ("jsonl:///x", {"fsync": "sometimes"}),
    ],
)
def test_bad_urls_and_options_are_config_errors(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        JSONLStore.from_url(url, **options)


async def test_url_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("jsonl:///rel/dir")
    assert isinstance(store, JSONLStore)
    assert store.directory == tmp_path / "rel" / "dir"
    absolute = open_store(f"jsonl:///{tmp_path / 'abs'}?fsync=off")
    assert isinstance(absolute, JSONLStore)
    assert (absolute.directory, absolute.fsync) == (tmp_path / "abs", False)


async def test_fsync_off_still_writes_everything(root: Path) -> None:
    async with JSONLStore(root, fsync=False) as store:
        chain = await new_session(store, turns=3)
    async with JSONLStore(root) as store:
        assert await collect(store, chain[0].session) == chain


# --- recovery -------------------------------------------------------------------


async def test_torn_final_line_is_moved_aside_reported_and_the_session_goes_on(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"jsonl:///{root}"
    async with Ledger.open(url) as led:
        sid = (await led.create(user_id="u", agent="a")).session_id
        for n in range(3):
            await led.add_turn(sid, role="user", content=f"turn {n}")
        history = await led.history(sid)
    path = session_file(root, sid)
    torn = b'{"pos":5,"event":{"id":"abc'
    with path.open("ab") as f:  # what a writer killed mid-write leaves
        f.write(torn)
    caplog.set_level(logging.WARNING, logger="stores.jsonl")
    async with Ledger.open(url) as led:
        assert isinstance(led.store, JSONLStore)
        aside = path.with_name(path.name + ".torn-1")
        assert led.store.recovered == [aside]
        assert aside.read_bytes() == torn
        assert stat.S_IMODE(aside.stat().st_mode) == 0o600
        assert str(aside) in caplog.text
        assert await led.history(sid) == history
        await led.add_turn(sid, role="user", content="after recovery")
        assert (await led.verify(sid)).ok
        assert len(await led.history(sid)) == len(history) + 1
    assert path.read_bytes().endswith(b"\n")


async def test_an_incomplete_batch_at_the_tail_is_moved_aside_whole(root: Path) -> None:
    async with JSONLStore(root) as store:
        (first,) = await new_session(store)
    path = session_file(root, first.session)
    a = turn(first, "a")
    b = turn(a, "b")
    line_a = line(2, a, first, ',"batch":[1,2]')
    line_b = line(3, b, a, ',"batch":[2,2]')
    with path.open("ab") as f:
        f.write(line_a + line_b[:20])
    async with JSONLStore(root) as store:
        assert len(store.recovered) == 1
        assert store.recovered[0].read_bytes() == line_a + line_b[:20]
        assert await collect(store, first.session) == [first]
        assert len(await store.read_feed(0)) == 1


async def test_a_synced_batch_without_its_feed_record_is_kept(root: Path) -> None:
    """A writer that died between the sync and the feed write: the batch is kept."""
    async with JSONLStore(root) as store:
        (first,) = await new_session(store)
    a = turn(first, "a")
    with session_file(root, first.session).open("ab") as f:
        f.write(line(2, a, first))
    async with JSONLStore(root) as store:
        assert store.recovered == []
        assert await collect(store, first.session) == [first, a]
        assert [i.event for i in await store.read_feed(0)] == [first, a]
        assert await store.heads(first.session) == {"main": a.id}


async def test_a_dead_writer_is_repaired_by_the_next_writer(root: Path) -> None:
    """A store already open finds a dead writer's torn tail through the intent."""
    async with JSONLStore(root) as store:
        (first,) = await new_session(store)
        path = session_file(root, first.session)
        offset = path.stat().st_size
        # what a writer of another process leaves when killed mid-write
        with (root / "lock").open("r+b") as f:
            f.write(b"%s %014d %015d %09d\n" % (first.session.encode(), offset, 2, 1))
        with path.open("ab") as f:
            f.write(b'{"pos":2,"ev')
        second = turn(first)
        await store.append(request([second], first.id))
        assert store.recovered == [path.with_name(path.name + ".torn-1")]
        assert await collect(store, first.session) == [first, second]
    async with JSONLStore(root) as store:
        assert await collect(store, first.session) == [first, second]
        assert [i.position for i in await store.read_feed(0)] == [1, 2]


async def test_a_dead_writers_synced_batch_is_adopted_by_the_next_writer(root: Path) -> None:
    """A store already open finds, through the intent, a whole batch no record names."""
    async with JSONLStore(root) as store:
        (first,) = await new_session(store)
        path = session_file(root, first.session)
        offset = path.stat().st_size
        a = turn(first, "a")
        # what a writer of another process leaves when killed after its sync
        with (root / "lock").open("r+b") as f:
            f.write(b"%s %014d %015d %09d\n" % (first.session.encode(), offset, 2, 1))
        with path.open("ab") as f:
            f.write(line(2, a, first))
        b = turn(a, "b")
        await store.append(request([b], a.id))
        assert store.recovered == []
        assert await collect(store, first.session) == [first, a, b]
        assert [i.position for i in await store.read_feed(0)] == [1, 2, 3]


async def test_a_purge_cut_short_is_finished_by_the_next_writer(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purger killed after its commit (the redo renamed into place): another store's
    next append carries the purge out before it writes."""
    async with JSONLStore(root) as store, JSONLStore(root) as purger:
        (gone,) = await new_session(store)
        (kept,) = await new_session(store)
        finish = retention.finish_purge
        calls = 0

        def killed_after_commit(finisher: JSONLStore) -> None:
            nonlocal calls
            if finisher is purger:
                calls += 1
            if calls > 1:  # the purger's call right after the rename: the process dies there
                raise KeyboardInterrupt
            finish(finisher)

        monkeypatch.setattr(retention, "finish_purge", killed_after_commit)
        row = await purger.session(gone.session)
        with pytest.raises(KeyboardInterrupt):
            await purger.purge([purge_request(row)])
        monkeypatch.setattr(retention, "finish_purge", finish)
        assert (root / "purge.redo").exists()
        assert session_file(root, gone.session).exists()
        await store.append(request([turn(kept)], kept.id))
        assert not (root / "purge.redo").exists()
        assert not session_file(root, gone.session).exists()
        assert [r.session_id for r in (await store.purges()).items] == [gone.session]
        with pytest.raises(SessionNotFoundError):
            await store.append(request([turn(gone)], gone.id))


async def test_damaged_middle_line_raises_integrity_error_naming_file_and_line(
    root: Path,
) -> None:
    async with JSONLStore(root) as store:
        chain = await new_session(store, turns=3)
    path = session_file(root, chain[0].session)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"event":{', b'"event":#', 1)
    path.write_bytes(b"".join(lines))
    with pytest.raises(IntegrityError) as info:
        await JSONLStore(root).open()
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value)


async def test_cut_short_acknowledged_line_is_not_taken_for_a_torn_write(root: Path) -> None:
    async with JSONLStore(root) as store:
        chain = await new_session(store, turns=2)
    path = session_file(root, chain[0].session)
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # feed.log names that line: it was acknowledged
    with pytest.raises(IntegrityError) as info:
        await JSONLStore(root).open()
    assert str(path) in str(info.value)
    assert "line 4" in str(info.value)
    path.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 1])  # a whole line gone
    with pytest.raises(IntegrityError) as info:
        await JSONLStore(root).open()
    assert "feed.log" in str(info.value)


async def test_damage_while_open_is_caught_on_read(root: Path) -> None:
    async with JSONLStore(root) as store:
        chain = await new_session(store, turns=2)
        path = session_file(root, chain[0].session)
        data = bytearray(path.read_bytes())
        at = data.index(chain[1].id.encode())
        data[at] = ord("0") if data[at] != ord("0") else ord("1")
        path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError) as info:
            await store.get(chain[1].id)
        assert info.value.event_id == chain[1].id
        assert str(path) in str(info.value)
        assert "line 3" in str(info.value)
        assert await store.get(chain[2].id) == chain[2]


async def test_newer_format_version_refuses_to_open(root: Path) -> None:
    async with JSONLStore(root) as store:
        (first,) = await new_session(store)
    path = session_file(root, first.session)
    data = path.read_bytes().replace(b'"version":2', b'"version":3', 1)
    path.write_bytes(data)
    with pytest.raises(StoreError, match="newer"):
        await JSONLStore(root).open()


# --- sizes and the index ----------------------------------------------------------


async def test_very_long_lines(root: Path) -> None:
    content = "x" * (5 << 20)
    config = LedgerConfig(url=f"jsonl:///{root}", max_event_bytes=16 << 20)
    async with Ledger.open(config=config) as led:
        sid = (await led.create(user_id="u", agent="a")).session_id
        big = await led.add_turn(sid, role="user", content=content)
        after = await led.add_turn(sid, role="user", content="small")
    async with Ledger.open(config=config) as led:
        got = await led.store.get(big.id)
        assert isinstance(got.body, TurnAdded)
        assert got.body.content == content
        assert [e.id for e in await led.history(sid)][-2:] == [big.id, after.id]
        assert (await led.verify(sid)).ok


async def test_feed_log_is_rebuilt_after_deleting_it(root: Path) -> None:
    async with JSONLStore(root) as store:
        a = await new_session(store, turns=2)
        b = await new_session(store, turns=1)
        more = turn(a[-1])
        await store.append(request([more], a[-1].id, status="closed"))
        feed = await store.read_feed(0)
        rows = [await store.session(s[0].session) for s in (a, b)]
    original = (root / "feed.log").read_bytes()
    (root / "feed.log").unlink()
    async with JSONLStore(root) as store:
        assert await store.read_feed(0) == feed
        assert [await store.session(s[0].session) for s in (a, b)] == rows
        assert await store.heads(a[0].session) == {"main": more.id}
    assert (root / "feed.log").read_bytes() == original


async def test_another_instance_sees_appends(root: Path) -> None:
    async with JSONLStore(root) as one, JSONLStore(root) as two:
        chain = await new_session(one, turns=1)
        assert await collect(two, chain[0].session) == chain
        later = turn(chain[-1])
        await two.append(request([later], chain[-1].id))
        assert await one.heads(chain[0].session) == {"main": later.id}
        assert [i.event for i in await one.read_feed(0)] == [*chain, later]


def purge_request(row: SessionRow) -> PurgeRequest:
    """A purge of the session as ``row`` has it (the store checks its count and time)."""
    return PurgeRequest(
        record=PurgeRecord(
            session_id=row.session_id,
            user_id=row.user_id,
            agent=row.agent,
            status=row.status,
            created_at=row.created_at,
            last_activity_at=row.last_activity_at,
            event_count=row.event_count,
            bytes=0,
            purged_at=1,
            actor="test",
            reason="test",
            anchor={},
        )
    )
