"""The keyed ledger: where the key comes from, what it protects, and a wrong key named."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import ConfigError, Ledger
from ledger.anchors import KEY_SIZE, key_id, new_key
from ledger.cli import main
from ledger.events import Checkpointed, Event, TurnAdded
from projections.session import state_checksum
from tests import tamper

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LEDGER_"):
            monkeypatch.delenv(name)


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_a_key_id_names_a_key_without_revealing_it(a: bytes, b: bytes) -> None:
    assert key_id(a) == key_id(a) and len(key_id(a)) == 16
    assert (key_id(a) == key_id(b)) == (a == b)
    assert a.hex()[:16] != key_id(a)


def test_new_keys_are_random_32_bytes() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50 and {len(k) for k in keys} == {KEY_SIZE}


async def test_the_key_comes_from_open_or_ledger_key(monkeypatch: pytest.MonkeyPatch) -> None:
    async with Ledger.open("memory://") as plain:
        assert not plain.keyed and plain.key_id is None
        report = await plain.verify()
        assert not report.keyed and report.key_id is None
    for given_key in (KEY, KEY.hex(), KEY.hex().upper()):
        async with Ledger.open("memory://", key=given_key) as led:
            assert led.keyed and led.key_id == key_id(KEY)
    monkeypatch.setenv("LEDGER_KEY", OTHER_KEY.hex())
    async with Ledger.open("memory://") as led:
        assert led.key_id == key_id(OTHER_KEY)
        sid = (await led.create(user_id="u", agent="a")).session_id
        assert (await led.verify(sid)).key_id == key_id(OTHER_KEY)
    async with Ledger.open("memory://", key=KEY) as led:  # an explicit key wins
        assert led.key_id == key_id(KEY)


@pytest.mark.parametrize("bad", [b"short", bytes(33), "ab" * 31, "zz" * 32])
def test_a_key_that_is_not_32_bytes_is_refused(bad: bytes | str) -> None:
    with pytest.raises(ConfigError, match="Invalid key"):
        Ledger.open("memory://", key=bad)


async def test_a_forger_without_the_key_passes_integrity_but_not_the_keyed_check(
    tmp_path: Path,
) -> None:
    """Rewrite a turn and re-address everything after it, recomputing the checkpoint
    as a plain digest (all a forger without the key can compute): every id and link
    checks again; only the key, and the recorded anchor, tell."""
    path = tmp_path / "l.db"
    url = f"sqlite:///{path}"
    async with Ledger.open(url, key=KEY) as led:
        sid = (await led.create(user_id="u", agent="a")).session_id
        for i in range(3):
            await led.add_turn(sid, role="user", content=f"turn {i}")
        await led.anchor(sid)
        await led.checkpoint(sid, label="end")

    def rewrite(event: Event) -> Event:
        assert isinstance(event.body, TurnAdded)
        return msgspec.structs.replace(
            event, body=msgspec.structs.replace(event.body, content="forged")
        )

    tamper.forge_linear(path, sid, 2, rewrite)
    async with Ledger.open(url) as keyless:
        *_, entry, _ = [e async for e in keyless.events(sid)]
        forged_state = await keyless.state(sid, at=entry.id)

    def recompute(event: Event) -> Event:
        assert isinstance(event.body, Checkpointed)
        body = msgspec.structs.replace(
            event.body, entry=event.parent, checksum=state_checksum(forged_state, None)
        )
        return msgspec.structs.replace(event, body=body)

    tamper.forge_linear(path, sid, 4, recompute)  # the checkpoint, the last event
    async with Ledger.open(url) as keyless:
        report = await keyless.verify(sid)
        # Integrity only: the chain checks; the recorded anchor alone disagrees.
        assert [p.event_id for p in report.problems] == [None]
        assert "no longer hash to the anchored root" in report.problems[0].message
    async with Ledger.open(url, key=KEY) as led:
        report = await led.verify(sid)
        messages = [p.message for p in report.problems]
        assert "it is an unkeyed digest" in messages[0]
        assert "no longer hash to the anchored root" in messages[1]
        assert report.anchors[0].mac == "ok"  # the anchor is genuine; the session is not


def test_keygen_writes_a_private_file_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "ledger.key"
    assert main(["keygen", "--out", str(target), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    key = bytes.fromhex(target.read_text().strip())
    assert out == {"file": str(target), "key_id": key_id(key)}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert main(["keygen", "--out", str(target)]) == 1
    assert "Not overwriting" in capsys.readouterr().err
    assert bytes.fromhex(target.read_text().strip()) == key
    assert main(["keygen"]) == 0
    printed = capsys.readouterr()
    assert len(bytes.fromhex(printed.out.strip())) == 32 and "key id" in printed.err
    assert not (tmp_path / "ledger.db").exists()  # keygen opens no store


def test_a_bad_key_file_or_variable_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not hex\n")
    store = f"sqlite:///{tmp_path / 'l.db'}"
    assert main(["--store", store, "verify", "--key-file", str(bad)]) == 1
    assert f"Cannot read a key from {str(bad)!r}" in capsys.readouterr().err
    bad.write_text("ab" * 16)
    assert main(["--store", store, "verify", "--key-file", str(bad)]) == 1
    assert "expected 32 bytes" in capsys.readouterr().err
    monkeypatch.setenv("LEDGER_KEY", "12")
    assert main(["check-proof", str(bad)]) == 1
    assert "LEDGER_KEY" in capsys.readouterr().err


def test_the_worked_example_keygen_anchor_tamper_verify(tmp_path: Path) -> None:
    """The README's example, as a user runs it, in real processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_URL"] = f"sqlite:///{tmp_path / 'ledger.db'}"

    def ledger(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ledger.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            check=False,
        )

    assert ledger("keygen", "--out", "ledger.key").returncode == 0
    env["LEDGER_KEY"] = (tmp_path / "ledger.key").read_text().strip()
    assert ledger("demo").returncode == 0
    sid = json.loads(ledger("sessions", "--json").stdout)[-1]["session_id"]
    anchored = ledger("anchor", sid, "--out", "anchor.json")
    assert "signed with key" in anchored.stdout
    ok = ledger("verify", sid, "--anchor", "anchor.json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"(keyed: key {key_id(bytes.fromhex(env['LEDGER_KEY']))})" in ok.stdout
    assert "given anchor at 19 events (MAC ok" in ok.stdout
    log = ledger("log", sid).stdout
    assert "[anchor 19 events, key" in log.splitlines()[0]
    ids = [e.id for _, e in tamper.rows(tmp_path / "ledger.db", sid)]
    tamper.delete(tmp_path / "ledger.db", ids[-1:])
    cut = ledger("verify", sid, "--anchor", "anchor.json")
    assert cut.returncode == 1
    assert "truncated to 18 of 19 events" in cut.stdout
    assert "NOT extended" in cut.stdout
    as_json = json.loads(ledger("verify", sid, "--anchor", "anchor.json", "--json").stdout)
    assert as_json["ok"] is False
    assert [a["extended"] for a in as_json["anchors"]] == [False]
    del env["LEDGER_KEY"]
    keyless = ledger("verify", sid, "--anchor", "anchor.json")
    assert "MAC not checked: no key" in keyless.stdout
