"""The ``ledger`` command: look into a session ledger from a shell.

::

    ledger demo                      # write two example sessions to ./ledger.db
    ledger sessions --status active  # newest activity first
    ledger log SESSION               # the tree of a session, like git log --graph
    ledger state SESSION --at EVENT  # the state of a session at any event
    ledger verify                    # recompute every id and checksum
    ledger export > bundle.jsonl     # sessions as a verified bundle
    ledger import bundle.jsonl       # ... into another store

Every command takes ``--store URL`` (default: ``LEDGER_URL``, else
``sqlite:///ledger.db``) and ``--json`` (one JSON document on stdout). Exit
status: 0 success, 1 a ledger error or a failed verification, 2 a usage error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import IO, Any, NoReturn, TextIO

import msgspec

from ledger.bundle import ExportReport, ImportReport
from ledger.config import DEFAULT_URL
from ledger.errors import EventNotFoundError, LedgerError, SessionExpiredError
from ledger.events import (
    Branched,
    Checkpointed,
    Closed,
    Event,
    Expired,
    MetadataSet,
    Recorded,
    Restored,
    Resumed,
    SessionCreated,
    Suspended,
    TurnAdded,
)
from ledger.ledger import Ledger
from ledger.verify import VerifyReport
from projections.session import SessionState
from projections.tree import Tree
from stores.base import SessionRow

__all__ = ["main", "render_graph"]

SHORT = 12
"""Hex digits of an event id shown to people (48 bits: unique within any session)."""
SUMMARY_WIDTH = 60
MAIN = "main"


class UsageError(Exception):
    """A command-line argument the ledger cannot act on (exit status 1, like a ledger error)."""


# ---------------------------------------------------------------------------- output


class Output:
    """Where a command writes: stdout for results, colours only on a terminal."""

    def __init__(self, stream: TextIO, *, as_json: bool) -> None:
        self.stream = stream
        self.as_json = as_json
        self.color = _wants_color(stream)

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")

    def json(self, value: Any) -> None:
        data = msgspec.json.encode(value)
        if self.stream.isatty():
            data = msgspec.json.format(data, indent=2)
        self.stream.write(data.decode() + "\n")

    def paint(self, text: str, style: str) -> str:
        if not self.color or not text:
            return text
        return f"\033[{_STYLES[style]}m{text}\033[0m"


_STYLES = {"id": "33", "head": "1;32", "branch": "1;36", "mark": "35", "ok": "32", "bad": "1;31"}


def _wants_color(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def short(event_id: str | None) -> str:
    return event_id[:SHORT] if event_id else "-"


def iso(at_ns: int) -> str:
    """An event time (integer nanoseconds, UTC) as ISO 8601, to the second."""
    moment = datetime.fromtimestamp(at_ns / 1e9, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def clip(text: str, width: int = SUMMARY_WIDTH) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _text(value: Any) -> str:
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def table(rows: Sequence[Sequence[str]], *, right: frozenset[int] = frozenset()) -> list[str]:
    """Rows (the first is the header) as aligned columns; ``right`` columns align right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


# ---------------------------------------------------------------------------- log graph


def render_graph(events: Sequence[Event], tree: Tree) -> list[tuple[str, Event | None]]:
    """The graph of a session's tree, newest event first, like ``git log --graph``.

    Returns one ``(graph, event)`` pair per line: an event's line carries its
    ``*``; connector lines (``event`` is ``None``) join a branch to the column
    of its fork point. Each branch has a column, in order of creation. A
    branch's line runs from its head down to its first event and on, as ``|``,
    to just above its fork point, where it turns into its parent branch's
    column with ``/`` (with ``_`` across any columns in between).

    Example (``alt`` forked from ``c1``; ``main`` went on)::

        *    main head
        | *  alt head
        | *  Branched alt
        * |  main turn
        |/
        *    c1
    """
    names = tree.branch_names()
    column = {name: i for i, name in enumerate(names)}
    width = max(2 * len(names) - 1, 1)
    index = {event.id: i for i, event in enumerate(events)}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, event in enumerate(events):
        first.setdefault(event.branch, i)
        last[event.branch] = i
    for event in events:  # a branch the tree does not know still gets a column
        if event.branch not in column:
            column[event.branch] = len(column)
            width = 2 * len(column) - 1
    low: dict[int, int] = {}  # column -> lowest row index its line covers
    high: dict[int, int] = {}
    joins: dict[int, list[tuple[int, int]]] = {}  # fork row -> [(column, parent column)]
    for name, col in column.items():
        if name not in first:
            continue
        low[col], high[col] = first[name], last[name]
        info = tree.branches.get(name)
        if info is None or info.fork_point is None or info.forked_from not in column:
            continue
        parent_col = column[info.forked_from]
        fork_row = index.get(info.fork_point)
        if fork_row is None or parent_col >= col or fork_row >= first[name]:
            continue
        low[col] = fork_row + 1
        joins.setdefault(fork_row, []).append((col, parent_col))

    def spans(col: int, row: int) -> bool:
        return low[col] <= row <= high[col]

    lines: list[tuple[str, Event | None]] = []
    for row in range(len(events) - 1, -1, -1):
        joined: set[int] = set()
        for col, parent_col in sorted(joins.get(row, ()), reverse=True):
            # Columns whose line passes between this row and the one above it.
            passing = [c for c in low if c != col and c not in joined and low[c] <= row < high[c]]
            if col == parent_col + 1:
                lines.append((_cells(width, passing, {2 * col - 1: "/"}), None))
            else:
                marks = {2 * col - 1: "/"}
                over = _cells(width, passing, marks).ljust(width)
                under = "".join(
                    "_" if 2 * parent_col < pos < 2 * col - 1 and ch == " " else ch
                    for pos, ch in enumerate(over)
                )
                lines.append((under.rstrip(), None))
                lines.append((_cells(width, passing, {2 * parent_col + 1: "/"}), None))
            joined.add(col)
        cells = [" "] * width
        for col in low:
            if spans(col, row):
                cells[2 * col] = "|"
        cells[2 * column[events[row].branch]] = "*"
        lines.append(("".join(cells), events[row]))
    return lines


def _cells(width: int, columns: Sequence[int], marks: dict[int, str]) -> str:
    cells = [" "] * width
    for col in columns:
        cells[2 * col] = "|"
    for pos, mark in marks.items():
        cells[pos] = mark
    return "".join(cells).rstrip()


def summary(event: Event, labels: dict[str, str]) -> str:
    """One short phrase saying what an event did."""
    body = event.body
    match body:
        case TurnAdded(role=role, content=content, name=name):
            who = f"{role}({name})" if name else role
            return clip(f"{who}: {_text(content)}")
        case SessionCreated(user_id=user, agent=agent):
            return f"user {user}, agent {agent}"
        case Checkpointed(label=label):
            return label or "(no label)"
        case Branched(name=name, fork_point=fork):
            return f"{name} from {short(fork)}"
        case Restored(checkpoint=checkpoint, entry=entry):
            return f"checkpoint {labels.get(checkpoint, short(checkpoint))}, back to {short(entry)}"
        case Suspended(reason=reason) | Resumed(reason=reason) | Closed(reason=reason):
            return clip(reason or "")
        case Expired(idle_s=idle, ttl_s=ttl):
            return f"idle {idle:g}s > ttl {ttl:g}s"
        case MetadataSet(metadata=metadata):
            return clip(", ".join(f"{k}={_text(v)}" for k, v in metadata.items()))
        case Recorded(type=kind):
            return clip(kind)
    return ""  # pragma: no cover - every kind is matched above


def log_lines(events: Sequence[Event], tree: Tree, out: Output) -> list[str]:
    """The text of ``ledger log``: graph, short id, kind, branch, summary, marks."""
    labels: dict[str, str] = {}
    marks: dict[str, list[str]] = {}
    for event in events:
        body = event.body
        if isinstance(body, Checkpointed):
            label = body.label or short(event.id)
            labels[event.id] = label
            marks.setdefault(body.entry, []).append(f"[checkpoint {label}]")
    heads = {info.head: name for name, info in tree.branches.items()}
    kind_width = max((len(e.kind) for e in events), default=0)
    branch_width = max((len(e.branch) for e in events), default=0)
    lines = []
    for graph, item in render_graph(events, tree):
        if item is None:
            lines.append(graph)
            continue
        event = item
        text = [
            graph,
            out.paint(short(event.id), "id"),
            event.kind.ljust(kind_width),
            event.branch.ljust(branch_width),
        ]
        phrase = summary(event, labels)
        extra = []
        head_of = heads.get(event.id)
        if head_of is not None:
            deco = f"(HEAD -> {head_of})" if head_of == MAIN else f"({head_of})"
            extra.append(out.paint(deco, "head" if head_of == MAIN else "branch"))
        extra += [out.paint(mark, "mark") for mark in marks.get(event.id, ())]
        line = " ".join(text)
        tail = " ".join(part for part in (phrase, *extra) if part)
        lines.append(f"{line} {tail}".rstrip() if tail else line.rstrip())
    return lines


def event_json(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "parent": event.parent,
        "seq": event.seq,
        "branch": event.branch,
        "kind": event.kind,
        "at": event.at,
        "actor": event.actor,
        "body": msgspec.to_builtins(event.body),
    }


def tree_json(tree: Tree) -> dict[str, Any]:
    return {
        "session_id": tree.session_id,
        "root": tree.root,
        "branches": [msgspec.to_builtins(tree.branches[name]) for name in tree.branch_names()],
        "heads": {name: tree.branches[name].head for name in tree.branch_names()},
    }


# ---------------------------------------------------------------------------- commands


async def _resolve_event(led: Ledger, session_id: str, ref: str) -> str:
    """A full event id from a full id or a unique prefix of an event of the session."""
    ref = ref.strip().lower()
    if len(ref) == 64:
        return ref
    found = [event.id async for event in led.events(session_id) if event.id.startswith(ref)]
    if not found or not ref:
        raise EventNotFoundError(ref, session_id)
    if len(found) > 1:
        raise UsageError(f"Ambiguous event id in session {session_id!r}: {ref!r}")
    return found[0]


async def cmd_sessions(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    rows: list[SessionRow] = []
    cursor: str | None = None
    more = False
    while len(rows) < args.limit:
        page = await led.sessions(
            user_id=args.user,
            agent=args.agent,
            status=args.status,
            limit=args.limit - len(rows),
            cursor=cursor,
        )
        rows.extend(page.items)
        cursor = page.next_cursor
        if cursor is None or not page.items:
            break
    else:
        more = cursor is not None
    rows = rows[: args.limit]
    if out.as_json:
        out.json(rows)
        return 0
    if not rows:
        out.line("No sessions.")
        return 0
    header = ("SESSION", "USER", "AGENT", "STATUS", "EVENTS", "LAST ACTIVITY")
    body = [
        (r.session_id, r.user_id, r.agent, r.status, str(r.event_count), iso(r.last_activity_at))
        for r in rows
    ]
    for line in table([header, *body], right=frozenset({4})):
        out.line(line)
    if more:
        print(f"(more sessions: showing the first {args.limit}; see --limit)", file=sys.stderr)
    return 0


async def cmd_log(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    tree = await led.tree(args.session)
    events = [event async for event in led.events(args.session)]
    if out.as_json:
        out.json({"events": [event_json(e) for e in events], "tree": tree_json(tree)})
        return 0
    for line in log_lines(events, tree, out):
        out.line(line)
    return 0


def state_lines(state: SessionState, out: Output) -> list[str]:
    metadata = ", ".join(f"{k}={_text(v)}" for k, v in state.metadata.items()) or "-"
    fields = [
        ("session", state.session_id),
        ("user", state.user_id),
        ("agent", state.agent),
        ("status", state.status),
        ("branch", state.branch),
        ("head", f"{out.paint(short(state.head), 'id')} (depth {state.seq})"),
        ("events", str(state.event_count)),
        ("turns", str(state.turn_count)),
        ("tokens", f"{state.tokens_in} in, {state.tokens_out} out"),
        ("cost", f"${state.cost:.4f}"),
        ("metadata", metadata),
        ("created", iso(state.created_at)),
        ("last activity", iso(state.last_activity_at)),
        ("ttl", f"{state.ttl_s:g}s" if state.ttl_s is not None else "-"),
        ("checkpoints", str(len(state.checkpoints)) if state.checkpoints else "-"),
    ]
    width = max(len(name) for name, _ in fields)
    lines = [f"{name.ljust(width)}  {value}" for name, value in fields]
    if state.checkpoints:
        rows = [("ID", "LABEL", "BRANCH", "ENTRY", "TAKEN")]
        rows += [
            (short(c.id), c.label or "-", c.branch, short(c.entry), iso(c.at))
            for c in state.checkpoints
        ]
        lines += ["  " + line for line in table(rows)]
    return lines


async def cmd_state(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    at = await _resolve_event(led, args.session, args.at) if args.at else None
    state = await led.state(args.session, branch=args.branch, at=at)
    if out.as_json:
        out.json(state)
        return 0
    for line in state_lines(state, out):
        out.line(line)
    return 0


def report_lines(report: VerifyReport, out: Output) -> list[str]:
    if report.ok:
        checked = f"{plural(report.events_checked, 'event')} in "
        checked += f"{plural(report.sessions_checked, 'session')} verified"
        line = f"{out.paint('OK', 'ok')}: {checked}"
        return [line if report.keyed else f"{line} (integrity only: no key)"]
    lines = [
        f"{out.paint('FAILED', 'bad')}: {plural(len(report.problems), 'problem')} in "
        f"{plural(report.events_checked, 'event')} of "
        f"{plural(report.sessions_checked, 'session')}"
    ]
    lines += [f"  {problem}" for problem in report.problems]
    return lines


def report_json(report: VerifyReport) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(report)
    return {"ok": report.ok, "first_bad": report.first_bad, **data}


async def cmd_verify(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    report = await led.verify(args.session)
    if out.as_json:
        out.json(report_json(report))
    else:
        for line in report_lines(report, out):
            out.line(line)
    return 0 if report.ok else 1


async def cmd_demo(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    """A scripted support conversation that goes through every kind of event."""

    def say(text: str = "") -> None:
        if not out.as_json:
            out.line(text)

    say(f"Writing a demo conversation to {led.config.url}")
    s = await led.create(
        user_id="demo-user",
        agent="support-bot",
        metadata={"channel": "web", "topic": "order"},
    )
    sid = s.session_id
    say(f"  created session {sid}")
    await led.add_turn(sid, role="system", content="You are a helpful support agent.")
    await led.add_turn(sid, role="user", content="Hi! Where is my order A-1042?", tokens_in=12)
    call = {"id": "call-1", "name": "lookup_order", "arguments": {"order_id": "A-1042"}}
    await led.add_turn(
        sid,
        role="assistant",
        content="Let me look that up.",
        tokens_in=40,
        tokens_out=9,
        cost=0.00021,
        model="demo-model-1",
        tool_calls=[call],
    )
    await led.record(sid, "tool_call", call)
    await led.record(
        sid, "tool_result", {"call_id": "call-1", "status": "shipped", "eta": "tomorrow"}
    )
    await led.add_turn(
        sid,
        role="assistant",
        content="Your order A-1042 has shipped and arrives tomorrow.",
        tokens_in=61,
        tokens_out=14,
        cost=0.00034,
        model="demo-model-1",
    )
    await led.set_metadata(sid, {"order_id": "A-1042"})
    say("  4 turns, a tool call and its result recorded, metadata set")
    checkpoint = await led.checkpoint(sid, label="order-found")
    say(f"  checkpoint 'order-found' at {short(checkpoint.entry)}")
    await led.add_turn(sid, role="user", content="Actually, please cancel it.", tokens_in=8)
    await led.add_turn(
        sid,
        role="assistant",
        content="Done: order A-1042 is cancelled.",
        tokens_in=80,
        tokens_out=10,
        cost=0.00041,
        model="demo-model-1",
    )
    await led.branch(sid, "alt", at=checkpoint.entry)
    await led.add_turn(
        sid, role="user", content="Can you deliver it to my office instead?", branch="alt"
    )
    await led.add_turn(
        sid,
        role="assistant",
        content="Sure: the delivery address is now your office.",
        tokens_in=70,
        tokens_out=12,
        cost=0.00038,
        model="demo-model-1",
        branch="alt",
    )
    say("  branch 'alt' forked from the checkpoint, 2 turns on it")
    await led.restore(sid, checkpoint.id)
    say("  main restored to 'order-found' (the cancellation stays in the tree)")
    await led.suspend(sid, reason="user went away")
    await led.resume(sid, reason="user is back")
    await led.add_turn(sid, role="user", content="Thanks, that's all!", tokens_in=6)
    await led.close(sid, reason="resolved")
    say("  suspended, resumed, closed")

    brief = await led.create(user_id="demo-user", agent="support-bot", ttl_s=0.05)
    await led.add_turn(brief.session_id, role="user", content="Hello? Anyone there?")
    await asyncio.sleep(0.15)
    expired = False
    try:
        await led.add_turn(brief.session_id, role="user", content="Too late.")
    except SessionExpiredError as exc:
        expired = True
        say(f"  second session {brief.session_id}: idle past its 0.05s TTL, as expected:")
        say(f"    {exc}")

    tree = await led.tree(sid)
    events = [event async for event in led.events(sid)]
    report = (await led.verify(sid)).merge(await led.verify(brief.session_id))
    if out.as_json:
        out.json(
            {
                "store": led.config.url,
                "sessions": [sid, brief.session_id],
                "expired": expired,
                "tree": tree_json(tree),
                "verify": report_json(report),
            }
        )
        return 0 if report.ok else 1
    say()
    say(f"ledger log {sid}")
    for line in log_lines(events, tree, out):
        say(line)
    say()
    for line in report_lines(report, out):
        say(line)
    say()
    store = "" if args.store is None else f" --store {args.store}"
    say("Try:")
    say(f"  ledger{store} sessions")
    say(f"  ledger{store} log {sid}")
    say(f"  ledger{store} state {sid} --branch alt")
    say(f"  ledger{store} state {brief.session_id}")
    say(f"  ledger{store} verify")
    return 0 if report.ok else 1


def export_lines(report: ExportReport, where: str) -> list[str]:
    signed = (
        f"anchors MAC'd with key {report.key_id}" if report.key_id else "no key: anchors unsigned"
    )
    lines = [
        f"Exported {plural(report.sessions, 'session')}, {plural(report.events, 'event')} "
        f"({report.bytes:,} bytes) to {where} ({signed})"
    ]
    lines += [
        f"  {a.session}  {plural(a.size, 'event')}  root {short(a.root)}" for a in report.anchors
    ]
    return lines


async def cmd_export(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    sessions = args.sessions or None
    try:
        if args.out is None or args.out == "-":
            # The bundle is stdout: the summary goes to stderr.
            report = await led.export(sys.stdout.buffer, sessions, user_id=args.user)
            sys.stdout.buffer.flush()
            out = Output(sys.stderr, as_json=out.as_json)
            where = "stdout"
        else:
            report = await led.export(args.out, sessions, user_id=args.user)
            where = args.out
    except OSError as exc:
        raise UsageError(f"Cannot write the bundle: {exc}") from None
    if out.as_json:
        out.json(report)
    else:
        for line in export_lines(report, where):
            out.line(line)
    return 0


def import_lines(report: ImportReport, where: str) -> list[str]:
    verb = "Verified (dry run, nothing written)" if report.dry_run else "Imported"
    trust = (
        f"authenticated: MACs checked with key {report.key_id}"
        if report.authenticated
        else "integrity only: no key"
    )
    lines = [
        f"{verb} {where}: {plural(len(report.sessions), 'session')}, "
        f"{plural(report.events, 'event')}, {report.written} written ({trust})"
    ]
    lines += [
        f"  {s.session_id}  {s.action:<9}  {plural(s.events, 'event')}, {s.written} written"
        for s in report.sessions
    ]
    return lines


async def cmd_import(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    source: str | IO[bytes] = sys.stdin.buffer if args.file == "-" else args.file
    try:
        report = await led.import_bundle(source, dry_run=args.dry_run)
    except OSError as exc:
        raise UsageError(f"Cannot read the bundle: {exc}") from None
    if out.as_json:
        out.json(report)
    else:
        for line in import_lines(report, "stdin" if args.file == "-" else args.file):
            out.line(line)
    return 0


Command = Callable[[Ledger, argparse.Namespace, Output], Coroutine[Any, Any, int]]


async def _run(command: Command, args: argparse.Namespace, out: Output) -> int:
    async with Ledger.open(args.store) as led:
        return await command(led, args, out)


# ---------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"ledger: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _common(*, suppress: bool) -> _Parser:
    """--store and --json, accepted before and after the command.

    After the command they default to SUPPRESS, so that a value given before
    it is not overwritten by the subcommand's default.
    """
    parser = _Parser(add_help=False)
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--store",
        metavar="URL",
        default=default,
        help=f"the ledger's URL (default: $LEDGER_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print one JSON document",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ledger",
        description="The session ledger: an append-only, event-sourced ledger of agent sessions.",
        parents=[_common(suppress=False)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_common(suppress=True)]

    def add(name: str, help: str, command: Command) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=common)
        p.set_defaults(handler=command)
        return p

    add("demo", "write an example conversation through every kind of event", cmd_demo)

    p = add("sessions", "list sessions, newest activity first", cmd_sessions)
    p.add_argument("--user", help="only this user's sessions")
    p.add_argument("--agent", help="only this agent's sessions")
    p.add_argument(
        "--status", choices=("active", "suspended", "closed", "expired"), help="only this status"
    )
    p.add_argument("--limit", type=_positive, default=50, help="at most N (default: 50)")

    p = add("log", "draw the tree of a session, newest event first", cmd_log)
    p.add_argument("session", metavar="SESSION")

    p = add("state", "the state of a session at a branch head or an event", cmd_state)
    p.add_argument("session", metavar="SESSION")
    p.add_argument("--branch", default=MAIN, help="the branch (default: main)")
    p.add_argument("--at", metavar="EVENT", help="right after this event (id or unique prefix)")

    p = add("verify", "recompute every id and checksum; exit 1 when anything is wrong", cmd_verify)
    p.add_argument("session", metavar="SESSION", nargs="?", help="only this session")

    p = add("export", "write sessions as a bundle (all of them by default)", cmd_export)
    p.add_argument("sessions", metavar="SESSION", nargs="*", help="only these sessions")
    p.add_argument("--user", help="only this user's sessions")
    p.add_argument("--out", metavar="FILE", help="write to FILE (default: stdout)")

    p = add("import", "verify a whole bundle, then write its sessions into the store", cmd_import)
    p.add_argument("file", metavar="FILE", help="the bundle, or - for stdin")
    p.add_argument("--dry-run", action="store_true", help="verify and compare, write nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``ledger`` command; returns its exit status.

    Example::

        main(["--store", "sqlite:///sessions.db", "log", session_id])
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    out = Output(sys.stdout, as_json=args.json)
    try:
        return asyncio.run(_run(args.handler, args, out))
    except (LedgerError, UsageError) as exc:
        print(f"ledger: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``ledger log ... | head``): stop quietly, and keep
        # Python from complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
