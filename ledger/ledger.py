"""The ``Ledger`` facade: the lifecycle rules on top of a store and the fold engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import tempfile
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Mapping,
    Sequence,
)
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar, overload

import msgspec

from ledger.anchors import (
    Anchor,
    anchor_of,
    check_anchor_mac,
    decode_anchor,
    describe,
    encode_anchor,
    key_id,
    make_anchor,
)
from ledger.bundle import ExportReport, ImportReport, export_bundle, import_bundle
from ledger.config import LedgerConfig
from ledger.errors import (
    AlreadyRedactedError,
    AnchorError,
    CheckpointNotFoundError,
    ConfigError,
    ConflictError,
    EventNotFoundError,
    IntegrityError,
    InvalidEventError,
    LedgerError,
    ProofError,
    SessionCapacityError,
    SessionClosedError,
    SessionExpiredError,
    SessionNotFoundError,
    SessionSuspendedError,
    SessionTransitionError,
)
from ledger.events import (
    Body,
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
    encode_event,
    erase,
    erased_digest,
    make_event,
    new_session_id,
    validate_name,
)
from ledger.logs import SessionLogs
from ledger.proofs import ConsistencyProof, InclusionProof, consistency_proof, inclusion_proof
from ledger.replay import (
    MAX_PAUSE,
    BranchDiff,
    Callback,
    branch_head,
    diff_paths,
    drive,
    drive_pages,
    events_of,
    follow_branch,
    open_path,
    paced,
)
from ledger.verify import PARALLEL_FROM, VerifyReport, verify_session
from projections.base import Projection
from projections.engine import FoldEngine
from projections.session import (
    ACTIVE,
    CLOSED,
    EXPIRED,
    SESSION,
    SUSPENDED,
    Checkpoint,
    SessionState,
    state_checksum,
)
from projections.transcript import Turn, context_window, is_turn, turns_of
from projections.tree import TREE, Tree
from stores import open_store
from stores.base import (
    AppendRequest,
    FeedItem,
    FeedStore,
    PurgePage,
    PurgeRecord,
    PurgeRequest,
    PurgeStore,
    SessionPage,
    SessionQuery,
    SessionRow,
    page_cursor,
)

__all__ = ["Ledger"]

_logger = logging.getLogger(__name__)

S = TypeVar("S")
MAIN = "main"


def _now() -> int:
    return time.time_ns()


def _turn_body(turn: TurnAdded | Mapping[str, Any], index: int, session_id: str) -> TurnAdded:
    """A turn of ``add_turns``: a ``TurnAdded`` as it is, a mapping as ``add_turn``'s arguments."""
    if isinstance(turn, TurnAdded):
        return turn
    if not isinstance(turn, Mapping):
        raise InvalidEventError(
            f"Invalid turn {index} for session {session_id!r}: "
            f"a TurnAdded or a mapping, not {type(turn).__name__}"
        )
    try:
        fields = dict(turn)
        fields["tool_calls"] = list(fields.get("tool_calls", ()))
        fields["metadata"] = fields.get("metadata") or {}
        return TurnAdded(**fields)
    except TypeError as exc:  # an unknown or missing argument, tool_calls not a sequence
        raise InvalidEventError(f"Invalid turn {index} for session {session_id!r}: {exc}") from None


class _Batch:
    """Events being built for one append: chained, sized and folded as they are added."""

    __slots__ = ("actor", "base", "events", "key", "ledger", "states")

    def __init__(self, ledger: Ledger, state: SessionState, actor: str, key: str | None) -> None:
        self.ledger = ledger
        self.base = state
        self.actor = actor
        self.key = key
        self.events: list[Event] = []
        self.states: list[SessionState] = []

    @property
    def state(self) -> SessionState:
        return self.states[-1] if self.states else self.base

    def add(self, body: Body, *, branch: str, after: SessionState | None = None) -> Event:
        """Append ``body`` after the last event (or after ``after``, for a fork or restore)."""
        parent = after or self.state
        event = make_event(
            session=parent.session_id,
            parent=parent.head,
            seq=parent.seq + 1,
            branch=branch,
            at=max(_now(), parent.last_activity_at),
            actor=self.actor,
            body=body,
            idempotency_key=None if self.events else self.key,
            max_bytes=self.ledger.config.max_event_bytes,
        )
        self.events.append(event)
        self.states.append(SESSION.apply(parent, event))
        return event


class _Opening:
    """``Ledger.open(url)``: await it, or use it as ``async with``."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def __await__(self) -> Generator[Any, None, Ledger]:
        return self._open().__await__()

    async def _open(self) -> Ledger:
        await self._ledger.store.open()
        return self._ledger

    async def __aenter__(self) -> Ledger:
        return await self._open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._ledger.close()


class Ledger:
    """Sessions as append-only trees of events; every read is a fold.

    Example::

        async with Ledger.open("sqlite:///sessions.db") as led:
            s = await led.create(user_id="user-42", agent="assistant")
            await led.add_turn(s.session_id, role="user", content="Hello!")
            print((await led.state(s.session_id)).turn_count)
    """

    def __init__(self, store: FeedStore, config: LedgerConfig | None = None) -> None:
        self.store = store
        self.config = config or LedgerConfig(url=store.url)
        self._key = self.config.key_bytes
        self._engine = FoldEngine(store, snapshot_every=self.config.snapshot_every, key=self._key)
        self._heads: dict[tuple[str, str], str] = {}
        self._projections: dict[str, Projection[Any]] = {}
        # (session, branch) being written by a task of this ledger -> the tasks waiting
        # for it, in arrival order (a future each, which the writer before them sets).
        self._branch_writers: dict[tuple[str, str], deque[asyncio.Future[None]]] = {}
        self._logs = SessionLogs()

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        config: LedgerConfig | None = None,
        key: str | bytes | None = None,
        **store_options: Any,
    ) -> _Opening:
        """Open the ledger at ``url`` (default: ``LEDGER_URL``, else ``sqlite:///ledger.db``).

        Settings not given in ``config`` come from ``LEDGER_*`` environment variables.

        Raises:
            ConfigError: an unknown URL scheme or a bad setting.
            StoreError: the store cannot be opened.
        """
        hex_key = key.hex() if isinstance(key, bytes) else key
        config = config or LedgerConfig.from_env(url=url, key=hex_key)
        if url is not None and config.url != url:
            config = LedgerConfig(**{**_fields(config), "url": url})
        return _Opening(cls(open_store(config.url, **store_options), config))

    async def __aenter__(self) -> Self:
        await self.store.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def keyed(self) -> bool:
        return self._key is not None

    @property
    def key_id(self) -> str | None:
        """The public id of this ledger's key (see ``ledger.anchors.key_id``), if it has one."""
        return key_id(self._key) if self._key is not None else None

    # ------------------------------------------------------------------ writes

    async def create(
        self,
        *,
        user_id: str,
        agent: str,
        metadata: dict[str, Any] | None = None,
        ttl_s: float | None = None,
        actor: str | None = None,
        idempotency_key: str | None = None,
    ) -> SessionState:
        """Start a session; returns its state. A retried ``idempotency_key`` returns the first.

        Raises:
            SessionCapacityError: the user already has ``max_open_sessions_per_user`` open.
        """
        if idempotency_key is not None:
            found = await self.store.find_created(user_id, idempotency_key)
            if found is not None:
                return await self.state(found.session, at=found.id)
        session_id = new_session_id()
        root = make_event(
            session=session_id,
            parent=None,
            seq=0,
            branch=MAIN,
            at=_now(),
            actor=actor or user_id,
            body=SessionCreated(user_id=user_id, agent=agent, metadata=metadata or {}, ttl_s=ttl_s),
            idempotency_key=idempotency_key,
            max_bytes=self.config.max_event_bytes,
        )
        result = await self.store.append(
            AppendRequest(
                session_id=session_id,
                branch=MAIN,
                expected_head=None,
                events=[root],
                status=ACTIVE,
                max_open_sessions=self.config.max_open_sessions_per_user or None,
            )
        )
        if result.replayed:
            first = result.events[0]
            return await self.state(first.session, at=first.id)
        state = SESSION.apply(SESSION.initial(), root)
        self._remember(root, state)
        return state

    async def add_turn(
        self,
        session_id: str,
        *,
        role: str,
        content: Any,
        name: str | None = None,
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost: float = 0.0,
        model: str | None = None,
        tool_calls: Sequence[Any] = (),
        turn_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        branch: str = MAIN,
        actor: str | None = None,
        idempotency_key: str | None = None,
        expected_head: str | None = None,
    ) -> Event:
        """Append a turn; every ``auto_checkpoint_every`` turns a checkpoint follows it.

        Raises:
            SessionSuspendedError, SessionClosedError, SessionExpiredError: not active.
            SessionCapacityError: ``max_turns_per_session`` reached on this branch.
            ConflictError: ``expected_head`` is no longer the branch head.
            InvalidEventError: content that is not JSON, or a field of the wrong type.
        """
        body = TurnAdded(
            role=role,
            content=content,
            name=name,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost=cost,
            model=model,
            tool_calls=list(tool_calls),
            turn_id=turn_id,
            metadata=metadata or {},
        )
        events = await self._write(
            session_id,
            branch,
            self._plan_turns(session_id, [body], branch),
            actor=actor,
            key=idempotency_key,
            expected=expected_head,
        )
        return events[0]

    async def add_turns(
        self,
        session_id: str,
        turns: Sequence[TurnAdded | Mapping[str, Any]],
        *,
        branch: str = MAIN,
        actor: str | None = None,
        idempotency_key: str | None = None,
        expected_head: str | None = None,
    ) -> list[Event]:
        """Append several turns as one append: all of them, or none.

        Each turn is a ``TurnAdded`` or a mapping of ``add_turn``'s keyword
        arguments (``{"role": "user", "content": "Hi"}``). The turns are chained
        in order and written in one transaction, with the checkpoints that
        ``auto_checkpoint_every`` puts between them. Returns the turns' events,
        in order (an empty list, writing nothing, for no turns). A retried
        ``idempotency_key`` returns the original turns and writes nothing.

        Raises:
            InvalidEventError: a turn that is not one (its index named), or not JSON.
            SessionCapacityError: the turns would pass ``max_turns_per_session``.
            the errors of ``add_turn``, for the batch as a whole.
        """
        bodies = [_turn_body(turn, index, session_id) for index, turn in enumerate(turns)]
        if not bodies:
            return []
        events = await self._write(
            session_id,
            branch,
            self._plan_turns(session_id, bodies, branch),
            actor=actor,
            key=idempotency_key,
            expected=expected_head,
        )
        if len(events) < len(bodies):  # the key was used: only its first event came back
            return await self._batch_from(events[0], len(bodies))
        return [event for event in events if isinstance(event.body, TurnAdded)]

    def _plan_turns(
        self, session_id: str, bodies: Sequence[TurnAdded], branch: str
    ) -> Callable[[_Batch, SessionState], None]:
        """The plan of a write of turns: limits checked for all, checkpoints where due."""
        every = self.config.auto_checkpoint_every
        limit = self.config.max_turns_per_session

        def plan(batch: _Batch, state: SessionState) -> None:
            _require_active(state)
            if limit and state.turn_count + len(bodies) > limit:
                raise SessionCapacityError(f"session {session_id!r}", "turns", limit)
            for body in bodies:
                batch.add(body, branch=branch)
                if every and batch.state.turn_count % every == 0:
                    self._plan_checkpoint(batch, branch, f"auto-{batch.state.turn_count}")

        return plan

    async def _batch_from(self, first: Event, count: int) -> list[Event]:
        """The ``count`` turns of the batch that ``first`` opened, for a retried key.

        A batch is one transaction, so its events follow one another in the
        session's append order, each the parent of the next.
        """
        turns: list[Event] = []
        last: str | None = None
        async for event in self.store.events(first.session):
            if event.id == first.id or (last is not None and event.parent == last):
                last = event.id
                if isinstance(event.body, TurnAdded):
                    turns.append(event)
                    if len(turns) == count:
                        break
        return turns

    async def record(
        self,
        session_id: str,
        type: str,
        data: Any = None,
        *,
        branch: str = MAIN,
        actor: str | None = None,
        idempotency_key: str | None = None,
        expected_head: str | None = None,
    ) -> Event:
        """Append a ``Recorded`` event: a tool call, a state delta, anything an agent keeps."""
        body = Recorded(type=type, data=data)
        return await self._simple(
            session_id, body, _require_active, branch, actor, idempotency_key, expected_head
        )

    async def set_metadata(
        self,
        session_id: str,
        metadata: dict[str, Any],
        *,
        branch: str = MAIN,
        actor: str | None = None,
        idempotency_key: str | None = None,
        expected_head: str | None = None,
    ) -> Event:
        """Merge ``metadata`` into the session's; a ``None`` value removes that key."""
        body = MetadataSet(metadata=metadata)
        return await self._simple(
            session_id, body, _require_open, branch, actor, idempotency_key, expected_head
        )

    async def suspend(
        self,
        session_id: str,
        *,
        reason: str | None = None,
        branch: str = MAIN,
        actor: str | None = None,
        idempotency_key: str | None = None,
        expected_head: str | None = None,
    ) -> Event:
        """ACTIVE -> SUSPENDED."""
        return await self._simple(
            session_id,
            Suspended(reason=reason),
            _transition(ACTIVE, SUSPENDED),
            branch,
            actor,
            idempotency_key,
            expected_head,
        )

    async def resume(
        self,
        session_id: str,
        *,
        reason: str | None = None,
        branch: str = MAIN,
        actor: str | None = None,
        idempotency_key: str | None = None,
        expected_head: str | None = None,
    ) -> Event:
        """SUSPENDED -> ACTIVE."""
        return await self._simple(
            session_id,
            Resumed(reason=reason),
            _transition(SUSPENDED, ACTIVE),
            branch,
            actor,
            idempotency_key,
            expected_head,
        )

    async def checkpoint(
        self,
        session_id: str,
        *,
        label: str | None = None,
        branch: str = MAIN,
        actor: str | None = None,
        idempotency_key: str | None = None,
        expected_head: str | None = None,
    ) -> Checkpoint:
        """Capture the branch head's state under a checksum (a MAC with a key).

        Raises:
            SessionClosedError, SessionExpiredError: the branch is terminal.
            SessionCapacityError: ``max_checkpoints_per_session`` reached on this branch.
        """

        def plan(batch: _Batch, state: SessionState) -> None:
            _require_open(state)
            self._plan_checkpoint(batch, branch, label)

        events = await self._write(
            session_id, branch, plan, actor=actor, key=idempotency_key, expected=expected_head
        )
        return _checkpoint_of(events[-1])

    def _plan_checkpoint(self, batch: _Batch, branch: str, label: str | None) -> None:
        state = batch.state
        limit = self.config.max_checkpoints_per_session
        if limit and len(state.checkpoints) >= limit:
            raise SessionCapacityError(f"session {state.session_id!r}", "checkpoints", limit)
        checksum = state_checksum(state, self._key)
        batch.add(Checkpointed(entry=state.head, checksum=checksum, label=label), branch=branch)

    async def restore(
        self,
        session_id: str,
        checkpoint_id: str,
        *,
        branch: str = MAIN,
        actor: str | None = None,
        idempotency_key: str | None = None,
        expected_head: str | None = None,
    ) -> Event:
        """Continue ``branch`` from a checkpoint: append ``Restored`` after its entry.

        Nothing is deleted: the abandoned events stay in the tree.

        Raises:
            CheckpointNotFoundError: unknown, or a checkpoint of another session.
            IntegrityError: the entry's state no longer matches the checkpoint's checksum.
            SessionClosedError, SessionExpiredError, SessionSuspendedError: not active.
        """
        checkpoint = await self._checkpoint(session_id, checkpoint_id)
        entry_state = await self._engine.state_at(SESSION, session_id, checkpoint.entry)
        if state_checksum(entry_state, self._key) != checkpoint.checksum:
            raise IntegrityError(
                f"Checkpoint {checkpoint_id!r} of session {session_id!r} does not match "
                f"the state of its entry {checkpoint.entry!r}",
                event_id=checkpoint_id,
            )
        body = Restored(checkpoint=checkpoint.id, entry=checkpoint.entry)

        def plan(batch: _Batch, state: SessionState) -> None:
            _require_active(state)
            batch.add(body, branch=branch, after=entry_state)

        events = await self._write(
            session_id, branch, plan, actor=actor, key=idempotency_key, expected=expected_head
        )
        return events[0]

    async def branch(
        self,
        session_id: str,
        name: str,
        *,
        at: str | None = None,
        from_branch: str = MAIN,
        actor: str | None = None,
        idempotency_key: str | None = None,
    ) -> Event:
        """Start branch ``name`` at event ``at`` (default: the head of ``from_branch``).

        Raises:
            BranchExistsError: a branch of that name exists.
            EventNotFoundError: ``at`` is not an event of this session.
            SessionClosedError, SessionExpiredError: the fork point is terminal.
            SessionCapacityError: ``max_branches_per_session`` reached.
        """
        validate_name("branch name", name, session_id)
        if idempotency_key is not None:
            found = await self.store.find_by_key(session_id, idempotency_key)
            if found is not None:
                return found
        fork = at or await self._head(session_id, from_branch)
        fork_state = await self._engine.state_at(SESSION, session_id, fork)
        _require_open(fork_state)
        batch = _Batch(self, fork_state, actor or fork_state.user_id, idempotency_key)
        batch.add(Branched(name=name, fork_point=fork), branch=name)
        return (await self._commit(batch, name, expected=None))[0]

    @overload
    async def close(self) -> None: ...

    @overload
    async def close(
        self,
        session_id: str,
        *,
        reason: str | None = None,
        branch: str = MAIN,
        actor: str | None = None,
        idempotency_key: str | None = None,
        expected_head: str | None = None,
    ) -> Event: ...

    async def close(
        self,
        session_id: str | None = None,
        *,
        reason: str | None = None,
        branch: str = MAIN,
        actor: str | None = None,
        idempotency_key: str | None = None,
        expected_head: str | None = None,
    ) -> Event | None:
        """``close(session_id)``: ACTIVE or SUSPENDED -> CLOSED for that branch (a new
        branch may still fork from before it). ``close()``: close the ledger and its store.
        """
        if session_id is None:
            await self.store.close()
            return None
        return await self._simple(
            session_id,
            Closed(reason=reason),
            _require_open,
            branch,
            actor,
            idempotency_key,
            expected_head,
        )

    async def expire_idle(self, *, page_size: int = 500) -> list[str]:
        """The sweeper: append ``Expired`` to every idle open ``main`` branch; return their ids."""
        expired: list[str] = []
        for status in (ACTIVE, SUSPENDED):
            cursor: str | None = None
            while True:
                page = await self.sessions(status=status, limit=page_size, cursor=cursor)
                for row in page.items:
                    state = await self.state(row.session_id)
                    if self._idle(state) is not None:
                        try:
                            await self._expire(state, MAIN)
                        except ConflictError:
                            continue  # it was written to meanwhile: not idle any more
                        expired.append(row.session_id)
                cursor = page.next_cursor
                if cursor is None:
                    break
        return expired

    async def redact(self, event_id: str, *, reason: str, actor: str | None = None) -> Event:
        """Erase a turn's or a record's body and salt; return the ``Redacted`` record.

        The event keeps its id and ``body_digest``, so ids, the chain, checksums
        and anchors still verify; its body becomes ``Erased`` (the kind and the
        tokens and cost a session's state folds). The ``Redacted`` event (who:
        ``actor``, when, why: ``reason``) is appended at the head of the erased
        event's branch, whatever the branch's status, in the same transaction
        as the overwrite. The store then makes the old bytes unreadable from its
        files (see the README for what each store guarantees).

        Raises:
            EventNotFoundError: no event has this id.
            EventNotRedactableError: the event is not a ``TurnAdded`` or ``Recorded``.
            AlreadyRedactedError: the event was redacted before (naming the redaction).
            InvalidEventError: an empty reason.

        Example::

            record = await led.redact(turn.id, reason="user asked to erase their address")
        """
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidEventError(f"A redaction needs a reason: event {event_id!r}")
        target = await self.store.get(event_id)
        if isinstance(target.body, Erased):
            raise AlreadyRedactedError(event_id, await self._redaction_of(target))
        erased = erase(target)
        assert isinstance(erased.body, Erased)
        body = Redacted(event=event_id, reason=reason, erased=erased_digest(erased.body))

        def plan(batch: _Batch, state: SessionState) -> None:
            batch.add(body, branch=target.branch)

        try:
            events = await self._write(
                target.session,
                target.branch,
                plan,
                actor=actor,
                key=None,
                expected=None,
                erase=[erased],
            )
        finally:
            # Cached folds of this session may hold the erased content.
            self._engine.forget(target.session)
        return events[0]

    async def redactions(self, session_id: str) -> list[Event]:
        """The session's ``Redacted`` records, in append order."""
        return [e async for e in self.events(session_id) if isinstance(e.body, Redacted)]

    async def _redaction_of(self, target: Event) -> str | None:
        async for event in self.store.events(target.session):
            if isinstance(event.body, Redacted) and event.body.event == target.id:
                return event.id
        return None

    # ------------------------------------------------------------------ retention

    async def purge(
        self,
        *,
        older_than: float | timedelta,
        user_id: str | None = None,
        batch_size: int = 100,
        reason: str = "retention",
        actor: str = "ledger",
        dry_run: bool = False,
        on_batch: Callable[[int], object] | None = None,
    ) -> list[PurgeRecord]:
        """Delete whole sessions idle longer than ``older_than``; return their records.

        Sessions (of ``user_id``, or of everyone) whose last activity is older
        than ``older_than`` seconds (or a ``timedelta``) are deleted whole,
        ``batch_size`` sessions per store transaction, whatever their status.
        Each leaves a ``PurgeRecord``: ids, user, agent, times, event count,
        bytes, who purged it, when and why, and its final anchor (the Merkle root
        of its event ids, a MAC with the ledger's key), listed by ``purged``.
        A session written to while it is being purged is kept (it is not idle);
        a write that comes after it is gone raises ``SessionNotFoundError``.
        ``dry_run``: the records that would be written, and nothing is deleted.
        ``on_batch(n)`` is called after each batch with the sessions it examined
        (for progress).

        Raises:
            ConfigError: a retention period or batch size that is not positive, or
                a store that cannot purge.

        Example::

            purged = await led.purge(older_than=timedelta(days=90), reason="90-day retention")
        """
        store = self._purge_store()
        seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
        if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds <= 0:
            raise ConfigError(f"Invalid retention period: {older_than!r} (seconds, > 0)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"Invalid purge batch size: {batch_size!r} (at least 1)")
        if not isinstance(reason, str) or not reason.strip():
            raise ConfigError("A purge needs a reason")
        now = _now()
        cutoff = now - int(seconds * 1e9)
        purged: list[PurgeRecord] = []
        after: str | None = None
        while True:
            rows = await store.idle_sessions(cutoff, user_id=user_id, limit=batch_size, after=after)
            if not rows:
                return purged
            after = page_cursor(rows[-1])
            requests = [
                PurgeRequest(record=record)
                for row in rows
                if (record := await self._purge_record(row, now, actor, reason)) is not None
            ]
            if dry_run:
                purged.extend(request.record for request in requests)
            else:
                done = await store.purge(requests)
                for record in done:
                    self._forget_session(record.session_id)
                purged.extend(done)
            if on_batch is not None:
                on_batch(len(rows))
            if len(rows) < batch_size:
                return purged

    async def purged(
        self, *, user_id: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> PurgePage:
        """A page of purge records, most recent first; ``page.next_cursor`` gives the next.

        Raises:
            ConfigError: a store that cannot purge.
        """
        return await self._purge_store().purges(user_id=user_id, limit=limit, cursor=cursor)

    def _purge_store(self) -> PurgeStore:
        if not isinstance(self.store, PurgeStore):
            raise ConfigError(f"This store cannot purge sessions: {self.store.url!r}")
        return self.store

    async def _purge_record(
        self, row: SessionRow, now: int, actor: str, reason: str
    ) -> PurgeRecord | None:
        """The record of a session about to be purged; None when it moved meanwhile."""
        ids: list[str] = []
        size = 0
        async for event in self.store.events(row.session_id):
            ids.append(event.id)
            size += len(encode_event(event))
        if len(ids) != row.event_count:
            return None  # written to since it was listed: not idle, the store keeps it
        anchor = make_anchor(row.session_id, ids, key=self._key, at=now)
        return PurgeRecord(
            session_id=row.session_id,
            user_id=row.user_id,
            agent=row.agent,
            status=row.status,
            created_at=row.created_at,
            last_activity_at=row.last_activity_at,
            event_count=row.event_count,
            bytes=size,
            purged_at=now,
            actor=actor,
            reason=reason,
            anchor=msgspec.to_builtins(anchor),
        )

    def _forget_session(self, session_id: str) -> None:
        """Drop what this ledger caches of a session (its folds and its heads)."""
        self._engine.forget(session_id)
        for key in [key for key in self._heads if key[0] == session_id]:
            del self._heads[key]

    # ------------------------------------------------------------------ reads

    async def get(self, event_id: str) -> Event:
        """One event by id."""
        return await self.store.get(event_id)

    async def state(
        self, session_id: str, *, branch: str = MAIN, at: str | None = None
    ) -> SessionState:
        """The session's state at the head of ``branch``, or right after event ``at``.

        Raises:
            SessionNotFoundError, BranchNotFoundError, EventNotFoundError.
        """
        return await self.project(session_id, SESSION, branch=branch, at=at)

    async def project(
        self,
        session_id: str,
        projection: Projection[S] | str,
        *,
        branch: str = MAIN,
        at: str | None = None,
    ) -> S:
        """The state of any projection (or a registered one, by name) at a point."""
        chosen: Projection[S] = (
            self._projections[projection] if isinstance(projection, str) else projection
        )
        event_id = at or await self._head(session_id, branch)
        return await self._engine.state_at(chosen, session_id, event_id)

    def register(self, projection: Projection[Any]) -> None:
        """Make a projection available by name to ``project``."""
        self._projections[projection.name] = projection

    async def history(
        self, session_id: str, *, branch: str = MAIN, at: str | None = None
    ) -> list[Event]:
        """The path of events from the root to the head of ``branch`` (or to ``at``)."""
        event_id = at or await self._head(session_id, branch)
        path = await self.store.path(event_id)
        if path[0].session != session_id:
            raise EventNotFoundError(event_id, session_id)
        return path

    @overload
    async def replay(
        self,
        session_id: str,
        *,
        into: Projection[S],
        branch: str = ...,
        at: str | None = ...,
        speed: float | None = ...,
        max_pause: float = ...,
    ) -> S: ...

    @overload
    async def replay(
        self,
        session_id: str,
        *,
        into: Callback,
        branch: str = ...,
        at: str | None = ...,
        speed: float | None = ...,
        max_pause: float = ...,
    ) -> None: ...

    async def replay(
        self,
        session_id: str,
        *,
        into: Projection[S] | Callback,
        branch: str = MAIN,
        at: str | None = None,
        speed: float | None = None,
        max_pause: float = MAX_PAUSE,
    ) -> S | None:
        """Drive ``into`` through the history of ``branch`` (to ``at``), root first.

        ``into`` is a callback, sync or async, called with each event (returns
        ``None``), or a ``Projection`` (returns its state there, as ``project``
        does). The history is the parent path: a forked branch replays the shared
        history first; after a restore, the abandoned events are skipped and the
        ``Restored`` event shows where the branch went back. With ``speed`` the
        original timing is kept, scaled (2.0: twice as fast), each pause at most
        ``max_pause`` seconds. A session never forked nor restored is read in
        pages, in bounded memory (``ledger.replay.open_path``).

        Example::

            await led.replay(session_id, into=print, branch="alt")
            state = await led.replay(session_id, into=SESSION)

        Raises:
            SessionNotFoundError, BranchNotFoundError, EventNotFoundError;
            IntegrityError: the stored session does not chain up to its head.
        """
        path = await open_path(self.store, session_id, at or await self._head(session_id, branch))
        if speed is None:
            return await drive_pages(path, into)
        return await drive(paced(events_of(path), speed, max_pause=max_pause), into)

    def follow(
        self,
        session_id: str,
        *,
        branch: str = MAIN,
        speed: float | None = None,
        max_pause: float = MAX_PAUSE,
    ) -> AsyncGenerator[Event, None]:
        """The history of ``branch`` (paced by ``speed``, as in ``replay``), then each
        event appended to it as it commits; no gap or duplicate between the two.

        Ends after the branch is closed or expires; else runs until you stop::

            async with contextlib.aclosing(led.follow(session_id)) as events:
                async for event in events:
                    print(event.kind)

        Raises:
            SessionNotFoundError, BranchNotFoundError.
        """
        return follow_branch(self.store, session_id, branch, speed=speed, max_pause=max_pause)

    async def diff(self, session_id: str, a: str, b: str) -> BranchDiff:
        """Where the histories of branches ``a`` and ``b`` part, and the events only on each.

        Raises:
            SessionNotFoundError, BranchNotFoundError.
        """
        path_a = await self.history(session_id, branch=a)
        path_b = await self.history(session_id, branch=b)
        return diff_paths(session_id, a, b, path_a, path_b)

    async def turns(
        self,
        session_id: str,
        *,
        branch: str = MAIN,
        at: str | None = None,
        last: int | None = None,
    ) -> list[Turn]:
        """The turns on the path to the head of ``branch`` (or to ``at``), oldest first.

        ``last``: only the newest ``last`` turns, read back from the head a window
        of events at a time, so a long conversation's tail costs what the tail does.

        Raises:
            ValueError: ``last`` is negative.
        """
        if last is None:
            return turns_of(await self.history(session_id, branch=branch, at=at))
        if last < 0:
            raise ValueError(f"last must be >= 0, not {last}")
        cursor: str | None = at or await self._head(session_id, branch)
        newest: list[Event] = []  # the turn events, newest first
        while cursor is not None and len(newest) < last:
            # Turns are most of a conversation's events: ask for a few more than are missing.
            events = await self.store.ancestors(cursor, limit=last - len(newest) + 16)
            if events[0].session != session_id:  # a path never leaves its session
                raise EventNotFoundError(cursor, session_id)
            newest += [event for event in events if is_turn(event)]
            cursor = events[-1].parent
        del newest[last:]
        newest.reverse()
        return turns_of(newest)

    async def context(
        self,
        session_id: str,
        *,
        branch: str = MAIN,
        last: int | None = None,
        max_tokens: int | None = None,
        keep_system: bool = True,
    ) -> list[Turn]:
        """The turns to send to a model: the newest ones, system turns kept."""
        turns = await self.turns(session_id, branch=branch)
        return context_window(turns, last=last, max_tokens=max_tokens, keep_system=keep_system)

    async def tree(self, session_id: str) -> Tree:
        """Every branch of the session with its head and fork point."""
        state = TREE.initial()
        async for event in self.store.events(session_id):
            state = TREE.apply(state, event)
        if not state.branches:
            raise SessionNotFoundError(session_id)
        return state

    async def events(self, session_id: str) -> AsyncIterator[Event]:
        """Every event of the session, in append order."""
        await self.store.session(session_id)
        async for event in self.store.events(session_id):
            yield event

    async def sessions(
        self,
        *,
        user_id: str | None = None,
        agent: str | None = None,
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> SessionPage:
        """A page of sessions, newest activity first; ``page.next_cursor`` gives the next."""
        query = SessionQuery(
            user_id=user_id, agent=agent, status=status, limit=limit, cursor=cursor
        )
        return await self.store.sessions(query)

    async def get_or_create(
        self,
        user_id: str,
        agent: str,
        *,
        metadata: dict[str, Any] | None = None,
        ttl_s: float | None = None,
    ) -> SessionState:
        """The user's most recently active session with ``agent``, or a new one."""
        page = await self.sessions(user_id=user_id, agent=agent, status=ACTIVE, limit=5)
        for row in page.items:
            state = await self.state(row.session_id)
            if state.status == ACTIVE and self._idle(state) is None:
                return state
        return await self.create(user_id=user_id, agent=agent, metadata=metadata, ttl_s=ttl_s)

    async def verify(
        self,
        session_id: str | None = None,
        *,
        anchors: Sequence[Anchor] = (),
        on_session: Callable[[VerifyReport], object] | None = None,
    ) -> VerifyReport:
        """Recompute every id and checksum, check links, depths, branches and lifecycle.

        Returns a report naming the first bad event; without ``session_id``, of every
        session, calling ``on_session`` with each session's report (for progress).
        Each session's recorded anchors are checked too, and ``anchors``
        (kept by you, of ``session_id``): the session must still extend each of them.

        Raises:
            AnchorError: an anchor of another session, a MAC that does not match, or
                an anchor made under another key (nothing is checked then).
        """
        if session_id is not None:
            await self.store.session(session_id)
            for anchor in anchors:
                self._check_given(anchor, session_id)
            return await verify_session(self.store, session_id, self._key, anchors)
        if anchors:
            raise AnchorError("Anchors are checked against one session: name it", reason="session")
        report = VerifyReport(keyed=self.keyed, key_id=self.key_id)
        cursor: str | None = None
        while True:
            page = await self.sessions(limit=500, cursor=cursor)
            for row in page.items:
                parallel = row.event_count >= PARALLEL_FROM and (os.cpu_count() or 1) > 1
                checked = await verify_session(
                    self.store, row.session_id, self._key, parallel=parallel
                )
                report = report.merge(checked)
                if on_session is not None:
                    on_session(checked)
            cursor = page.next_cursor
            if cursor is None:
                return report

    # ------------------------------------------------------------------ anchors and proofs

    async def anchor(self, session_id: str, *, record: bool = True) -> Anchor:
        """The session's Merkle tree head now: an anchor, with a MAC under the ledger's key.

        Keep it elsewhere; ``verify(session_id, anchors=[it])`` later proves that the
        session still extends it. ``record``: the ledger also keeps it (``anchors``),
        and every later ``verify`` checks it.

        Raises:
            SessionNotFoundError.
        """
        log = await self._logs.get(self.store, session_id)
        anchor = anchor_of(session_id, log.log, key=self._key, at=_now(), heads=log.heads)
        if record:
            await self.store.put_anchor(session_id, encode_anchor(anchor))
        return anchor

    async def anchors(self, session_id: str) -> list[Anchor]:
        """The anchors the ledger issued (and recorded) for the session, oldest first.

        Raises:
            SessionNotFoundError; AnchorError: a recorded anchor that does not parse.
        """
        await self.store.session(session_id)
        return [
            decode_anchor(data, source=f"recorded anchor #{n} of session {session_id!r}")
            for n, data in enumerate(await self.store.anchors(session_id), start=1)
        ]

    async def prove(self, event_id: str, *, anchor: Anchor | None = None) -> InclusionProof:
        """An inclusion proof: the event belongs to its session at ``anchor`` (default: now).

        The proof carries the event, its index, the audit path and the anchor:
        ``ledger.proofs.check_proof`` checks it with nothing else.

        Raises:
            EventNotFoundError; AnchorError: ``anchor`` is of another session, forged,
            or under another key; ProofError: the event came after the anchor, or the
            session no longer extends the anchor.
        """
        # A proof from a log in memory is mostly this read.
        event = await self.store.get_inline(event_id)
        session_id = event.session
        size = anchor.size if anchor is not None else None
        log, index = await self._logs.locate(self.store, session_id, event_id, size=size)
        if anchor is None:
            anchor = anchor_of(session_id, log.log, key=self._key, at=_now(), heads=log.heads)
        else:
            self._check_given(anchor, session_id)
            if index >= anchor.size:
                raise ProofError(
                    f"Event {event_id!r} (index {index}) was appended after the {describe(anchor)}",
                    reason="index",
                    event_id=event_id,
                )
            if anchor.size > log.size:
                raise ProofError(
                    f"Session {session_id!r} has {log.size} events, fewer than the "
                    f"{describe(anchor)}: run verify with this anchor",
                    reason="extends",
                )
        return inclusion_proof(event, index, log.log, anchor)

    async def prove_consistency(self, anchor: Anchor) -> ConsistencyProof:
        """A consistency proof: the session now extends ``anchor`` (to a new anchor).

        Raises:
            AnchorError: as for ``prove``; ProofError: the session does not extend it.
        """
        self._check_given(anchor, anchor.session)
        log = await self._logs.get(self.store, anchor.session)
        if anchor.size > log.size or log.log.root(anchor.size).hex() != anchor.root:
            raise ProofError(
                f"Session {anchor.session!r} does not extend the {describe(anchor)}: "
                "run verify with this anchor to see what changed",
                reason="extends",
            )
        now = anchor_of(anchor.session, log.log, key=self._key, at=_now(), heads=log.heads)
        return consistency_proof(anchor, log.log, now)

    def _check_given(self, anchor: Anchor, session_id: str) -> None:
        if anchor.session != session_id:
            raise AnchorError(
                f"Anchor of session {anchor.session!r} given for session {session_id!r}",
                reason="session",
            )
        check_anchor_mac(anchor, self._key)

    # ------------------------------------------------------------------ bundles

    async def export(
        self,
        out: str | os.PathLike[str] | IO[bytes],
        session_ids: Sequence[str] | None = None,
        *,
        user_id: str | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> ExportReport:
        """Write sessions as a bundle (see ``ledger.bundle``): to a path, or a binary stream.

        Without ``session_ids``, every session (of ``user_id`` when given). A path
        is written to a temporary file beside it and renamed when complete.
        ``progress(n)`` is told of every ``n`` events written.

        Raises:
            SessionNotFoundError: a named session does not exist (or is not ``user_id``'s);
                nothing is written.
            IntegrityError: an event of the store does not verify (it is named).

        Example::

            report = await led.export("backup.jsonl")
            print(report.sessions, report.events, report.anchors[0].root)
        """
        ids = await self._export_ids(session_ids, user_id)
        if not isinstance(out, str | os.PathLike):
            return await export_bundle(
                self.store, out, ids, key=self._key, at=_now(), progress=progress
            )
        target = Path(out)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                report = await export_bundle(
                    self.store, file, ids, key=self._key, at=_now(), progress=progress
                )
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return report

    async def _export_ids(
        self, session_ids: Sequence[str] | None, user_id: str | None
    ) -> list[str]:
        if session_ids is not None:
            ids = list(dict.fromkeys(session_ids))
            for session_id in ids:
                row = await self.store.session(session_id)
                if user_id is not None and row.user_id != user_id:
                    raise SessionNotFoundError(session_id)
            return ids
        found: list[str] = []
        cursor: str | None = None
        while True:
            page = await self.sessions(user_id=user_id, limit=500, cursor=cursor)
            found += [row.session_id for row in page.items]
            cursor = page.next_cursor
            if cursor is None:
                return list(dict.fromkeys(found))

    async def import_bundle(
        self,
        source: str | os.PathLike[str] | IO[bytes],
        *,
        dry_run: bool = False,
        progress: Callable[[int], object] | None = None,
    ) -> ImportReport:
        """Verify a whole bundle, then write its sessions: the same trees, the same ids.

        Nothing is written unless everything verifies (every id, digest, link,
        anchor, MAC under this ledger's key) and no session conflicts with this
        store. Sessions already here are skipped; one a stopped import left
        half-written is finished. ``dry_run``: verify and compare only.
        ``progress(n)`` is told of every ``n`` bytes read (the bundle is read three times).

        Raises:
            BundleError: damaged, cut short or tampered with; names line, session, event.
            BundleKeyError: exported with another key than this ledger's (or one has none).
            BundleConflictError: this store holds one of its sessions, different.
            ImportIncompleteError: the store failed midway; ``.report`` says what landed.
        """
        return await import_bundle(
            self.store, source, key=self._key, dry_run=dry_run, progress=progress
        )

    def subscribe(
        self,
        after: int = 0,
        *,
        session_id: str | None = None,
        kinds: Sequence[str] | None = None,
    ) -> AsyncGenerator[FeedItem, None]:
        """Every event after feed position ``after``, then live events as they commit."""
        return self.store.subscribe(after, session_id=session_id, kinds=kinds)

    # ------------------------------------------------------------------ internals

    async def _simple(
        self,
        session_id: str,
        body: Body,
        check: Callable[[SessionState], None],
        branch: str,
        actor: str | None,
        key: str | None,
        expected: str | None,
    ) -> Event:
        def plan(batch: _Batch, state: SessionState) -> None:
            check(state)
            batch.add(body, branch=branch)

        events = await self._write(
            session_id, branch, plan, actor=actor, key=key, expected=expected
        )
        return events[0]

    async def _write(
        self,
        session_id: str,
        branch: str,
        plan: Callable[[_Batch, SessionState], None],
        *,
        actor: str | None,
        key: str | None,
        expected: str | None,
        erase: Sequence[Event] = (),
    ) -> list[Event]:
        """``_write_on_head``, one task of this ledger at a time per branch.

        Tasks writing to one branch at once would all plan on the same head and
        all but one lose the compare-and-swap, again and again (64 tasks: some
        ran out of retries). In turn, each plans on the head the last one made.
        Other processes still race through the compare-and-swap.
        """
        turn = (session_id, branch)
        waiting = self._branch_writers.get(turn)
        if waiting is None:  # the branch is free: no lock to make and take (~9,000 instructions)
            self._branch_writers[turn] = waiting = deque()
        else:
            ready = asyncio.get_running_loop().create_future()
            waiting.append(ready)
            try:
                await ready
            except BaseException:  # cancelled: while waiting, or once handed the branch
                if ready.cancelled():
                    if ready in waiting:
                        waiting.remove(ready)
                else:
                    self._hand_on(turn, waiting)
                raise
        try:
            return await self._write_on_head(
                session_id, branch, plan, actor=actor, key=key, expected=expected, erase=erase
            )
        finally:
            self._hand_on(turn, waiting)

    def _hand_on(self, turn: tuple[str, str], waiting: deque[asyncio.Future[None]]) -> None:
        """Give the branch to the next task waiting for it (in arrival order), or free it."""
        while waiting:
            ready = waiting.popleft()
            if not ready.done():  # a waiter cancelled meanwhile is done: skipped
                ready.set_result(None)
                return
        del self._branch_writers[turn]

    async def _write_on_head(
        self,
        session_id: str,
        branch: str,
        plan: Callable[[_Batch, SessionState], None],
        *,
        actor: str | None,
        key: str | None,
        expected: str | None,
        erase: Sequence[Event] = (),
    ) -> list[Event]:
        """Plan a batch on the branch head and append it with compare-and-swap.

        Without ``expected`` the head is whatever it is at commit: on a conflict the
        batch is planned again on the new head (the lifecycle checks run again too).
        A batch that erases (a redaction) is an audit annotation: it does not expire
        an idle branch first.
        """
        if key is not None:
            found = await self.store.find_by_key(session_id, key)
            if found is not None:
                return [found]
        # A write may guess the head it last wrote: the compare-and-swap corrects it.
        head = (
            expected
            or self._heads.get((session_id, branch))
            or await self._head(session_id, branch)
        )
        for attempt in range(self.config.max_retries):
            state = await self._engine.state_at(SESSION, session_id, head)
            if not erase and self._idle(state) is not None:
                try:
                    await self._expire(state, branch)
                except ConflictError as exc:
                    head = self._retry_head(exc, expected)
                    continue
                raise SessionExpiredError(session_id, branch)
            batch = _Batch(self, state, actor or state.user_id, key)
            plan(batch, state)
            try:
                return await self._commit(batch, branch, expected=head, erase=erase)
            except ConflictError as exc:
                head = self._retry_head(exc, expected)
                await asyncio.sleep(random.random() * 0.001 * min(attempt, 10))
        raise ConflictError(session_id, branch, head, self._heads.get((session_id, branch)))

    def _retry_head(self, exc: ConflictError, expected: str | None) -> str:
        if expected is not None or exc.current is None:
            raise exc
        self._heads[(exc.session_id, exc.branch)] = exc.current
        return exc.current

    async def _commit(
        self, batch: _Batch, branch: str, *, expected: str | None, erase: Sequence[Event] = ()
    ) -> list[Event]:
        last = batch.state
        request = AppendRequest(
            session_id=last.session_id,
            branch=branch,
            expected_head=expected,
            events=batch.events,
            status=last.status if branch == MAIN else None,
            max_branches=self.config.max_branches_per_session or None,
            erase=erase,
        )
        result = await self.store.append(request)
        if not result.replayed:
            for event, state in zip(batch.events, batch.states, strict=True):
                self._remember(event, state)
            if any(map(self._engine.due, batch.events)):
                await self._persist_snapshots(batch)
        return result.events

    async def _persist_snapshots(self, batch: _Batch) -> None:
        """Snapshots due in a committed batch, so a fresh process reads any point cheaply.

        The batch is acknowledged already: a failure here must not report it as
        failed (a retry would append it twice). Reads fold further until a later
        read or append writes the snapshot.
        """
        try:
            await self._engine.persist(
                SESSION, batch.state.session_id, list(zip(batch.events, batch.states, strict=True))
            )
        except LedgerError as exc:
            _logger.warning(
                "Snapshot not written after an append to session %r: %s",
                batch.state.session_id,
                exc,
            )

    def _remember(self, event: Event, state: SessionState) -> None:
        self._engine.remember(SESSION, event.session, event.id, state)
        self._heads[(event.session, event.branch)] = event.id

    async def _head(self, session_id: str, branch: str) -> str:
        """The branch's head as the store has it now: what a read starts from.

        Not this ledger's cache of the heads it wrote: another process (or another
        ledger over the same store) may have appended since.
        """
        return await branch_head(self.store, session_id, branch)

    async def _checkpoint(self, session_id: str, checkpoint_id: str) -> Checkpoint:
        try:
            event = await self.store.get(checkpoint_id)
        except EventNotFoundError:
            raise CheckpointNotFoundError(session_id, checkpoint_id) from None
        if event.session != session_id or not isinstance(event.body, Checkpointed):
            raise CheckpointNotFoundError(session_id, checkpoint_id)
        return _checkpoint_of(event)

    def _idle(self, state: SessionState) -> float | None:
        """Idle seconds when the session's TTL has run out (open branches only)."""
        ttl = state.ttl_s if state.ttl_s is not None else self.config.session_ttl_s
        if not ttl or not state.is_open:
            return None
        idle = (_now() - state.last_activity_at) / 1e9
        return idle if idle > ttl else None

    async def _expire(self, state: SessionState, branch: str) -> Event:
        idle = self._idle(state) or 0.0
        ttl = state.ttl_s if state.ttl_s is not None else self.config.session_ttl_s
        batch = _Batch(self, state, "ledger", None)
        batch.add(Expired(idle_s=round(idle, 3), ttl_s=ttl), branch=branch)
        return (await self._commit(batch, branch, expected=state.head))[0]


def _fields(config: LedgerConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__struct_fields__}


def _checkpoint_of(event: Event) -> Checkpoint:
    body = event.body
    assert isinstance(body, Checkpointed)
    return Checkpoint(
        id=event.id,
        entry=body.entry,
        checksum=body.checksum,
        label=body.label,
        branch=event.branch,
        at=event.at,
    )


def _require_terminal_free(state: SessionState) -> None:
    if state.status == CLOSED:
        raise SessionClosedError(state.session_id, state.branch)
    if state.status == EXPIRED:
        raise SessionExpiredError(state.session_id, state.branch)


def _require_open(state: SessionState) -> None:
    """Active or suspended: checkpoints, metadata and closing are allowed."""
    _require_terminal_free(state)


def _require_active(state: SessionState) -> None:
    """Turns, records and restores need an active branch."""
    _require_terminal_free(state)
    if state.status == SUSPENDED:
        raise SessionSuspendedError(state.session_id, state.branch)


def _transition(source: str, target: str) -> Callable[[SessionState], None]:
    def check(state: SessionState) -> None:
        _require_terminal_free(state)
        if state.status != source:
            raise SessionTransitionError(state.session_id, state.status, target)

    return check
