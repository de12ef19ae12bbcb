"""Verification: recompute every id and checksum and check every invariant of a session.

One pass over the session's events in append order, keeping only the state of
each branch head: every event's parent must be its branch's head (branches are
linear), except a ``Branched`` event (its parent is the fork point) and a
``Restored`` event (its parent is the checkpoint's entry); those rare events
fold their parent's path from the root. Nothing read here is trusted: not the
store's snapshots, not the fold engine's cache.

With anchors (given by the caller, and those the ledger recorded), the same
pass builds the session's Merkle log, and each anchor is checked: its MAC
under the ledger's key, then a consistency proof that today's session extends
it. A failure says which: a truncated session, or a prefix that no longer
hashes to the anchored root, narrowed down by the other anchors and by the
chain's own findings to the event that changed when they can tell.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncGenerator, Sequence
from typing import Final, Literal

import msgspec

from ledger.anchors import Anchor, check_anchor_mac, decode_anchor, describe, key_id
from ledger.errors import AnchorError, IntegrityError, NotFoundError
from ledger.events import (
    Branched,
    Checkpointed,
    Erased,
    Event,
    Redacted,
    Restored,
    Resumed,
    SessionCreated,
    erased_digest,
    event_problem,
    gc_paused,
)
from ledger.merkle import MerkleLog, verify_consistency
from ledger.verify_worker import (
    PLAIN,
    Answer,
    TailRequest,
    TailWorker,
    Worker,
    check_events,
    encode_request,
    event_chunks,
    event_id_if_sound,
)
from projections.base import fold
from projections.session import ACTIVE, SESSION, SUSPENDED, SessionState, state_checksum
from projections.session import apply as _apply
from stores.base import EventStore

__all__ = ["AnchorCheck", "Problem", "VerifyReport", "verify_session"]

KEEP_EVERY: Final = 1024
"""The walk keeps the state at every event this deep (a multiple of it): a fork's
state is folded from the nearest one, at most this many events away."""
MAX_PROBLEMS = 100
PARALLEL_FROM: Final = 50_000
"""Sessions of at least this many events are verified on two cores."""
CHUNK: Final = 4096
"""Events per request to the worker process: a power of two (see ``ledger.verify_worker``)."""

PAGE: Final = 8192
"""Events per page read from the store: fewer round trips to its driver's thread."""

_FORKS: Final = frozenset({Branched, Restored})
"""The events whose parent need not be their branch's head."""
_STEP_CHECKED: Final = frozenset({Checkpointed, Resumed})
"""The kinds that always take ``_check_step``'s every check (a checksum, a lifecycle rule)."""
_SPLIT_SCHEMES: Final = frozenset({"sqlite", "postgresql", "jsonl"})
"""The stores that a second process reads (``_walk_split``): SQLite and PostgreSQL opened
at once by their URL, JSONL's file where this process's index says (opening the store
there would read its index: seconds); not the memory store (in this process)."""
_PAIRED: Final = frozenset({Erased, Redacted})
"""The kinds ``_Redactions`` pairs up; no other event can change its findings."""

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


AnchorMac = Literal["ok", "unsigned", "unchecked", "other-key", "mismatch"]


class AnchorCheck(msgspec.Struct, frozen=True, kw_only=True):
    """One anchor checked against the session as it is now."""

    source: Literal["given", "recorded"]
    session: str
    size: int
    root: str
    at: int
    key_id: str | None
    mac: AnchorMac
    """``ok``: matches under this ledger's key; ``unsigned``: the anchor has none;
    ``unchecked``: this ledger has no key; ``other-key``: made with another key;
    ``mismatch``: altered or forged (a problem)."""
    extended: bool | None
    """True: the session extends it (a consistency proof checked); False: it does
    not (a problem); None: not checked (a forged or unreadable anchor)."""
    message: str


class VerifyReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``Ledger.verify`` found. ``problems[0]`` names the first bad event."""

    events_checked: int = 0
    sessions_checked: int = 0
    problems: list[Problem] = []
    keyed: bool = False
    """False: checksums are plain digests, so this checked integrity, not authenticity."""
    key_id: str | None = None
    """The id of the ledger's key (``ledger.anchors.key_id``), when it has one."""
    anchors: list[AnchorCheck] = []
    """Every anchor checked: those given, then those the ledger recorded."""

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
            key_id=self.key_id,
            anchors=self.anchors + other.anchors,
        )


class _Bad(Exception):
    """One event's problem, raised inside the checks to stop checking that event.

    ``state``: the state after the event when only its content is wrong (a
    checksum), so that the events after it are checked as usual.
    """

    def __init__(self, message: str, state: SessionState | None = None) -> None:
        super().__init__(message)
        self.state = state


async def verify_session(
    store: EventStore,
    session_id: str,
    key: bytes | None = None,
    anchors: Sequence[Anchor] = (),
    *,
    parallel: bool | None = None,
) -> VerifyReport:
    """Verify one session of ``store``; checksums are MACs under ``key`` when given.

    ``anchors`` (of this session, their MACs already checked by the caller) and
    the anchors the store recorded are checked against the session's Merkle log.
    ``parallel``: recompute digests, ids and the Merkle log in a second process
    while this one checks the structure (default: for sessions of at least
    ``PARALLEL_FROM`` events on a machine with more than one core).
    """
    recorded = await store.anchors(session_id)
    need_log = bool(anchors or recorded)
    count = await _event_count(store, session_id)
    if parallel is None:
        parallel = (os.cpu_count() or 1) > 1 and count >= PARALLEL_FROM
    result = None
    if parallel and store.url.partition(":")[0] in _SPLIT_SCHEMES and count >= 2 * CHUNK:
        split = count // 2 // CHUNK * CHUNK
        result = await _walk_split(store, session_id, key, need_log, split)
    if parallel and result is None:
        result = await _walk_parallel(store, session_id, key, need_log)
    if result is None:  # sequential, or a worker found a bad event: the exact report
        result = await _walk(store, session_id, key, need_log)
    checked, problems, log, bad_at = result
    if checked == 0:
        problems.append(Problem(session_id, None, "the session has no events"))
    checks: list[AnchorCheck] = []
    if log is not None:
        checks = await _check_anchors(
            store, session_id, log, anchors, recorded, key, bad_at, problems
        )
        others = {c.key_id for c in checks if c.mac == "other-key"}
        if key is not None and others and not any(c.mac == "ok" for c in checks):
            problems.append(
                Problem(
                    session_id,
                    None,
                    f"wrong key? this ledger holds key {key_id(key)}, the session's recorded "
                    f"anchors were made under key {', '.join(sorted(map(str, others)))}",
                )
            )
    return VerifyReport(
        events_checked=checked,
        sessions_checked=1,
        problems=problems[:MAX_PROBLEMS],
        keyed=key is not None,
        key_id=key_id(key) if key is not None else None,
        anchors=checks,
    )


_Walk = tuple[int, list[Problem], MerkleLog | None, dict[str, int]]
"""Events checked, problems, the Merkle log (when asked for), bad event id -> index."""


async def _event_count(store: EventStore, session_id: str) -> int:
    try:
        return (await store.session(session_id)).event_count
    except NotFoundError:
        return 0


async def _walk(store: EventStore, session_id: str, key: bytes | None, need_log: bool) -> _Walk:
    """Every check of every event, in append order, in this process."""
    walker = _Walker(store, session_id, key, content=True)
    leaves = bytearray() if need_log else None
    try:
        async for chunk in _chunks(store, session_id):
            with gc_paused():  # see _Walker.walk
                walked = await walker.walk(chunk)
                if leaves is not None:
                    leaves += bytes.fromhex("".join([event.id for event in chunk[:walked]]))
            if walked < len(chunk):
                break
    except IntegrityError as exc:
        walker.problems.append(Problem(session_id, exc.event_id, str(exc)))
    return walker.done(MerkleLog.from_leaves(leaves) if leaves is not None else None)


def _chunks(store: EventStore, session_id: str) -> AsyncGenerator[list[Event], None]:
    """The session's events in append order, ``CHUNK`` at a time; a store's
    ``IntegrityError`` is raised after the chunk of the good events before it."""
    return event_chunks(store.event_pages(session_id, page_size=PAGE), CHUNK)


class _Walker:
    """The checks of a walk in append order that need what came before: the
    branches' head states, the states kept for forks, the redaction pairs.

    Each event goes to ``step``, or to ``step_fork`` when ``forks`` says so (the
    root, a fork or a restore: they read the store); the common case is no coroutine.
    """

    def __init__(
        self, store: EventStore, session_id: str, key: bytes | None, *, content: bool
    ) -> None:
        self.store = store
        self.session_id = session_id
        self.key = key
        self.content = content
        """False: a worker process recomputes digests and ids (``_walk_parallel``)."""
        self.checked = 0
        self.problems: list[Problem] = []
        self.bad_at: dict[str, int] = {}
        self.heads: dict[str, SessionState] = {}
        self.kept: dict[str, SessionState] = {}  # every KEEP_EVERY-th depth: a fork's base
        self.redactions = _Redactions(session_id)

    async def walk(self, events: Sequence[Event]) -> int:
        """Check these next events in turn; how many were checked (fewer than all once
        there are too many problems to go on).

        Callers pause the collector around a chunk's walk: it makes and drops objects
        by the thousand, none in a cycle, and in a process that holds a large heap (a
        store's index, a service's caches) the collector would scan that heap again
        and again (a tenth of a JSONL verify beside an index of 100,000 sessions). A
        chunk at a time, not the whole walk: between chunks the store reads, and the
        application's other tasks run and are collected as usual.

        The common event, a plain step on an active branch, is folded here with no
        call but the fold's: ``step`` would find nothing wrong with it.
        """
        heads, session_id, plain = self.heads, self.session_id, not self.content
        for walked, event in enumerate(events):
            kind = type(event.body)
            head = heads.get(event.branch)
            if (
                plain
                and kind in PLAIN
                and head is not None
                and event.parent == head.head
                and event.seq == head.seq + 1
                and event.seq % KEEP_EVERY
                and event.at >= head.last_activity_at
                and head.status == ACTIVE
                and event.session == session_id
            ):
                self.checked += 1
                heads[event.branch] = _apply(head, event)
            elif not (await self.step_fork(event) if self.forks(event) else self.step(event)):
                return walked + 1
        return len(events)

    def forks(self, event: Event) -> bool:
        """Must this event go to ``step_fork``?"""
        return not self.checked or type(event.body) in _FORKS

    def step(self, event: Event) -> bool:
        """Check the next event (not one ``forks`` names); False once there are too many
        problems to go on."""
        self.checked += 1
        try:
            state = _check_linear(self.session_id, event, self.heads, self.key, self.content)
            if type(event.body) in _PAIRED:
                changed = self.redactions.see(event)
                if changed is not None:
                    self.problems.append(changed)
        except _Bad as bad:
            return self._bad(event, bad)
        self.heads[event.branch] = state  # as _passed does, without the call
        if not event.seq % KEEP_EVERY:
            self.kept[event.id] = state
        return True

    async def step_fork(self, event: Event) -> bool:
        """``step`` of the root, a fork or a restore."""
        self.checked += 1
        try:
            state = await _check(
                self.store,
                self.session_id,
                event,
                self.heads,
                self.kept,
                self.key,
                root=self.checked == 1,
                content=self.content,
            )
        except _Bad as bad:
            return self._bad(event, bad)
        return self._passed(event, state)

    def _passed(self, event: Event, state: SessionState) -> bool:
        self.heads[event.branch] = state
        if not event.seq % KEEP_EVERY:
            self.kept[event.id] = state
        return True

    def _bad(self, event: Event, bad: _Bad) -> bool:
        self.problems.append(Problem(self.session_id, event.id, str(bad)))
        self.bad_at[event.id] = self.checked - 1
        if bad.state is not None:
            self.heads[event.branch] = bad.state
        return len(self.problems) < MAX_PROBLEMS

    def done(self, log: MerkleLog | None) -> _Walk:
        self.problems += self.redactions.unpaired()
        return self.checked, self.problems, log, self.bad_at


async def _walk_parallel(
    store: EventStore, session_id: str, key: bytes | None, need_log: bool
) -> _Walk | None:
    """``_walk`` on two cores: a worker process (``ledger.verify_worker``) recomputes
    each event's digest and id and hashes the Merkle log, chunk by chunk, while
    this process checks the structure. A chunk that fills up while the worker is
    still taking in the one before is checked here instead, with the worker's own
    code: so the faster process does more, whichever it is (a store that is slow to
    read leaves the worker the content; a fast one shares it).

    None when the worker finds a bad event (the caller then walks again in one
    process, so that the report is exactly the sequential one), or cannot run.
    """
    try:
        worker = Worker("--log" if need_log else "--content")
    except OSError:
        return None
    walker = _Walker(store, session_id, key, content=False)
    chunks: list[Answer | None] = []  # each chunk's answer; None: the worker's
    try:
        try:
            async for chunk in _chunks(store, session_id):
                with gc_paused():  # see _Walker.walk
                    walked = await walker.walk(chunk)
                    chunks.append(_hand_over(chunk[:walked], worker, need_log))
                if walked < len(chunk):
                    break
        except IntegrityError as exc:
            walker.problems.append(Problem(session_id, exc.event_id, str(exc)))
        results = await worker.results()
    finally:
        await worker.close()
    if results is None or len(results) != chunks.count(None):
        return None  # the worker died, or could not start: walk in this process
    theirs = iter(results)
    answered = [next(theirs) if mine is None else mine for mine in chunks]
    if not all(ok for ok, _ in answered):
        return None
    log = MerkleLog.from_chunks([levels for _, levels in answered]) if need_log else None
    return walker.done(log)


async def _walk_split(
    store: EventStore, session_id: str, key: bytes | None, need_log: bool, start: int
) -> _Walk | None:
    """``_walk`` on two cores for a store a second process can open: a worker
    (``ledger.verify_worker.check_tail``) reads and checks the session from its
    ``start``-th event on, while this process reads and checks the events before it.

    None (then the caller walks again another way) unless every event checks and the
    worker is sure of the tail given the heads this process leaves: a tail that needs
    the state before it (a checkpoint, a fork, a redaction, a resumed branch) or a bad
    event is walked again, so that it is reported as the sequential walk reports it.
    """
    request = TailRequest(url=store.url, session=session_id, start=start, log=need_log)
    session_lines = getattr(store, "session_lines", None)  # JSONL's
    if session_lines is not None:
        lines = await session_lines(session_id, start)
        if lines is None:
            return None
        request = msgspec.structs.replace(request, lines=lines)
    try:
        tail = TailWorker(request, CHUNK)
    except OSError:
        return None
    walker = _Walker(store, session_id, key, content=False)
    answers: list[Answer] = []
    try:
        async with contextlib.aclosing(_chunks(store, session_id)) as chunks:
            async for chunk in chunks:
                with gc_paused():  # see _Walker.walk
                    if await walker.walk(chunk) < len(chunk) or walker.problems:
                        return None  # a problem: the report is the sequential walk's
                    answers.append(check_events(chunk, need_log))
                if not answers[-1][0]:
                    return None
                if walker.checked >= start:
                    break
        answer = await tail.answer()
    except IntegrityError:
        return None
    finally:
        await tail.close()
    if walker.checked != start or answer is None or not answer.sure:
        return None
    if not all(_continues(walker.heads.get(b), *first) for b, first in answer.firsts.items()):
        return None
    walker.checked += answer.count
    log = MerkleLog.from_chunks([levels for _, levels in answers] + answer.levels)
    return walker.done(log if need_log else None)


def _continues(head: SessionState | None, parent: str | None, seq: int, at: int) -> bool:
    """Does a plain event with this parent, depth and time step from this branch head?"""
    return (
        head is not None
        and head.head == parent
        and head.seq + 1 == seq
        and head.last_activity_at <= at
        and head.status == ACTIVE
    )


def _hand_over(chunk: list[Event], worker: Worker, need_log: bool) -> Answer | None:
    """A full (or the last) chunk: checked here while the worker is busy, else sent to it."""
    if worker.busy():
        return check_events(chunk, need_log)
    worker.send(encode_request(chunk))
    return None


async def _check_anchors(
    store: EventStore,
    session_id: str,
    log: MerkleLog,
    given: Sequence[Anchor],
    recorded: Sequence[bytes],
    key: bytes | None,
    bad_at: dict[str, int],
    problems: list[Problem],
) -> list[AnchorCheck]:
    """Check each anchor's MAC and that the session extends it; problems for the failures."""
    found: list[tuple[Literal["given", "recorded"], Anchor, AnchorMac]] = []
    for anchor in given:
        found.append(("given", anchor, check_anchor_mac(anchor, key)))
    checks: list[AnchorCheck] = []
    for n, data in enumerate(recorded, start=1):
        try:
            anchor = decode_anchor(data, source=f"recorded anchor #{n} of session {session_id!r}")
        except AnchorError as exc:
            problems.append(Problem(session_id, None, str(exc)))
            continue
        if anchor in given:
            continue  # checked once, as given
        if anchor.session != session_id:
            problems.append(
                Problem(session_id, None, f"recorded anchor #{n} is an {describe(anchor)}")
            )
            continue
        try:
            found.append(("recorded", anchor, check_anchor_mac(anchor, key)))
        except AnchorError as exc:
            if exc.reason == "key":
                found.append(("recorded", anchor, "other-key"))
                continue
            problems.append(Problem(session_id, None, f"recorded anchor #{n}: {exc}"))
            checks.append(_anchor_check("recorded", anchor, "mismatch", None, str(exc)))
    # The anchors the session still extends bound where a change can be.
    matching = [a.size for _, a, _ in found if a.size <= log.size and _extends(log, a)]
    for source, anchor, mac in found:
        if anchor.size <= log.size and _extends(log, anchor):
            message = f"the session ({log.size} events) extends the {describe(anchor)}"
            checks.append(_anchor_check(source, anchor, mac, True, message))
            continue
        gone = await _heads_gone(store, anchor)
        message = _not_extended(log, anchor, matching, bad_at, gone)
        problems.append(Problem(session_id, None, message))
        checks.append(_anchor_check(source, anchor, mac, False, message))
    return checks


def _extends(log: MerkleLog, anchor: Anchor) -> bool:
    """The RFC 9162 consistency check of today's log against the anchor's tree head."""
    proof = log.consistency_proof(anchor.size)
    root = log.root()
    return verify_consistency(anchor.size, log.size, bytes.fromhex(anchor.root), root, proof)


async def _heads_gone(store: EventStore, anchor: Anchor) -> list[str]:
    """The anchored branch heads that are no longer events of the session."""
    gone = []
    for branch, head in sorted((anchor.heads or {}).items()):
        try:
            there = (await store.get(head)).session == anchor.session
        except NotFoundError:
            there = False
        if not there:
            gone.append(f"the head of branch {branch!r} at the anchor, {head!r}, is gone")
    return gone


def _not_extended(
    log: MerkleLog, anchor: Anchor, matching: list[int], bad_at: dict[str, int], gone: list[str]
) -> str:
    """What a user can act on: what changed, and where, as closely as can be told."""
    what = f"the session does not extend the {describe(anchor)}"
    low = max((size for size in matching if size < anchor.size), default=0)
    if anchor.size > log.size:
        what += (
            f": truncated to {log.size} of {anchor.size} events "
            "(a cut tail, or removed events or branches)"
        )
    else:
        what += (
            f": its first {anchor.size} events no longer hash to the anchored root "
            "(an event was rewritten, reordered or removed)"
        )
    if low:
        what += f"; the first {low} events still match an earlier anchor"
    suspects = sorted(
        (index, event_id) for event_id, index in bad_at.items() if low <= index < anchor.size
    )
    if suspects:
        index, event_id = suspects[0]
        what += f"; the first bad event, at index {index}, is {event_id!r}"
    return "; ".join([what, *gone])


def _anchor_check(
    source: Literal["given", "recorded"],
    anchor: Anchor,
    mac: AnchorMac,
    extended: bool | None,
    message: str,
) -> AnchorCheck:
    return AnchorCheck(
        source=source,
        session=anchor.session,
        size=anchor.size,
        root=anchor.root,
        at=anchor.at,
        key_id=anchor.key_id,
        mac=mac,
        extended=extended,
        message=message,
    )


def _check_linear(
    session_id: str,
    event: Event,
    heads: dict[str, SessionState],
    key: bytes | None,
    content: bool = True,
) -> SessionState:
    """The common case, without a coroutine: an event whose parent is its branch's head.

    ``content=False`` leaves out recomputing the event's digest and id (a worker does).
    """
    if content or event.session != session_id:  # else nothing there can fail
        _check_envelope(session_id, event, content)
    if type(event.body) is SessionCreated:
        raise _Bad("a session has exactly one root, its first event, SessionCreated")
    head = heads.get(event.branch)
    if head is None:
        raise _Bad(f"appended to unknown branch {event.branch!r}")
    if event.parent != head.head:
        raise _Bad(
            f"parent {event.parent!r} is not the head {head.head!r} of branch "
            f"{event.branch!r}: the branch forks silently"
        )
    if (
        event.seq != head.seq + 1
        or event.at < head.last_activity_at
        or head.status != ACTIVE
        or type(event.body) in _STEP_CHECKED
    ):
        return _check_step(head, event, key)  # every check, and its exact message
    return SESSION.apply(head, event)  # what _check_step ends with when all of these pass


async def _check(
    store: EventStore,
    session_id: str,
    event: Event,
    heads: dict[str, SessionState],
    kept: dict[str, SessionState],
    key: bytes | None,
    *,
    root: bool,
    content: bool = True,
) -> SessionState:
    """The root, a fork or a restore: the events whose parent need not be a head."""
    if not root and not isinstance(event.body, Branched | Restored):
        return _check_linear(session_id, event, heads, key, content)
    _check_envelope(session_id, event, content)
    body = event.body
    if root:
        if not isinstance(body, SessionCreated):
            raise _Bad("a session has exactly one root, its first event, SessionCreated")
        if event.parent is not None or event.seq != 0 or event.branch != "main":
            raise _Bad("the root must have no parent, depth 0 and branch 'main'")
        return SESSION.apply(SESSION.initial(), event)
    if event.parent is None:
        raise _Bad("only the root has no parent")
    parent = await _state_at(store, session_id, event.parent, kept)
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


class _Redactions:
    """Erased bodies and Redacted records pair up: one record per erased event, after it."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.erased: dict[str, str | None] = {}  # erased event id -> the Redacted naming it
        self.kept: dict[str, str] = {}  # erased event id -> erased_digest of its body

    def see(self, event: Event) -> Problem | None:
        """Raises ``_Bad`` for a stray record; a problem for an erased body changed since."""
        body = event.body
        if isinstance(body, Erased):
            self.erased[event.id] = None
            self.kept[event.id] = erased_digest(body)
        elif isinstance(body, Redacted):
            erased = self.erased
            if body.event not in erased:
                raise _Bad(f"redacts {body.event!r}, not an erased event before it in this session")
            if erased[body.event] is not None:
                raise _Bad(f"redacts {body.event!r} a second time (after {erased[body.event]!r})")
            erased[body.event] = event.id
            if body.erased is not None and body.erased != self.kept[body.event]:
                message = f"erased body differs from {event.id!r}'s"
                return Problem(self.session_id, body.event, message)
        return None

    def unpaired(self) -> list[Problem]:
        return [
            Problem(self.session_id, event_id, "erased, but no Redacted event names it")
            for event_id, record in self.erased.items()
            if record is None
        ]


def _check_envelope(session_id: str, event: Event, content: bool = True) -> None:
    problem = event_problem(event) if content and event_id_if_sound(event) is None else None
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
    body = event.body
    if parent.status != ACTIVE or type(body) is Resumed:  # the common case, without a call
        _check_lifecycle(parent, event)
    if type(body) is Checkpointed:
        if body.entry != event.parent:
            raise _Bad("a checkpoint's entry must be its parent")
        if state_checksum(parent, key) != body.checksum:
            raise _Bad(_checksum_problem(parent, body, key), SESSION.apply(parent, event))
    return SESSION.apply(parent, event)


def _checksum_problem(parent: SessionState, body: Checkpointed, key: bytes | None) -> str:
    """Why a checksum does not match, when a wrong (or missing) key explains it."""
    problem = "checkpoint checksum does not match the state of its entry"
    if key is None:
        return problem + " (a checksum taken under a key is checked only with that key)"
    if state_checksum(parent, None) == body.checksum:
        return problem + (
            f" under key {key_id(key)}: it is an unkeyed digest, taken by a ledger "
            "without a key (or rewritten by someone without it)"
        )
    return problem + f" under key {key_id(key)} (a wrong key, or a forged checkpoint)"


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


async def _state_at(
    store: EventStore, session_id: str, event_id: str, kept: dict[str, SessionState]
) -> SessionState:
    """The state at an earlier event (a fork point): folded from the nearest state the
    walk kept on its path, so memory stays bounded however deep the fork."""
    window: list[Event] = []
    base: SessionState | None = None
    cursor: str | None = event_id
    while cursor is not None and base is None:
        try:
            batch = await store.ancestors(cursor, limit=KEEP_EVERY)
        except NotFoundError:
            raise _Bad(f"parent {cursor!r} does not exist") from None
        for event in batch:
            base = kept.get(event.id)
            if base is not None:
                break
            if event.session != session_id:
                raise _Bad(f"parent {event_id!r} belongs to another session")
            if event_problem(event):
                raise _Bad(f"its path goes through bad event {event.id!r}")
            window.append(event)
        cursor = batch[-1].parent if base is None else None
    window.reverse()
    return fold(SESSION, window, base)


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
