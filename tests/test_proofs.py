"""Inclusion and consistency proofs: made by the ledger, checked offline, every tamper named."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import Ledger, LedgerConfig
from ledger.anchors import anchor_mac, key_id
from ledger.cli import main
from ledger.errors import AnchorError, EventNotFoundError, ProofError
from ledger.events import TurnAdded
from ledger.logs import SessionLog
from ledger.merkle import blake3_hash
from ledger.proofs import (
    ConsistencyProof,
    InclusionProof,
    check_proof,
    decode_proof,
    encode_proof,
)
from stores.base import FeedStore
from stores.memory import MemoryStore
from tests.test_anchors import store_state, story
from tests.test_merkle import ref_mth

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def keyed(store: FeedStore, key: bytes | None) -> Ledger:
    return Ledger(store, LedgerConfig(url=store.url, key=key.hex() if key else None))


# --- laws -----------------------------------------------------------------------------

# A session grows by steps: a turn on an existing branch, or a new branch at any event.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("turn"), st.integers(0, 3)),
        st.tuples(st.just("branch"), st.integers(0, 10_000)),
    ),
    min_size=0,
    max_size=25,
)


async def grow(led: Ledger, plan: list[tuple[str, int]]) -> tuple[str, list[str]]:
    sid = (await led.create(user_id="u", agent="a")).session_id
    branches = ["main"]
    ids = [e.id async for e in led.events(sid)]
    for kind, n in plan:
        if kind == "turn":
            event = await led.add_turn(
                sid, role="user", content=n, branch=branches[n % len(branches)]
            )
        else:
            name = f"b{len(branches)}"
            event = await led.branch(sid, name, at=ids[n % len(ids)])
            branches.append(name)
        ids.append(event.id)
    return sid, ids


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps, key=st.sampled_from([None, KEY]), data=st.data())
def test_every_event_is_proven_at_every_later_anchor(
    plan: list[tuple[str, int]], key: bytes | None, data: st.DataObject
) -> None:
    async def run() -> None:
        async with keyed(MemoryStore(), key) as led:
            sid, ids = await grow(led, plan)
            anchor = await led.anchor(sid)
            # The anchored root is the RFC's MTH over the ids, computed independently.
            assert anchor.root == ref_mth([bytes.fromhex(i) for i in ids], blake3_hash).hex()
            old_size = data.draw(st.integers(1, len(ids)))
            old = msgspec.structs.replace(
                anchor,
                size=old_size,
                root=ref_mth([bytes.fromhex(i) for i in ids[:old_size]], blake3_hash).hex(),
            )
            if key is not None:
                old = msgspec.structs.replace(old, mac=anchor_mac(old, key))
            for index, event_id in enumerate(ids):
                proof = await led.prove(event_id, anchor=anchor)
                assert proof.index == index and proof.event.id == event_id
                again = decode_proof(encode_proof(proof))
                assert again == proof
                check = check_proof(again, key=key, trusted=anchor)
                assert (check.event_id, check.index, check.size) == (event_id, index, len(ids))
                assert check.mac == ("ok" if key else "unsigned")
                if index < old_size:
                    at_old = await led.prove(event_id, anchor=old)
                    assert check_proof(at_old, key=key).size == old_size
            consistency = await led.prove_consistency(old)
            assert (
                check_proof(decode_proof(encode_proof(consistency)), key=key, trusted=old).old_size
                == old_size
            )

    asyncio.run(run())


# --- every backend ----------------------------------------------------------------------


async def test_proofs_over_every_backend(make_store: Callable[[], FeedStore]) -> None:
    async with keyed(make_store(), KEY) as led:
        sid, ids = await story(led)
        anchor = await led.anchor(sid)
        turn = ids[2]
        proof = await led.prove(turn)  # at a fresh anchor of the session as it is now
        assert check_proof(proof, key=KEY).kind == "TurnAdded"
        later = await led.add_turn(sid, role="user", content="later")
        fresh = await led.prove(later.id)  # the cached log follows the appends
        assert fresh.index == len(ids) and fresh.anchor.size == len(ids) + 1
        assert check_proof(await led.prove(turn, anchor=anchor), key=KEY, trusted=anchor).index == 2
        before = await store_state(led)
        with pytest.raises(ProofError, match="appended after") as info:
            await led.prove(later.id, anchor=anchor)
        assert info.value.reason == "index" and later.id in str(info.value)
        with pytest.raises(EventNotFoundError, match="f" * 64):
            await led.prove("f" * 64)
        other = (await led.create(user_id="v", agent="a")).session_id
        other_anchor = await led.anchor(other, record=False)
        before = await store_state(led)
        with pytest.raises(AnchorError, match="given for session") as anchor_info:
            await led.prove(turn, anchor=other_anchor)
        assert anchor_info.value.reason == "session"
        assert await store_state(led) == before


# --- every tamper is named -------------------------------------------------------------------


@pytest.fixture(scope="module")
def made() -> tuple[InclusionProof, ConsistencyProof, InclusionProof]:
    async def run() -> tuple[InclusionProof, ConsistencyProof, InclusionProof]:
        async with keyed(MemoryStore(), KEY) as led:
            sid, ids = await story(led)
            for i in range(5):
                await led.add_turn(sid, role="user", content=f"more {i}")
            old = await led.anchor(sid)
            await led.add_turn(sid, role="user", content="last")
            proof = await led.prove(ids[2])
            neighbour = await led.prove(ids[3], anchor=proof.anchor)
            return proof, await led.prove_consistency(old), neighbour

    return asyncio.run(run())


def flip(hex_digest: str) -> str:
    return ("0" if hex_digest[0] != "0" else "1") + hex_digest[1:]


def _body(proof: InclusionProof, content: Any) -> InclusionProof:
    assert isinstance(proof.event.body, TurnAdded)
    body = msgspec.structs.replace(proof.event.body, content=content)
    return msgspec.structs.replace(proof, event=msgspec.structs.replace(proof.event, body=body))


def _anchor(proof: InclusionProof, **changes: Any) -> InclusionProof:
    return msgspec.structs.replace(proof, anchor=msgspec.structs.replace(proof.anchor, **changes))


INCLUSION_TAMPERS: dict[
    str,
    tuple[Callable[[InclusionProof, InclusionProof], InclusionProof], type[Exception], str, str],
] = {
    "the turn's content": (
        lambda p, n: _body(p, "something else"),
        ProofError,
        "event",
        "does not verify",
    ),
    "another event": (
        lambda p, n: msgspec.structs.replace(p, event=n.event),
        ProofError,
        "path",
        "does not lead to the root",
    ),
    "the index": (
        lambda p, n: msgspec.structs.replace(p, index=p.index + 1),
        ProofError,
        "path",
        "does not lead",
    ),
    "an index past the end": (
        lambda p, n: msgspec.structs.replace(p, index=p.anchor.size),
        ProofError,
        "index",
        "outside",
    ),
    "a path node": (
        lambda p, n: msgspec.structs.replace(p, path=[flip(p.path[0]), *p.path[1:]]),
        ProofError,
        "path",
        "does not lead",
    ),
    "a shorter path": (
        lambda p, n: msgspec.structs.replace(p, path=p.path[:-1]),
        ProofError,
        "path",
        "does not lead",
    ),
    "the anchored root": (
        lambda p, n: _anchor(p, root=flip(p.anchor.root)),
        AnchorError,
        "mac",
        "MAC does not match",
    ),
    "the anchored size": (
        lambda p, n: _anchor(p, size=p.anchor.size - 1),
        AnchorError,
        "mac",
        "MAC does not match",
    ),
    "the anchor's session": (
        lambda p, n: _anchor(p, session="s-2"),
        AnchorError,
        "mac",
        "MAC does not match",
    ),
    "the anchored heads": (
        lambda p, n: _anchor(p, heads={**(p.anchor.heads or {}), "main": n.event.id}),
        AnchorError,
        "mac",
        "MAC does not match",
    ),
    "the anchor's key id": (
        lambda p, n: _anchor(p, key_id=key_id(OTHER_KEY)),
        AnchorError,
        "key",
        "Wrong key",
    ),
}


@pytest.mark.parametrize("what", list(INCLUSION_TAMPERS), ids=list(INCLUSION_TAMPERS))
def test_a_tampered_inclusion_proof_names_what_failed(
    made: tuple[InclusionProof, ConsistencyProof, InclusionProof], what: str
) -> None:
    proof, _, neighbour = made
    change, error, reason, words = INCLUSION_TAMPERS[what]
    assert check_proof(proof, key=KEY).event_id == proof.event.id
    bad = decode_proof(encode_proof(change(proof, neighbour)))  # as a file would carry it
    with pytest.raises(error, match=words) as info:
        check_proof(bad, key=KEY)
    assert type(info.value) is error
    assert info.value.reason == reason  # type: ignore[attr-defined]


def test_without_a_key_a_tampered_anchor_is_caught_by_the_path_or_a_kept_anchor(
    made: tuple[InclusionProof, ConsistencyProof, InclusionProof],
) -> None:
    proof, _, _ = made
    assert check_proof(proof).mac == "unchecked"  # integrity only
    with pytest.raises(ProofError, match="does not lead") as info:
        check_proof(_anchor(proof, root=flip(proof.anchor.root)))
    assert info.value.reason == "path"
    # A forger who rebuilds the whole proof around a forged event needs a new root:
    # a kept anchor tells.
    kept = proof.anchor
    moved = _anchor(proof, root=flip(kept.root), mac=None, key_id=None)
    with pytest.raises(ProofError, match="not the anchor of session") as kept_info:
        check_proof(moved, trusted=kept)
    assert kept_info.value.reason == "anchor"


def test_a_proof_under_another_key_says_so(
    made: tuple[InclusionProof, ConsistencyProof, InclusionProof],
) -> None:
    proof, consistency, _ = made
    for item in (proof, consistency):
        with pytest.raises(
            AnchorError,
            match=f"signed with key {key_id(KEY)}, this ledger holds key {key_id(OTHER_KEY)}",
        ):
            check_proof(item, key=OTHER_KEY)


def test_a_tampered_consistency_proof_names_what_failed(
    made: tuple[InclusionProof, ConsistencyProof, InclusionProof],
) -> None:
    _, proof, _ = made
    assert check_proof(proof, key=KEY).old_size == proof.old.size
    with pytest.raises(ProofError, match="does not extend") as info:
        check_proof(
            msgspec.structs.replace(proof, path=[flip(proof.path[0]), *proof.path[1:]]), key=KEY
        )
    assert info.value.reason == "path"
    with pytest.raises(AnchorError, match="MAC does not match"):
        check_proof(
            msgspec.structs.replace(
                proof, old=msgspec.structs.replace(proof.old, size=proof.old.size - 1)
            ),
            key=KEY,
        )
    with pytest.raises(ProofError, match="starts from") as trusted_info:
        check_proof(proof, key=KEY, trusted=proof.new)
    assert trusted_info.value.reason == "anchor"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{}",
        b"[1]",
        b'{"proof": "other"}',
        b"\xff\xfe",
        b'{"proof": "inclusion", "format": 1}',
    ],
)
def test_a_file_that_is_not_a_proof_is_named(data: bytes) -> None:
    with pytest.raises(ProofError, match=r"Not a proof: 'p\.json'") as info:
        decode_proof(data, source="'p.json'")
    assert info.value.reason == "format"


def test_an_unknown_proof_format_is_refused(
    made: tuple[InclusionProof, ConsistencyProof, InclusionProof],
) -> None:
    proof, _, _ = made
    with pytest.raises(ProofError, match="Unknown proof format 7"):
        decode_proof(encode_proof(msgspec.structs.replace(proof, format=7)))


# --- the command ----------------------------------------------------------------------------


def test_check_proof_runs_offline_in_a_real_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("LEDGER_"):
            monkeypatch.delenv(name)
    store = f"sqlite:///{tmp_path / 'l.db'}"
    assert main(["keygen", "--out", "k.key"]) == 0
    assert main(["--store", store, "demo"]) == 0
    capsys.readouterr()
    assert main(["--store", store, "sessions", "--json"]) == 0
    sid = json.loads(capsys.readouterr().out)[-1]["session_id"]
    assert main(["--store", store, "log", sid, "--json"]) == 0
    turn = json.loads(capsys.readouterr().out)["events"][2]["id"]
    assert main(["--store", store, "anchor", sid, "--out", "a.json", "--key-file", "k.key"]) == 0
    assert (
        main(
            [
                "--store",
                store,
                "prove",
                turn,
                "--anchor",
                "a.json",
                "--out",
                "p.json",
                "--key-file",
                "k.key",
            ]
        )
        == 0
    )
    capsys.readouterr()
    # A process that cannot reach any store: only the files.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_URL"] = "postgresql://nobody@127.0.0.1:1/none"
    command = [
        sys.executable,
        "-m",
        "ledger.cli",
        "check-proof",
        "p.json",
        "--key-file",
        "k.key",
        "--anchor",
        "a.json",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    assert f"event {turn} (TurnAdded) is at index 2" in done.stdout
    assert "MAC matches under key" in done.stdout
    keyless = subprocess.run(
        [*command[:5], "--json"], capture_output=True, text=True, env=env, cwd=tmp_path, check=False
    )
    assert json.loads(keyless.stdout)["mac"] == "unchecked"
    # One byte of the proven turn changed: exit 1, named.
    text = (tmp_path / "p.json").read_text()
    (tmp_path / "bad.json").write_text(
        text.replace("Hi! Where is my order", "Hi! Where is my ordeR")
    )
    bad = subprocess.run(
        [*command[:4], "bad.json", "--key-file", "k.key", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert bad.returncode == 1
    assert json.loads(bad.stdout) == {
        "ok": False,
        "reason": "event",
        "error": json.loads(bad.stdout)["error"],
    }
    assert "does not verify" in json.loads(bad.stdout)["error"]
    assert not (tmp_path / "ledger.db").exists()


@settings(max_examples=100, deadline=None)
@given(
    ids=st.lists(st.binary(min_size=32, max_size=32), unique=True, max_size=40),
    twins=st.integers(0, 5),
    lookups=st.lists(st.integers(0, 60), max_size=6),
)
def test_a_log_finds_each_leaf_by_scan_then_by_index(
    ids: list[bytes], twins: int, lookups: list[int]
) -> None:
    # Ids sharing their first 8 bytes (the index's key) are told apart by the whole id.
    ids += [ids[0][:8] + bytes([n]) * 24 for n in range(twins)] if ids else []
    ids = list(dict.fromkeys(ids))
    log = SessionLog("s", b"".join(ids))
    kept = SessionLog("s", b"".join(ids))
    # Not ids: all 0xff, and (when there are two ids) the bytes across their boundary.
    others = [b"\xff" * 32] * 2 + ([ids[0][16:] + ids[1][:16]] if len(ids) > 1 else [b"\xff" * 32])
    for n in lookups + list(
        range(len(ids) + 3)
    ):  # the first lookups scan, later ones use the index
        wanted = ids[n] if n < len(ids) else others[n % 3]
        expected = n if n < len(ids) else (ids.index(wanted) if wanted in ids else None)
        assert log.index_of(wanted.hex()) == expected
        assert kept.index_of(wanted.hex(), kept=True) == expected  # indexed at once
    assert log.index_of("ab") is None  # not an id at all


# --- SQLite's inline read, a proof's one store read ----------------------------------


async def test_sqlite_inline_read_gives_what_get_gives_and_refuses_as_it_does(
    tmp_path: Path,
) -> None:
    from ledger.errors import IntegrityError, StoreClosedError
    from stores.sqlite import SQLiteStore
    from tests import tamper

    path = tmp_path / "inline.db"
    async with Ledger.open(f"sqlite:///{path}", key=KEY) as led:
        sid, _ = await story(led)
        store = led.store
        assert isinstance(store, SQLiteStore)
        every = [e async for e in store.events(sid)]
        for event in every:
            assert await store.get_inline(event.id) == event == await store.get(event.id)
        with pytest.raises(EventNotFoundError, match="no-such-event"):
            await store.get_inline("no-such-event")
        proof = await led.prove(every[3].id)  # through the inline read
        assert check_proof(proof, key=KEY).event_id == every[3].id
    with pytest.raises(StoreClosedError):
        await store.get_inline(every[0].id)
    position, event = tamper.rows(path, sid)[2]
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("UPDATE events SET data = ? WHERE position = ?", (b"{not json", position))
    async with Ledger.open(f"sqlite:///{path}") as led:
        store = led.store
        assert isinstance(store, SQLiteStore)
        with pytest.raises(IntegrityError, match=event.id) as inline:
            await store.get_inline(event.id)
        with pytest.raises(IntegrityError) as get:
            await store.get(event.id)
        assert str(inline.value) == str(get.value)
        assert await store.get_inline(every[1].id) == every[1]


async def test_the_first_proof_from_a_kept_log_indexes_it_and_a_one_off_scans() -> None:
    async with Ledger.open("memory://", key=KEY) as led:
        sid, _ = await story(led)
        ids = [e.id async for e in led.events(sid)]
        one_off = Ledger(led.store, LedgerConfig(url="memory://", key=KEY.hex()))
        await one_off.prove(ids[2])  # the log read for it: scanned, not indexed
        assert one_off._logs._logs[sid]._index is None
        anchor = await led.anchor(sid, record=False)  # the log read, no lookup yet
        proof = await led.prove(ids[1], anchor=anchor)  # its first lookup, of a kept log
        assert led._logs._logs[sid]._index is not None
        assert check_proof(proof, key=KEY).index == 1
