"""The ``ledger`` command, run in-process through ``main`` and once as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import pytest

import ledger.cli
from ledger import Ledger
from ledger.anchors import key_id
from ledger.cli import main

EVERY_KIND = {
    "SessionCreated",
    "TurnAdded",
    "Recorded",
    "MetadataSet",
    "Checkpointed",
    "Branched",
    "Restored",
    "Suspended",
    "Resumed",
    "Closed",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LEDGER_"):
            monkeypatch.delenv(name)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@dataclass(frozen=True)
class Demo:
    url: str
    path: Path
    session: str
    expired: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """One demo run, shared by the read-only tests of this module."""
    path = tmp_path_factory.mktemp("demo") / "demo.db"
    url = f"sqlite:///{path}"
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("LEDGER_"):
                mp.delenv(name)
        buffer = StringIO()
        mp.setattr(sys, "stdout", buffer)
        assert main(["--store", url, "demo", "--json"]) == 0
    document = json.loads(buffer.getvalue())
    session, expired = document["sessions"]
    yield Demo(url=url, path=path, session=session, expired=expired)


# ---------------------------------------------------------------------------- demo


def test_demo_writes_every_kind_and_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    code, out, err = run(capsys, "--store", url, "demo")
    assert code == 0, err
    assert err == ""
    assert "OK: 22 events in 2 sessions verified (integrity only: no key)" in out
    assert "(HEAD -> main)" in out
    assert "(alt)" in out
    assert "[checkpoint order-found]" in out
    assert "|/" in out
    assert "Session has expired" in out  # the second session, reported as expected
    assert "\x1b[" not in out  # not a terminal: no colours
    for kind in EVERY_KIND:
        assert f" {kind} " in out
    assert (tmp_path / "x.db").exists()


def test_demo_defaults_to_ledger_db_in_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "demo")
    assert code == 0
    assert "sqlite:///ledger.db" in out
    assert (tmp_path / "ledger.db").exists()


def test_ledger_url_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LEDGER_URL", f"sqlite:///{tmp_path / 'env.db'}")
    code, _, _ = run(capsys, "demo")
    assert code == 0
    assert (tmp_path / "env.db").exists()
    assert not (tmp_path / "ledger.db").exists()
    rows = run_json(capsys, "sessions")
    assert len(rows) == 2
    # --store wins over LEDGER_URL
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert run_json(capsys, "sessions", "--store", other) == []


# ---------------------------------------------------------------------------- reads


def test_sessions_json(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_json(capsys, "--store", demo.url, "sessions")
    by_id = {row["session_id"]: row for row in rows}
    assert set(by_id) == {demo.session, demo.expired}
    assert by_id[demo.session]["status"] == "closed"
    assert by_id[demo.session]["event_count"] == 19
    assert by_id[demo.expired]["status"] == "expired"
    assert by_id[demo.expired]["event_count"] == 3
    assert rows[0]["session_id"] == demo.expired  # newest activity first
    assert run_json(capsys, "sessions", "--store", demo.url, "--status", "closed") == [
        by_id[demo.session]
    ]
    assert run_json(capsys, "sessions", "--store", demo.url, "--user", "nobody") == []
    assert len(run_json(capsys, "sessions", "--store", demo.url, "--agent", "support-bot")) == 2


def test_sessions_follows_pages_up_to_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'many.db'}"

    async def create(n: int) -> None:
        async with Ledger.open(url) as led:
            for i in range(n):
                await led.create(user_id=f"u{i % 2}", agent="a")

    asyncio.run(create(7))
    assert len(run_json(capsys, "--store", url, "sessions")) == 7
    assert len(run_json(capsys, "--store", url, "sessions", "--limit", "3")) == 3
    assert len(run_json(capsys, "--store", url, "sessions", "--user", "u0")) == 4
    code, _, err = run(capsys, "--store", url, "sessions", "--limit", "3")
    assert code == 0
    assert "--limit" in err  # says there are more


def test_sessions_table(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "sessions", "--store", demo.url)
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == ["SESSION", "USER", "AGENT", "STATUS", "EVENTS", "LAST", "ACTIVITY"]
    assert first.split()[:5] == [demo.expired, "demo-user", "support-bot", "expired", "3"]
    assert second.split()[:5] == [demo.session, "demo-user", "support-bot", "closed", "19"]
    assert first.split()[5].endswith("Z") and "T" in first.split()[5]
    # aligned: every column starts at the same offset on every line
    assert header.index("STATUS") == first.index("expired") == second.index("closed")


def test_sessions_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--store", f"sqlite:///{tmp_path / 'e.db'}", "sessions")
    assert (code, out) == (0, "No sessions.\n")


def test_log_json(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    document = run_json(capsys, "log", demo.session, "--store", demo.url)
    events, tree = document["events"], document["tree"]
    assert len(events) == 19
    assert {e["kind"] for e in events} == EVERY_KIND
    assert [e["seq"] for e in events][:3] == [0, 1, 2]
    assert events[0]["parent"] is None
    assert set(events[0]) == {"id", "parent", "seq", "branch", "kind", "at", "actor", "body"}
    assert [b["name"] for b in tree["branches"]] == ["main", "alt"]
    last = {e["branch"]: e["id"] for e in events}
    assert tree["heads"] == last
    assert events[-1]["kind"] == "Closed"
    assert events[-1]["body"]["reason"] == "resolved"
    alt = tree["branches"][1]
    checkpoint = next(e for e in events if e["kind"] == "Checkpointed")
    assert alt["fork_point"] == checkpoint["body"]["entry"]
    assert alt["forked_from"] == "main"


def test_log_text_of_the_demo(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--store", demo.url, "log", demo.session)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 20  # 19 events and the line where alt joins main
    assert lines[0].startswith("*   ")
    assert lines[0].endswith("resolved (HEAD -> main)")
    assert lines[-1].startswith("*   ") and "SessionCreated main user demo-user" in lines[-1]
    assert lines.count("|/") == 1


def test_log_of_expired_session(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--store", demo.url, "log", demo.expired)
    assert code == 0
    top = out.splitlines()[0]
    assert " Expired " in top
    assert "ttl 0.05s" in top
    assert top.endswith("(HEAD -> main)")


def test_state_json(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    main_state = run_json(capsys, "--store", demo.url, "state", demo.session)
    assert main_state["status"] == "closed"
    assert main_state["branch"] == "main"
    assert main_state["turn_count"] == 5
    assert main_state["metadata"] == {"channel": "web", "topic": "order", "order_id": "A-1042"}
    assert main_state["checkpoints"] == []  # main was restored to before its checkpoint
    assert main_state["tokens_out"] == 23

    alt = run_json(capsys, "--store", demo.url, "state", demo.session, "--branch", "alt")
    assert alt["status"] == "active"
    assert alt["branch"] == "alt"
    assert alt["turn_count"] == 6
    log = run_json(capsys, "--store", demo.url, "log", demo.session)
    assert alt["head"] == log["tree"]["heads"]["alt"]

    checkpoint = next(e for e in log["events"] if e["kind"] == "Checkpointed")
    at = run_json(capsys, "--store", demo.url, "state", demo.session, "--at", checkpoint["id"])
    assert at["head"] == checkpoint["id"]
    assert at["turn_count"] == 4
    assert [c["label"] for c in at["checkpoints"]] == ["order-found"]
    # the short id that `ledger log` prints is enough
    short = run_json(
        capsys, "--store", demo.url, "state", demo.session, "--at", checkpoint["id"][:12]
    )
    assert short == at

    expired = run_json(capsys, "--store", demo.url, "state", demo.expired)
    assert (expired["status"], expired["turn_count"], expired["ttl_s"]) == ("expired", 1, 0.05)


def test_state_text(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--store", demo.url, "state", demo.session, "--branch", "alt")
    assert code == 0
    fields = {line[:13].strip(): line[15:] for line in out.splitlines()}
    assert fields["status"] == "active"
    assert fields["branch"] == "alt"
    assert fields["turns"] == "6"
    assert fields["metadata"] == "channel=web, topic=order, order_id=A-1042"
    assert fields["created"].endswith("Z")


def test_verify(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--store", demo.url, "verify")
    assert (code, out) == (0, "OK: 22 events in 2 sessions verified (integrity only: no key)\n")
    code, out, _ = run(capsys, "--store", demo.url, "verify", demo.expired)
    assert (code, out) == (0, "OK: 3 events in 1 session verified (integrity only: no key)\n")
    report = run_json(capsys, "--store", demo.url, "verify", demo.session)
    assert report["ok"] is True
    assert (report["events_checked"], report["sessions_checked"]) == (19, 1)
    assert report["problems"] == []


def test_verify_with_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LEDGER_KEY", "ab" * 32)
    url = f"sqlite:///{tmp_path / 'k.db'}"
    assert main(["--store", url, "demo", "--json"]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "--store", url, "verify")
    kid = key_id(bytes.fromhex("ab" * 32))
    assert (code, out) == (0, f"OK: 22 events in 2 sessions verified (keyed: key {kid})\n")


def test_global_options_before_or_after_the_command(
    demo: Demo, capsys: pytest.CaptureFixture[str]
) -> None:
    before = main(["--json", "--store", demo.url, "verify"])
    out_before = capsys.readouterr().out
    after = main(["verify", "--json", "--store", demo.url])
    out_after = capsys.readouterr().out
    assert before == after == 0
    assert json.loads(out_before) == json.loads(out_after)
    assert json.loads(out_before)["ok"] is True


# ---------------------------------------------------------------------------- the graph


def test_log_draws_three_branches_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"

    async def build() -> tuple[str, dict[str, str]]:
        async with Ledger.open(url) as led:
            s = await led.create(user_id="u", agent="a")
            sid = s.session_id
            ids = {"root": s.head}
            ids["t1"] = (await led.add_turn(sid, role="user", content="hi")).id
            ids["t2"] = (await led.add_turn(sid, role="assistant", content="hello")).id
            cp = await led.checkpoint(sid, label="greeted")
            ids["cp"] = cp.id
            ids["t3"] = (await led.add_turn(sid, role="user", content="cancel\nit")).id
            ids["alt"] = (await led.branch(sid, "alt", at=cp.entry)).id
            ids["a2"] = (await led.add_turn(sid, role="user", content="track", branch="alt")).id
            ids["fix"] = (await led.branch(sid, "fix", at=ids["t1"])).id
            ids["f2"] = (await led.add_turn(sid, role="user", content="x" * 70, branch="fix")).id
            ids["t4"] = (await led.record(sid, "tool_call", {"name": "lookup"})).id
            ids["a3"] = (await led.add_turn(sid, role="assistant", content=[1], branch="alt")).id
            return sid, {name: event_id[:12] for name, event_id in ids.items()}

    sid, i = asyncio.run(build())
    code, out, err = run(capsys, "--store", url, "log", sid)
    assert code == 0, err
    expected = [
        f"  *   {i['a3']} TurnAdded      alt  assistant: [1] (alt)",
        f"* |   {i['t4']} Recorded       main tool_call (HEAD -> main)",
        f"| | * {i['f2']} TurnAdded      fix  user: {'x' * 51}... (fix)",
        f"| | * {i['fix']} Branched       fix  fix from {i['t1']}",
        f"| * | {i['a2']} TurnAdded      alt  user: track",
        f"| * | {i['alt']} Branched       alt  alt from {i['t2']}",
        f"* | | {i['t3']} TurnAdded      main user: cancel it",
        f"* | | {i['cp']} Checkpointed   main greeted",
        "|/  |",
        f"*   | {i['t2']} TurnAdded      main assistant: hello [checkpoint greeted]",
        "|__/",
        "|/",
        f"*     {i['t1']} TurnAdded      main user: hi",
        f"*     {i['root']} SessionCreated main user u, agent a",
    ]
    assert out.splitlines() == expected


def test_log_branch_from_the_head_of_main(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Main never moves again, so no line of it runs beside the branch."""
    url = f"sqlite:///{tmp_path / 'h.db'}"

    async def build() -> tuple[str, list[str]]:
        async with Ledger.open(url) as led:
            s = await led.create(user_id="u", agent="a")
            b = await led.branch(s.session_id, "b")
            c = await led.close(s.session_id, branch="b", reason="done")
            return s.session_id, [s.head[:12], b.id[:12], c.id[:12]]

    sid, (root, branched, closed) = asyncio.run(build())
    code, out, _ = run(capsys, "--store", url, "log", sid)
    assert code == 0
    assert out.splitlines() == [
        f"  * {closed} Closed         b    done (b)",
        f"  * {branched} Branched       b    b from {root}",
        " /",
        f"*   {root} SessionCreated main user u, agent a (HEAD -> main)",
    ]


# ---------------------------------------------------------------------------- errors


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err
    assert err.startswith("ledger: error: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["log", "state", "verify"])
def test_unknown_session(demo: Demo, capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, err = run(capsys, "--store", demo.url, command, "no-such-session")
    assert code == 1
    assert out == ""
    assert err == "ledger: error: Session not found: 'no-such-session'\n"


@pytest.mark.parametrize("at", ["0" * 64, "fffffffffff", "not-hex"])
def test_unknown_at_event(demo: Demo, capsys: pytest.CaptureFixture[str], at: str) -> None:
    code, _, err = run(capsys, "--store", demo.url, "state", demo.session, "--at", at)
    assert code == 1
    _no_traceback(err)
    assert "Event not found" in err


def test_unknown_branch(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--store", demo.url, "state", demo.session, "--branch", "nope")
    assert code == 1
    _no_traceback(err)
    assert "Branch not found" in err and "'nope'" in err


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://somewhere", "Unknown store URL: 'ftp://somewhere'"),
        ("ledger.db", "Invalid url: 'ledger.db'"),
    ],
)
def test_bad_store_url(capsys: pytest.CaptureFixture[str], url: str, message: str) -> None:
    code, _, err = run(capsys, "--store", url, "sessions")
    assert code == 1
    _no_traceback(err)
    assert message in err


def test_bad_store_url_from_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LEDGER_URL", "nope://x")
    code, _, err = run(capsys, "verify")
    assert code == 1
    assert "Unknown store URL: 'nope://x'" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["sessions", "--limit", "0"],
        ["sessions", "--limit", "many"],
        ["sessions", "--status", "dead"],
        ["log"],
        ["state"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    assert "ledger: error: " in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("demo", "sessions", "log", "state", "verify"):
        assert command in out


def test_keyboard_interrupt_exits_130_quietly(
    demo: Demo, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(ledger.cli, "cmd_verify", interrupted)
    code, out, err = run(capsys, "--store", demo.url, "verify")
    assert (code, out, err) == (130, "", "")


def test_verify_names_a_tampered_event(
    demo: Demo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tampered.db"
    shutil.copy(demo.path, path)
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT id, data FROM events WHERE session_id = ? AND kind = 'TurnAdded'",
            (demo.session,),
        ).fetchall()
        event_id, data = next(
            (i, d) for i, d in rows if json.loads(d)["body"]["content"] == "Thanks, that's all!"
        )
        event = json.loads(data)
        event["body"]["content"] = "Thanks, and refund me twice!"
        db.execute(
            "UPDATE events SET data = ? WHERE id = ?", (json.dumps(event).encode(), event_id)
        )
    db.close()
    url = f"sqlite:///{path}"
    code, out, err = run(capsys, "--store", url, "verify")
    assert code == 1
    assert err == ""
    assert out.startswith("FAILED: ")
    assert event_id in out
    assert "body does not match its digest" in out

    report = run_json_code(capsys, 1, "--store", url, "verify", demo.session)
    assert report["ok"] is False
    assert report["first_bad"] == event_id
    # the other session is intact
    assert main(["--store", url, "verify", demo.expired]) == 0


def run_json_code(capsys: pytest.CaptureFixture[str], expected: int, *argv: str) -> Any:
    code, out, _ = run(capsys, *argv, "--json")
    assert code == expected
    return json.loads(out)


# ---------------------------------------------------------------------------- the real command


def test_installed_command(demo: Demo, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_URL"] = demo.url
    script = Path(sys.executable).with_name("ledger")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ledger.cli"]
    done = subprocess.run(
        [*command, "log", demo.session],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].endswith("(HEAD -> main)")
    assert "\x1b[" not in done.stdout

    failed = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "state", "missing"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert failed.returncode == 1
    assert failed.stderr == "ledger: error: Session not found: 'missing'\n"
    assert not list(tmp_path.iterdir())  # nothing written to the cwd


# ---------------------------------------------------------------------------- replay and diff


def stamps_removed(out: str) -> list[str]:
    """A replay's lines without the ``HH:MM:SS`` stamps and date lines (they vary)."""
    lines = []
    for line in out.splitlines():
        if line.strip().startswith("-- ") and line.rstrip().endswith("(UTC) --"):
            continue
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if len(stripped) > 10 and stripped[2] == ":" and stripped[5] == ":":
            stripped = stripped[10:]
        lines.append(indent + stripped)
    return lines


def history_ids(url: str, session: str, branch: str = "main") -> list[str]:
    async def read() -> list[str]:
        async with Ledger.open(url) as led:
            return [e.id for e in await led.history(session, branch=branch)]

    return asyncio.run(read())


def test_replay_of_the_demo(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--store", demo.url, "replay", demo.session)
    assert (code, err) == (0, "")
    entry = history_ids(demo.url, demo.session)[7][:12]
    assert out.splitlines()[0].startswith("-- 20") and out.splitlines()[0].endswith(" (UTC) --")
    assert stamps_removed(out) == [
        f"== session {demo.session}: user demo-user, agent support-bot "
        "(channel=web, topic=order) ==",
        "system: You are a helpful support agent.",
        "user: Hi! Where is my order A-1042?",
        "assistant: Let me look that up.",
        '            -> lookup_order({"order_id":"A-1042"})',
        '* tool_call: {"arguments":{"order_id":"A-1042"},"id":"call-1","name":"lookup_order"}',
        '* tool_result: {"call_id":"call-1","eta":"tomorrow","status":"shipped"}',
        "assistant: Your order A-1042 has shipped and arrives tomorrow.",
        "* metadata: order_id=A-1042",
        f"== restored checkpoint order-found: back to {entry} ==",
        "== suspended: user went away ==",
        "== resumed: user is back ==",
        "user: Thanks, that's all!",
        "== closed: resolved ==",
    ]
    assert "cancel" not in out  # abandoned by the restore: not on main's history


def test_replay_of_a_branch_shares_the_history_first(
    demo: Demo, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--store", demo.url, "replay", demo.session, "--branch", "alt")
    assert code == 0
    entry = history_ids(demo.url, demo.session)[7][:12]
    lines = stamps_removed(out)
    assert lines[-3:] == [
        f"== branch alt, from {entry} ==",
        "user: Can you deliver it to my office instead?",
        "assistant: Sure: the delivery address is now your office.",
    ]
    assert (
        lines[:9] == stamps_removed(run(capsys, "--store", demo.url, "replay", demo.session)[1])[:9]
    )


def test_replay_json_is_one_event_per_line(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    for branch in ("main", "alt"):
        code, out, _ = run(
            capsys, "--store", demo.url, "replay", demo.session, "--branch", branch, "--json"
        )
        assert code == 0
        events = [json.loads(line) for line in out.splitlines()]
        assert [e["id"] for e in events] == history_ids(demo.url, demo.session, branch)
        assert set(events[0]) == {"id", "parent", "seq", "branch", "kind", "at", "actor", "body"}


def test_replay_at_an_event(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    ids = history_ids(demo.url, demo.session)
    code, out, _ = run(capsys, "--store", demo.url, "replay", demo.session, "--at", ids[2][:12])
    assert code == 0
    assert stamps_removed(out)[-1] == "user: Hi! Where is my order A-1042?"
    assert len(stamps_removed(out)) == 3


def test_replay_with_speed_and_follow_of_a_closed_branch(
    demo: Demo, capsys: pytest.CaptureFixture[str]
) -> None:
    """main is closed: --follow prints its history and ends by itself."""
    plain = run(capsys, "--store", demo.url, "replay", demo.session)
    paced = run(
        capsys, "--store", demo.url, "replay", demo.session, "--speed", "1000", "--max-pause", "0"
    )
    followed = run(capsys, "--store", demo.url, "replay", demo.session, "--follow")
    assert plain == paced == followed
    assert plain[0] == 0


def test_replay_help_says_how_long_a_pause_can_be(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "replay", "--help")
    assert code == 0
    assert "--speed X" in out and "--follow" in out
    assert "pause at most S seconds between events (default: 2)" in " ".join(out.split())


@pytest.mark.parametrize(
    "argv",
    [
        ["replay"],
        ["replay", "s", "--speed", "0"],
        ["replay", "s", "--speed", "-1"],
        ["replay", "s", "--speed", "nan"],
        ["replay", "s", "--speed", "fast"],
        ["replay", "s", "--max-pause", "-1"],
        ["diff", "s", "main"],
    ],
)
def test_replay_and_diff_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert "ledger: error: " in err and "Traceback" not in err


def test_replay_follow_cannot_take_at(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "--store", demo.url, "replay", demo.session, "--follow", "--at", "abc"
    )
    assert (code, out) == (1, "")
    assert err == "ledger: error: --follow replays a branch to its head: it cannot take --at\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["replay", "nope"], "Session not found: 'nope'"),
        (["replay", "nope", "--follow"], "Session not found: 'nope'"),
        (["replay", "{s}", "--branch", "zzz"], "Branch not found in session '{s}': 'zzz'"),
        (
            ["replay", "{s}", "--branch", "zzz", "--follow"],
            "Branch not found in session '{s}': 'zzz'",
        ),
        (["diff", "nope", "main", "alt"], "Session not found: 'nope'"),
        (["diff", "{s}", "main", "zzz"], "Branch not found in session '{s}': 'zzz'"),
        (["diff", "{s}", "zzz", "alt"], "Branch not found in session '{s}': 'zzz'"),
    ],
)
def test_replay_and_diff_of_unknown_session_or_branch(
    demo: Demo, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [arg.replace("{s}", demo.session) for arg in argv]
    code, out, err = run(capsys, "--store", demo.url, *argv)
    assert (code, out) == (1, "")
    assert err == f"ledger: error: {message.replace('{s}', demo.session)}\n"


def test_diff_of_the_demo(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--store", demo.url, "diff", demo.session, "main", "alt")
    assert code == 0
    entry = history_ids(demo.url, demo.session)[7][:12]
    lines = stamps_removed(out)
    assert lines[0].startswith(f"fork point: {entry} MetadataSet at depth 7, 20")
    assert lines[0].endswith("Z: order_id=A-1042")
    assert lines[1:] == [
        "",
        "only on main (1 turn, 5 events):",
        f"  == restored checkpoint order-found: back to {entry} ==",
        "  == suspended: user went away ==",
        "  == resumed: user is back ==",
        "  user: Thanks, that's all!",
        "  == closed: resolved ==",
        "",
        "only on alt (2 turns, 3 events):",
        f"  == branch alt, from {entry} ==",
        "  user: Can you deliver it to my office instead?",
        "  assistant: Sure: the delivery address is now your office.",
    ]
    code, out, _ = run(capsys, "--store", demo.url, "diff", demo.session, "alt", "alt")
    assert stamps_removed(out)[1:] == ["", "only on alt: nothing", "", "only on alt: nothing"]


def test_diff_json(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    document = run_json(capsys, "--store", demo.url, "diff", demo.session, "main", "alt")
    main_ids = history_ids(demo.url, demo.session)
    alt_ids = history_ids(demo.url, demo.session, "alt")
    assert (document["session_id"], document["a"], document["b"]) == (demo.session, "main", "alt")
    assert document["fork_point"]["id"] == main_ids[7] == alt_ids[7]
    assert [e["id"] for e in document["only_a"]] == main_ids[8:]
    assert [e["id"] for e in document["only_b"]] == alt_ids[8:]
    assert document["only_b"][0]["kind"] == "Branched"


def log_fields(line: str) -> list[str]:
    """A ``ledger log`` line without its graph: id, kind, branch, summary and marks."""
    tokens = line.split()
    first = next(k for k, token in enumerate(tokens) if re.fullmatch("[0-9a-f]{12}", token))
    return tokens[first:]


def test_log_marks_what_a_restore_abandoned(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--store", demo.url, "log", demo.session)
    assert code == 0
    restore = log_fields(next(line for line in out.splitlines() if " Restored " in line))[0]
    marked = [line for line in out.splitlines() if "[abandoned by restore" in line]
    assert [log_fields(line)[1] for line in marked] == ["TurnAdded", "TurnAdded", "Checkpointed"]
    assert all(line.endswith(f"[abandoned by restore {restore}]") for line in marked)
    assert "cancel" in marked[1] and "cancelled" in marked[0]


def test_log_marks_only_the_restored_branch_own_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A restore of b to a checkpoint on main, before b forked: b's own events are
    abandoned; main's events between the entry and the fork are still main's."""
    url = f"sqlite:///{tmp_path / 'r.db'}"

    async def build() -> tuple[str, dict[str, str]]:
        async with Ledger.open(url) as led:
            s = await led.create(user_id="u", agent="a")
            sid = s.session_id
            ids = {"t1": (await led.add_turn(sid, role="user", content="one")).id}
            cp = await led.checkpoint(sid, label="one")
            ids["t2"] = (await led.add_turn(sid, role="user", content="two")).id
            ids["b"] = (await led.branch(sid, "b")).id
            ids["b1"] = (await led.add_turn(sid, role="user", content="b one", branch="b")).id
            ids["r"] = (await led.restore(sid, cp.id, branch="b")).id
            ids["b2"] = (await led.add_turn(sid, role="user", content="b two", branch="b")).id
            return sid, {k: v[:12] for k, v in ids.items()}

    sid, i = asyncio.run(build())
    code, out, _ = run(capsys, "--store", url, "log", sid)
    assert code == 0
    by_id = {log_fields(line)[0]: line for line in out.splitlines() if "*" in line}
    abandoned = {key for key, line in by_id.items() if f"[abandoned by restore {i['r']}]" in line}
    assert abandoned == {i["b"], i["b1"]}
    for key in ("t1", "t2", "b2", "r"):
        assert "abandoned" not in by_id[i[key]]


def test_verify_draws_progress_on_a_terminal_stderr_and_json_on_stdout(
    demo: Demo, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ledger.progress import Progress

    class Terminal(StringIO):
        def isatty(self) -> bool:
            return True

    ticks = iter(range(1000))
    monkeypatch.setattr(Progress, "clock", lambda: next(ticks) * 0.6)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = main(["--store", demo.url, "verify", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out)["sessions_checked"] == 2
    drawn = terminal.getvalue()
    assert drawn.startswith("\rverifying sessions  [")
    assert "2/2  100%" in drawn
    assert drawn.endswith("\r")
    assert "\n" not in drawn


def test_purge_draws_progress_on_a_terminal_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ledger.progress import Progress

    class Terminal(StringIO):
        def isatty(self) -> bool:
            return True

    url = f"sqlite:///{tmp_path / 'purge.db'}"

    async def build() -> None:
        async with Ledger.open(url) as led:
            for user in ("u1", "u2", "u3"):
                s = await led.create(user_id=user, agent="a")
                await led.add_turn(s.session_id, role="user", content="hello")

    asyncio.run(build())
    time.sleep(0.6)
    ticks = iter(range(1000))
    monkeypatch.setattr(Progress, "clock", lambda: next(ticks) * 0.6)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = main(["--store", url, "purge", "--older-than", "0.5s", "--batch-size", "2", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert len(json.loads(out)["purged"]) == 3
    drawn = terminal.getvalue()
    assert drawn.startswith("\rpurging sessions  3  ")  # 3 sessions examined, no total
    assert drawn.endswith("\r") and "\n" not in drawn


def test_export_and_import_draw_progress_on_a_terminal_stderr(
    demo: Demo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ledger.progress import Progress

    class Terminal(StringIO):
        def isatty(self) -> bool:
            return True

    ticks = iter(range(10_000))
    monkeypatch.setattr(Progress, "clock", lambda: next(ticks) * 0.6)
    bundle = tmp_path / "bundle.jsonl"
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["--store", demo.url, "export", "--out", str(bundle), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    drawn = terminal.getvalue()
    assert drawn.startswith(f"\rexporting events  {exported['events']}  ")
    assert drawn.endswith("\r") and "\n" not in drawn

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    target = f"sqlite:///{tmp_path / 'copy.db'}"
    assert main(["--store", target, "import", str(bundle), "--json"]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert imported["events"] == exported["events"]
    size = bundle.stat().st_size
    drawn = terminal.getvalue()
    assert drawn.startswith("\rimporting (bytes read)  [")
    assert f"{2 * size}/{2 * size}  100%" in drawn  # one pass verifies, another writes
    assert drawn.endswith("\r") and "\n" not in drawn


def test_help_lists_replay_and_diff(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "replay" in out and "diff" in out


class Running:
    """``ledger replay --follow`` as a real process, its output read line by line."""

    def __init__(self, url: str, *argv: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        script = Path(sys.executable).with_name("ledger")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "ledger.cli"]
        self.process = subprocess.Popen(
            [*command, "--store", url, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            # A shell without job control starts background jobs with SIGINT ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, count: int) -> list[str]:
        return [self.lines.get(timeout=60) for _ in range(count)]

    def finish(self) -> tuple[int, str]:
        _, err = self.process.communicate(timeout=60)
        return self.process.returncode, err


def write(url: str, action: Callable[[Ledger], Awaitable[object]]) -> None:
    async def run_it() -> None:
        async with Ledger.open(url) as led:
            await action(led)

    asyncio.run(run_it())


def started_session(url: str) -> str:
    async def create() -> str:
        async with Ledger.open(url) as led:
            s = await led.create(user_id="u", agent="a")
            await led.add_turn(s.session_id, role="user", content="hello")
            return s.session_id

    return asyncio.run(create())


@pytest.mark.slow
def test_replay_follow_prints_live_events_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    sid = started_session(url)
    follower = Running(url, "replay", sid, "--follow")
    try:
        date, created, hello = follower.expect(3)
        assert date.endswith("(UTC) --") and sid in created and hello.endswith("user: hello")
        write(url, lambda led: led.add_turn(sid, role="assistant", content="live\nand well"))
        write(url, lambda led: led.branch(sid, "other"))  # another branch: not shown
        write(url, lambda led: led.add_turn(sid, role="user", content="again"))
        assert [line[10:] for line in follower.expect(3)] == [
            "assistant: live",
            "and well",
            "user: again",
        ]
        follower.process.send_signal(signal.SIGINT)
        code, err = follower.finish()
    finally:
        if follower.process.poll() is None:
            follower.process.kill()
    assert (code, err) == (0, "")
    assert follower.lines.empty()


@pytest.mark.slow
def test_replay_follow_ends_when_the_branch_is_closed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    sid = started_session(url)
    follower = Running(url, "replay", sid, "--follow", "--json")
    try:
        first = [json.loads(line) for line in follower.expect(2)]
        assert [e["kind"] for e in first] == ["SessionCreated", "TurnAdded"]
        write(url, lambda led: led.close(sid, reason="bye"))
        (closed,) = [json.loads(line) for line in follower.expect(1)]
        code, err = follower.finish()
    finally:
        if follower.process.poll() is None:
            follower.process.kill()
    assert (code, err) == (0, "")
    assert (closed["kind"], closed["body"]["reason"]) == ("Closed", "bye")


def test_replay_shows_an_erased_turn_and_its_redaction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"

    async def build() -> tuple[str, str]:
        async with Ledger.open(url) as led:
            s = await led.create(user_id="u", agent="a")
            turn = await led.add_turn(s.session_id, role="user", content="my secret address")
            await led.redact(turn.id, reason="asked to forget")
            return s.session_id, turn.id

    session_id, turn_id = asyncio.run(build())
    code, out, err = run(capsys, "--store", url, "replay", session_id)
    assert code == 0, err
    assert "my secret address" not in out
    assert "[TurnAdded erased by a redaction]" in out
    assert f"redacted {ledger.cli.short(turn_id)}: asked to forget" in out
