"""The JSONL store's saved index: opening from it finds what a full scan finds.

``index`` is derived data: each test compares a store opened from it with one
opened after deleting it (every session file scanned), and damage done to the
files after the index was saved is still named at open.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import Ledger
from ledger.errors import IntegrityError
from stores.base import SessionQuery
from stores.jsonl import JSONLStore, saved_index, scan
from tests.test_jsonl import (
    collect,
    line,
    new_session,
    purge_request,
    request,
    session_file,
    turn,
)


async def view(store: JSONLStore) -> dict[str, Any]:
    """Everything the index answers: listing, heads, keys, the feed and every event."""
    feed = await store.read_feed(0, limit=1 << 20)
    rows = (await store.sessions(SessionQuery(limit=1 << 20))).items
    sessions = {row.session_id for row in rows}
    return {
        "feed": feed,
        "rows": rows,
        "idle": await store.idle_sessions(1 << 62, limit=1 << 20),
        "heads": {s: await store.heads(s) for s in sessions},
        "events": {s: await collect(store, s) for s in sessions},
        "got": [await store.get(item.event.id) for item in feed],
        "keys": [
            await store.find_by_key(i.event.session, i.event.idempotency_key)
            for i in feed
            if i.event.idempotency_key is not None
        ],
        "open": {user: n for user, n in store._open_count.items() if n},  # open sessions
    }


async def scanned_view(root: Path) -> dict[str, Any]:
    """The view of a store opened with no index: every file scanned."""
    scratch = root.with_name(root.name + "-scanned")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(root, scratch)
    (scratch / "index").unlink(missing_ok=True)
    async with JSONLStore(scratch) as store:
        return await view(store)


class ScanCounter:
    """Counts the session files a store scans at open (the real scan runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.scanned: list[str] = []
        scan_session = scan.scan_session

        def counting(store: JSONLStore, session_id: str, *args: Any) -> None:
            self.scanned.append(session_id)
            scan_session(store, session_id, *args)

        monkeypatch.setattr(scan, "scan_session", counting)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(autouse=True)
def index_every_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small stores save no index (their scan is as quick): these tests want one."""
    monkeypatch.setattr(saved_index, "_INDEX_FROM", 0)


async def test_a_small_store_saves_no_index(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with JSONLStore(root) as store:
        await new_session(store, turns=2)
    assert (root / "index").exists()
    monkeypatch.setattr(saved_index, "_INDEX_FROM", 4)
    async with JSONLStore(root) as store:
        await new_session(store)
    assert (root / "index").exists()  # 4 events
    monkeypatch.setattr(saved_index, "_INDEX_FROM", 6)
    async with JSONLStore(root) as store:
        await new_session(store)
    assert not (root / "index").exists()  # 5 events: removed, not left to go stale


async def test_a_closed_store_opens_from_its_index_without_scanning(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"jsonl:///{root}"
    async with Ledger.open(url) as led:
        first = await led.create(user_id="u1", agent="a", idempotency_key="k1")
        second = await led.create(user_id="u2", agent="b")
        await led.add_turn(first.session_id, role="user", content="one", idempotency_key="t1")
        await led.branch(first.session_id, "alt")
        await led.add_turn(first.session_id, role="user", content="two", branch="alt")
        turn_id = (await led.add_turn(second.session_id, role="user", content="secret")).id
        await led.redact(turn_id, reason="test")
        await led.suspend(second.session_id)
        third = await led.create(user_id="u3", agent="c")
        await led.close(third.session_id)
    assert (root / "index").exists()
    counter = ScanCounter(monkeypatch)
    async with JSONLStore(root) as store:
        assert counter.scanned == [], "nothing changed: the index is taken as it is"
        assert await view(store) == await scanned_view(root)


async def test_a_stale_index_is_brought_up_to_date(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process wrote after this index was saved: only what changed is scanned."""
    async with JSONLStore(root) as store:
        kept = await new_session(store, turns=2)
        grown = await new_session(store, turns=1)
    old_index = (root / "index").read_bytes()
    async with JSONLStore(root) as store:
        more = turn(grown[-1], "more")
        await store.append(request([more], grown[-1].id, status="closed"))
        fresh = await new_session(store, turns=1)
    (root / "index").write_bytes(old_index)
    counter = ScanCounter(monkeypatch)
    async with JSONLStore(root) as store:
        assert sorted(counter.scanned) == sorted([grown[0].session, fresh[0].session])
        assert await collect(store, grown[0].session) == [*grown, more]
        assert await collect(store, fresh[0].session) == fresh
        assert await collect(store, kept[0].session) == kept
        assert (await store.session(grown[0].session)).status == "closed"
        assert await view(store) == await scanned_view(root)


async def test_a_torn_tail_written_after_the_index_is_moved_aside(root: Path) -> None:
    async with JSONLStore(root) as store:
        chain = await new_session(store, turns=1)
    path = session_file(root, chain[0].session)
    torn = b'{"pos":3,"event":{"id":"ab'
    with path.open("ab") as f:
        f.write(torn)
    async with JSONLStore(root) as store:
        assert store.recovered == [path.with_name(path.name + ".torn-1")]
        assert store.recovered[0].read_bytes() == torn
        assert await collect(store, chain[0].session) == chain
        later = turn(chain[-1])
        await store.append(request([later], chain[-1].id))
    async with JSONLStore(root) as store:
        assert await collect(store, chain[0].session) == [*chain, later]


async def test_a_synced_batch_without_its_record_is_kept_with_an_index(root: Path) -> None:
    async with JSONLStore(root) as store:
        chain = await new_session(store)
    a = turn(chain[0], "a")
    with session_file(root, chain[0].session).open("ab") as f:
        f.write(line(2, a, chain[0]))
    async with JSONLStore(root) as store:
        assert [i.event for i in await store.read_feed(0)] == [chain[0], a]
        assert await store.heads(chain[0].session) == {"main": a.id}


async def test_a_session_file_gone_since_the_index_is_named(root: Path) -> None:
    async with JSONLStore(root) as store:
        chain = await new_session(store, turns=1)
        await new_session(store)
    session_file(root, chain[0].session).unlink()
    with pytest.raises(IntegrityError, match=r"feed\.log.*which is missing"):
        await JSONLStore(root).open()


async def test_an_older_shorter_copy_of_a_session_file_is_named(root: Path) -> None:
    async with JSONLStore(root) as store:
        chain = await new_session(store, turns=1)
        path = session_file(root, chain[0].session)
        older = path.read_bytes()
        await store.append(request([turn(chain[-1])], chain[-1].id))
    stat = path.stat()
    path.write_bytes(older)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the saved time
    with pytest.raises(IntegrityError, match=r"feed\.log"):
        await JSONLStore(root).open()


async def test_damage_in_the_tick_of_the_save_is_named(root: Path) -> None:
    """A file whose time is not older than the save is scanned whole, whatever its stat."""
    async with JSONLStore(root) as store:
        chain = await new_session(store, turns=2)
        path = session_file(root, chain[0].session)
        future = path.stat().st_mtime_ns + 10**12  # as if changed as the index was saved
        os.utime(path, ns=(future, future))
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"event":{', b'"event":#', 2).replace(b"#", b"{", 1))
    os.utime(path, ns=(future, future))  # same size, same time: only the content changed
    with pytest.raises(IntegrityError) as info:
        await JSONLStore(root).open()
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value)


async def test_an_unreadable_index_means_a_full_scan(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with JSONLStore(root) as store:
        chain = await new_session(store, turns=1)
    (root / "index").write_bytes(b"not an index")
    counter = ScanCounter(monkeypatch)
    async with JSONLStore(root) as store:
        assert counter.scanned == [chain[0].session]
        assert await collect(store, chain[0].session) == chain
    assert (root / "index").read_bytes() != b"not an index"  # saved again at close


async def test_an_index_of_another_feed_is_not_used(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with JSONLStore(root) as store:
        chain = await new_session(store, turns=1)
    (root / "feed.log").unlink()  # rebuilt from the session files: its records are new
    counter = ScanCounter(monkeypatch)
    async with JSONLStore(root) as store:
        assert counter.scanned == [chain[0].session]
        assert await collect(store, chain[0].session) == chain


# --- the law: open from the index == open by scanning ---------------------------------

steps = st.lists(
    st.tuples(
        st.sampled_from(["new", "turns", "close", "reopen", "stale", "purge"]),
        st.integers(0, 7),
        st.integers(1, 3),
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(program=steps)
def test_opening_from_the_index_equals_a_full_scan(tmp_path: Path, program: list[Any]) -> None:
    root = tmp_path / f"law-{os.urandom(4).hex()}"

    async def run() -> None:
        chains: list[list[Any]] = []
        stale: bytes | None = None
        store = JSONLStore(root)
        await store.open()
        try:
            for what, which, n in program:
                live = [c for c in chains if c]
                if what == "new" or not live:
                    chains.append(await new_session(store, turns=n - 1))
                elif what == "turns":
                    chain = live[which % len(live)]
                    batch = [turn(chain[-1])]
                    for _ in range(n - 1):
                        batch.append(turn(batch[-1]))
                    await store.append(request(batch, chain[-1].id))
                    chain.extend(batch)
                elif what == "close":
                    chain = live[which % len(live)]
                    chain.append(turn(chain[-1]))
                    await store.append(request([chain[-1]], chain[-2].id, status="closed"))
                elif what == "purge":
                    chain = live[which % len(live)]
                    await store.purge([purge_request(await store.session(chain[0].session))])
                    chain.clear()
                else:
                    await store.close()
                    if what == "stale" and stale is not None:
                        (root / "index").write_bytes(stale)  # saved by an earlier close
                    elif (root / "index").exists():
                        stale = (root / "index").read_bytes()
                    store = JSONLStore(root)
                    await store.open()
            await store.close()
            async with JSONLStore(root) as store:
                assert await view(store) == await scanned_view(root)
        finally:
            await store.close()

    asyncio.run(run())
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(root.with_name(root.name + "-scanned"), ignore_errors=True)
