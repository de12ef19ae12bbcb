"""Redaction over every selected backend: what is erased, what is kept, what still verifies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import (
    AlreadyRedactedError,
    Erased,
    EventNotFoundError,
    EventNotRedactableError,
    InvalidEventError,
    Ledger,
    LedgerConfig,
    Projection,
    Recorded,
    Redacted,
    TurnAdded,
)
from ledger.events import encode_event, erase, event_problem, make_event
from ledger.testing import append_request, create_event, next_event
from projections.transcript import REDACTED_ROLE, TRANSCRIPT, context_window
from stores.base import AppendRequest, FeedStore, SessionQuery
from tests.strategies import json_values, texts

MakeStore = Callable[[], FeedStore]


def ledger(make_store: MakeStore, **settings: Any) -> Ledger:
    return Ledger(make_store(), LedgerConfig(url="memory://", **settings))


def marker() -> str:
    """A string found nowhere else: the erased content the file greps look for."""
    return f"SECRET-{uuid.uuid4().hex}"


async def everything(led: Ledger) -> dict[str, Any]:
    """All a store holds, to prove that a refused operation changed none of it."""
    store = led.store
    sessions = (await store.sessions(SessionQuery(limit=10_000))).items
    return {
        "feed": await store.read_feed(0, 100_000),
        "rows": sessions,
        "heads": {s.session_id: await store.heads(s.session_id) for s in sessions},
    }


# --- the facade, every backend ------------------------------------------------------


async def test_redact_erases_the_body_and_keeps_id_digest_and_accounting(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        secret = marker()
        turn = await led.add_turn(
            s.session_id, role="user", content=secret, tokens_in=7, tokens_out=3, cost=0.25
        )
        cp = await led.checkpoint(s.session_id)
        await led.add_turn(s.session_id, role="assistant", content="ok")
        before = await led.state(s.session_id)

        record = await led.redact(turn.id, reason="user asked", actor="dpo")

        assert isinstance(record.body, Redacted)
        assert (record.body.event, record.body.reason, record.actor) == (
            turn.id,
            "user asked",
            "dpo",
        )
        assert record.parent == before.head and record.branch == "main"
        stored = await led.get(turn.id)
        assert stored.id == turn.id and stored.body_digest == turn.body_digest
        assert stored.kind == "TurnAdded" and stored.salt == ""
        assert stored.body == Erased(original="TurnAdded", tokens_in=7, tokens_out=3, cost=0.25)
        assert secret not in msgspec.json.encode(await led.history(s.session_id)).decode()
        after = await led.state(s.session_id)
        assert (after.turn_count, after.tokens_in, after.tokens_out, after.cost) == (
            before.turn_count,
            before.tokens_in,
            before.tokens_out,
            before.cost,
        )
        assert after.head == record.id and after.event_count == before.event_count + 1
        report = await led.verify(s.session_id)
        assert report.ok, report.problems
        # The checkpoint taken before the redaction still matches its entry's state.
        await led.restore(s.session_id, cp.id)
        assert (await led.verify(s.session_id)).ok


async def test_the_transcript_shows_a_placeholder_and_the_context_window_leaves_it_out(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        await led.add_turn(s.session_id, role="system", content="be brief")
        secret = await led.add_turn(s.session_id, role="user", content=marker(), tokens_in=4)
        await led.add_turn(s.session_id, role="assistant", content="noted")
        folded = await led.project(s.session_id, TRANSCRIPT)  # cached before the redaction
        assert folded[1].content == secret.body.content  # type: ignore[union-attr]

        await led.redact(secret.id, reason="pii")

        turns = await led.turns(s.session_id)
        assert [t.role for t in turns] == ["system", REDACTED_ROLE, "assistant"]
        placeholder = turns[1]
        assert placeholder.redacted and placeholder.content is None
        assert placeholder.event_id == secret.id and placeholder.tokens_in == 4
        assert not turns[0].redacted and not turns[2].redacted
        assert await led.project(s.session_id, TRANSCRIPT) == tuple(turns)
        window = await led.context(s.session_id)
        assert [t.content for t in window] == ["be brief", "noted"]
        # The newest non-system turn is "noted": the placeholder is not counted in ``last``.
        assert context_window(turns, last=2) == [turns[0], turns[2]]


async def test_a_redacted_record_reaches_custom_projections_as_erased(
    make_store: MakeStore,
) -> None:
    seen = Projection(
        "kinds-seen",
        1,
        initial=lambda: (),
        apply=lambda s, e: (*s, type(e.body).__name__) if e.kind == "Recorded" else s,
        state_type=tuple[str, ...],
    )
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        rec = await led.record(s.session_id, "tool", {"card": marker()})
        await led.redact(rec.id, reason="card number")
        assert await led.project(s.session_id, seen) == ("Erased",)
        stored = await led.get(rec.id)
        assert stored.body == Erased(original="Recorded") and stored.kind == "Recorded"
        assert (await led.verify(s.session_id)).ok


async def test_redactions_are_listed_in_append_order(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        a = await led.add_turn(s.session_id, role="user", content="a")
        b = await led.record(s.session_id, "note", "b")
        rb = await led.redact(b.id, reason="first")
        ra = await led.redact(a.id, reason="second")
        assert [e.id for e in await led.redactions(s.session_id)] == [rb.id, ra.id]


async def test_redaction_is_allowed_on_closed_and_expired_branches(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        turn = await led.add_turn(s.session_id, role="user", content=marker())
        await led.close(s.session_id, reason="done")
        record = await led.redact(turn.id, reason="closed but not forgotten")
        state = await led.state(s.session_id)
        assert state.status == "closed" and state.head == record.id
        assert (await led.verify(s.session_id)).ok

        e = await led.create(user_id="u", agent="a", ttl_s=0.2)
        old = await led.add_turn(e.session_id, role="user", content="x")
        await asyncio.sleep(0.3)  # idle beyond the TTL: the next write expires the session
        with pytest.raises(Exception, match="expired"):
            await led.add_turn(e.session_id, role="user", content="too late")
        await led.redact(old.id, reason="after expiry")
        assert (await led.state(e.session_id)).status == "expired"
        assert (await led.verify(e.session_id)).ok


async def test_redacting_a_turn_on_a_side_branch_appends_to_that_branch(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        await led.add_turn(s.session_id, role="user", content="main")
        await led.branch(s.session_id, "alt")
        side = await led.add_turn(s.session_id, role="user", content=marker(), branch="alt")
        main_head = (await led.state(s.session_id)).head
        record = await led.redact(side.id, reason="x")
        assert record.branch == "alt" and record.parent == side.id
        assert (await led.state(s.session_id)).head == main_head
        assert (await led.verify(s.session_id)).ok


# --- bad input: a clear error, and nothing written ----------------------------------


async def test_redacting_an_unknown_event_raises_event_not_found_and_writes_nothing(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        await led.add_turn(s.session_id, role="user", content="x")
        before = await everything(led)
        with pytest.raises(EventNotFoundError, match="'no-such-event'"):
            await led.redact("no-such-event", reason="x")
        assert await everything(led) == before


async def test_a_second_redaction_names_the_first_and_writes_nothing(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        turn = await led.add_turn(s.session_id, role="user", content="x")
        first = await led.redact(turn.id, reason="once")
        before = await everything(led)
        with pytest.raises(AlreadyRedactedError) as info:
            await led.redact(turn.id, reason="twice")
        assert info.value.event_id == turn.id and info.value.redaction_id == first.id
        assert repr(turn.id) in str(info.value) and repr(first.id) in str(info.value)
        assert await everything(led) == before


async def test_only_turns_and_records_can_be_redacted(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        meta = await led.set_metadata(s.session_id, {"k": "v"})
        cp = await led.checkpoint(s.session_id)
        record = await led.redact((await led.record(s.session_id, "t", 1)).id, reason="x")
        before = await everything(led)
        for event_id, kind in (
            (s.head, "SessionCreated"),
            (meta.id, "MetadataSet"),
            (cp.id, "Checkpointed"),
            (record.id, "Redacted"),
        ):
            with pytest.raises(EventNotRedactableError) as info:
                await led.redact(event_id, reason="x")
            assert repr(event_id) in str(info.value) and kind in str(info.value)
            assert info.value.kind == kind
        assert await everything(led) == before


async def test_a_redaction_needs_a_reason(make_store: MakeStore) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        turn = await led.add_turn(s.session_id, role="user", content="x")
        before = await everything(led)
        for reason in ("", "   "):
            with pytest.raises(InvalidEventError, match=repr(turn.id)):
                await led.redact(turn.id, reason=reason)
        assert await everything(led) == before
        assert isinstance((await led.get(turn.id)).body, TurnAdded)


# --- caches and snapshots -----------------------------------------------------------


@pytest.mark.durable
async def test_no_snapshot_or_cache_serves_the_erased_content(make_store: MakeStore) -> None:
    secret = marker()
    async with ledger(make_store, snapshot_every=2) as led:
        s = await led.create(user_id="u", agent="a")
        turn = await led.add_turn(s.session_id, role="user", content=secret)
        for i in range(6):
            await led.add_turn(s.session_id, role="assistant", content=f"r{i}")
        head = (await led.state(s.session_id)).head
        assert secret in str(await led.project(s.session_id, TRANSCRIPT))  # keeps snapshots
        path = await led.history(s.session_id)
        snapshotted = [
            e.id
            for e in path
            if e.seq % 2 == 0 and await led.store.get_snapshot(s.session_id, "transcript@1", e.id)
        ]
        assert snapshotted, "the test needs snapshots to be kept"

        await led.redact(turn.id, reason="x")

        for event_id in snapshotted:
            assert await led.store.get_snapshot(s.session_id, "transcript@1", event_id) is None
        assert secret not in str(await led.project(s.session_id, TRANSCRIPT, at=head))
    async with ledger(make_store, snapshot_every=2) as reopened:
        assert secret not in str(await reopened.project(s.session_id, TRANSCRIPT, at=head))
        assert (await reopened.verify(s.session_id)).ok


# --- the erased bytes are gone from the files ----------------------------------------


def _files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and needle in path.read_bytes():
            found.append(path.name)
    return found


async def _redact_big_and_small(led: Ledger, secret: str) -> tuple[str, list[str]]:
    """A session whose erased content sits in a small turn, a big one (overflow pages)
    and a record, among many other events and sessions; returns it and the erased ids."""
    s = await led.create(user_id="u", agent="a")
    other = await led.create(user_id="u", agent="a")
    small = await led.add_turn(s.session_id, role="user", content=f"my name is {secret}")
    # Incompressible, so that even compressed (SQLite) it spans overflow pages.
    big = await led.add_turn(
        s.session_id, role="user", content=f"{secret} {os.urandom(6000).hex()}"
    )
    rec = await led.record(s.session_id, "tool", {"args": [secret]})
    for i in range(40):
        await led.add_turn(s.session_id, role="assistant", content=f"reply {i} " * 50)
        await led.add_turn(other.session_id, role="user", content=f"other {i} " * 50)
    await led.project(s.session_id, TRANSCRIPT)  # snapshots holding the content
    return s.session_id, [small.id, big.id, rec.id]


async def test_sqlite_erased_content_is_gone_from_the_database_wal_and_shm(
    tmp_path: Path,
) -> None:
    secret = marker()
    db = tmp_path / "db" / "ledger.db"
    async with Ledger.open(f"sqlite:///{db}", config=LedgerConfig(snapshot_every=4)) as led:
        session_id, erased = await _redact_big_and_small(led, secret)
        ids = [e.id async for e in led.events(session_id)]
        # Not vacuous: the content is in the files, the WAL among them, before.
        assert _files_holding(db.parent, secret.encode()), "the marker should be on disk"
        # The big turn is stored compressed: look for a piece of its stored bytes too.
        with contextlib.closing(sqlite3.connect(db)) as raw:
            (stored,) = raw.execute("SELECT data FROM events WHERE id = ?", (erased[1],)).fetchone()
            (page_size,) = raw.execute("PRAGMA page_size").fetchone()
        assert stored[:1] == b"\x02" and len(stored) > page_size  # compressed, overflowing
        piece = stored[len(stored) // 2 : len(stored) // 2 + 64]
        assert _files_holding(db.parent, piece)
        assert (db.parent / "ledger.db-wal").exists()
        for event_id in erased:
            await led.redact(event_id, reason="erase")
        # Checked while the store is open: the WAL and shm files exist now.
        assert (db.parent / "ledger.db-wal").exists() and (db.parent / "ledger.db-shm").exists()
        assert _files_holding(db.parent, secret.encode()) == []
        assert _files_holding(db.parent, piece) == []
        assert [e.id async for e in led.events(session_id)] == ids + [
            r.id for r in await led.redactions(session_id)
        ]
        assert (await led.verify()).ok
    assert _files_holding(db.parent, secret.encode()) == []


async def test_jsonl_erased_content_is_gone_from_every_file(tmp_path: Path) -> None:
    secret = marker()
    root = tmp_path / "jsonl"
    async with Ledger.open(f"jsonl:///{root}", config=LedgerConfig(snapshot_every=4)) as led:
        session_id, erased = await _redact_big_and_small(led, secret)
        ids = [e.id async for e in led.events(session_id)]
        sizes = {p.name: p.stat().st_size for p in root.rglob("*.jsonl")}
        assert _files_holding(root, secret.encode())
        for event_id in erased:
            await led.redact(event_id, reason="erase")
        assert _files_holding(root, secret.encode()) == []
        assert not (root / "redact.redo").exists()
        # In place: every other session file is untouched, offsets are kept.
        other = {p.name: p.stat().st_size for p in root.rglob("*.jsonl")}
        assert {k: v for k, v in other.items() if session_id not in k} == {
            k: v for k, v in sizes.items() if session_id not in k
        }
        assert [e.id async for e in led.events(session_id)][: len(ids)] == ids
        assert (await led.verify()).ok
        feed = await led.store.read_feed(0, 10_000)
        assert all(secret not in str(item.event.body) for item in feed)
    # A fresh process's view: the index rebuilt from the files, feed.log checked.
    async with Ledger.open(f"jsonl:///{root}") as reopened:
        assert (await reopened.verify()).ok
        assert [e.id async for e in reopened.events(session_id)][: len(ids)] == ids


async def test_postgres_erased_content_is_gone_from_every_row(postgres_url: str) -> None:
    import asyncpg

    secret = marker()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    url = f"{postgres_url}?schema={schema}"
    async with Ledger.open(url, config=LedgerConfig(snapshot_every=4)) as led:
        session_id, erased = await _redact_big_and_small(led, secret)
        conn = await asyncpg.connect(postgres_url)
        try:
            count_sql = (
                f"SELECT (SELECT count(*) FROM {schema}.ledger_events "
                "WHERE position($1::bytea IN data) > 0) + "
                f"(SELECT count(*) FROM {schema}.ledger_snapshots "
                "WHERE position($1::bytea IN state) > 0)"
            )
            assert await conn.fetchval(count_sql, secret.encode()) > 0
            for event_id in erased:
                await led.redact(event_id, reason="erase")
            assert await conn.fetchval(count_sql, secret.encode()) == 0
            # What VACUUM FULL leaves on disk: the table files are rewritten from the
            # tuples some transaction may still see; once none can see the old
            # versions (another backend's snapshot may hold them a moment), none.
            for _ in range(40):
                if not await _on_disk(conn, schema, secret.encode()):
                    break
                await asyncio.sleep(0.25)
            else:
                raise AssertionError("VACUUM FULL kept the erased tuples on disk")
        finally:
            await conn.close()
        assert (await led.verify(session_id)).ok


async def _on_disk(conn: Any, schema: str, needle: bytes) -> bool:
    """VACUUM FULL ledger_events, CHECKPOINT, then: does its heap or TOAST file hold ``needle``?"""
    await conn.execute(f"VACUUM FULL {schema}.ledger_events")
    await conn.execute("CHECKPOINT")
    files = await conn.fetch(
        "SELECT pg_relation_filepath(c.oid), pg_relation_filepath(c.reltoastrelid) "
        "FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = 'ledger_events'",
        schema,
    )
    paths = [path for row in files for path in row if path is not None]
    assert paths
    for path in paths:
        if needle in await conn.fetchval("SELECT pg_read_binary_file($1)", path):
            return True
    return False


# --- a JSONL redaction cut short by SIGKILL is finished at the next open --------------

_KILL_AFTER_APPEND = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from ledger import Ledger
    import stores.jsonl.write as jsonl_write

    def die(self, *args, **kwargs):  # the batch is appended: die before the overwrite
        os.kill(os.getpid(), signal.SIGKILL)

    async def main(url, event_id):
        async with Ledger.open(url) as led:
            jsonl_write.write_batch = (lambda write: lambda store, *a, **k: (
                write(store, *a, **k), die(store)))(jsonl_write.write_batch)
            await led.redact(event_id, reason="cut short")

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_jsonl_redaction_killed_after_its_append_is_finished_at_open(
    tmp_path: Path,
) -> None:
    secret = marker()
    root = tmp_path / "jsonl"
    url = f"jsonl:///{root}"
    async with Ledger.open(url) as led:
        s = await led.create(user_id="u", agent="a")
        turn = await led.add_turn(s.session_id, role="user", content=secret)
        await led.add_turn(s.session_id, role="assistant", content="after")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _KILL_AFTER_APPEND,
        url,
        turn.id,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == -signal.SIGKILL, stderr.decode()
    assert (root / "redact.redo").exists()
    assert _files_holding(root / "sessions", secret.encode())  # killed before the overwrite
    async with Ledger.open(url) as led:
        assert not (root / "redact.redo").exists()
        assert _files_holding(root, secret.encode()) == []
        assert isinstance((await led.get(turn.id)).body, Erased)
        assert len(await led.redactions(s.session_id)) == 1
        assert (await led.verify(s.session_id)).ok


# --- the event model and verify -------------------------------------------------------


def test_make_event_refuses_an_erased_body() -> None:
    with pytest.raises(InvalidEventError, match="only by a redaction"):
        make_event(
            session="s",
            parent="p",
            seq=1,
            branch="main",
            at=1,
            actor="a",
            body=Erased(original="TurnAdded"),
        )


@given(content=json_values, tokens=st.integers(0, 10**9), record_type=texts)
@settings(max_examples=50, deadline=None)
def test_erasing_keeps_the_id_and_verifies_on_its_own(
    content: Any, tokens: int, record_type: str
) -> None:
    root = create_event()
    for body in (
        TurnAdded(role="user", content=content, tokens_in=tokens),
        Recorded(type=record_type, data=content),
    ):
        event = next_event(root, body)
        erased = erase(event)
        assert erased.id == event.id and erased.body_digest == event.body_digest
        assert erased.kind == event.kind and erased.salt == ""
        assert event_problem(erased) is None
        assert len(msgspec.json.encode(erased)) < len(msgspec.json.encode(event))


def test_event_problem_refuses_erased_bodies_of_the_wrong_shape() -> None:
    event = erase(next_event(create_event()))
    salted = msgspec.structs.replace(event, salt="0" * 32)
    assert event_problem(salted) == "an erased body must have an empty salt"
    renamed = msgspec.structs.replace(event, body=Erased(original="Closed"))
    assert event_problem(renamed) == "a Closed body cannot be erased"
    other_kind = msgspec.structs.replace(event, body=Erased(original="Recorded"))
    assert event_problem(other_kind) == "id does not match its header"
    unsalted = msgspec.structs.replace(next_event(create_event()), salt="")
    assert event_problem(unsalted) == "salt is not 32 lower-case hex digits"


async def test_verify_names_an_erased_event_without_its_redaction_record(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        turn = await led.add_turn(s.session_id, role="user", content="x")
        # A store written to directly: an erase that no Redacted event records.
        after = next_event(turn, TurnAdded(role="user", content="y"))
        await led.store.append(
            AppendRequest(
                session_id=s.session_id,
                branch="main",
                expected_head=turn.id,
                events=[after],
                erase=[erase(turn)],
            )
        )
        report = await led.verify(s.session_id)
        assert [(p.event_id, p.message) for p in report.problems] == [
            (turn.id, "erased, but no Redacted event names it")
        ]


async def test_verify_names_a_redaction_of_an_event_that_is_not_erased(
    make_store: MakeStore,
) -> None:
    async with ledger(make_store) as led:
        s = await led.create(user_id="u", agent="a")
        turn = await led.add_turn(s.session_id, role="user", content="x")
        forged = next_event(turn, Redacted(event=turn.id, reason="never done"))
        await led.store.append(append_request([forged], turn.id))
        report = await led.verify(s.session_id)
        assert report.first_bad == forged.id
        assert "not an erased event before it" in report.problems[0].message


# --- the command ----------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from ledger.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_redact_command_and_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    secret = marker()

    async def setup() -> tuple[str, str]:
        async with Ledger.open(url) as led:
            s = await led.create(user_id="u", agent="a")
            turn = await led.add_turn(s.session_id, role="user", content=secret)
            return s.session_id, turn.id

    session_id, turn_id = asyncio.run(setup())
    code, out, err = _cli(
        capsys, "--store", url, "redact", turn_id[:10], "--session", session_id, "--reason",
        "asked to forget", "--actor", "dpo",
    )  # fmt: skip
    assert code == 0, err
    assert f"Erased {turn_id[:12]} (TurnAdded) of session {session_id}" in out
    code, out, err = _cli(capsys, "--store", url, "log", session_id)
    assert code == 0, err
    lines = out.splitlines()
    redaction = next(line for line in lines if "Redacted" in line)
    assert f"{turn_id[:12]} by dpo at " in redaction and "asked to forget" in redaction
    erased = next(line for line in lines if turn_id[:12] in line and "TurnAdded" in line)
    assert "(erased)" in erased and "[redacted by " in erased
    assert secret not in out
    code, out, _ = _cli(capsys, "--store", url, "--json", "log", session_id)
    events = json.loads(out)["events"]
    assert [e["body"]["kind"] for e in events] == ["SessionCreated", "Erased", "Redacted"]
    assert (events[1]["kind"], events[1]["body"]["kind"]) == ("TurnAdded", "Erased")
    # Bad input: a clear message naming what failed, exit status 1.
    code, _, err = _cli(capsys, "--store", url, "redact", turn_id, "--reason", "again")
    assert code == 1 and f"Event already redacted: {turn_id!r}" in err
    code, _, err = _cli(capsys, "--store", url, "redact", "f" * 64, "--reason", "x")
    assert code == 1 and "Event not found" in err
    code, _, err = _cli(capsys, "--store", url, "redact", turn_id)
    assert code == 2 and "--reason" in err


async def test_verify_names_an_erased_body_changed_after_the_redaction(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    async with Ledger.open(f"sqlite:///{db}") as led:
        s = await led.create(user_id="u", agent="a")
        turn = await led.add_turn(s.session_id, role="user", content="x", tokens_in=5)
        record = await led.redact(turn.id, reason="x")
        assert isinstance(record.body, Redacted) and record.body.erased is not None
        assert (await led.verify(s.session_id)).ok
    # The erased body is not covered by the event's digest; the record's id covers it.
    forged = msgspec.structs.replace(
        await _get(db, turn.id), body=Erased(original="TurnAdded", tokens_in=1)
    )
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE events SET data = ? WHERE id = ?", (encode_event(forged), turn.id))
    async with Ledger.open(f"sqlite:///{db}") as led:
        report = await led.verify(s.session_id)
        assert [(p.event_id, p.message) for p in report.problems] == [
            (turn.id, f"erased body differs from {record.id!r}'s")
        ]


async def _get(db: Path, event_id: str) -> Any:
    async with Ledger.open(f"sqlite:///{db}") as led:
        return await led.get(event_id)


async def test_sqlite_a_reader_holding_old_wal_frames_delays_their_removal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented limit: another connection's open read transaction keeps the WAL."""
    secret = marker()
    db = tmp_path / "ledger.db"
    async with Ledger.open(f"sqlite:///{db}?busy_timeout=0.2") as led:
        s = await led.create(user_id="u", agent="a")
        turn = await led.add_turn(s.session_id, role="user", content=secret)
        other = await led.add_turn(s.session_id, role="user", content="second")
        reader = sqlite3.connect(db, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM events").fetchone()  # a snapshot held
            with caplog.at_level("WARNING", logger="stores.sqlite"):
                await led.redact(turn.id, reason="x")
            assert "kept the WAL from being truncated" in caplog.text
            assert _files_holding(tmp_path, secret.encode()) == ["ledger.db-wal"]
        finally:
            reader.close()
        await led.redact(other.id, reason="the next erase truncates the WAL")
        assert _files_holding(tmp_path, secret.encode()) == []


@given(
    contents=st.lists(st.tuples(st.booleans(), json_values), min_size=1, max_size=8),
    chosen=st.sets(st.integers(0, 7)),
)
@settings(max_examples=30, deadline=None)
def test_any_set_of_redactions_keeps_every_id_and_verifies(
    contents: list[tuple[bool, Any]], chosen: set[int]
) -> None:
    from stores.memory import MemoryStore

    async def run() -> None:
        async with Ledger(MemoryStore()) as led:
            s = await led.create(user_id="u", agent="a")
            written = []
            for i, (is_turn, content) in enumerate(contents):
                if is_turn:
                    written.append(
                        await led.add_turn(s.session_id, role="user", content=content, tokens_in=i)
                    )
                else:
                    written.append(await led.record(s.session_id, "r", content))
                if i % 3 == 2:
                    await led.checkpoint(s.session_id)
            before = [e.id async for e in led.events(s.session_id)]
            state = await led.state(s.session_id)
            targets = [written[i] for i in sorted(chosen) if i < len(written)]
            for event in targets:
                await led.redact(event.id, reason="law")
            after = [e.id async for e in led.events(s.session_id)]
            assert after[: len(before)] == before and len(after) == len(before) + len(targets)
            for event in targets:
                assert (await led.get(event.id)).body == erase(event).body
            now = await led.state(s.session_id)
            assert (now.turn_count, now.tokens_in) == (state.turn_count, state.tokens_in)
            report = await led.verify(s.session_id)
            assert report.ok, report.problems

    asyncio.run(run())
