"""Bundles: sessions moved between any two stores as a verified, streaming JSONL file.

Format ``session-ledger/bundle``, version 1: one JSON object per line, each
tagged by ``type``, in this order::

    {"type":"header","format":"session-ledger/bundle","version":1,"created_at":NS,"key_id":K}
    {"type":"session","session":{listing row: session_id, user_id, agent, status, ...}}
    {"type":"event","event":{the event's own JSON}}            x event_count, in append order
    {"type":"anchor","anchor":{session,size,root,at,mac,format},"digest":D}
    ... (session, events, anchor) for each further session ...
    {"type":"trailer","sessions":N,"events":M,"lines":L,"digest":T,"mac":X}

``key_id`` names the exporting ledger's key (null without one); each anchor is
the session's RFC 9162 Merkle root over its event ids in append order (the
``ledger.anchors`` anchor, MAC'd with a key); ``digest`` is blake3 over the
bytes of the session's lines (its session line and its events);
``T`` is blake3 over every byte before the trailer, whose ``mac`` (with a key)
covers the whole file, so a bundle changed in any byte or cut short is refused.

Import keeps O(sessions + branches + fork points + bundle size / 1 MiB) in
memory, never the events nor a set of their ids, in three passes:

1. scan, the whole file: framing, every id and body digest (``event_problem``;
   for a large bundle in a worker process, ``ledger.verify_worker``), the
   anchors' roots and MACs, the digests, the counts; per session, the ids its
   ``Branched``/``Restored`` events point back to; each session folded as
   ``verify`` folds it (parents, depths, branches, lifecycle, checkpoint
   checksums), keeping the states of its branch heads and of its last 4,096
   events, and its listing row compared with the fold; and a digest of each
   block of about 1 MiB of lines;
2. check, only the sessions that need it: one with a fork from further back
   folded again, keeping the states of its branch heads and of the ids found in
   pass 1; one the target store holds compared with it, id by id;
3. write: only when all of that passed, session by session, through the
   store's atomic appends (one batch per run of a branch, ``expected_head`` the
   compare-and-swap).

Passes 2 and 3 read a block again only while its digest is still pass 1's, so
they see exactly the bytes pass 1 verified: a bundle changed meanwhile is
refused where it changed, and pass 3 need not check each event again.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import shutil
import sys
import tempfile
from bisect import bisect_left
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import aclosing, suppress
from pathlib import Path
from typing import IO, Any, Final, cast

import blake3
import msgspec

from ledger.anchors import Anchor, key_id, mac_matches, signed
from ledger.errors import (
    BundleConflictError,
    BundleError,
    BundleKeyError,
    ImportIncompleteError,
    IntegrityError,
    LedgerError,
)
from ledger.events import (
    Branched,
    Checkpointed,
    Event,
    Restored,
    SessionCreated,
    canonical,
    event_problem,
)
from ledger.merkle import HASH_SIZE, StreamingRoot
from ledger.verify import _Bad, _check_step
from ledger.verify_worker import Worker, check_events, encode_request, event_id_if_sound
from projections.session import SESSION, SessionState
from stores.base import AppendRequest, AppendResult, EventStore, SessionRow

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "ExportReport",
    "ImportReport",
    "SessionImport",
    "export_bundle",
    "import_bundle",
    "key_id",
]

BUNDLE_FORMAT: Final = "session-ledger/bundle"
BUNDLE_VERSION: Final = 1
MAIN: Final = "main"
BATCH_EVENTS: Final = 10_000
"""Events per append of an import (fewer at a branch change, a fork or a restore)."""
BATCH_BYTES: Final = 4 << 20
BLOCK_BYTES: Final = 1 << 20
"""Pass 1 digests the bundle in blocks of whole lines of this size or more; the
passes after it read a block again only while its digest still matches."""
PARALLEL_BYTES: Final = 64 << 20
"""From this bundle size on, a worker process recomputes the ids in pass 1."""
CHUNK: Final = 4096
"""Events per request to the worker, and ids per Merkle hashing (a power of two)."""
RECENT: Final = 4096
"""States pass 1 keeps of a session's last events: a fork from further back (rare)
makes pass 2 fold the session again, knowing its fork points."""
_YIELD_EVERY: Final = 2000
"""Lines between two yields to the event loop, so a long import does not starve it."""

Progress = Callable[[int], object]
"""Told how much more is done: events exported, or bundle bytes read by an import."""


# ---------------------------------------------------------------------------- lines


class _Line(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"
):
    pass


class _Header(_Line, tag="header", frozen=True):
    format: str
    version: int
    created_at: int
    key_id: str | None


class _SessionLine(_Line, tag="session", frozen=True):
    session: SessionRow


class _EventLine(_Line, tag="event", frozen=True):
    event: Event


class _AnchorLine(_Line, tag="anchor", frozen=True):
    anchor: Anchor
    digest: str


class _Trailer(_Line, tag="trailer", frozen=True):
    sessions: int
    events: int
    lines: int
    digest: str
    mac: str | None


class _Version(msgspec.Struct):
    """The first line, read leniently: a newer version is named, not misread."""

    format: str | None = None
    version: int | None = None


_encode = msgspec.json.Encoder().encode
_decode_line = msgspec.json.Decoder(
    _Header | _SessionLine | _EventLine | _AnchorLine | _Trailer
).decode
_decode_lines = msgspec.json.Decoder(
    list[_Header | _SessionLine | _EventLine | _AnchorLine | _Trailer]
).decode
_decode_version = msgspec.json.Decoder(_Version).decode


def _trailer_mac(trailer: _Trailer, created_at: int, key: bytes) -> str:
    signed = canonical(
        [
            BUNDLE_FORMAT,
            BUNDLE_VERSION,
            created_at,
            trailer.sessions,
            trailer.events,
            trailer.lines,
            trailer.digest,
        ]
    )
    return blake3.blake3(signed, key=key).hexdigest()


# ---------------------------------------------------------------------------- reports


class ExportReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``Ledger.export`` wrote: one anchor per session (keep them to check later)."""

    sessions: int
    events: int
    bytes: int
    created_at: int
    key_id: str | None
    anchors: list[Anchor]


class SessionImport(msgspec.Struct, frozen=True, kw_only=True):
    """One session of an import.

    ``action``: ``imported`` (new in the target), ``resumed`` (an earlier import
    of it stopped midway: the rest was written), ``identical`` (already there:
    skipped), ``ahead`` (the target holds it and more events after: skipped).
    """

    session_id: str
    action: str
    events: int
    written: int


class ImportReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``Ledger.import_bundle`` found and wrote."""

    sessions: list[SessionImport]
    events: int
    """Events in the bundle."""
    written: int
    """Events written by this import."""
    created_at: int
    key_id: str | None
    authenticated: bool
    """True: MACs were checked under this ledger's key. False: integrity only (no key)."""
    dry_run: bool = False


# ---------------------------------------------------------------------------- export


async def export_bundle(
    store: EventStore,
    out: IO[bytes],
    session_ids: Sequence[str],
    *,
    key: bytes | None,
    at: int,
    progress: Progress | None = None,
) -> ExportReport:
    """Write the sessions (ids already checked to exist) to ``out`` as one bundle.

    ``progress(n)`` is told of every ``n`` events written.

    Each session is exported as its listing row said when it was read, with
    exactly that many events, so a session written to meanwhile is exported
    as a consistent prefix. An event that does not verify raises
    ``IntegrityError`` naming it: corrupt data is not exported.
    """
    total = blake3.blake3()
    written = 0
    events = 0
    anchors: list[Anchor] = []

    def put(line: bytes) -> None:
        nonlocal written
        out.write(line)
        total.update(line)
        written += len(line)

    lines = 1
    put(
        _encode(
            _Header(
                format=BUNDLE_FORMAT,
                version=BUNDLE_VERSION,
                created_at=at,
                key_id=key_id(key) if key else None,
            )
        )
        + b"\n"
    )
    for session_id in session_ids:
        row = await store.session(session_id)
        digest = blake3.blake3()
        root = _Root()
        size = 0
        line = _encode(_SessionLine(session=row)) + b"\n"
        digest.update(line)
        put(line)
        async with aclosing(_first(store.events(session_id), row.event_count)) as events_of:
            async for event in events_of:
                problem = None if event_id_if_sound(event) is not None else event_problem(event)
                if problem or event.session != session_id:
                    raise IntegrityError(
                        f"Cannot export session {session_id!r}: event {event.id!r} "
                        f"{problem or 'belongs to another session'}",
                        event.id,
                    )
                line = _encode(_EventLine(event=event)) + b"\n"
                digest.update(line)
                put(line)
                root.add(event.id)
                size += 1
                if size % _YIELD_EVERY == 0:
                    if progress is not None:
                        progress(_YIELD_EVERY)
                    await asyncio.sleep(0)
        if size != row.event_count:
            raise IntegrityError(
                f"Cannot export session {session_id!r}: its listing counts "
                f"{row.event_count} events, the store holds {size}"
            )
        anchor = signed(Anchor(session=session_id, size=size, root=root.root().hex(), at=at), key)
        anchors.append(anchor)
        put(_encode(_AnchorLine(anchor=anchor, digest=digest.hexdigest())) + b"\n")
        events += size
        lines += size + 2
        if progress is not None:
            progress(size % _YIELD_EVERY)
    trailer = _Trailer(
        sessions=len(anchors), events=events, lines=lines, digest=total.hexdigest(), mac=None
    )
    if key:
        trailer = msgspec.structs.replace(trailer, mac=_trailer_mac(trailer, at, key))
    put(_encode(trailer) + b"\n")
    return ExportReport(
        sessions=len(anchors),
        events=events,
        bytes=written,
        created_at=at,
        key_id=key_id(key) if key else None,
        anchors=anchors,
    )


async def _first(events: AsyncIterator[Event], count: int) -> AsyncGenerator[Event, None]:
    """The first ``count`` events, closing the store's iterator early."""
    if count <= 0:
        return
    seen = 0
    try:
        async for event in events:
            yield event
            seen += 1
            if seen >= count:
                break
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


# ---------------------------------------------------------------------------- reading


def _where(line: int, session_id: str | None = None, event_id: str | None = None) -> str:
    parts = [f"Bundle line {line}"]
    if session_id is not None:
        parts.append(f"session {session_id!r}")
    if event_id is not None:
        parts.append(f"event {event_id!r}")
    return ", ".join(parts)


def _bad(
    message: str, line: int, session_id: str | None = None, event_id: str | None = None
) -> BundleError:
    return BundleError(
        f"{_where(line, session_id, event_id)}: {message}",
        line=line,
        session_id=session_id,
        event_id=event_id,
    )


def _lines(file: IO[bytes]) -> Iterator[tuple[int, bytes, Any]]:
    """(line number, raw bytes, decoded line) from the start of ``file``.

    Raises ``BundleError`` for a line that is not one of the bundle's (naming it)
    and for a last line without its newline (a bundle cut short).
    """
    file.seek(0)
    for number, raw in enumerate(file, 1):
        if not raw.endswith(b"\n"):
            raise BundleError(
                f"Bundle cut short: line {number} is incomplete (no newline at its end)",
                line=number,
            )
        try:
            yield number, raw, _decode_line(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            if number == 1:
                _check_version(raw)
            raise BundleError(
                f"Bundle line {number} is not a bundle line: {exc}", line=number
            ) from None


def _check_version(raw: bytes) -> None:
    try:
        first = _decode_version(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        first = _Version()
    if first.format != BUNDLE_FORMAT:
        raise BundleError(f"Not a {BUNDLE_FORMAT} file: line 1 is not its header", line=1)
    if first.version != BUNDLE_VERSION:
        raise BundleError(
            f"Unsupported bundle version {first.version!r} "
            f"(this ledger reads version {BUNDLE_VERSION})",
            line=1,
        )


class _Plan(msgspec.Struct, kw_only=True):
    """What pass 1 learnt of one session, for the next passes."""

    row: SessionRow
    first_line: int
    count: int = 0
    keep: set[str] = msgspec.field(default_factory=set)
    """Ids the session's Branched/Restored events point back to: their states are kept."""
    folded: bool = False
    """Pass 1 folded it whole (no fork from further back than ``RECENT``): pass 2 need not."""
    statuses: list[tuple[int, str]] = msgspec.field(default_factory=list)
    """The listing status after the n-th event of branch main, at each n where it changes."""
    root_id: str = ""
    create_key: str | None = None
    """The root's idempotency key: unique per user in the target store."""
    present: int = 0
    """Events of it the target already holds (a prefix of the bundle's)."""
    action: str = "imported"


class _Block(msgspec.Struct, frozen=True):
    """Whole lines of the bundle, as pass 1 read them: where, and their digest."""

    offset: int
    size: int
    line: int
    """The number of its first line."""
    digest: bytes


class _Scan(msgspec.Struct, kw_only=True):
    header: _Header
    plans: list[_Plan]
    events: int
    blocks: list[_Block]
    deferred: BundleError | None
    """A digest mismatch: raised only if no more specific problem is found."""


def _check_key(header: _Header, key: bytes | None) -> None:
    """The bundle's key must be this ledger's: a keyed ledger holds only what it can check."""
    ours = key_id(key) if key else None
    if header.key_id == ours:
        return
    if ours is None:
        raise BundleKeyError(
            f"Bundle was exported with key {header.key_id!r}: open the importing ledger "
            "with that key (LEDGER_KEY) to check its MACs and checkpoint checksums",
            line=1,
        )
    if header.key_id is None:
        raise BundleKeyError(
            f"Bundle was exported without a key, but this ledger holds key {ours!r}: "
            "its sessions cannot be authenticated and their checkpoint checksums are "
            "not MACs under this key",
            line=1,
        )
    raise BundleKeyError(
        f"Bundle was exported with key {header.key_id!r}, but this ledger holds key {ours!r}",
        line=1,
    )


class _Root:
    """A session's Merkle root over its event ids, hashed ``CHUNK`` ids at a time."""

    def __init__(self) -> None:
        self._tree = StreamingRoot()
        self._ids: list[str] = []

    def add(self, event_id: str) -> None:
        """Raises ``ValueError`` for ids that are not hex digits, 32 bytes each."""
        self._ids.append(event_id)
        if len(self._ids) == CHUNK:
            self._hash()

    def root(self) -> bytes:
        self._hash()
        return self._tree.root()

    def _hash(self) -> None:
        leaves = bytes.fromhex("".join(self._ids))
        if len(leaves) != len(self._ids) * HASH_SIZE:
            raise ValueError("event ids of other than 32 bytes")
        self._tree.extend(leaves)
        self._ids.clear()


class _Blocks:
    """Pass 1's digests of the bundle, in blocks of whole lines of ``BLOCK_BYTES`` or more."""

    def __init__(self) -> None:
        self.done: list[_Block] = []
        self._digest = blake3.blake3()
        self._offset = self._size = 0
        self._line = 1

    def add(self, number: int, raw: bytes) -> None:
        self._digest.update(raw)
        self._size += len(raw)
        if self._size >= BLOCK_BYTES:
            self.close(number)

    def close(self, number: int) -> None:
        """End the block at line ``number``."""
        if self._size:
            self.done.append(_Block(self._offset, self._size, self._line, self._digest.digest()))
        self._offset += self._size
        self._size, self._line, self._digest = 0, number + 1, blake3.blake3()


class _Contents:
    """Each event's body digest and id recomputed (``event_problem``'s checks): here,
    one by one, or, with a worker process (``ledger.verify_worker``), chunk by chunk
    there while this process checks everything else. A chunk that fills up while the
    worker still takes in the one before is checked here, so neither process waits.
    """

    def __init__(self, worker: Worker | None) -> None:
        self.worker = worker
        self._chunk: list[Event] = []
        self._sent = 0
        self._failed = False

    def problem(self, event: Event) -> str | None:
        """What is wrong with the event; with a worker, None: ``all_sound`` answers later."""
        if self.worker is None:
            return None if event_id_if_sound(event) is not None else event_problem(event)
        self._chunk.append(event)
        if len(self._chunk) == CHUNK:
            self._hand_over()
        return None

    def _hand_over(self) -> None:
        assert self.worker is not None
        if self.worker.busy():
            self._failed |= not check_events(self._chunk, False)[0]
        else:
            self.worker.send(encode_request(self._chunk))
            self._sent += 1
        self._chunk = []

    async def all_sound(self) -> bool:
        """Did every event verify? (False too if the worker failed.)"""
        if self.worker is None:
            return True  # each problem was raised at its event
        if self._chunk:
            self._hand_over()
        answers = await self.worker.results()
        return (
            not self._failed
            and answers is not None
            and len(answers) == self._sent
            and all(ok for ok, _ in answers)
        )


def _scan(file: IO[bytes], key: bytes | None, contents: _Contents) -> _Scan:
    """Pass 1: framing, ids and digests, anchors, counts, the fork points of each
    session, and each session folded (up to a fork from further back than ``RECENT``)."""
    total = blake3.blake3()
    blocks = _Blocks()
    header: _Header | None = None
    plans: list[_Plan] = []
    seen: set[str] = set()
    plan: _Plan | None = None
    walker: _Walker | None = None
    digest: Any = None
    root = _Root()
    events = 0
    deferred: BundleError | None = None
    last = 0
    for number, raw, line in _lines(file):
        last = number
        blocks.add(number, raw)
        if number == 1:
            if not isinstance(line, _Header):
                raise BundleError(f"Not a {BUNDLE_FORMAT} file: line 1 is not its header", line=1)
            if line.format != BUNDLE_FORMAT or line.version != BUNDLE_VERSION:
                _check_version(raw)
            _check_key(line, key)
            header = line
            total.update(raw)
            continue
        assert header is not None
        match line:
            case _EventLine(event=event):
                if plan is None:
                    raise _bad("an event outside any session", number, event_id=event.id)
                sid = plan.row.session_id
                if event.session != sid:
                    raise _bad(f"belongs to session {event.session!r}", number, sid, event.id)
                problem = contents.problem(event)
                if problem:
                    raise _bad(problem, number, sid, event.id)
                body = event.body
                if isinstance(body, Branched | Restored) and event.parent is not None:
                    plan.keep.add(event.parent)
                    if isinstance(body, Restored):
                        plan.keep.add(body.checkpoint)
                if plan.count == 0:
                    plan.root_id, plan.create_key = event.id, event.idempotency_key
                plan.count += 1
                if plan.count > plan.row.event_count:
                    raise _bad(
                        f"more events than the {plan.row.event_count} its session line counts",
                        number,
                        sid,
                        event.id,
                    )
                try:
                    root.add(event.id)
                except ValueError:  # with a worker, the id check comes later
                    raise _bad("an event id is not 64 hex digits", number, sid) from None
                digest.update(raw)
                if walker is not None:
                    try:
                        _step(walker, event, number)
                    except _Forgotten:
                        walker = None
            case _SessionLine(session=row):
                if plan is not None:
                    raise _bad(
                        f"a new session before the anchor of {plan.row.session_id!r}",
                        number,
                        row.session_id,
                    )
                if row.session_id in seen:
                    raise _bad("the session is in the bundle twice", number, row.session_id)
                seen.add(row.session_id)
                plan = _Plan(row=row, first_line=number)
                walker = _Walker(row.session_id, None, key)
                digest = blake3.blake3()
                digest.update(raw)
                root = _Root()
            case _AnchorLine(anchor=anchor, digest=claimed):
                if plan is None:
                    raise _bad(
                        f"an anchor of session {anchor.session!r} outside any session", number
                    )
                deferred = deferred or _check_anchor(
                    plan, anchor, claimed, root, digest, header, key, number
                )
                if walker is not None:
                    _folded(plan, walker)
                plans.append(plan)
                events += plan.count
                plan = walker = None
            case _Trailer() as trailer:
                if plan is not None:
                    raise _bad(
                        f"the bundle ends inside session {plan.row.session_id!r}: no anchor",
                        number,
                        plan.row.session_id,
                    )
                deferred = deferred or _check_trailer(
                    trailer, total, len(plans), events, number, header, key
                )
                blocks.close(number)
                break
            case _Header():
                raise _bad("a second header", number)
        total.update(raw)
    else:
        where = (
            f"inside session {plan.row.session_id!r}, after {plan.count} of its "
            f"{plan.row.event_count} events"
            if plan is not None
            else f"after {len(plans)} complete sessions"
        )
        if last == 0:
            raise BundleError("Bundle is empty", line=0)
        raise BundleError(
            f"Bundle cut short: it ends at line {last} without a trailer ({where})",
            line=last,
            session_id=plan.row.session_id if plan is not None else None,
        )
    extra = file.readline()
    if extra:
        raise _bad("a line after the trailer", last + 1)
    assert header is not None
    return _Scan(header=header, plans=plans, events=events, blocks=blocks.done, deferred=deferred)


def _step(walker: _Walker, event: Event, number: int) -> SessionState:
    try:
        return walker.step(event)
    except _Bad as exc:
        raise _bad(str(exc), number, walker.session_id, event.id) from None


def _folded(plan: _Plan, walker: _Walker) -> None:
    """The whole session folded: its listing row checked, its statuses kept for pass 3."""
    problem = walker.listing_problem(plan.row)
    if problem:
        raise _bad(problem, plan.first_line, plan.row.session_id)
    plan.statuses, plan.folded = walker.statuses, True


def _check_anchor(
    plan: _Plan,
    anchor: Anchor,
    claimed: str,
    root: _Root,
    digest: Any,
    header: _Header,
    key: bytes | None,
    number: int,
) -> BundleError | None:
    """Raise what names the damage; return a digest mismatch, to raise only at the end."""
    sid = plan.row.session_id
    if plan.count == 0:
        raise _bad("a session without events", number, sid)
    if anchor.session != sid:
        raise _bad(f"the anchor is of another session, {anchor.session!r}", number, sid)
    if plan.count != plan.row.event_count:
        raise _bad(
            f"{plan.count} events, but its session line counts {plan.row.event_count}", number, sid
        )
    if anchor.size != plan.count:
        raise _bad(
            f"the anchor counts {anchor.size} events, the bundle has {plan.count}", number, sid
        )
    try:
        ours = root.root().hex()
    except ValueError:  # with a worker: its verdict on the ids comes later
        raise _bad("an event id is not 64 hex digits", number, sid) from None
    if not hmac.compare_digest(anchor.root, ours):
        raise _bad(
            "the Merkle root of its event ids does not match its anchor: an event was "
            "added, removed, reordered or rewritten",
            number,
            sid,
        )
    if header.key_id is None:
        if anchor.mac is not None:
            raise _bad("the anchor carries a MAC, but the bundle names no key", number, sid)
    elif key is not None and not mac_matches(anchor, key):
        raise _bad("the anchor's MAC does not match under this ledger's key", number, sid)
    if hmac.compare_digest(claimed, digest.hexdigest()):
        return None
    return _bad(
        f"lines {plan.first_line}-{number - 1} do not match the digest in its anchor "
        "line: bytes no event id covers were changed",
        number,
        sid,
    )


def _check_trailer(
    trailer: _Trailer,
    total: Any,
    sessions: int,
    events: int,
    number: int,
    header: _Header,
    key: bytes | None,
) -> BundleError | None:
    if header.key_id is None:
        if trailer.mac is not None:
            raise _bad("the trailer carries a MAC, but the bundle names no key", number)
    elif key is not None and (
        trailer.mac is None
        or not hmac.compare_digest(trailer.mac, _trailer_mac(trailer, header.created_at, key))
    ):
        raise _bad("the trailer's MAC does not match under this ledger's key", number)
    if (trailer.sessions, trailer.events, trailer.lines) != (sessions, events, number - 1):
        raise _bad(
            f"the trailer counts {trailer.sessions} sessions, {trailer.events} events and "
            f"{trailer.lines} lines before it; the bundle has {sessions}, {events} and "
            f"{number - 1}: lines were removed, added or moved",
            number,
        )
    if hmac.compare_digest(trailer.digest, total.hexdigest()):
        return None
    return _bad(
        f"lines 1-{number - 1} do not match the trailer's digest, though every session's "
        "own digest matches: the header or an anchor line was changed",
        number,
    )


def _verified(file: IO[bytes], blocks: Iterable[_Block]) -> Iterator[tuple[int, list[bytes]]]:
    """Passes 2 and 3 read the bundle anew: each block of lines (its first line's number,
    its lines without their newlines) once its digest is still the one pass 1 took,
    so that they use only bytes pass 1 verified."""
    position = None
    for block in blocks:
        if position != block.offset:
            file.seek(block.offset)
        data = file.read(block.size)
        position = block.offset + len(data)
        if not hmac.compare_digest(blake3.blake3(data).digest(), block.digest):
            raise BundleError(
                f"Bundle line {block.line}: the bundle changed while it was imported "
                "(its lines differ from those verified)",
                line=block.line,
            )
        yield block.line, data.split(b"\n")[:-1]


def _events(
    file: IO[bytes], blocks: Sequence[_Block], spans: Sequence[tuple[int, int]] | None = None
) -> Iterator[tuple[int, int, Event | None]]:
    """Passes 2 and 3: (line, size, event) for each event line, (line, 0, None) at an
    anchor; of every line, or of those in ``spans`` (first and last line, in order)."""
    wanted = _Spans(spans) if spans is not None else None
    ends = [block.line for block in blocks[1:]] + [sys.maxsize]  # each one's next line
    chosen = (
        block
        for block, end in zip(blocks, ends, strict=True)
        if wanted is None or wanted.meets(block.line, end - 1)
    )
    for line, pieces in _verified(file, chosen):
        # Each line decoded alone in pass 1, so together they decode to the same.
        decoded = _decode_lines(b"[" + b",".join(pieces) + b"]")
        for number, (piece, item) in enumerate(zip(pieces, decoded, strict=True), line):
            if wanted is not None and not wanted.holds(number):
                continue
            if isinstance(item, _EventLine):
                yield number, len(piece) + 1, item.event
            elif isinstance(item, _AnchorLine):
                yield number, 0, None


class _Spans:
    """Ranges of lines (first, last), in order, asked about in increasing order."""

    def __init__(self, spans: Sequence[tuple[int, int]]) -> None:
        self._spans = spans
        self._lasts = [last for _, last in spans]
        self._at = 0

    def meets(self, first: int, last: int) -> bool:
        """Does any span meet the lines first..last?"""
        i = bisect_left(self._lasts, first)
        return i < len(self._spans) and self._spans[i][0] <= last

    def holds(self, line: int) -> bool:
        while self._at < len(self._spans) and self._spans[self._at][1] < line:
            self._at += 1
        return self._at < len(self._spans) and self._spans[self._at][0] <= line


class _Forgotten(Exception):
    """A fork from further back than the states pass 1 keeps: pass 2 folds the session."""


class _Walker:
    """One session folded as ``verify`` folds it, in one pass and bounded memory.

    It keeps the state of each branch head, and the state after each event
    listed in ``keep`` (the fork points and restored entries found by pass 1),
    which is all a ``Branched`` or ``Restored`` event needs to be checked. Pass 1
    does not know them yet (``keep`` None): it keeps the last ``RECENT`` states,
    and raises ``_Forgotten`` for a fork from before them.
    """

    def __init__(self, session_id: str, keep: set[str] | None, key: bytes | None) -> None:
        self.session_id = session_id
        self.keep = keep
        self.key = key
        self.heads: dict[str, SessionState] = {}
        self.kept: dict[str, SessionState] = {}
        self.entries: dict[str, str] = {}  # kept checkpoint id -> its entry
        self.recent: deque[str] = deque()
        self.count = 0
        self.last_at = 0
        self.main = 0  # events of branch main
        self.statuses: list[tuple[int, str]] = []

    def step(self, event: Event) -> SessionState:
        """The state after ``event``; raises ``_Bad`` saying what is wrong with it."""
        body = event.body
        if self.count == 0:
            if not isinstance(body, SessionCreated):
                raise _Bad("a session has exactly one root, its first event, SessionCreated")
            if event.parent is not None or event.seq != 0 or event.branch != MAIN:
                raise _Bad("the root must have no parent, depth 0 and branch 'main'")
            state = SESSION.apply(SESSION.initial(), event)
        elif isinstance(body, Branched | Restored):
            state = self._fork(event, body)
        else:
            if isinstance(body, SessionCreated):
                raise _Bad("a session has exactly one root, its first event, SessionCreated")
            head = self.heads.get(event.branch)
            if head is None:
                raise _Bad(f"appended to unknown branch {event.branch!r}")
            if event.parent != head.head:
                raise _Bad(
                    f"parent {event.parent!r} is not the head {head.head!r} of branch "
                    f"{event.branch!r}: the branch forks silently"
                )
            state = _check_step(head, event, self.key)
        self.heads[event.branch] = state
        self._keep(event, state)
        self.count += 1
        self.last_at = max(self.last_at, event.at)
        if event.branch == MAIN:
            self.main += 1
            if not self.statuses or self.statuses[-1][1] != state.status:
                self.statuses.append((self.main, state.status))
        return state

    def _keep(self, event: Event, state: SessionState) -> None:
        if self.keep is None:
            self.recent.append(event.id)
            if len(self.recent) > RECENT:
                old = self.recent.popleft()
                del self.kept[old]
                self.entries.pop(old, None)
        elif event.id not in self.keep:
            return
        self.kept[event.id] = state
        if isinstance(event.body, Checkpointed):
            self.entries[event.id] = event.body.entry

    def _fork(self, event: Event, body: Branched | Restored) -> SessionState:
        if event.parent is None:
            raise _Bad("only the root has no parent")
        parent = self.kept.get(event.parent)
        if parent is None:
            if self.keep is None:
                raise _Forgotten
            raise _Bad(f"parent {event.parent!r} is not an earlier event of this session")
        if isinstance(body, Branched):
            if event.branch in self.heads or body.name != event.branch:
                raise _Bad(f"Branched must start a new branch, {event.branch!r} exists")
            if body.fork_point != event.parent:
                raise _Bad("Branched's parent is not its fork point")
        else:
            if body.entry != event.parent:
                raise _Bad("Restored's parent is not its checkpoint's entry")
            entry = self.entries.get(body.checkpoint)
            if entry is None:
                if self.keep is None:
                    raise _Forgotten
                raise _Bad(
                    f"restores {body.checkpoint!r}, not an earlier checkpoint of this session"
                )
            if entry != body.entry:
                raise _Bad("Restored's entry differs from its checkpoint's")
            if event.branch not in self.heads:
                raise _Bad(f"restores onto unknown branch {event.branch!r}")
        return _check_step(parent, event, self.key)

    def listing_problem(self, row: SessionRow) -> str | None:
        """How the session line's listing row differs from what its events fold to."""
        main = self.heads[MAIN]
        derived = SessionRow(
            session_id=self.session_id,
            user_id=main.user_id,
            agent=main.agent,
            status=main.status,
            created_at=main.created_at,
            last_activity_at=self.last_at,
            event_count=self.count,
        )
        if derived == row:
            return None
        wrong = [
            f"{name} {getattr(row, name)!r} (its events say {getattr(derived, name)!r})"
            for name in row.__struct_fields__
            if getattr(row, name) != getattr(derived, name)
        ]
        return "its session line does not match its events: " + ", ".join(wrong)


async def _check(store: EventStore, file: IO[bytes], scan: _Scan, key: bytes | None) -> None:
    """Pass 2, of the sessions that need it, in one reading: one with a fork folded
    whole, knowing its fork points now; one the target store holds compared with it,
    id by id."""
    needed: list[tuple[_Plan, bool]] = []
    for plan in scan.plans:
        held = bool(await store.heads(plan.row.session_id))
        if held or not plan.folded:
            needed.append((plan, held))
    spans = [(plan.first_line + 1, plan.first_line + plan.count + 1) for plan, _ in needed]
    events = _events(file, scan.blocks, spans)
    for plan, held in needed:
        await _check_session(store, plan, held, events, key)
    if scan.deferred is not None:
        raise scan.deferred


async def _check_session(
    store: EventStore,
    plan: _Plan,
    held: bool,
    events: Iterator[tuple[int, int, Event | None]],
    key: bytes | None,
) -> None:
    """One session of pass 2: its events from ``events``, up to its anchor."""
    sid = plan.row.session_id
    walker = None if plan.folded else _Walker(sid, plan.keep, key)
    target = _Target(sid, aiter(store.events(sid)) if held else None)
    for index, (number, _size, event) in enumerate(events, 1):
        if event is None:
            if walker is not None:
                _folded(plan, walker)
            await target.finish(plan, number)
            return
        if walker is not None:
            _step(walker, event, number)
        await target.compare(event, index, number)
        if number % _YIELD_EVERY == 0:
            await asyncio.sleep(0)


class _Target:
    """The same session in the target store, read in step with the bundle's events."""

    def __init__(self, session_id: str, events: AsyncIterator[Event] | None) -> None:
        self.session_id = session_id
        self.events = events
        self.present = 0

    async def compare(self, event: Event, index: int, number: int) -> None:
        if self.events is None:
            return
        try:
            theirs = await anext(self.events)
        except StopAsyncIteration:
            self.events = None
            return
        if theirs.id != event.id:
            await self.close()
            raise BundleConflictError(
                f"{_where(number, self.session_id, event.id)}: the target store holds this "
                f"session and differs from the bundle at event #{index}: "
                f"it has {theirs.id!r} there (branch {theirs.branch!r}); nothing was written",
                session_id=self.session_id,
                branch=event.branch,
                expected=event.id,
                current=theirs.id,
            )
        self.present = index

    async def finish(self, plan: _Plan, number: int) -> None:
        plan.present = self.present
        if self.events is not None:  # the bundle's events are all there: is there more?
            try:
                await anext(self.events)
                plan.action = "ahead"
            except StopAsyncIteration:
                plan.action = "identical"
            await self.close()
        elif self.present == plan.count and plan.count:
            plan.action = "identical"
        elif self.present:
            plan.action = "resumed"

    async def close(self) -> None:
        close = getattr(self.events, "aclose", None)
        self.events = None
        if close is not None:
            await close()


async def _check_create_keys(store: EventStore, scan: _Scan) -> None:
    """A new session's create key must be free for its user (else the store would replay)."""
    for plan in scan.plans:
        if plan.create_key is None or plan.present:
            continue
        key, root_id = plan.create_key, plan.root_id
        found = await store.find_created(plan.row.user_id, key)
        if found is not None and found.session != plan.row.session_id:
            raise BundleConflictError(
                f"{_where(plan.first_line + 1, plan.row.session_id, root_id)}: its idempotency "
                f"key {key!r} of user {plan.row.user_id!r} already created session "
                f"{found.session!r} in the target store; nothing was written",
                session_id=plan.row.session_id,
                branch=MAIN,
                expected=root_id,
                current=found.id,
            )


# ---------------------------------------------------------------------------- writing


class _Writer:
    """One session's appends: runs of one branch, the next one built while the last commits.

    At most one append is in flight, and the next is sent only after it has
    committed, so ``written`` counts exactly what the store acknowledged.
    """

    def __init__(
        self, store: EventStore, scan: _Scan, plan: _Plan, done: list[SessionImport]
    ) -> None:
        self.store = store
        self.scan = scan
        self.plan = plan
        self.done = done
        self.heads: dict[str, str] = {}
        self.run: list[Event] = []
        self.size = 0
        self.count = 0
        self.main = 0
        self.changes = iter(plan.statuses)
        self.change = next(self.changes, None)
        self.status: str | None = None
        self.written = 0
        self.pending: tuple[asyncio.Future[AppendResult], int] | None = None

    async def add(self, event: Event, size: int) -> None:
        """The session's next event: appended, unless the target holds it already."""
        self.count += 1
        if self.count <= self.plan.present:
            self.heads[event.branch] = event.id  # already there: only the heads move
        else:
            run = self.run
            if run and (
                event.branch != run[-1].branch
                or isinstance(event.body, Branched | Restored)
                or len(run) >= BATCH_EVENTS
                or self.size >= BATCH_BYTES
            ):
                await self.flush()  # a new list: the one sent stays as it was
            self.run.append(event)
            self.size += size
        if event.branch == MAIN:  # the status the run's append will carry
            self.main += 1
            if self.change is not None and self.change[0] == self.main:
                self.status = self.change[1]
                self.change = next(self.changes, None)

    async def flush(self) -> None:
        """Send the run, once the append before it has committed."""
        await self.settle()
        if not self.run:
            return
        branch = self.run[0].branch
        request = AppendRequest(
            session_id=self.plan.row.session_id,
            branch=branch,
            expected_head=self.heads.get(branch),
            events=self.run,
            status=self.status if branch == MAIN else None,
        )
        self.heads[branch] = self.run[-1].id
        self.pending = (asyncio.ensure_future(self.store.append(request)), len(self.run))
        self.run, self.size = [], 0

    async def settle(self) -> None:
        if self.pending is None:
            return
        future, count = self.pending
        self.pending = None
        try:
            result = await future
        except (LedgerError, OSError) as exc:
            raise self.incomplete(exc) from exc
        if result.replayed:
            replayed = result.events[0].id
            raise self.incomplete(BundleError(f"the store replayed event {replayed!r}"))
        self.written += count

    async def fail(self, error: BundleError) -> ImportIncompleteError:
        await self.settle()
        return self.incomplete(error)

    def incomplete(self, cause: Exception) -> ImportIncompleteError:
        return _incomplete(self.done, self.scan, self.plan, self.written, cause)


async def _write(store: EventStore, file: IO[bytes], scan: _Scan) -> list[SessionImport]:
    """Pass 3: each session's missing events, in runs of one branch, compare-and-swapped.

    It reads only lines pass 1 verified (``_verified``), so it need not check them again.
    """
    done: list[SessionImport] = []
    plans = iter(scan.plans)
    writer: _Writer | None = None
    events = _events(file, scan.blocks)
    while True:
        try:
            number, size, event = next(events)
        except StopIteration:
            return done
        except BundleError as exc:
            if writer is None and not done:
                raise
            writer = writer or _Writer(store, scan, scan.plans[len(done)], done)
            raise await writer.fail(exc) from None
        if writer is None:
            writer = _Writer(store, scan, next(plans), done)
        plan = writer.plan
        if event is None:
            await writer.flush()
            await writer.settle()
            done.append(
                SessionImport(
                    session_id=plan.row.session_id,
                    action=plan.action,
                    events=plan.count,
                    written=writer.written,
                )
            )
            writer = None
        elif plan.action in ("imported", "resumed"):
            await writer.add(event, size)
        if number % _YIELD_EVERY == 0:
            await asyncio.sleep(0)


def _incomplete(
    done: list[SessionImport], scan: _Scan, plan: _Plan, written: int, cause: Exception
) -> ImportIncompleteError:
    sid = plan.row.session_id
    before, after = len(done), len(scan.plans) - len(done) - 1
    report = ImportReport(
        sessions=[
            *done,
            SessionImport(session_id=sid, action="partial", events=plan.count, written=written),
        ],
        events=scan.events,
        written=sum(s.written for s in done) + written,
        created_at=scan.header.created_at,
        key_id=scan.header.key_id,
        authenticated=scan.header.key_id is not None,
    )
    return ImportIncompleteError(
        f"Import stopped in session {sid!r} after writing {written} of its "
        f"{plan.count - plan.present} missing events (sessions before it: {before}, all "
        f"complete; after it: {after}, not started): {cause}. Run the import again: "
        "complete sessions are skipped and this one resumes where it stopped",
        session_id=sid,
        report=report,
    )


# ---------------------------------------------------------------------------- import


async def import_bundle(
    store: EventStore,
    source: str | os.PathLike[str] | IO[bytes],
    *,
    key: bytes | None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ImportReport:
    """Verify a whole bundle, then write its sessions into ``store``.

    ``progress(n)`` is told of every ``n`` bytes read; the import reads the
    bundle twice (a pass that verifies, one that writes), and in between the
    sessions that have forks or that the target holds already.

    Nothing is written unless every line, id, digest, anchor, MAC and session
    of the bundle verifies and no session conflicts with the target. A stream
    that cannot seek (stdin) is spooled to a temporary file first.

    Raises:
        BundleError: the bundle is damaged, cut short or tampered with (names
            the line, and the session and event when there is one).
        BundleKeyError: it was exported with another key (or none) than ``key``.
        BundleConflictError: the target holds one of its sessions, different.
        ImportIncompleteError: the store failed midway; ``.report`` says what
            was written, and running the import again finishes it.
    """
    if isinstance(source, str | os.PathLike):
        file = await asyncio.to_thread(Path(source).open, "rb")
        with file:
            return await _import(store, file, progress, key, dry_run)
    if _seekable(source):
        return await _import(store, source, progress, key, dry_run)
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(source, spool, 1 << 20)
        return await _import(store, spool, progress, key, dry_run)


def _reading(file: IO[bytes], progress: Progress | None) -> IO[bytes]:
    return file if progress is None else cast(IO[bytes], _CountingReader(file, progress))


class _CountingReader:
    """The lines of a bundle file, telling ``progress`` of the bytes read now and then."""

    def __init__(self, file: IO[bytes], progress: Progress) -> None:
        self._file = file
        self._progress = progress

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def readline(self) -> bytes:
        return self._file.readline()

    def read(self, size: int) -> bytes:
        data = self._file.read(size)
        self._progress(len(data))
        return data

    def __iter__(self) -> Iterator[bytes]:
        pending = 0
        try:
            for number, raw in enumerate(self._file, 1):
                pending += len(raw)
                if number % _YIELD_EVERY == 0:
                    self._progress(pending)
                    pending = 0
                yield raw
        finally:  # a pass may stop reading at the trailer
            self._progress(pending)


def _seekable(file: IO[bytes]) -> bool:
    with suppress(AttributeError, OSError, ValueError):
        return bool(file.seekable())
    return False


async def _import(
    store: EventStore,
    file: IO[bytes],
    progress: Progress | None,
    key: bytes | None,
    dry_run: bool,
) -> ImportReport:
    """The passes; ``progress`` hears of the reading of passes 1 and 3, the whole file."""
    scan = await _scan_in_parallel(_reading(file, progress), key)
    await _check(store, file, scan, key)
    await _check_create_keys(store, scan)
    header = scan.header
    if dry_run:
        sessions = [
            SessionImport(
                session_id=p.row.session_id,
                action=p.action,
                events=p.count,
                written=0,
            )
            for p in scan.plans
        ]
    else:
        sessions = await _write(store, _reading(file, progress), scan)
    return ImportReport(
        sessions=sessions,
        events=scan.events,
        written=sum(s.written for s in sessions),
        created_at=header.created_at,
        key_id=header.key_id,
        authenticated=key is not None,
        dry_run=dry_run,
    )


async def _scan_in_parallel(file: IO[bytes], key: bytes | None) -> _Scan:
    """Pass 1, with a worker process for a bundle of ``PARALLEL_BYTES`` or more.

    Should anything fail there, pass 1 runs again in this process alone: it names
    the first problem in the bundle's order (the worker's verdicts come late).
    """
    if file.seek(0, os.SEEK_END) >= PARALLEL_BYTES:
        with suppress(OSError, BundleError):
            scan = await _scan_with_worker(file, key)
            if scan is not None:
                return scan
    return await asyncio.to_thread(_scan, file, key, _Contents(None))


async def _scan_with_worker(file: IO[bytes], key: bytes | None) -> _Scan | None:
    """Pass 1 with a worker process; None if an event did not verify there."""
    worker = Worker("--content")
    try:
        contents = _Contents(worker)
        # In a thread: no I/O of the loop's, keep it free.
        scan = await asyncio.to_thread(_scan, file, key, contents)
        return scan if await contents.all_sound() else None
    finally:
        await worker.close()
