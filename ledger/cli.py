"""The ``ledger`` command: look into a session ledger from a shell.

::

    ledger demo                      # write two example sessions to ./ledger.db
    ledger sessions --status active  # newest activity first
    ledger log SESSION               # the tree of a session, like git log --graph
    ledger state SESSION --at EVENT  # the state of a session at any event
    ledger verify                    # recompute every id and checksum
    ledger redact EVENT --reason WHY # erase a turn's or a record's content
    ledger purge --older-than 90d    # delete sessions idle that long (--dry-run first)
    ledger purged                    # the records purges left
    ledger replay SESSION --follow   # the conversation as it happened, then live
    ledger diff SESSION main alt     # where two branches part, and what each has alone
    ledger keygen --out ledger.key   # a key: checksums and anchors become MACs
    ledger anchor SESSION > a.json   # the session's signed tree head, to keep elsewhere
    ledger verify SESSION --anchor a.json   # does the session still extend it?
    ledger prove EVENT > p.json      # one event belongs to its session (at an anchor)
    ledger check-proof p.json        # checked offline, with nothing else
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
import contextlib
import os
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import IO, Any, NoReturn, TextIO

import msgspec

from ledger.anchors import Anchor, decode_anchor, encode_anchor, key_id, new_key
from ledger.bundle import ExportReport, ImportReport
from ledger.config import DEFAULT_URL
from ledger.errors import (
    AnchorError,
    ConfigError,
    EventNotFoundError,
    LedgerError,
    NotFoundError,
    ProofError,
    SessionExpiredError,
)
from ledger.events import (
    Branched,
    Checkpointed,
    Closed,
    Erased,
    Event,
    Expired,
    MetadataSet,
    Recorded,
    Redacted,
    Restored,
    Resumed,
    SessionCreated,
    Suspended,
    TurnAdded,
    gc_paused,
)
from ledger.ledger import Ledger
from ledger.progress import Progress
from ledger.proofs import ProofCheck, check_proof, decode_proof, encode_proof
from ledger.replay import MAX_PAUSE
from ledger.verify import VerifyReport
from projections.session import SessionState
from projections.tree import Tree
from stores.base import PurgeRecord, SessionRow

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
        case Erased():
            return "(erased)"
        case Redacted(event=erased, reason=reason):
            return clip(f"{short(erased)} by {event.actor} at {iso(event.at)}: {reason}")
    return ""  # pragma: no cover - every kind is matched above


def abandoned(events: Sequence[Event]) -> dict[str, str]:
    """The events a restore took off their branch's history: event id -> the restore's id.

    Those are the branch's own events on its old path (from its head before the
    restore) that are not on the new one (through the checkpoint's entry).
    """
    by_id = {event.id: event for event in events}
    heads: dict[str, Event] = {}
    left: dict[str, str] = {}
    for event in events:
        body = event.body
        old = heads.get(event.branch)
        heads[event.branch] = event
        if not isinstance(body, Restored) or old is None:
            continue
        kept = by_id.get(body.entry)
        while old is not None and kept is not None and old.id != kept.id:
            if old.seq >= kept.seq:  # walk the deeper side up to the common ancestor
                if old.branch == event.branch:
                    left.setdefault(old.id, event.id)
                old = by_id.get(old.parent) if old.parent else None
            else:
                kept = by_id.get(kept.parent) if kept.parent else None
    return left


def log_lines(
    events: Sequence[Event], tree: Tree, out: Output, anchors: Sequence[Anchor] = ()
) -> list[str]:
    """The text of ``ledger log``: graph, short id, kind, branch, summary, marks."""
    labels: dict[str, str] = {}
    marks: dict[str, list[str]] = {}
    for anchor in anchors:  # on the last event it covers, in append order
        if 0 < anchor.size <= len(events):
            marks.setdefault(events[anchor.size - 1].id, []).append(anchor_mark(anchor))
    for event in events:
        body = event.body
        if isinstance(body, Checkpointed):
            label = body.label or short(event.id)
            labels[event.id] = label
            marks.setdefault(body.entry, []).append(f"[checkpoint {label}]")
        elif isinstance(body, Redacted):
            marks.setdefault(body.event, []).append(f"[redacted by {short(event.id)}]")
    for event_id, restore_id in abandoned(events).items():
        marks.setdefault(event_id, []).append(f"[abandoned by restore {short(restore_id)}]")
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
    anchors = await led.anchors(args.session)
    if out.as_json:
        out.json(
            {
                "events": [event_json(e) for e in events],
                "tree": tree_json(tree),
                "anchors": anchors,
            }
        )
        return 0
    for line in log_lines(events, tree, out, anchors):
        out.line(line)
    for anchor in anchors:
        if anchor.size > len(events):
            out.line(f"{anchor_mark(anchor)} beyond the session's {len(events)} events")
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
        keyed = f" (keyed: key {report.key_id})" if report.key_id else ""
        line = line + keyed if report.keyed else f"{line} (integrity only: no key)"
        return [line, *anchor_lines(report)]
    lines = [
        f"{out.paint('FAILED', 'bad')}: {plural(len(report.problems), 'problem')} in "
        f"{plural(report.events_checked, 'event')} of "
        f"{plural(report.sessions_checked, 'session')}"
    ]
    lines += [f"  {problem}" for problem in report.problems]
    return lines + anchor_lines(report)


def report_json(report: VerifyReport) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(report)
    return {"ok": report.ok, "first_bad": report.first_bad, **data}


async def cmd_verify(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    anchors = [read_anchor(path) for path in args.anchor or ()]
    if anchors and args.session is None:
        raise UsageError("--anchor needs a SESSION: anchors are checked against one session")
    # A process of its own, where no other task makes garbage: the collector can stay
    # paused for the whole walk. The library pauses it a chunk at a time (see
    # ledger.verify._Walker.walk), which cost a JSONL verify 15-20% more CPU.
    with gc_paused():
        if args.session is None:
            report = await verify_all(led)
        else:
            report = await led.verify(args.session, anchors=anchors)
    if out.as_json:
        out.json(report_json(report))
    else:
        for line in report_lines(report, out):
            out.line(line)
    return 0 if report.ok else 1


async def cmd_redact(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    event_id = args.event.strip().lower()
    if args.session is not None:
        event_id = await _resolve_event(led, args.session, event_id)
    target = await led.get(event_id)
    record = await led.redact(event_id, reason=args.reason, actor=args.actor)
    if out.as_json:
        out.json({"redaction": event_json(record), "erased": event_json(await led.get(event_id))})
        return 0
    out.line(
        f"Erased {out.paint(short(event_id), 'id')} ({target.kind}) of session "
        f"{target.session}; recorded as {out.paint(short(record.id), 'id')} "
        f"on branch {record.branch}"
    )
    return 0


def purge_lines(records: Sequence[PurgeRecord], out: Output) -> list[str]:
    header = ("SESSION", "USER", "AGENT", "EVENTS", "BYTES", "LAST ACTIVITY", "PURGED", "ROOT")
    body = [
        (
            r.session_id,
            r.user_id,
            r.agent,
            str(r.event_count),
            str(r.bytes),
            iso(r.last_activity_at),
            iso(r.purged_at),
            short(str(r.anchor.get("root", ""))),
        )
        for r in records
    ]
    return table([header, *body], right=frozenset({3, 4}))


async def cmd_purge(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    with Progress("purging sessions") as progress:
        records = await led.purge(
            older_than=args.older_than,
            user_id=args.user,
            batch_size=args.batch_size,
            reason=args.reason,
            actor=args.actor,
            dry_run=args.dry_run,
            on_batch=progress.advance,
        )
    if out.as_json:
        out.json({"dry_run": args.dry_run, "purged": records})
        return 0
    verb = "Would purge" if args.dry_run else "Purged"
    out.line(f"{verb} {plural(len(records), 'session')}.")
    if records:
        for line in purge_lines(records, out):
            out.line(line)
    return 0


async def cmd_purged(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    records: list[PurgeRecord] = []
    cursor: str | None = None
    while len(records) < args.limit:
        page = await led.purged(user_id=args.user, limit=args.limit - len(records), cursor=cursor)
        records.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    if out.as_json:
        out.json(records)
        return 0
    if not records:
        out.line("No purge records.")
        return 0
    for line in purge_lines(records, out):
        out.line(line)
    return 0


async def verify_all(led: Ledger, *, page_size: int = 500) -> VerifyReport:
    """``led.verify()`` of every session, with a progress line on a terminal."""
    with Progress("verifying sessions") as progress:
        if progress.enabled:  # a total for the bar costs a pass over the listing
            progress.total = await _count_sessions(led, page_size)
        return await led.verify(on_session=lambda _: progress.advance())


async def _count_sessions(led: Ledger, page_size: int) -> int:
    count, cursor = 0, None
    while True:
        page = await led.sessions(limit=page_size, cursor=cursor)
        count += len(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return count


# ---------------------------------------------------------------------------- replay, diff

STAMP_WIDTH = 10
"""``HH:MM:SS`` and two spaces: where a replayed event's text starts."""
DATA_WIDTH = 200
"""Characters of a ``Recorded`` event's data shown in a replay (``--json`` has it all)."""


class Conversation:
    """Events as a readable conversation: a time, then who said what, or a marker.

    ::

        -- 2026-11-21 (UTC) --
        15:11:03  user: Hi! Where is my order A-1042?
        15:11:04  assistant: Let me look that up.
                    -> lookup_order({"order_id":"A-1042"})
        15:11:04  * tool_call: {"id":"call-1",...}
        15:11:05  == checkpoint order-found ==
    """

    def __init__(self, led: Ledger, out: Output, *, indent: str = "") -> None:
        self.led = led
        self.out = out
        self.indent = indent
        self.day: str | None = None
        self.labels: dict[str, str] = {}
        """Checkpoint id -> its label (a restore names the checkpoint it went back to)."""

    async def lines(self, event: Event) -> list[str]:
        moment = datetime.fromtimestamp(event.at / 1e9, tz=UTC)
        day = moment.strftime("%Y-%m-%d")
        lines = []
        if day != self.day:
            self.day = day
            lines.append(self.out.paint(f"-- {day} (UTC) --", "mark"))
        first, *more = await self._text(event)
        lines.append(f"{self.out.paint(moment.strftime('%H:%M:%S'), 'id')}  {first}")
        lines += [" " * STAMP_WIDTH + line for line in more]
        return [self.indent + line for line in lines]

    def _marker(self, text: str) -> list[str]:
        return [self.out.paint(f"== {text} ==", "mark")]

    async def _label(self, checkpoint_id: str) -> str:
        if checkpoint_id not in self.labels:
            label = short(checkpoint_id)
            with contextlib.suppress(NotFoundError):  # verify names a missing checkpoint
                body = (await self.led.get(checkpoint_id)).body
                if isinstance(body, Checkpointed) and body.label:
                    label = body.label
            self.labels[checkpoint_id] = label
        return self.labels[checkpoint_id]

    async def _text(self, event: Event) -> list[str]:
        body = event.body
        match body:
            case TurnAdded(role=role, content=content, name=name, tool_calls=calls):
                who = self.out.paint(f"{role}({name})" if name else role, "branch")
                first, *more = _text(content).splitlines() or [""]
                lines = [f"{who}: {first}", *more]
                return lines + [f"  -> {_call_text(call)}" for call in calls]
            case SessionCreated(user_id=user, agent=agent, metadata=metadata):
                about = f"user {user}, agent {agent}"
                if metadata:
                    about += " (" + ", ".join(f"{k}={_text(v)}" for k, v in metadata.items()) + ")"
                return self._marker(f"session {event.session}: {about}")
            case Checkpointed(label=label):
                self.labels[event.id] = label or short(event.id)
                return self._marker(f"checkpoint {self.labels[event.id]}")
            case Branched(name=name, fork_point=fork):
                return self._marker(f"branch {name}, from {short(fork)}")
            case Restored(checkpoint=checkpoint, entry=entry):
                label = await self._label(checkpoint)
                return self._marker(f"restored checkpoint {label}: back to {short(entry)}")
            case Suspended(reason=reason) | Resumed(reason=reason) | Closed(reason=reason):
                verb = event.kind.lower()
                return self._marker(f"{verb}: {reason}" if reason else verb)
            case Expired(idle_s=idle, ttl_s=ttl):
                return self._marker(f"expired: idle {idle:g}s > ttl {ttl:g}s")
            case MetadataSet(metadata=metadata):
                pairs = ", ".join(f"{k}={_text(v)}" for k, v in metadata.items())
                return [f"* metadata: {pairs}"]
            case Recorded(type=kind, data=data):
                return [f"* {kind}: {clip(_text(data), DATA_WIDTH)}"]
            case Erased(original=original):
                return [f"[{original} erased by a redaction]"]
            case Redacted(event=target, reason=reason):
                return self._marker(f"redacted {short(target)}: {reason}")
        return [event.kind]  # pragma: no cover - every kind is matched above


def _call_text(call: Any) -> str:
    """A tool call as ``name(arguments)`` when it has the usual shape, else its JSON."""
    if isinstance(call, dict):
        function = call.get("function")
        inner: dict[str, Any] = function if isinstance(function, dict) else call
        name = inner.get("name")
        if isinstance(name, str):
            return f"{name}({_text(inner.get('arguments', ''))})"
    return _text(call)


def _json_line(out: Output, event: Event) -> None:
    out.stream.write(msgspec.json.encode(event_json(event)).decode() + "\n")


async def cmd_replay(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    if args.follow and args.at:
        raise UsageError("--follow replays a branch to its head: it cannot take --at")
    view = Conversation(led, out)
    live = args.follow or args.speed is not None

    async def show(event: Event) -> None:
        if out.as_json:
            _json_line(out, event)
        else:
            for line in await view.lines(event):
                out.line(line)
        if live:  # a pipe buffers: let the reader see each event as it comes
            out.stream.flush()

    if not args.follow:
        at = await _resolve_event(led, args.session, args.at) if args.at else None
        await led.replay(
            args.session,
            into=show,
            branch=args.branch,
            at=at,
            speed=args.speed,
            max_pause=args.max_pause,
        )
        return 0
    following = led.follow(
        args.session, branch=args.branch, speed=args.speed, max_pause=args.max_pause
    )
    try:
        async with contextlib.aclosing(following) as events:
            async for event in events:
                await show(event)
    except asyncio.CancelledError:
        # Ctrl-C: asyncio.run cancels this task. For --follow that is how it is
        # meant to end, so it ends cleanly, with status 0.
        return 0
    return 0


async def cmd_diff(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    diff = await led.diff(args.session, args.a, args.b)
    fork = await led.get(diff.fork_point)
    if out.as_json:
        out.json(
            {
                "session_id": diff.session_id,
                "a": diff.a,
                "b": diff.b,
                "fork_point": event_json(fork),
                "only_a": [event_json(e) for e in diff.only_a],
                "only_b": [event_json(e) for e in diff.only_b],
            }
        )
        return 0
    what = summary(fork, {})
    out.line(
        f"fork point: {out.paint(short(fork.id), 'id')} {fork.kind} at depth {fork.seq}, "
        f"{iso(fork.at)}" + (f": {what}" if what else "")
    )
    for name, events in ((diff.a, diff.only_a), (diff.b, diff.only_b)):
        out.line()
        turns = sum(isinstance(e.body, TurnAdded) for e in events)
        if not events:
            out.line(f"only on {out.paint(name, 'branch')}: nothing")
            continue
        count = f"{plural(turns, 'turn')}, {plural(len(events), 'event')}"
        out.line(f"only on {out.paint(name, 'branch')} ({count}):")
        view = Conversation(led, out, indent="  ")
        for event in events:
            for line in await view.lines(event):
                out.line(line)
    return 0


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


# ---------------------------------------------------------------------------- keys, anchors, proofs


def anchor_mark(anchor: Anchor) -> str:
    signed = f", key {anchor.key_id}" if anchor.key_id else ", unsigned"
    return f"[anchor {plural(anchor.size, 'event')}{signed}]"


def anchor_lines(report: VerifyReport) -> list[str]:
    """One line per anchor checked (naming its session when several were verified)."""
    mac_words = {
        "ok": "MAC ok",
        "unsigned": "unsigned",
        "unchecked": "MAC not checked: no key",
        "other-key": "MAC not checked: another key",
        "mismatch": "MAC does not match",
    }
    lines = []
    for check in report.anchors:
        verdict = {True: "extended", False: "NOT extended", None: "not checked"}[check.extended]
        of = f" of session {check.session}" if report.sessions_checked > 1 else ""
        lines.append(
            f"  {check.source} anchor{of} at {plural(check.size, 'event')} "
            f"({mac_words[check.mac]}{f', key {check.key_id}' if check.key_id else ''}): "
            f"{verdict}"
        )
    return lines


def read_key_file(path: str) -> bytes:
    """A key file: 64 hex digits (what ``ledger keygen --out`` writes)."""
    try:
        with open(path, encoding="ascii") as file:
            key = bytes.fromhex(file.read().strip())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"Cannot read a key from {path!r}: {exc}") from None
    if len(key) != 32:
        raise ConfigError(f"Invalid key in {path!r}: expected 32 bytes as 64 hex digits")
    return key


def _key(args: argparse.Namespace) -> bytes | None:
    """``--key-file``, else ``LEDGER_KEY``, else no key."""
    if getattr(args, "key_file", None):
        return read_key_file(args.key_file)
    raw = os.environ.get("LEDGER_KEY")
    if raw:
        try:
            key = bytes.fromhex(raw.strip())
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError("Invalid LEDGER_KEY: expected 32 bytes as 64 hex digits")
        return key
    return None


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise UsageError(f"Cannot read the {what} {path!r}: {exc.strerror}") from None


def read_anchor(path: str) -> Anchor:
    return decode_anchor(_read(path, "anchor file"), source=repr(path))


def _write_new(path: str, data: bytes, *, mode: int = 0o644) -> None:
    """Write a file that must not exist yet (a kept anchor or key is never overwritten)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise UsageError(f"Not overwriting {path!r}: it exists") from None
    except OSError as exc:
        raise UsageError(f"Cannot write {path!r}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _document(
    out: Output, data: bytes, path: str | None, summary: str, extra: dict[str, Any]
) -> None:
    """An anchor or a proof: to ``path`` (and a summary), or as the output itself."""
    if path is None:
        out.stream.write(data.decode() + "\n")
        return
    _write_new(path, data + b"\n")
    if out.as_json:
        out.json({"file": path, **extra})
    else:
        out.line(f"{summary} -> {path}")


async def cmd_keygen(args: argparse.Namespace, out: Output) -> int:
    key = new_key()
    kid = key_id(key)
    if args.out is None:
        if out.as_json:
            out.json({"key": key.hex(), "key_id": kid})
        else:
            out.line(key.hex())
            print(f"key id {kid}: keep the key secret (LEDGER_KEY or --key-file)", file=sys.stderr)
        return 0
    _write_new(args.out, key.hex().encode() + b"\n", mode=0o600)
    if out.as_json:
        out.json({"file": args.out, "key_id": kid})
    else:
        out.line(f"Wrote a new key to {args.out} (key id {kid}, mode 0600).")
        out.line(f"Use it with --key-file {args.out}, or LEDGER_KEY=$(cat {args.out}).")
    return 0


def _refuse_existing(path: str | None) -> None:
    """Before anything is recorded: a kept anchor or proof is never overwritten."""
    if path is not None and os.path.lexists(path):
        raise UsageError(f"Not overwriting {path!r}: it exists")


async def cmd_anchor(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    _refuse_existing(args.out)
    anchor = await led.anchor(args.session, record=not args.no_record)
    signed = f"signed with key {anchor.key_id}" if anchor.key_id else "unsigned (no key)"
    summary = f"Anchored session {anchor.session} at {plural(anchor.size, 'event')}, {signed}"
    _document(out, encode_anchor(anchor), args.out, summary, {"anchor": anchor})
    return 0


async def cmd_prove(led: Ledger, args: argparse.Namespace, out: Output) -> int:
    _refuse_existing(args.out)
    anchor = read_anchor(args.anchor) if args.anchor else None
    proof = await led.prove(args.event.strip().lower(), anchor=anchor)
    summary = (
        f"Proof that event {short(proof.event.id)} ({proof.event.kind}, index {proof.index}) "
        f"is in session {proof.anchor.session} at {plural(proof.anchor.size, 'event')}"
    )
    _document(out, encode_proof(proof), args.out, summary, {"proof": proof})
    return 0


def proof_lines(check: ProofCheck) -> list[str]:
    if check.proof == "inclusion":
        what = (
            f"event {check.event_id} ({check.kind}) is at index {check.index} of the "
            f"{plural(check.size, 'event')} of session {check.session}"
        )
    else:
        what = (
            f"session {check.session} at {plural(check.size, 'event')} extends its "
            f"first {plural(check.old_size or 0, 'event')}"
        )
    trust = {
        "ok": f"the anchor's MAC matches under key {check.key_id}",
        "unsigned": "integrity only: the anchor is unsigned",
        "unchecked": "integrity only: no key, the anchor's MAC was not checked",
    }[check.mac]
    return [f"OK: {what} (root {check.root[:12]}...)", f"  {trust}"]


async def cmd_check_proof(args: argparse.Namespace, out: Output) -> int:
    key = _key(args)
    trusted = read_anchor(args.anchor) if args.anchor else None
    try:
        proof = decode_proof(_read(args.proof, "proof file"), source=repr(args.proof))
        check = check_proof(proof, key=key, trusted=trusted)
    except (AnchorError, ProofError) as exc:
        if not out.as_json:
            raise
        out.json({"ok": False, "reason": exc.reason, "error": str(exc)})
        return 1
    if out.as_json:
        out.json({"ok": True, **msgspec.to_builtins(check)})
    else:
        for line in proof_lines(check):
            out.line(line)
    return 0


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
        with Progress("exporting events") as progress:
            if args.out is None or args.out == "-":
                # The bundle is stdout: the summary goes to stderr.
                report = await led.export(
                    sys.stdout.buffer, sessions, user_id=args.user, progress=progress.advance
                )
                sys.stdout.buffer.flush()
                out = Output(sys.stderr, as_json=out.as_json)
                where = "stdout"
            else:
                report = await led.export(
                    args.out, sessions, user_id=args.user, progress=progress.advance
                )
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
        # One pass verifies the bundle (a second reads only sessions with forks or
        # already in the store), another writes it; a pipe's size is unknown.
        size = None if args.file == "-" else await asyncio.to_thread(os.path.getsize, args.file)
        total = None if size is None else size * (1 if args.dry_run else 2)
        with Progress("importing (bytes read)", total) as progress:
            report = await led.import_bundle(
                source, dry_run=args.dry_run, progress=progress.advance
            )
    except OSError as exc:
        raise UsageError(f"Cannot read the bundle: {exc}") from None
    if out.as_json:
        out.json(report)
    else:
        for line in import_lines(report, "stdin" if args.file == "-" else args.file):
            out.line(line)
    return 0


Command = Callable[[Ledger, argparse.Namespace, Output], Coroutine[Any, Any, int]]
Offline = Callable[[argparse.Namespace, Output], Coroutine[Any, Any, int]]
"""A command that opens no store (``keygen``, ``check-proof``)."""


async def _run(command: Command, args: argparse.Namespace, out: Output) -> int:
    async with Ledger.open(args.store, key=_key(args)) as led:
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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(text: str) -> float:
    """``90d``, ``12h``, ``30m``, ``45s``, ``2w`` or a sum of them (``1d12h``), in seconds."""
    parts = _DURATION.findall(text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (like 90d, 12h, 30m, 45s, 2w or 1d12h)"
        )
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be longer than zero: {text!r}")
    return seconds


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {text}")
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
    p.add_argument(
        "--anchor", metavar="FILE", action="append", help="the session must extend it (repeatable)"
    )
    _key_option(p)

    p = sub.add_parser(
        "keygen", help="make a 32-byte key", description="make a 32-byte key", parents=common
    )
    p.set_defaults(offline=cmd_keygen)
    p.add_argument("--out", metavar="FILE", help="write it to a new file (mode 0600)")

    p = add("anchor", "print the session's signed tree head, to keep elsewhere", cmd_anchor)
    p.add_argument("session", metavar="SESSION")
    p.add_argument("--out", metavar="FILE", help="write it to a new file")
    p.add_argument("--no-record", action="store_true", help="do not record it in the ledger")
    _key_option(p)

    p = add("prove", "print a proof that an event belongs to its session", cmd_prove)
    p.add_argument("event", metavar="EVENT", help="the event's full id")
    p.add_argument("--anchor", metavar="FILE", help="prove it at this anchor (default: now)")
    p.add_argument("--out", metavar="FILE", help="write it to a new file")
    _key_option(p)

    help = "check a proof offline; exit 1 when it does not check"
    p = sub.add_parser("check-proof", help=help, description=help, parents=common)
    p.set_defaults(offline=cmd_check_proof)
    p.add_argument("proof", metavar="FILE")
    p.add_argument("--anchor", metavar="FILE", help="the proof must be against this kept anchor")
    _key_option(p)

    p = add(
        "redact",
        "erase a turn's or a record's content; its id, digest and the chain still verify",
        cmd_redact,
    )
    p.add_argument("event", metavar="EVENT", help="the event id (a unique prefix with --session)")
    p.add_argument("--reason", required=True, help="why: kept in the redaction record")
    p.add_argument("--actor", help="who: kept in the redaction record (default: the user)")
    p.add_argument("--session", metavar="SESSION", help="resolve EVENT as a prefix in it")

    p = add("purge", "delete whole sessions idle longer than a retention period", cmd_purge)
    p.add_argument(
        "--older-than",
        metavar="DURATION",
        type=_duration,
        required=True,
        help="idle at least this long: 90d, 12h, 30m, 45s, 2w, 1d12h",
    )
    p.add_argument("--user", help="only this user's sessions")
    p.add_argument("--reason", default="retention", help="kept in each purge record")
    p.add_argument("--actor", default="ledger", help="who purges: kept in each record")
    p.add_argument(
        "--batch-size", type=_positive, default=100, help="sessions per transaction (100)"
    )
    p.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")

    p = add("purged", "list purge records, most recent first", cmd_purged)
    p.add_argument("--user", help="only this user's")
    p.add_argument("--limit", type=_positive, default=50, help="at most N (default: 50)")

    p = add("replay", "print a branch's conversation as it happened", cmd_replay)
    p.add_argument("session", metavar="SESSION")
    p.add_argument("--branch", default=MAIN, help="the branch (default: main)")
    p.add_argument("--at", metavar="EVENT", help="stop after this event (id or unique prefix)")
    p.add_argument(
        "--speed",
        type=_positive_float,
        metavar="X",
        help="keep the original timing, X times faster (default: as fast as possible)",
    )
    p.add_argument(
        "--max-pause",
        type=_seconds,
        default=MAX_PAUSE,
        metavar="S",
        help=f"with --speed, pause at most S seconds between events (default: {MAX_PAUSE:g})",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        help="then print new events as they are appended, until the branch is closed or Ctrl-C",
    )

    p = add("diff", "the fork point of two branches and the turns only on each", cmd_diff)
    p.add_argument("session", metavar="SESSION")
    p.add_argument("a", metavar="A", help="a branch")
    p.add_argument("b", metavar="B", help="another branch")

    p = add("export", "write sessions as a bundle (all of them by default)", cmd_export)
    p.add_argument("sessions", metavar="SESSION", nargs="*", help="only these sessions")
    p.add_argument("--user", help="only this user's sessions")
    p.add_argument("--out", metavar="FILE", help="write to FILE (default: stdout)")

    p = add("import", "verify a whole bundle, then write its sessions into the store", cmd_import)
    p.add_argument("file", metavar="FILE", help="the bundle, or - for stdin")
    p.add_argument("--dry-run", action="store_true", help="verify and compare, write nothing")
    return parser


def _key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--key-file", metavar="FILE", help="the ledger's key (default: $LEDGER_KEY, else none)"
    )


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
        offline: Offline | None = getattr(args, "offline", None)
        return asyncio.run(offline(args, out) if offline else _run(args.handler, args, out))
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
