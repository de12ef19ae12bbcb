"""Retention over every backend that can purge: what goes, what stays, what is recorded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sqlite3
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ledger import (
    ConfigError,
    EventNotFoundError,
    Ledger,
    LedgerConfig,
    SessionNotFoundError,
)
from ledger.anchors import Anchor, mac_matches, make_anchor
from ledger.events import encode_event
from ledger.testing import append_request, next_event
from stores.base import FeedStore, PurgeRecord, PurgeRequest, PurgeStore, SessionQuery
from stores.jsonl import JSONLStore

MakeStore = Callable[[], FeedStore]
KEY = "ab" * 32


@pytest.fixture
def purging(make_store: MakeStore) -> MakeStore:
    """``make_store``: every backend can purge."""
    assert isinstance(make_store(), PurgeStore)
    return make_store


def ledger(make_store: MakeStore, **settings: Any) -> Ledger:
    return Ledger(make_store(), LedgerConfig(url="memory://", **settings))


async def _everything(led: Ledger) -> dict[str, Any]:
    store = led.store
    sessions = (await store.sessions(SessionQuery(limit=10_000))).items
    return {
        "feed": await store.read_feed(0, 100_000),
        "rows": sessions,
        "heads": {s.session_id: await store.heads(s.session_id) for s in sessions},
    }


async def _session(led: Ledger, user: str, turns: int = 2) -> list[str]:
    """A session with ``turns`` turns; its event ids in append order."""
    s = await led.create(user_id=user, agent="agent")
    for i in range(turns):
        await led.add_turn(s.session_id, role="user", content=f"turn {i} {uuid.uuid4().hex}")
    return [e.id async for e in led.events(s.session_id)]


IDLE = 0.3
"""Seconds the old sessions are left alone before a purge with a shorter period."""


async def test_purge_removes_idle_sessions_whole_and_records_them(purging: MakeStore) -> None:
    async with ledger(purging, key=KEY) as led:
        old = [await _session(led, "u1"), await _session(led, "u2", turns=3)]
        events = {ids[0]: [await led.get(i) for i in ids] for ids in old}
        await asyncio.sleep(IDLE)
        fresh = await _session(led, "u1")
        session_ids = [(await led.get(ids[0])).session for ids in old]
        feed_before = await led.store.read_feed(0, 100_000)

        records = await led.purge(older_than=IDLE / 2, reason="test retention", actor="janitor")

        assert sorted(r.session_id for r in records) == sorted(session_ids)
        for record in records:
            root_id = next(ids[0] for ids in old if events[ids[0]][0].session == record.session_id)
            kept = events[root_id]
            assert record.event_count == len(kept)
            assert record.bytes == sum(len(encode_event(e)) for e in kept)
            assert (record.actor, record.reason) == ("janitor", "test retention")
            assert record.user_id in ("u1", "u2") and record.agent == "agent"
            assert record.created_at == kept[0].at and record.last_activity_at == kept[-1].at
            anchor = msgspec.convert(record.anchor, Anchor)
            expected = make_anchor(
                record.session_id, [e.id for e in kept], key=bytes.fromhex(KEY), at=anchor.at
            )
            assert anchor == expected and mac_matches(anchor, bytes.fromhex(KEY))
            with pytest.raises(SessionNotFoundError):
                await led.state(record.session_id)
            with pytest.raises(SessionNotFoundError):
                await led.store.session(record.session_id)
            assert await led.store.heads(record.session_id) == {}
            assert [e async for e in led.store.events(record.session_id)] == []
            for event in kept:
                with pytest.raises(EventNotFoundError):
                    await led.store.get(event.id)
        # Nothing else moved: the fresh session and the feed around the gaps.
        assert (await led.verify()).ok
        assert [e.id async for e in led.events((await led.get(fresh[0])).session)] == fresh
        gone = {e.id for kept in events.values() for e in kept}
        assert await led.store.read_feed(0, 100_000) == [
            item for item in feed_before if item.event.id not in gone
        ]
        page = await led.purged()
        assert sorted(r.session_id for r in page.items) == sorted(session_ids)
        assert page.next_cursor is None


async def test_a_purged_session_refuses_writes_with_session_not_found(
    purging: MakeStore,
) -> None:
    async with ledger(purging) as led:
        ids = await _session(led, "u")
        session_id = (await led.get(ids[0])).session
        last = await led.get(ids[-1])
        await led.state(session_id)  # cached heads and folds
        await asyncio.sleep(IDLE)
        assert len(await led.purge(older_than=IDLE / 2)) == 1
        with pytest.raises(SessionNotFoundError, match=repr(session_id)):
            await led.add_turn(session_id, role="user", content="too late")
        with pytest.raises(SessionNotFoundError):
            await led.state(session_id)
        # The store itself refuses an append that names the gone head.
        with pytest.raises(SessionNotFoundError):
            await led.store.append(append_request([next_event(last)], last.id))


async def test_purge_by_user_touches_no_other_user(purging: MakeStore) -> None:
    async with ledger(purging) as led:
        mine = await _session(led, "me")
        theirs = await _session(led, "them")
        await asyncio.sleep(IDLE)
        records = await led.purge(older_than=IDLE / 2, user_id="me")
        assert [(r.user_id, r.event_count) for r in records] == [("me", len(mine))]
        assert (await led.get(theirs[0])).id == theirs[0]
        with pytest.raises(EventNotFoundError):
            await led.get(mine[0])
        assert [r.user_id for r in (await led.purged(user_id="them")).items] == []
        assert [r.user_id for r in (await led.purged(user_id="me")).items] == ["me"]


async def test_purge_runs_in_batches_and_the_records_page(purging: MakeStore) -> None:
    async with ledger(purging) as led:
        for i in range(7):
            await _session(led, f"u{i}", turns=0)
        await asyncio.sleep(IDLE)
        records = await led.purge(older_than=IDLE / 2, batch_size=3)
        assert len(records) == 7 and len({r.session_id for r in records}) == 7
        seen: list[PurgeRecord] = []
        cursor = None
        while True:
            page = await led.purged(limit=3, cursor=cursor)
            seen.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(r.session_id for r in seen) == sorted(r.session_id for r in records)
        assert [(r.purged_at, r.session_id) for r in seen] == sorted(
            ((r.purged_at, r.session_id) for r in seen), reverse=True
        )
        assert (await led.sessions()).items == []


async def test_a_dry_run_lists_and_deletes_nothing(purging: MakeStore) -> None:
    async with ledger(purging) as led:
        for _ in range(3):
            await _session(led, "u")
        await asyncio.sleep(IDLE)
        before = await _everything(led)
        planned = await led.purge(older_than=IDLE / 2, batch_size=2, dry_run=True)
        assert len(planned) == 3
        assert await _everything(led) == before
        assert (await led.purged()).items == []


async def test_nothing_newer_than_the_period_is_purged(purging: MakeStore) -> None:
    async with ledger(purging) as led:
        await _session(led, "u")
        before = await _everything(led)
        assert await led.purge(older_than=timedelta(days=1)) == []
        assert await _everything(led) == before


async def test_bad_retention_arguments_raise_config_error_and_purge_nothing(
    purging: MakeStore,
) -> None:
    async with ledger(purging) as led:
        await _session(led, "u")
        await asyncio.sleep(IDLE)
        before = await _everything(led)
        for period in (0, -1, math.nan, math.inf, timedelta(0), "90d"):
            with pytest.raises(ConfigError, match="Invalid retention period"):
                await led.purge(older_than=period)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="batch size"):
            await led.purge(older_than=IDLE / 2, batch_size=0)
        with pytest.raises(ConfigError, match="reason"):
            await led.purge(older_than=IDLE / 2, reason=" ")
        assert await _everything(led) == before


async def test_a_session_written_to_after_it_was_planned_is_kept(purging: MakeStore) -> None:
    """The store's check: the count and activity the purge planned must still hold."""
    async with ledger(purging) as led:
        ids = await _session(led, "u")
        session_id = (await led.get(ids[0])).session
        row = await led.store.session(session_id)
        store = led.store
        assert isinstance(store, PurgeStore)
        planned = [r async for r in _records_for(led, [row])]
        await led.add_turn(session_id, role="user", content="still here")
        assert await store.purge([PurgeRequest(record=r) for r in planned]) == []
        assert (await store.session(session_id)).event_count == row.event_count + 1
        assert (await store.purges()).items == []


async def _records_for(led: Ledger, rows: list[Any]) -> Any:
    for row in rows:
        record = await led._purge_record(row, 1, "t", "t")
        assert record is not None
        yield record


async def test_concurrent_appends_during_a_purge_land_before_or_fail_cleanly(
    purging: MakeStore,
) -> None:
    async with ledger(purging) as led:
        sessions = []
        for _ in range(6):
            ids = await _session(led, "u", turns=1)
            sessions.append((await led.get(ids[0])).session)
        await asyncio.sleep(IDLE)

        async def write(session_id: str) -> str:
            try:
                await led.add_turn(session_id, role="user", content="racing the purge")
            except SessionNotFoundError:
                return "refused"
            return "landed"

        results = await asyncio.gather(
            led.purge(older_than=IDLE / 2, batch_size=2), *(write(s) for s in sessions)
        )
        purged = {r.session_id for r in results[0]}  # type: ignore[union-attr]
        outcomes = dict(zip(sessions, results[1:], strict=True))
        for session_id, outcome in outcomes.items():
            if session_id in purged:
                # Purged whole: a write either came after (refused) or the session
                # was purged without it, so it cannot have landed.
                assert outcome == "refused"
                with pytest.raises(SessionNotFoundError):
                    await led.store.session(session_id)
            else:
                assert outcome == "landed"
                row = await led.store.session(session_id)
                assert row.event_count == 3
        assert (await led.verify()).ok


# --- what stays on disk -----------------------------------------------------------------


def _holding(root: Path, needle: bytes) -> set[str]:
    """The names of the files under ``root`` that contain ``needle``."""
    return {p.name for p in root.iterdir() if p.is_file() and needle in p.read_bytes()}


async def test_sqlite_a_purged_sessions_content_is_gone_from_the_files(tmp_path: Path) -> None:
    secret = f"SECRET-{uuid.uuid4().hex}"
    db = tmp_path / "ledger.db"
    async with Ledger.open(f"sqlite:///{db}", config=LedgerConfig(snapshot_every=2)) as led:
        s = await led.create(user_id="u", agent="a")
        for i in range(10):  # small events: stored as plain JSON
            await led.add_turn(s.session_id, role="user", content=f"{secret} {i}")
        # A large one is stored compressed: a piece of its stored bytes is looked for too.
        big = await led.add_turn(s.session_id, role="user", content=os.urandom(3000).hex())
        keep = await led.create(user_id="u", agent="a")
        with contextlib.closing(sqlite3.connect(db)) as raw:
            (stored,) = raw.execute("SELECT data FROM events WHERE id = ?", (big.id,)).fetchone()
        assert stored[:1] == b"\x02"
        piece = stored[len(stored) // 2 : len(stored) // 2 + 64]
        assert _holding(tmp_path, secret.encode())
        assert _holding(tmp_path, piece)
        await asyncio.sleep(IDLE)
        await led.add_turn(keep.session_id, role="user", content="fresh")
        assert [r.session_id for r in await led.purge(older_than=IDLE / 2)] == [s.session_id]
        assert _holding(tmp_path, b"") >= {"ledger.db", "ledger.db-wal"}  # checked: open
        assert _holding(tmp_path, secret.encode()) == set()
        assert _holding(tmp_path, piece) == set()
        assert (await led.verify()).ok


# --- the command ----------------------------------------------------------------------


def test_the_purge_and_purged_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ledger.cli import main

    url = f"sqlite:///{tmp_path / 'cli.db'}"

    async def setup() -> list[str]:
        async with Ledger.open(url) as led:
            ids = [await _session(led, "u1"), await _session(led, "u2")]
            return [(await led.get(i[0])).session for i in ids]

    sessions = asyncio.run(setup())

    def cli(*argv: str) -> tuple[int, str, str]:
        code = main(["--store", url, *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    assert cli("purge", "--older-than", "1d")[1] == "Purged 0 sessions.\n"
    asyncio.run(asyncio.sleep(IDLE))
    code, out, err = cli("purge", "--older-than", "0.1s", "--dry-run", "--user", "u1")
    assert code == 0 and out.startswith("Would purge 1 session.") and sessions[0] in out, err
    code, out, err = cli("--json", "purge", "--older-than", "0.1s", "--reason", "policy")
    assert code == 0, err
    result = json.loads(out)
    assert not result["dry_run"]
    assert sorted(r["session_id"] for r in result["purged"]) == sorted(sessions)
    assert {r["reason"] for r in result["purged"]} == {"policy"}
    code, out, err = cli("purged", "--user", "u2")
    assert code == 0 and sessions[1] in out and sessions[0] not in out, err
    code, out, _ = cli("--json", "purged", "--limit", "1")
    assert len(json.loads(out)) == 1
    for bad in ("90", "d", "-1d", "0s", "1y"):
        code, _, err = cli("purge", "--older-than", bad)
        assert code == 2 and "--older-than" in err


async def test_a_purge_takes_the_sessions_recorded_anchors_with_it(purging: MakeStore) -> None:
    async with ledger(purging, key=KEY) as led:
        ids = await _session(led, "u1")
        session_id = (await led.get(ids[0])).session
        kept = await _session(led, "u2")
        kept_id = (await led.get(kept[0])).session
        await led.anchor(session_id)
        await led.anchor(kept_id)
        await asyncio.sleep(IDLE)
        [record] = await led.purge(older_than=IDLE / 2, user_id="u1")
        assert record.session_id == session_id
        assert await led.store.anchors(session_id) == []
        assert len(await led.store.anchors(kept_id)) == 1
        assert (await led.verify(kept_id)).ok


# --- the JSONL store: other instances, files, the rebuilt feed, SIGKILL -----------------


def _jsonl(directory: Path) -> Ledger:
    return Ledger(JSONLStore(directory), LedgerConfig(url="memory://", key=KEY))


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def test_jsonl_another_store_with_the_session_cached_refuses_it_after_a_purge(
    tmp_path: Path,
) -> None:
    """A second instance (own descriptors, own index) learns of the purge from the files."""
    directory = tmp_path / "j"
    async with _jsonl(directory) as purger, _jsonl(directory) as other:
        ids = await _session(other, "u")  # appended by ``other``: its file is cached open
        session_id = (await other.get(ids[0])).session
        last = await other.get(ids[-1])
        keep = await _session(other, "v")
        feed_before = await other.store.read_feed(0, 100_000)
        await asyncio.sleep(IDLE)
        [record] = await purger.purge(older_than=IDLE / 2, user_id="u")
        assert record.session_id == session_id
        feed_size = (directory / "feed.log").stat().st_size

        with pytest.raises(SessionNotFoundError, match=repr(session_id)):
            await other.store.append(append_request([next_event(last)], last.id))
        with pytest.raises(SessionNotFoundError, match=repr(session_id)):
            await other.add_turn(session_id, role="user", content="too late")
        with pytest.raises(SessionNotFoundError):
            await other.store.session(session_id)
        with pytest.raises(EventNotFoundError):
            await other.store.get(ids[0])
        assert await other.store.heads(session_id) == {}
        assert [e async for e in other.store.events(session_id)] == []
        assert [r.session_id for r in (await other.store.sessions(SessionQuery())).items] == [
            (await other.get(keep[0])).session
        ]
        assert await other.store.read_feed(0, 100_000) == [
            item for item in feed_before if item.event.session != session_id
        ]
        # Nothing was written anywhere: no record, no file brought back.
        assert (directory / "feed.log").stat().st_size == feed_size
        assert not (directory / "sessions" / f"{session_id}.jsonl").exists()
        assert [r.session_id for r in (await other.purged()).items] == [session_id]
        # A snapshot ``other`` folded before the purge does not bring content back.
        await other.store.put_snapshots(session_id, "session@1", [(last.id, b"state")])
        assert not (directory / "snapshots" / f"{session_id}.snap").exists()
        # ``other`` still writes the session it kept, after the gap in the feed.
        await other.add_turn((await other.get(keep[0])).session, role="user", content="on")
        assert (await other.verify()).ok


async def test_jsonl_a_purge_leaves_no_content_and_no_file_of_the_session(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "j"
    secret = f"SECRET-{uuid.uuid4().hex}"
    async with _jsonl(directory) as led:
        s = await led.create(user_id="u", agent="a")
        for _ in range(5):
            await led.add_turn(s.session_id, role="user", content=secret)
        await led.anchor(s.session_id)
        # what recovery and the snapshot files leave beside a session's file
        (directory / "sessions" / f"{s.session_id}.jsonl.torn-1").write_text(secret)
        (directory / "snapshots").mkdir()
        (directory / "snapshots" / f"{s.session_id}.snap").write_text(secret)
        keep = await led.create(user_id="u", agent="a")
        await asyncio.sleep(IDLE)
        await led.add_turn(keep.session_id, role="user", content="fresh")
        assert _files_holding(directory, secret.encode())
        [record] = await led.purge(older_than=IDLE / 2)
        assert record.session_id == s.session_id
        assert _files_holding(directory, secret.encode()) == []
        leftovers = [p.name for p in directory.rglob(f"*{s.session_id}*")]
        assert leftovers == []
        # What names it: its purge record, and the tombstones of its positions.
        assert sorted(p.name for p in _files_holding(directory, s.session_id.encode())) == [
            "feed.log",
            "purges.jsonl",
        ]
        feed = (directory / "feed.log").read_bytes()
        assert feed.count(b" %s purged " % s.session_id.encode()) == record.event_count
        assert not (directory / "purge.redo").exists()
        assert (await led.verify()).ok


async def test_jsonl_the_feed_rebuilt_after_purges_keeps_every_position(tmp_path: Path) -> None:
    """feed.log deleted: purged positions, the newest among them, are not handed out again."""
    directory = tmp_path / "j"
    async with _jsonl(directory) as led:
        early = await _session(led, "keep")
        await _session(led, "gone")  # in the middle of the feed
        late = await _session(led, "keep")
        await asyncio.sleep(IDLE)
        await _session(led, "gone")  # the newest positions
        last_position = (await led.store.read_feed(0, 100_000))[-1].position
        await asyncio.sleep(0.05)
        assert len(await led.purge(older_than=0.01, user_id="gone")) == 2
        feed_after = await led.store.read_feed(0, 100_000)
        assert {item.event.id for item in feed_after} == set(early) | set(late)
    (directory / "feed.log").unlink()
    async with _jsonl(directory) as led:
        assert await led.store.read_feed(0, 100_000) == feed_after
        session_id = (await led.get(early[0])).session
        event = await led.add_turn(session_id, role="user", content="after the rebuild")
        [item] = await led.store.read_feed(last_position, 10)
        assert (item.position, item.event.id) == (last_position + 1, event.id)
        assert len((await led.purged()).items) == 2
        assert (await led.verify()).ok


async def test_jsonl_a_session_reopened_after_a_purge_is_gone_and_the_purge_recorded(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "j"
    async with _jsonl(directory) as led:
        ids = await _session(led, "u")
        session_id = (await led.get(ids[0])).session
        await asyncio.sleep(IDLE)
        await led.purge(older_than=IDLE / 2)
    async with _jsonl(directory) as led:
        with pytest.raises(SessionNotFoundError):
            await led.store.session(session_id)
        assert await led.store.read_feed(0, 100) == []
        assert [r.session_id for r in (await led.purged()).items] == [session_id]
        s = await led.create(user_id="u", agent="a")
        [item] = await led.store.read_feed(0, 100)
        assert (item.position, item.event.session) == (len(ids) + 1, s.session_id)


PURGE_CHILD = """
import asyncio, sys
from ledger import Ledger

async def main(url, users):
    async with Ledger.open(url) as led:
        for user in users.split(","):
            for record in await led.purge(older_than=0.05, user_id=user):
                print(record.session_id, flush=True)  # acknowledged: purge returned

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.slow
def test_jsonl_a_purge_killed_at_any_moment_leaves_each_session_whole_or_gone_with_its_record(
    tmp_path: Path,
) -> None:
    import random
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    directory = tmp_path / "j"
    url = f"jsonl:///{directory}"
    log = tmp_path / "child.log"
    acknowledged: set[str] = set()
    originals: dict[str, list[str]] = {}
    kills = 0

    async def create(n: int) -> None:
        async with Ledger.open(url) as led:
            for i in range(n):
                s = await led.create(user_id=f"u{len(originals)}", agent="a")
                for t in range(i % 3):
                    await led.add_turn(s.session_id, role="user", content=f"{t} {uuid.uuid4()}")
                originals[s.session_id] = [e.id async for e in led.events(s.session_id)]

    async def check() -> None:
        async with Ledger.open(url) as led:
            recorded = {r.session_id async for r in _all_purged(led)}
            assert acknowledged <= recorded, f"seed {seed}"
            for session_id, ids in originals.items():
                if session_id in recorded:
                    with pytest.raises(SessionNotFoundError):
                        await led.store.session(session_id)
                    assert not list(directory.rglob(f"{session_id}*")), f"seed {seed}"
                else:
                    assert [e.id async for e in led.events(session_id)] == ids, f"seed {seed}"
            feed = await led.store.read_feed(0, 1_000_000)
            assert {i.event.session for i in feed} == set(originals) - recorded, f"seed {seed}"
            assert (await led.verify()).ok, f"seed {seed}"

    for _ in range(12):
        asyncio.run(create(6))
        time.sleep(0.1)
        users = ",".join(f"u{n}" for n in range(len(originals)))
        with log.open("w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-c", PURGE_CHILD, url, users],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=root,
                env={"PYTHONPATH": str(root), "PYTHONWARNINGS": "error", "PATH": ""},
            )
        assert proc.stdout is not None
        try:
            for _ in range(rng.choice([0, 1, 2, 3])):
                line = proc.stdout.readline()
                if line.endswith("\n"):
                    acknowledged.add(line.strip())
            time.sleep(rng.uniform(0, 0.03))
        finally:
            proc.send_signal(signal.SIGKILL)
            rest, _ = proc.communicate()
        kills += proc.returncode == -signal.SIGKILL
        acknowledged.update(x.strip() for x in rest.splitlines(keepends=True) if x.endswith("\n"))
        asyncio.run(check())
    assert kills >= 8, f"children exited before the kill (seed {seed}): {log.read_text()}"


async def _all_purged(led: Ledger) -> Any:
    cursor = None
    while True:
        page = await led.purged(limit=100, cursor=cursor)
        for record in page.items:
            yield record
        if (cursor := page.next_cursor) is None:
            return
