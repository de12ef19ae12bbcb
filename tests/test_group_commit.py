"""Group commit in the SQLite and PostgreSQL stores, against a real file and the real server.

Concurrent appends of one process are committed in groups (``stores.group``):
one transaction and one flush for many appends, each still answered with its
own result or its own error. These tests make groups happen (tasks queued
together are run together: the writer takes the whole queue) and check, from
the store's group counters, that they did, so none of them passes without a
group having formed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ledger import Ledger
from ledger.errors import (
    BranchExistsError,
    ConfigError,
    ConflictError,
    InvalidEventError,
    LedgerError,
    SessionCapacityError,
    SessionNotFoundError,
    StoreClosedError,
    StoreError,
)
from ledger.events import Event, TurnAdded
from ledger.testing import append_request, branch_event, create_event, next_event
from stores import open_store
from stores.base import AppendRequest, AppendResult
from stores.group import GroupCommit
from stores.sqlite import SQLiteStore, _in_thread
from tests.conftest import POSTGRES_URL_ENV, run_database_url
from tests.test_crash import create_sessions, spawn

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0
"""Guards against a hang only; no test asserts a duration."""

Store = Any  # SQLiteStore | PostgresStore: both have group_stats
MakeStore = Callable[..., Store]


def _backends() -> list[str]:
    return ["sqlite", "postgres"] if os.environ.get(POSTGRES_URL_ENV) else ["sqlite"]


@pytest.fixture(params=_backends())
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _url(kind: str, tmp_path: Path, name: str, **options: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / name}.db" + (f"?{query}" if query else "")
    base = run_database_url()
    sep = "&" if "?" in base else "?"
    schema = f"g_{uuid.uuid4().hex[:16]}"
    return f"{base}{sep}schema={schema}" + (f"&{query}" if query else "")


@pytest.fixture
def make(kind: str, tmp_path: Path) -> MakeStore:
    """``make(name, group_size=...)``: a new store over data of its own (unopened)."""
    names = itertools.count()

    def factory(name: str | None = None, **options: Any) -> Store:
        return open_store(_url(kind, tmp_path, name or f"db{next(names)}", **options))

    return factory


@contextlib.asynccontextmanager
async def opened(store: Store) -> AsyncIterator[Store]:
    async with store:
        yield store


async def settle(*awaitables: Awaitable[Any]) -> list[Any]:
    """Run the awaitables as concurrent tasks; each one's result or exception."""
    return await asyncio.wait_for(asyncio.gather(*awaitables, return_exceptions=True), TIMEOUT)


async def in_one_group(store: Store, requests: list[AppendRequest]) -> list[Any]:
    """Append ``requests`` as concurrent tasks that queue together and form one group.

    An unrelated append is put in flight first: the PostgreSQL store runs an
    append that finds its writer idle at once, alone, and the appends arriving
    meanwhile queue behind it. So this costs two groups: that one, then theirs.
    """
    first = asyncio.ensure_future(store.append(append_request([create_event()], None)))
    await asyncio.sleep(0)  # the first is in flight (SQLite: its writer task is started)
    answers = await settle(*(store.append(r) for r in requests))
    assert isinstance(await first, AppendResult)
    return answers


async def state_of(store: Store, session_ids: list[str]) -> list[Any]:
    """Everything a caller can see of these sessions (positions aside)."""
    seen: list[Any] = []
    for sid in session_ids:
        seen.append(await store.heads(sid))
        seen.append([e async for e in store.events(sid)])
        try:
            seen.append(await store.session(sid))
        except SessionNotFoundError:
            seen.append(None)
    return seen


def turn(parent: Event, content: str, *, key: str | None = None) -> Event:
    return next_event(parent, TurnAdded(role="user", content=content), idempotency_key=key)


def outcome(result: Any, store: Store) -> Any:
    """A comparable outcome: the events and replay flag, or the error's class and message
    (with the store's own file or schema, which differs between two stores, masked)."""
    if isinstance(result, AppendResult):
        return ("ok", result.events, result.replayed)
    assert isinstance(result, LedgerError), repr(result)
    where = store.filename if isinstance(store, SQLiteStore) else str(store.target)
    return (type(result), str(result).replace(where, "<store>"))


# --- one group: sessions mixed, one branch raced, keys replayed, bad requests alone ----


@dataclass
class Scenario:
    """Setup batches, then requests sent at once; the same events for every store."""

    setup: list[AppendRequest] = field(default_factory=list)
    requests: list[AppendRequest] = field(default_factory=list)
    expected: list[type[LedgerError] | None] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)

    def ask(self, request: AppendRequest, error: type[LedgerError] | None = None) -> None:
        self.requests.append(request)
        self.expected.append(error)


def scenario(with_invalid: bool) -> Scenario:
    s = Scenario()
    a, b, c, d = (create_event() for _ in range(4))
    capped = create_event("capped-user")
    alt = branch_event(d, "alt")
    for root in (a, b, c, d, capped):
        s.setup.append(append_request([root], None, status="active"))
    s.setup.append(append_request([alt], None))
    stranger = create_event()  # never appended
    e = create_event("user-e", idempotency_key="create-key")
    e_again = create_event("user-e", idempotency_key="create-key")
    s.sessions = [x.session for x in (a, b, c, d, capped, stranger, e, e_again)]

    a1 = turn(a, "a wins")
    s.ask(append_request([a1], a.id))
    s.ask(append_request([turn(a, "a loses")], a.id), ConflictError)
    b1 = turn(b, "b keyed", key="k")
    s.ask(append_request([b1], b.id))
    s.ask(append_request([turn(b, "b retried", key="k")], b.id))  # replays b1
    s.ask(append_request([turn(stranger, "nobody")], stranger.id), SessionNotFoundError)
    s.ask(
        append_request([create_event("capped-user")], None, max_open_sessions=1),
        SessionCapacityError,
    )
    s.ask(append_request([branch_event(d, "alt")], None), BranchExistsError)
    s.ask(append_request([branch_event(d, "third")], None, max_branches=2), SessionCapacityError)
    if with_invalid:
        # A batch whose second event repeats the first one's key: refused by
        # the database's unique index, not by a check.
        c1 = turn(c, "c one", key="x")
        c2 = next_event(c1, idempotency_key="x")
        s.ask(append_request([c1, c2], c.id), InvalidEventError)
    s.ask(append_request([turn(c, "c after")], c.id))
    s.ask(append_request([e], None, status="active"))
    s.ask(append_request([e_again], None, status="active"))  # replays e
    s.ask(append_request([turn(a1, "a second")], a1.id))
    return s


async def answers_match_one_transaction_each(alone: Any, grouped: Any, s: Any) -> list[Any]:
    """``s.requests`` appended as one group to ``grouped`` and one at a time to ``alone``
    (after ``s.setup`` on both): the same answers, of the expected types, and the same
    stored state. Returns the group's answers."""
    for store in (alone, grouped):
        for request in s.setup:
            await store.append(request)
    # One transaction per append, one after the other: the reference answers.
    reference = []
    for request in s.requests:
        try:
            reference.append(await alone.append(request))
        except LedgerError as exc:
            reference.append(exc)
    before = grouped.group_stats.groups
    answers = await in_one_group(grouped, s.requests)
    stats = grouped.group_stats
    assert stats.groups == before + 2, f"not one group: {stats}"
    assert stats.largest == len(s.requests)
    for answer, expected in zip(answers, s.expected, strict=True):
        if expected is None:
            assert isinstance(answer, AppendResult), repr(answer)
        else:
            assert type(answer) is expected, repr(answer)
    assert [outcome(x, grouped) for x in answers] == [outcome(x, alone) for x in reference]
    # Nothing of a refused request was written; everything else was.
    assert await state_of(grouped, s.sessions) == await state_of(alone, s.sessions)
    return answers


@pytest.mark.parametrize("with_invalid", [False, True], ids=["refusals", "and-invalid"])
async def test_one_group_answers_each_caller_as_one_transaction_per_append_would(
    make: MakeStore, kind: str, with_invalid: bool
) -> None:
    s = scenario(with_invalid)
    async with opened(make(group_size=1)) as alone, opened(make()) as grouped:
        answers = await answers_match_one_transaction_each(alone, grouped, s)
        stats = grouped.group_stats
        # The loser of the race on one head is told the winner's event.
        conflict = answers[1]
        assert isinstance(conflict, ConflictError)
        assert conflict.current == s.requests[0].events[-1].id
        assert answers[3].replayed and answers[3].events == list(s.requests[2].events)
        assert answers[-3].replayed is False and answers[-2].replayed is True
        assert answers[-2].events == list(s.requests[-3].events)
        if kind == "postgres":
            # The invalid batch failed the group's statement: it was rolled back
            # and its requests run one by one; refusals alone never need that.
            assert stats.split == (1 if with_invalid else 0)


def plain_scenario(with_duplicate: bool) -> Scenario:
    """Only appends to existing branches, without keys: the SQLite store checks and
    writes such a group as a whole (``_plain_group_tx``)."""
    s = Scenario()
    a, b, c = (create_event() for _ in range(3))
    alt = branch_event(c, "alt")
    stranger = create_event()  # never appended
    for root in (a, b, c):
        s.setup.append(append_request([root], None, status="active"))
    s.setup.append(append_request([alt], None))
    s.sessions = [x.session for x in (a, b, c, stranger)]
    a1 = turn(a, "a wins")
    s.ask(append_request([a1], a.id))
    s.ask(append_request([turn(a, "a loses")], a.id), ConflictError)
    a2 = turn(a1, "a after a1, in the same group")
    s.ask(append_request([a2], a1.id, status="suspended"))
    s.ask(append_request([turn(stranger, "nobody")], stranger.id), SessionNotFoundError)
    b1 = turn(b, "b one")
    s.ask(append_request([b1, turn(b1, "b two")], b.id))
    s.ask(append_request([turn(alt, "on alt")], alt.id))
    s.ask(append_request([turn(c, "c on a stale head")], b.id), ConflictError)
    if with_duplicate:
        # An event already written, sent again on the right head: only the
        # database's unique index refuses it.
        s.ask(append_request([a1], a2.id), InvalidEventError)
    s.ask(append_request([turn(a2, "a three")], a2.id))
    return s


@pytest.mark.parametrize("with_duplicate", [False, True], ids=["refusals", "and-duplicate"])
async def test_a_group_of_plain_appends_answers_each_caller_as_one_transaction_per_append_would(
    make: MakeStore, with_duplicate: bool
) -> None:
    s = plain_scenario(with_duplicate)
    async with opened(make(group_size=1)) as alone, opened(make()) as grouped:
        await answers_match_one_transaction_each(alone, grouped, s)


@pytest.mark.parametrize("plain", [True, False], ids=["plain-group", "mixed-group"])
async def test_sqlite_an_event_that_does_not_encode_fails_only_its_own_append(
    tmp_path: Path, plain: bool
) -> None:
    # Rows are encoded in the store's packing thread while its writer runs the
    # group: an event that does not encode is still its own caller's refusal.
    async with opened(SQLiteStore(tmp_path / "ledger.db")) as store:
        a, b, c = (create_event() for _ in range(3))
        for root in (a, b, c):
            await store.append(append_request([root], None))
        unencodable = msgspec.structs.replace(
            turn(b, "b"), body=TurnAdded(role="user", content=object())
        )
        requests = [
            append_request([turn(a, "a")], a.id),
            append_request([unencodable], b.id),
            append_request([turn(c, "c")], c.id),
        ]
        if not plain:  # a session created in the group: each append in a savepoint
            requests.append(append_request([create_event()], None))
        answers = await in_one_group(store, requests)
        assert store.group_stats.largest == len(requests)
        refused = answers.pop(1)
        assert isinstance(refused, InvalidEventError), repr(refused)
        assert unencodable.id in str(refused) and b.session in str(refused)
        assert all(isinstance(answer, AppendResult) for answer in answers), answers
        assert await store.heads(b.session) == {"main": b.id}
        assert (await store.session(b.session)).event_count == 1
        for root, request in ((a, requests[0]), (c, requests[2])):
            assert [e async for e in store.events(root.session)] == [root, *request.events]


async def test_groups_form_and_respect_the_bound(make: MakeStore) -> None:
    async with opened(make(group_size=4)) as store:
        roots = [create_event() for _ in range(10)]
        answers = await settle(*(store.append(append_request([r], None)) for r in roots))
        assert all(isinstance(a, AppendResult) for a in answers), answers
        stats = store.group_stats
        assert stats.appends == 10
        assert stats.largest == 4  # the bound held, and was reached: groups formed
        assert stats.groups >= 3
        for root in roots:
            assert await store.heads(root.session) == {"main": root.id}


async def test_group_size_one_is_one_transaction_per_append(make: MakeStore) -> None:
    async with opened(make(group_size=1)) as store:
        roots = [create_event() for _ in range(8)]
        answers = await settle(*(store.append(append_request([r], None)) for r in roots))
        assert all(isinstance(a, AppendResult) for a in answers), answers
        assert (store.group_stats.groups, store.group_stats.largest) == (8, 1)


@pytest.mark.parametrize("bad", ["0", "-3", "many", "2.5"])
def test_bad_group_size_is_a_config_error(kind: str, tmp_path: Path, bad: str) -> None:
    if kind == "postgres":
        url = f"{os.environ[POSTGRES_URL_ENV]}?group_size={bad}"
    else:
        url = f"sqlite:///{tmp_path / 'x.db'}?group_size={bad}"
    with pytest.raises(ConfigError, match="group_size"):
        open_store(url)
    with pytest.raises(ConfigError, match="group_size"):
        open_store(url.partition("?")[0], group_size=True)


def test_group_size_from_url_and_keyword(kind: str, tmp_path: Path) -> None:
    url = _url(kind, tmp_path, "opts", group_size=7)
    stores: list[Any] = [
        open_store(url),
        open_store(url, group_size=2),  # keywords win
        open_store(_url(kind, tmp_path, "default")),
    ]
    assert [s._group.max_size for s in stores] == [7, 2, 64]


# --- the commit itself fails ---------------------------------------------------------


async def test_sqlite_full_database_fails_every_caller_of_the_group(tmp_path: Path) -> None:
    """SQLITE_FULL (here from ``max_page_count``, as from a full disk) fails the whole group."""
    async with SQLiteStore(tmp_path / "full.db") as store:
        roots = [create_event() for _ in range(6)]
        for root in roots:
            await store.append(append_request([root], None))
        sessions = [r.session for r in roots]
        before = await state_of(store, sessions)
        assert store._writer is not None

        def cap(conn: Any) -> int:
            pages: int = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count={pages}")
            return pages

        pages = await _in_thread(store._writer, cap)
        big = "x" * 200_000  # each needs new pages
        groups = store.group_stats.groups
        answers = await settle(*(store.append(append_request([turn(r, big)], r.id)) for r in roots))
        assert store.group_stats.groups == groups + 1
        for answer, root in zip(answers, roots, strict=True):
            assert type(answer) is StoreError, repr(answer)
            message = str(answer)
            assert "full" in message and store.filename in message and root.session in message
        assert await state_of(store, sessions) == before
        # The store goes on once there is room again.
        await _in_thread(store._writer, lambda c: c.execute(f"PRAGMA max_page_count={pages * 100}"))
        answers = await settle(*(store.append(append_request([turn(r, big)], r.id)) for r in roots))
        assert all(isinstance(a, AppendResult) for a in answers), answers


FSIZE_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, resource, signal, sys
    from ledger.testing import append_request, create_event, next_event
    from ledger.events import TurnAdded
    from stores.sqlite import SQLiteStore

    async def main(path):
        async with SQLiteStore(path) as store:
            roots = [create_event() for _ in range(8)]
            for root in roots:
                await store.append(append_request([root], None))
            print(json.dumps([r.session for r in roots]), flush=True)
            # The file size limit stands in for a full disk: writing the
            # group's frames past it fails inside COMMIT (EFBIG, not a signal).
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            size = max(os.path.getsize(path), os.path.getsize(path + "-wal"))
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1024, hard))
            big = "y" * 100_000
            batch = [append_request([next_event(r, TurnAdded(role="user", content=big))], r.id)
                     for r in roots]
            answers = await asyncio.gather(*(store.append(b) for b in batch),
                                           return_exceptions=True)
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            print(json.dumps([[type(a).__name__, str(a)] for a in answers]), flush=True)
            print(json.dumps([store.group_stats.groups, store.group_stats.largest]), flush=True)
            again = await asyncio.gather(*(store.append(b) for b in batch),
                                         return_exceptions=True)
            print(json.dumps([type(a).__name__ for a in again]), flush=True)

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_sqlite_failed_commit_fails_the_group_and_shows_nothing(tmp_path: Path) -> None:
    """A write error inside COMMIT (a real EFBIG from the OS) fails every caller; nothing shows."""
    path = tmp_path / "fsize.db"
    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_CHILD, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    sessions_line, answers_line, stats_line, again_line = proc.stdout.splitlines()
    sessions = json.loads(sessions_line)
    answers = json.loads(answers_line)
    _, largest = json.loads(stats_line)
    assert largest == len(sessions), "the appends did not form one group"
    assert {name for name, _ in answers} == {"StoreError"}, answers
    assert all(str(path) in message for _, message in answers), answers
    # Once the limit is lifted the same appends commit: the store was not left broken.
    assert json.loads(again_line) == ["AppendResult"] * len(sessions)

    async def check() -> None:
        async with SQLiteStore(path) as store:
            for sid in sessions:
                events = [e async for e in store.events(sid)]
                # the root, then exactly the second attempt's turn: the failed group left nothing
                assert len(events) == 2
                assert (await store.session(sid)).event_count == 2

    asyncio.run(check())


async def test_postgres_connection_lost_fails_every_caller_of_the_group(
    postgres_url: str, tmp_path: Path
) -> None:
    import asyncpg

    async with opened(open_store(_url("postgres", tmp_path, "lost"))) as store:
        roots = [create_event() for _ in range(4)]
        for root in roots:
            await store.append(append_request([root], None))
        sessions = [r.session for r in roots]
        before = await state_of(store, sessions)
        admin = await asyncpg.connect(store._dsn, server_settings=store._settings)
        try:
            # Hold one session's row: the group waits for it inside its statement.
            tx = admin.transaction()
            await tx.start()
            await admin.execute(
                "SELECT 1 FROM ledger_sessions WHERE session_id = $1 FOR UPDATE", roots[2].session
            )
            groups = store.group_stats.groups
            # An append in flight first, so that the four queue together (see in_one_group).
            first = asyncio.ensure_future(store.append(append_request([create_event()], None)))
            await asyncio.sleep(0)
            pending = asyncio.gather(
                *(store.append(append_request([turn(r, "lost")], r.id)) for r in roots),
                return_exceptions=True,
            )
            pid = None
            for _ in range(1000):
                # Inside a transaction pg_stat_activity is read once, then cached.
                await admin.execute("SELECT pg_stat_clear_snapshot()")
                pid = await admin.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE '%ledger_append_group%'"
                )
                if pid is not None:
                    break
                await asyncio.sleep(0.01)
            assert pid is not None, "the group never blocked"
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            answers = await asyncio.wait_for(pending, TIMEOUT)
            await tx.rollback()
        finally:
            await admin.close()
        assert isinstance(await first, AppendResult)
        assert store.group_stats.groups == groups + 2
        assert store.group_stats.largest == len(roots)
        for answer, root in zip(answers, roots, strict=True):
            assert type(answer) is StoreError, repr(answer)
            message = str(answer)
            assert "lost during an append" in message and root.session in message
            assert "same idempotency key" in message
        assert await state_of(store, sessions) == before
        # the retry lands
        answers = await settle(
            *(store.append(append_request([turn(r, "retried")], r.id)) for r in roots)
        )
        assert all(isinstance(a, AppendResult) for a in answers), answers


# --- the feed, cancellation, close ---------------------------------------------------


async def test_a_tailing_reader_never_skips_an_event_of_a_group(make: MakeStore) -> None:
    async with opened(make()) as store:
        roots = [create_event() for _ in range(16)]
        await settle(*(store.append(append_request([r], None)) for r in roots))
        start = (await store.read_feed(0, 10_000))[-1].position
        seen: list[int] = []
        done = asyncio.Event()

        async def tail() -> None:
            after = start
            while True:
                finished = done.is_set()
                items = await store.read_feed(after, 1000)
                seen.extend(item.position for item in items)
                if items:
                    after = items[-1].position
                elif finished:
                    return
                else:
                    await asyncio.sleep(0)

        async def writer(root: Event) -> None:
            head = root
            for n in range(10):
                event = turn(head, f"n{n}")
                await store.append(append_request([event], head.id))
                head = event

        reader = asyncio.ensure_future(tail())
        await settle(*(writer(r) for r in roots))
        done.set()
        await asyncio.wait_for(reader, TIMEOUT)
        everything = [i.position for i in await store.read_feed(start, 10_000)]
        assert len(everything) == 160
        assert seen == everything  # in order, none skipped, none twice
        assert store.group_stats.largest > 1


async def test_a_cancelled_waiting_caller_is_dropped_and_the_others_commit(
    make: MakeStore,
) -> None:
    async with opened(make(group_size=1)) as store:
        roots = [create_event() for _ in range(5)]
        tasks = [asyncio.ensure_future(store.append(append_request([r], None))) for r in roots]
        await asyncio.sleep(0)  # every request is queued; the first group has not started
        tasks[3].cancel()
        answers = await settle(*tasks)
        assert isinstance(answers[3], asyncio.CancelledError)
        assert all(isinstance(a, AppendResult) for i, a in enumerate(answers) if i != 3)
        assert await store.heads(roots[3].session) == {}  # nothing of it was written
        assert store.group_stats.appends == 4
        # the writer goes on
        late = create_event()
        assert not (await store.append(append_request([late], None))).replayed


async def test_a_caller_cancelled_in_flight_does_not_break_the_writer(make: MakeStore) -> None:
    async with opened(make()) as store:
        roots = [create_event() for _ in range(6)]
        tasks = [asyncio.ensure_future(store.append(append_request([r], None))) for r in roots]
        for _ in range(20):  # let the group start: its statement is in flight
            await asyncio.sleep(0)
        tasks[0].cancel()
        answers = await settle(*tasks)
        assert all(isinstance(a, AppendResult) for a in answers[1:]), answers
        # The cancelled one committed or not, whole: its session is there or absent.
        assert await store.heads(roots[0].session) in ({}, {"main": roots[0].id})
        more = [create_event() for _ in range(6)]
        answers = await settle(*(store.append(append_request([r], None)) for r in more))
        assert all(isinstance(a, AppendResult) for a in answers), answers


async def test_closing_with_appends_queued_completes_them(make: MakeStore, kind: str) -> None:
    store = make(group_size=2)
    await store.open()
    roots = [create_event() for _ in range(12)]
    tasks = [asyncio.ensure_future(store.append(append_request([r], None))) for r in roots]
    await asyncio.sleep(0)  # all queued, the first group started
    await asyncio.wait_for(store.close(), TIMEOUT)
    answers = await settle(*tasks)
    assert all(isinstance(a, AppendResult) for a in answers), answers
    # PostgreSQL runs the first append alone, directly; the other 11 queue behind it.
    assert store.group_stats.groups == (1 + 6 if kind == "postgres" else 6)
    assert store.group_stats.largest == 2
    with pytest.raises(StoreClosedError):
        await store.append(append_request([create_event()], None))
    async with opened(open_store(store.url)) as again:
        for root in roots:
            assert await again.heads(root.session) == {"main": root.id}


# --- an append alone runs directly (PostgreSQL) --------------------------------------


class Recorder:
    """A group runner over plain values: records each group and the task that ran it."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.tasks: list[asyncio.Task[Any] | None] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, group: list[int]) -> list[int | BaseException]:
        self.groups.append(list(group))
        self.tasks.append(asyncio.current_task())
        await asyncio.sleep(0)  # as a database round trip, it always yields
        await self.gate.wait()
        return [ValueError(f"refused: {n}") if n < 0 else n * 10 for n in group]


def direct_group(runner: Recorder, max_size: int = 64) -> GroupCommit[int, int]:
    return GroupCommit(runner, max_size=max_size, name="test", direct=True)


async def test_an_append_alone_runs_on_its_callers_task() -> None:
    runner = Recorder()
    group = direct_group(runner)
    assert await group.submit(1) == 10
    with pytest.raises(ValueError, match="refused: -2"):
        await group.submit(-2)
    assert runner.groups == [[1], [-2]]
    assert runner.tasks == [asyncio.current_task()] * 2
    assert (group.stats.groups, group.stats.appends) == (2, 2)


async def test_appends_arriving_during_a_direct_run_form_the_next_group() -> None:
    runner = Recorder()
    group = direct_group(runner, max_size=3)
    runner.gate.clear()
    first = asyncio.ensure_future(group.submit(0))
    await asyncio.sleep(0)  # in flight, directly
    rest = [asyncio.ensure_future(group.submit(n)) for n in (1, -2, 3, 4)]
    await asyncio.sleep(0)
    assert runner.groups == [[0]]  # the others wait for it
    runner.gate.set()
    answers = await settle(first, *rest)
    assert answers[:2] == [0, 10] and answers[3:] == [30, 40]
    assert isinstance(answers[2], ValueError)
    assert runner.groups == [[0], [1, -2, 3], [4]]


async def test_callers_answered_together_appending_again_group_again() -> None:
    runner = Recorder()
    group = direct_group(runner)

    async def appender(n: int) -> None:
        for _ in range(5):
            await group.submit(n)

    await settle(*(appender(n) for n in range(8)))
    # The first ran alone and the other seven queued behind it (then the first,
    # appending again); from then on the eight answered by one group append
    # again before its writer ends.
    assert [len(g) for g in runner.groups] == [1] + [8] * 4 + [7], runner.groups


async def test_a_direct_caller_cancelled_in_flight_leaves_the_queue_served() -> None:
    runner = Recorder()
    group = direct_group(runner)
    runner.gate.clear()
    first = asyncio.ensure_future(group.submit(0))
    await asyncio.sleep(0)
    behind = asyncio.ensure_future(group.submit(1))
    await asyncio.sleep(0)
    first.cancel()
    runner.gate.set()
    answers = await settle(first, behind)
    assert isinstance(answers[0], asyncio.CancelledError) and answers[1] == 10
    assert await group.submit(2) == 20


async def test_close_waits_for_a_direct_run_and_the_queue_behind_it() -> None:
    runner = Recorder()
    group = direct_group(runner)
    runner.gate.clear()
    tasks = [asyncio.ensure_future(group.submit(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(group.close())
    await asyncio.sleep(0)
    assert not closing.done()
    runner.gate.set()
    await asyncio.wait_for(closing, TIMEOUT)
    assert all(t.done() for t in tasks)
    assert [t.result() for t in tasks] == [10, 20, 30]
    assert runner.groups == [[1], [2, 3]]
    with pytest.raises(StoreClosedError):
        await group.submit(4)


@contextlib.asynccontextmanager
async def session_held(
    store: Store, session_id: str
) -> AsyncIterator[Callable[[], Awaitable[Any]]]:
    """Another connection holds the session's row lock; yields a coroutine function
    that returns once an append waits for it."""
    import asyncpg

    admin = await asyncpg.connect(store._dsn, server_settings=store._settings)
    try:
        async with admin.transaction():
            await admin.execute(
                "SELECT 1 FROM ledger_sessions WHERE session_id = $1 FOR UPDATE", session_id
            )

            async def blocked() -> Any:
                for _ in range(1000):
                    await admin.execute("SELECT pg_stat_clear_snapshot()")
                    pid = await admin.fetchval(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE '%ledger_append%'"
                    )
                    if pid is not None:
                        return pid
                    await asyncio.sleep(0.01)
                raise AssertionError("the append never blocked")

            yield blocked
    finally:
        await admin.close()


async def appends_settled(store: Store) -> None:
    """Wait until no backend of this database is running an append."""
    import asyncpg

    admin = await asyncpg.connect(store._dsn, server_settings=store._settings)
    try:
        for _ in range(1000):
            running = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'active' AND query LIKE '%ledger_append%' AND pid <> pg_backend_pid()"
            )
            if not running:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("an append never finished")
    finally:
        await admin.close()


async def test_postgres_direct_append_cancelled_in_flight_is_whole_or_absent(
    postgres_url: str, tmp_path: Path
) -> None:
    async with opened(open_store(_url("postgres", tmp_path, "cancel"))) as store:
        root = create_event()
        await store.append(append_request([root], None))
        event = turn(root, "cancelled")
        async with session_held(store, root.session) as blocked:
            task = asyncio.ensure_future(store.append(append_request([event], root.id)))
            await blocked()  # running directly, waiting inside its statement
            others = [create_event() for _ in range(3)]
            behind = [
                asyncio.ensure_future(store.append(append_request([r], None))) for r in others
            ]
            await asyncio.sleep(0)
            task.cancel()
            answers = await settle(task, *behind)
        assert isinstance(answers[0], asyncio.CancelledError)
        assert all(isinstance(a, AppendResult) for a in answers[1:]), answers
        # The cancelled statement's backend may still be finishing it, now the lock is gone.
        await appends_settled(store)
        heads = await store.heads(root.session)
        assert heads in ({"main": root.id}, {"main": event.id})
        # The interrupted connection was replaced: appends go on, after whichever is the head.
        head = event if heads["main"] == event.id else root
        result = await store.append(append_request([turn(head, "again")], head.id))
        assert isinstance(result, AppendResult)


async def test_postgres_close_waits_for_a_direct_append_in_flight(
    postgres_url: str, tmp_path: Path
) -> None:
    store = open_store(_url("postgres", tmp_path, "closing"))
    await store.open()
    root = create_event()
    await store.append(append_request([root], None))
    event = turn(root, "in flight at close")
    async with session_held(store, root.session) as blocked:
        task = asyncio.ensure_future(store.append(append_request([event], root.id)))
        await blocked()
        closing = asyncio.ensure_future(store.close())
        await asyncio.sleep(0.05)
        assert not closing.done()  # it waits for the append
    # the lock released: the append commits, then the store closes
    assert isinstance(await asyncio.wait_for(task, TIMEOUT), AppendResult)
    await asyncio.wait_for(closing, TIMEOUT)
    async with opened(open_store(store.url)) as again:
        assert await again.heads(root.session) == {"main": event.id}


# --- through the facade ------------------------------------------------------------


async def test_facade_sixty_four_tasks_on_one_session_and_on_their_own(
    make: MakeStore,
) -> None:
    store = make()
    async with Ledger.open(store.url) as led:
        shared = await led.create(user_id="u", agent="a")
        own = [await led.create(user_id=f"u{n}", agent="a") for n in range(64)]

        async def one(sid: str, n: int) -> Event:
            return await led.add_turn(sid, role="user", content=f"turn {n}")

        answers = await settle(
            *(one(shared.session_id, n) for n in range(64)),
            *(one(s.session_id, n) for n, s in enumerate(own)),
        )
        assert all(isinstance(a, Event) for a in answers), [
            a for a in answers if not isinstance(a, Event)
        ]
        history = await led.history(shared.session_id)
        assert len(history) == 65
        assert collections.Counter(e.id for e in history[1:]) == collections.Counter(
            a.id for a in answers[:64]
        )
        for parent, child in itertools.pairwise(history):
            assert child.parent == parent.id
        for s, answer in zip(own, answers[64:], strict=True):
            assert [e.id for e in await led.history(s.session_id)][1:] == [answer.id]
        assert (await led.verify()).ok
        stats = led.store.group_stats  # type: ignore[attr-defined]
        assert stats.largest > 1 and stats.groups < stats.appends


# --- processes ---------------------------------------------------------------------

GROUP_WRITER = textwrap.dedent(
    """
    import asyncio, json, sys
    from ledger import Ledger

    async def main(url, sessions, turns, name):
        sessions = json.loads(sessions)
        async with Ledger.open(url) as led:
            async def write(sid):
                for n in range(int(turns)):
                    event = await led.add_turn(sid, role="user", content=f"{name} {n}")
                    print(event.id, flush=True)  # acknowledged
            await asyncio.gather(*(write(sid) for sid in sessions))
            stats = led.store.group_stats
            print(json.dumps({"groups": stats.groups, "appends": stats.appends,
                              "largest": stats.largest, "split": stats.split}), flush=True)

    asyncio.run(main(*sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_processes_grouping_the_same_sessions_in_opposite_orders(
    make: MakeStore, tmp_path: Path
) -> None:
    """Groups of two processes lock the same sessions in one order: none deadlocks or splits."""
    url = make().url
    sessions = asyncio.run(create_sessions(url, 12))
    turns = 8
    orders = [sessions, sessions[::-1], sessions[3:] + sessions[:3]]
    logs = [tmp_path / f"w{n}.log" for n in range(len(orders))]
    procs = [
        spawn(GROUP_WRITER, url, json.dumps(order), str(turns), f"w{n}", log=log)
        for n, (order, log) in enumerate(zip(orders, logs, strict=True))
    ]
    acked: set[str] = set()
    for proc, log in zip(procs, logs, strict=True):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log.read_text()
        *ids, stats_line = out.splitlines()
        stats = json.loads(stats_line)
        assert stats["split"] == 0, stats
        assert stats["largest"] > 1, stats
        acked.update(ids)

    async def check() -> None:
        async with Ledger.open(url) as led:
            for sid in sessions:
                history = await led.history(sid)
                assert len(history) == 1 + len(orders) * turns
                for parent, child in itertools.pairwise(history):
                    assert child.parent == parent.id and child.seq == parent.seq + 1
                assert acked >= {e.id for e in history[1:]}
            assert len(acked) == len(sessions) * len(orders) * turns
            assert (await led.verify()).ok

    asyncio.run(check())


GROUP_CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from ledger import Ledger

    async def main(url, sessions, name):
        async with Ledger.open(url) as led:
            async def write(sid):
                n = 0
                while True:
                    event = await led.add_turn(sid, role="user", content=f"{name} {n}")
                    print(event.id, flush=True)  # acknowledged: add_turn has returned
                    n += 1
            await asyncio.gather(*(write(sid) for sid in json.loads(sessions)))

    asyncio.run(main(*sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_acknowledged_grouped_appends_survive_sigkill(make: MakeStore, tmp_path: Path) -> None:
    """16 concurrent appenders in a process killed at random: every acknowledged append is
    there, and every session is one whole chain (a group is never half visible)."""
    url = make().url
    sessions = asyncio.run(create_sessions(url, 16))
    acknowledged: list[str] = []
    log = tmp_path / "child.log"
    for round_ in range(6):
        proc = spawn(GROUP_CRASH_CHILD, url, json.dumps(sessions), f"r{round_}", log=log)
        assert proc.stdout is not None
        for _ in range(20 + 15 * round_):
            line = proc.stdout.readline()
            assert line.endswith("\n"), f"child died: {log.read_text()}"
            acknowledged.append(line.strip())
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        acknowledged += [x.strip() for x in rest.splitlines(keepends=True) if x.endswith("\n")]

    async def check() -> None:
        async with Ledger.open(url) as led:
            present: collections.Counter[str] = collections.Counter()
            for sid in sessions:
                history = await led.history(sid)
                assert [e async for e in led.store.events(sid)] == history
                for parent, child in itertools.pairwise(history):
                    assert child.parent == parent.id and child.seq == parent.seq + 1
                present.update(e.id for e in history)
            lost = [i for i in acknowledged if present[i] != 1]
            assert not lost, f"acknowledged events lost: {lost}"
            assert (await led.verify()).ok

    asyncio.run(check())
