"""The session file format: version 2 lines rebuild every event exactly; version 1
files (written before version 2) still read, and keep getting version 1 lines."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import Ledger
from ledger.errors import IntegrityError
from ledger.events import (
    Event,
    Recorded,
    SessionCreated,
    encode_event,
    event_problem,
    make_event,
)
from stores.jsonl import JSONLStore, reads
from stores.jsonl import format as jsonl
from tests.strategies import bodies, chains, event_ids, events, json_objects, names, texts
from tests.test_jsonl import collect, create, new_session, request, session_file, turn


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


STATUSES = st.none() | st.sampled_from(["active", "suspended", "closed", "expired"])


# --- one line: any event, after any line ------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(event=events(), other=event_ids, after=st.sampled_from(["parent", "other", "none"]))
def test_a_version_2_line_rebuilds_any_event_exactly(event: Event, other: str, after: str) -> None:
    previous = {"parent": event.parent, "other": other, "none": None}[after]
    line = b'{"pos":7%s,"event":%s}\n' % (
        jsonl._parent_field(event, previous),
        jsonl._stored(event),
    )
    fields = json.loads(line)
    assert not {"session", "parent"} & set(fields["event"])
    assert ("idempotency_key" in fields["event"]) == (event.idempotency_key is not None)
    assert ("parent" in fields) == (event.parent != previous)
    parsed = jsonl._parse(line, "f.jsonl", 3, 2, msgspec.json.encode(event.session))
    rebuilt = jsonl._event(parsed, "f.jsonl", 3, previous)
    assert rebuilt == event
    assert event_problem(rebuilt) is None  # the id and digest recompute


# --- a store: trees of branches, forks and batches, read back every way ---------------


def keys(events: list[Event]) -> list[str]:
    return [e.idempotency_key for e in events if e.idempotency_key is not None]


@st.composite
def trees(draw: st.DrawFn) -> tuple[list[tuple[list[Event], str | None, str | None]], Event]:
    """A session built by appends (``(batch, expected head, status)``): its main
    branch from ``chains``, in batches, then more batches extending or forking branches."""
    # an idempotency key seen before would make an append a replay, not a write
    chain = draw(chains(max_size=6).filter(lambda c: len(keys(c)) == len(set(keys(c)))))
    appends: list[tuple[list[Event], str | None, str | None]] = [(chain[:1], None, draw(STATUSES))]
    rest = chain[1:]
    while rest:
        n = draw(st.integers(1, len(rest)))
        appends.append((rest[:n], rest[0].parent, draw(STATUSES)))
        rest = rest[n:]
    every = list(chain)
    heads = {"main": chain[-1]}
    at = chain[-1].at
    for n in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):  # a fork from any event, onto a new branch
            parent = draw(st.sampled_from(every))
            branch = f"{draw(names)}-{n}"
            expected = None
        else:  # more on an existing branch
            branch = draw(st.sampled_from(sorted(heads)))
            parent = heads[branch]
            expected = parent.id
        batch: list[Event] = []
        for body in draw(
            st.lists(
                bodies.filter(lambda b: not isinstance(b, SessionCreated)), min_size=1, max_size=3
            )
        ):
            at += 1
            batch.append(
                make_event(
                    session=parent.session,
                    parent=parent.id,
                    seq=parent.seq + 1,
                    branch=branch,
                    at=at,
                    actor=draw(texts),
                    body=body,
                    idempotency_key=draw(st.none() | st.just(f"tree-{len(every)}")),
                )
            )
            parent = batch[-1]
        appends.append((batch, expected, draw(STATUSES)))
        every += batch
        heads[branch] = batch[-1]
    return appends, chain[0]


async def read_back(store: JSONLStore, root: Event) -> dict[str, Any]:
    """Everything a reader can ask of the session, every event through every read."""
    sid = root.session
    heads = await store.heads(sid)
    steps = {h: await store.path_index(h, 10**6) for h in heads.values()}
    paths = {h: await store.ancestors(h) for h in heads.values()}
    every = await collect(store, sid)
    return {
        "events": every,
        "got": [await store.get(e.id) for e in every],
        "feed": [i.event for i in await store.read_feed(0)],
        "heads": heads,
        "paths": paths,
        "steps": steps,
        "status": (await store.session(sid)).status,
    }


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=trees())
def test_version_2_files_give_back_every_event_of_any_tree(
    tmp_path: Path, tree: tuple[list[tuple[list[Event], str | None, str | None]], Event]
) -> None:
    appends, root = tree
    directory = tmp_path / f"tree-{os.urandom(4).hex()}"

    async def run() -> None:
        async with JSONLStore(directory) as store, JSONLStore(directory) as other:
            await other.heads(root.session)  # open before the appends: it catches up later
            status = "active"
            appended: list[Event] = []
            for batch, expected, new_status in appends:
                await store.append(request(batch, expected, status=new_status))
                appended += batch
                status = new_status or status
            seen = await read_back(store, root)
            assert await read_back(other, root) == seen  # read through another's catch-up
        async with JSONLStore(directory) as store:  # and through a scan at open
            assert await read_back(store, root) == seen
        assert seen["events"] == seen["got"] == seen["feed"] == appended
        assert all(event_problem(e) is None for e in appended)
        assert seen["status"] == status
        by_id = {e.id: e for e in appended}
        for head, path in seen["paths"].items():
            assert path[0] == by_id[head] and path[-1] == root
            assert all(a.parent == b.id for a, b in itertools.pairwise(path))
            assert seen["steps"][head] == [(e.id, e.seq, e.parent) for e in path]
        lines = session_file(directory, root.session).read_bytes().splitlines()
        assert json.loads(lines[0])["version"] == 2
        assert not any("session" in json.loads(x)["event"] for x in lines[1:])

    asyncio.run(run())


# --- version 1 files ------------------------------------------------------------------


def write_version_1(directory: Path, chain: list[Event], first_pos: int = 1) -> Path:
    """A session file as version 1 wrote it: batches of one, every field of the event."""
    path = session_file(directory, chain[0].session)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"ledger": "session-ledger/jsonl", "version": 1, "session": chain[0].session}
    lines = [json.dumps(header, separators=(",", ":")).encode() + b"\n"]
    for pos, event in enumerate(chain, first_pos):
        lines.append(b'{"pos":%d,"batch":[1,1],"event":%s}\n' % (pos, encode_event(event)))
    path.write_bytes(b"".join(lines))
    return path


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chain=chains())
def test_a_version_1_file_still_reads(tmp_path: Path, chain: list[Event]) -> None:
    directory = tmp_path / f"v1-{os.urandom(4).hex()}"
    write_version_1(directory, chain)

    async def run() -> None:
        async with JSONLStore(directory) as store:  # feed.log is rebuilt from the file
            assert await collect(store, chain[0].session) == chain
            assert [i.event for i in await store.read_feed(0)] == chain
            head = chain[-1].id
            assert await store.ancestors(head) == chain[::-1]
            assert await store.path_index(head, 100) == [
                (e.id, e.seq, e.parent) for e in chain[::-1]
            ]

    asyncio.run(run())


async def test_a_version_1_file_keeps_getting_version_1_lines(root: Path) -> None:
    async with JSONLStore(root) as store:
        (fresh,) = await new_session(store)  # a version 2 file beside it, at position 1
    old = [create()]
    old.append(turn(old[0]))
    path = write_version_1(root, old, first_pos=2)
    (root / "feed.log").unlink()  # rebuilt at open from both files
    async with JSONLStore(root) as store:
        assert await collect(store, old[0].session) == old
        more = turn(old[-1])
        await store.append(request([more], old[-1].id, status="active"))
    last = path.read_bytes().splitlines()[-1]
    assert last == b'{"pos":4,"batch":[1,1],"status":"active","event":%s}' % encode_event(more)
    async with JSONLStore(root) as store:
        assert await collect(store, old[0].session) == [*old, more]
        assert await collect(store, fresh.session) == [fresh]
        assert [i.position for i in await store.read_feed(0)] == [1, 2, 3, 4]
        assert [i.event for i in await store.read_feed(0)] == [fresh, *old, more]


async def test_a_version_1_line_is_redacted_as_version_1(root: Path) -> None:
    async with Ledger.open(f"jsonl:///{root}") as led:
        sid = (await led.create(user_id="u", agent="a")).session_id
        secret = await led.add_turn(sid, role="user", content="a secret")
        events = await led.history(sid)
    path = session_file(root, sid)
    (root / "feed.log").unlink()
    write_version_1(root, events)
    async with Ledger.open(f"jsonl:///{root}") as led:
        await led.redact(secret.id, reason="test")
        assert (await led.verify(sid)).ok
    data = path.read_bytes()
    assert b"a secret" not in data
    assert all(b'"batch":[1,1]' in x and b'"session":' in x for x in data.splitlines()[1:])


# --- what cannot be rebuilt is named ----------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        (b'"event":{"id":', b'"event":["id":', "not an event line of this format"),
        (b'"event":{"id":', b'"event":{"ID":', "does not decode"),
    ],
)
async def test_a_line_that_cannot_be_rebuilt_is_named(
    root: Path, old: bytes, new: bytes, why: str
) -> None:
    line = 3  # the second event's
    async with JSONLStore(root) as store:
        chain = await new_session(store, turns=2)
    path = session_file(root, chain[0].session)
    lines = path.read_bytes().splitlines(keepends=True)
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    path.write_bytes(b"".join(lines))
    with pytest.raises(IntegrityError) as info:
        await JSONLStore(root).open()
    assert str(path) in str(info.value)
    assert f"line {line}:" in str(info.value)
    assert why in str(info.value)


async def test_only_a_change_of_status_is_written(root: Path) -> None:
    async with JSONLStore(root) as store:
        chain = [create()]
        await store.append(request(chain, None, status="active"))
        for status in ("active", "suspended", "suspended", "active"):
            chain.append(turn(chain[-1]))
            await store.append(request(chain[-1:], chain[-2].id, status=status))
        row = await store.session(chain[0].session)
    lines = [json.loads(x) for x in session_file(root, chain[0].session).read_bytes().splitlines()]
    assert [x.get("status") for x in lines[1:]] == [None, None, "suspended", None, "active"]
    async with JSONLStore(root) as store:
        assert await store.session(chain[0].session) == row
        assert row.status == "active"


async def test_events_whose_bodies_hold_an_event_key_read_back(root: Path) -> None:
    # "event":{ inside a body, as a framework's record may have: only each line's
    # first one is its envelope's (also one written as the envelope's is, after a
    # comma and with an id first)
    async with JSONLStore(root) as store:
        chain = await new_session(store)
        batch = [turn(chain[-1], {"event": {"id": "x", "event": {}}})]
        batch.append(turn(batch[-1], {"n": 1, "event": {"id": "y"}}))
        for n in range(5):
            batch.append(turn(batch[-1], {"event": {"n": n}}))
        await store.append(request(batch, chain[-1].id))
        chain += batch
        assert await collect(store, chain[0].session) == chain
        assert [await store.get(e.id) for e in chain] == chain
    async with JSONLStore(root) as store:
        assert [i.event for i in await store.read_feed(0)] == chain


# --- a page of lines is decoded at once: no other answer than line by line ---------------


@pytest.mark.parametrize("version", [1, 2])
async def test_a_raw_newline_written_into_a_string_is_named_not_read(
    root: Path, version: int
) -> None:
    # Written into an open store's file (the scan at open would have split the line):
    # a page decoded at once must not take it for a separator, nor change the string.
    chain = [create()]
    for n in range(4):
        chain.append(turn(chain[-1], f"turn\n{n}"))
    if version == 1:
        write_version_1(root, chain)
    else:
        async with JSONLStore(root) as store:
            await store.append(request(chain, None))
    path = session_file(root, chain[0].session)
    async with JSONLStore(root) as store:
        assert await collect(store, chain[0].session) == chain
        data = path.read_bytes()
        at = data.index(b"turn\\n2")
        path.write_bytes(data[:at] + b"turn \n2" + data[at + 7 :])  # the same length
        for page_size in (1, 2, 1000):
            with pytest.raises(IntegrityError) as info:
                [e async for e in store.events(chain[0].session, page_size=page_size)]
            assert f"{str(path)!r}, line 5:" in str(info.value)
        with pytest.raises(IntegrityError, match="line 5:"):
            await store.get(chain[3].id)
        assert await store.get(chain[2].id) == chain[2]


async def test_a_damaged_line_among_many_sessions_in_a_feed_page_is_named(root: Path) -> None:
    # A page of the feed decodes the lines of all its sessions at once: a line that
    # does not hold the event the index names is still named, by its file and line.
    async with JSONLStore(root) as store:
        chains = [await new_session(store, turns=n % 3) for n in range(6)]
        feed = [i.event for i in await store.read_feed(0)]
        assert sorted(feed, key=lambda e: e.id) == sorted(
            itertools.chain(*chains), key=lambda e: e.id
        )
        damaged = chains[3][-1]
        path = session_file(root, damaged.session)
        data = path.read_bytes()
        at = data.index(damaged.id.encode())
        other = b"0" if data[at : at + 1] != b"0" else b"1"
        path.write_bytes(data[:at] + other + data[at + 1 :])  # the same length
        with pytest.raises(IntegrityError) as info:
            await store.read_feed(0)
        assert f"{str(path)!r}, line {len(chains[3]) + 1}:" in str(info.value)


keyed_records = st.builds(Recorded, type=texts, data=st.fixed_dictionaries({"event": json_objects}))
"""Bodies holding an "event" key of their own, as the envelope's."""
turn_bodies = bodies.filter(lambda body: not isinstance(body, SessionCreated))


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    bodies_=st.lists(turn_bodies | keyed_records, min_size=1, max_size=12),
    page_size=st.integers(1, 5),
)
def test_pages_of_any_size_read_as_line_by_line(
    tmp_path: Path, bodies_: list[Any], page_size: int
) -> None:
    # Whatever the bodies hold (an "event" key of their own, newlines in strings),
    # a page decoded at once gives what the line-by-line reader gives.
    directory = tmp_path / f"pages-{os.urandom(4).hex()}"
    chain = [create()]
    for body in bodies_:
        chain.append(
            make_event(
                session=chain[0].session,
                parent=chain[-1].id,
                seq=chain[-1].seq + 1,
                branch="main",
                at=chain[-1].at + 1,
                actor="user-1",
                body=body,
            )
        )

    async def run() -> None:
        async with JSONLStore(directory) as store:
            await store.append(request(chain[:1], None))
            await store.append(request(chain[1:], chain[0].id))
            got = [e async for e in store.events(chain[0].session, page_size=page_size)]
            session = store._sessions[chain[0].session]
            one_by_one = [reads.read_event(store, session, k) for k in range(len(chain))]
        assert got == one_by_one == chain

    asyncio.run(run())
