"""Verification: recompute every id and checksum and check every invariant of a session.

One pass over the session's events in append order, keeping only the state of
each branch head: every event's parent must be its branch's head (branches are
linear), except a ``Branched`` event (its parent is the fork point) and a
``Restored`` event (its parent is the checkpoint's entry); those rare events
fold their parent's path from the root. Nothing read here is trusted: not the
store's snapshots, not the fold engine's cache.
"""

from __future__ import annotations

import msgspec

from ledger.errors import IntegrityError, NotFoundError
from ledger.events import (
    Branched,
    Checkpointed,
    Erased,
    Event,
    Redacted,
    Restored,
    SessionCreated,
    erased_digest,
    event_problem,
)
from projections.base import fold
from projections.session import ACTIVE, SESSION, SUSPENDED, SessionState, state_checksum
from stores.base import EventStore

__all__ = ["Problem", "VerifyReport", "verify_session"]

MAX_PROBLEMS = 100

# What each status lets a branch append next (anything on an active branch but Resumed).
_SUSPENDED_ALLOWS = frozenset(
    {"Resumed", "Closed", "Expired", "Checkpointed", "MetadataSet", "Branched"}
)


class Problem(msgspec.Struct, frozen=True):
    session_id: str
    event_id: str | None
    message: str

    def __str__(self) -> str:
        where = f"event {self.event_id!r}" if self.event_id else "session"
        return f"Session {self.session_id!r}, {where}: {self.message}"


class VerifyReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``Ledger.verify`` found. ``problems[0]`` names the first bad event."""

    events_checked: int = 0
    sessions_checked: int = 0
    problems: list[Problem] = []
    keyed: bool = False
    """False: checksums are plain digests, so this checked integrity, not authenticity."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad(self) -> str | None:
        return self.problems[0].event_id if self.problems else None

    def merge(self, other: VerifyReport) -> VerifyReport:
        return VerifyReport(
            events_checked=self.events_checked + other.events_checked,
            sessions_checked=self.sessions_checked + other.sessions_checked,
            problems=(self.problems + other.problems)[:MAX_PROBLEMS],
            keyed=self.keyed,
        )


class _Bad(Exception):
    """One event's problem, raised inside the checks to stop checking that event."""


async def verify_session(
    store: EventStore, session_id: str, key: bytes | None = None
) -> VerifyReport:
    """Verify one session of ``store``; checksums are MACs under ``key`` when given."""
    problems: list[Problem] = []
    heads: dict[str, SessionState] = {}
    checked = 0
    erased: dict[str, str | None] = {}  # erased event id -> the Redacted event naming it
    kept: dict[str, str] = {}  # erased event id -> erased_digest of its body
    try:
        async for event in store.events(session_id):
            checked += 1
            try:
                if checked > 1 and not isinstance(event.body, Branched | Restored):
                    state = _check_linear(session_id, event, heads, key)
                else:
                    state = await _check(store, session_id, event, heads, key, root=checked == 1)
                changed = _check_redaction(event, erased, kept)
                if changed is not None:
                    problems.append(
                        Problem(session_id, changed, f"erased body differs from {event.id!r}'s")
                    )
            except _Bad as bad:
                problems.append(Problem(session_id, event.id, str(bad)))
                if len(problems) >= MAX_PROBLEMS:
                    break
                continue
            heads[event.branch] = state
    except IntegrityError as exc:
        problems.append(Problem(session_id, exc.event_id, str(exc)))
    if checked == 0:
        problems.append(Problem(session_id, None, "the session has no events"))
    for event_id, redaction in erased.items():
        if redaction is None and len(problems) < MAX_PROBLEMS:
            problems.append(Problem(session_id, event_id, "erased, but no Redacted event names it"))
    return VerifyReport(
        events_checked=checked, sessions_checked=1, problems=problems, keyed=key is not None
    )


def _check_linear(
    session_id: str, event: Event, heads: dict[str, SessionState], key: bytes | None
) -> SessionState:
    """The common case, without a coroutine: an event whose parent is its branch's head."""
    _check_envelope(session_id, event)
    if isinstance(event.body, SessionCreated):
        raise _Bad("a session has exactly one root, its first event, SessionCreated")
    head = heads.get(event.branch)
    if head is None:
        raise _Bad(f"appended to unknown branch {event.branch!r}")
    if event.parent != head.head:
        raise _Bad(
            f"parent {event.parent!r} is not the head {head.head!r} of branch "
            f"{event.branch!r}: the branch forks silently"
        )
    return _check_step(head, event, key)


async def _check(
    store: EventStore,
    session_id: str,
    event: Event,
    heads: dict[str, SessionState],
    key: bytes | None,
    *,
    root: bool,
) -> SessionState:
    """The root, a fork or a restore: the events whose parent need not be a head."""
    if not root and not isinstance(event.body, Branched | Restored):
        return _check_linear(session_id, event, heads, key)
    _check_envelope(session_id, event)
    body = event.body
    if root:
        if not isinstance(body, SessionCreated):
            raise _Bad("a session has exactly one root, its first event, SessionCreated")
        if event.parent is not None or event.seq != 0 or event.branch != "main":
            raise _Bad("the root must have no parent, depth 0 and branch 'main'")
        return SESSION.apply(SESSION.initial(), event)
    if event.parent is None:
        raise _Bad("only the root has no parent")
    parent = await _state_from_root(store, session_id, event.parent)
    if isinstance(body, Branched):
        if event.branch in heads or body.name != event.branch:
            raise _Bad(f"Branched must start a new branch, {event.branch!r} exists")
        if body.fork_point != event.parent:
            raise _Bad("Branched's parent is not its fork point")
    else:
        assert isinstance(body, Restored)
        await _check_restore(store, session_id, event, body)
        if event.branch not in heads:
            raise _Bad(f"restores onto unknown branch {event.branch!r}")
    return _check_step(parent, event, key)


def _check_redaction(
    event: Event, erased: dict[str, str | None], kept: dict[str, str]
) -> str | None:
    """Erased bodies and Redacted records pair up: one record per erased event, after it.

    Returns the id of an erased event whose body no longer matches its record.
    """
    body = event.body
    if isinstance(body, Erased):
        erased[event.id] = None
        kept[event.id] = erased_digest(body)
    elif isinstance(body, Redacted):
        if body.event not in erased:
            raise _Bad(f"redacts {body.event!r}, not an erased event before it in this session")
        if erased[body.event] is not None:
            raise _Bad(f"redacts {body.event!r} a second time (after {erased[body.event]!r})")
        erased[body.event] = event.id
        if body.erased is not None and body.erased != kept[body.event]:
            return body.event
    return None


def _check_envelope(session_id: str, event: Event) -> None:
    problem = event_problem(event)
    if problem:
        raise _Bad(problem)
    if event.session != session_id:
        raise _Bad(f"belongs to session {event.session!r}")


def _check_step(parent: SessionState, event: Event, key: bytes | None) -> SessionState:
    """Depth, time, lifecycle and checkpoint checks of one step; the state after it."""
    if event.seq != parent.seq + 1:
        raise _Bad(f"depth {event.seq} after a parent of depth {parent.seq}")
    if event.at < parent.last_activity_at:
        raise _Bad("its time is before its parent's")
    _check_lifecycle(parent, event)
    body = event.body
    if isinstance(body, Checkpointed):
        if body.entry != event.parent:
            raise _Bad("a checkpoint's entry must be its parent")
        if state_checksum(parent, key) != body.checksum:
            raise _Bad("checkpoint checksum does not match the state of its entry")
    return SESSION.apply(parent, event)


def _check_lifecycle(parent: SessionState, event: Event) -> None:
    if isinstance(event.body, Redacted):
        return  # an audit annotation: allowed whatever the branch's status
    if parent.status == ACTIVE:
        allowed = event.kind != "Resumed"
    elif parent.status == SUSPENDED:
        allowed = event.kind in _SUSPENDED_ALLOWS
    else:
        allowed = False  # closed and expired are terminal for the branch
    if not allowed:
        raise _Bad(f"{event.kind} is not allowed on a {parent.status} branch")


async def _state_from_root(store: EventStore, session_id: str, event_id: str) -> SessionState:
    try:
        path = await store.path(event_id)
    except NotFoundError:
        raise _Bad(f"parent {event_id!r} does not exist") from None
    if path[0].session != session_id:
        raise _Bad(f"parent {event_id!r} belongs to another session")
    for event in path:
        if event_problem(event):
            raise _Bad(f"its path goes through bad event {event.id!r}")
    return fold(SESSION, path)


async def _check_restore(store: EventStore, session_id: str, event: Event, body: Restored) -> None:
    if body.entry != event.parent:
        raise _Bad("Restored's parent is not its checkpoint's entry")
    try:
        checkpoint = await store.get(body.checkpoint)
    except NotFoundError:
        raise _Bad(f"restores unknown checkpoint {body.checkpoint!r}") from None
    cp_body = checkpoint.body
    if checkpoint.session != session_id or not isinstance(cp_body, Checkpointed):
        raise _Bad(f"restores {body.checkpoint!r}, not a checkpoint of this session")
    if cp_body.entry != body.entry:
        raise _Bad("Restored's entry differs from its checkpoint's")
