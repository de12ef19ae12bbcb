"""The ``Ledger`` facade: the lifecycle rules on top of a store and the fold engine."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, overload

from ledger.config import LedgerConfig
from ledger.errors import (
    BranchNotFoundError,
    CheckpointNotFoundError,
    ConflictError,
    EventNotFoundError,
    EventTooLargeError,
    IntegrityError,
    LedgerError,
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
    Event,
    Expired,
    MetadataSet,
    Recorded,
    Restored,
    Resumed,
    SessionCreated,
    Suspended,
    TurnAdded,
    encode_event,
    make_event,
    new_session_id,
    validate_name,
)
from ledger.verify import VerifyReport, verify_session
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
from projections.transcript import Turn, context_window, turns_of
from projections.tree import TREE, Tree
from stores import open_store
from stores.base import AppendRequest, FeedItem, FeedStore, SessionPage, SessionQuery

__all__ = ["Ledger"]

_logger = logging.getLogger(__name__)

S = TypeVar("S")
MAIN = "main"


def _now() -> int:
    return time.time_ns()


class _Batch:
    """Events being built for one append: chained, sized and folded as they are added."""

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
        )
        self.ledger._check_size(event)
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
        )
        self._check_size(root)
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
        every = self.config.auto_checkpoint_every

        def plan(batch: _Batch, state: SessionState) -> None:
            _require_active(state)
            limit = self.config.max_turns_per_session
            if limit and state.turn_count >= limit:
                raise SessionCapacityError(f"session {session_id!r}", "turns", limit)
            batch.add(body, branch=branch)
            if every and batch.state.turn_count % every == 0:
                self._plan_checkpoint(batch, branch, f"auto-{batch.state.turn_count}")

        events = await self._write(
            session_id, branch, plan, actor=actor, key=idempotency_key, expected=expected_head
        )
        return events[0]

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

    async def turns(
        self, session_id: str, *, branch: str = MAIN, at: str | None = None
    ) -> list[Turn]:
        """The turns on the path to the head of ``branch`` (or to ``at``)."""
        return turns_of(await self.history(session_id, branch=branch, at=at))

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

    async def verify(self, session_id: str | None = None) -> VerifyReport:
        """Recompute every id and checksum, check links, depths, branches and lifecycle.

        Returns a report naming the first bad event; without ``session_id``, of every session.
        """
        if session_id is not None:
            await self.store.session(session_id)
            return await verify_session(self.store, session_id, self._key)
        report = VerifyReport(keyed=self.keyed)
        cursor: str | None = None
        while True:
            page = await self.sessions(limit=500, cursor=cursor)
            for row in page.items:
                report = report.merge(await verify_session(self.store, row.session_id, self._key))
            cursor = page.next_cursor
            if cursor is None:
                return report

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
    ) -> list[Event]:
        """Plan a batch on the branch head and append it with compare-and-swap.

        Without ``expected`` the head is whatever it is at commit: on a conflict the
        batch is planned again on the new head (the lifecycle checks run again too).
        """
        if key is not None:
            found = await self.store.find_by_key(session_id, key)
            if found is not None:
                return [found]
        head = expected or await self._head(session_id, branch)
        for attempt in range(self.config.max_retries):
            state = await self._engine.state_at(SESSION, session_id, head)
            if self._idle(state) is not None:
                try:
                    await self._expire(state, branch)
                except ConflictError as exc:
                    head = self._retry_head(exc, expected)
                    continue
                raise SessionExpiredError(session_id, branch)
            batch = _Batch(self, state, actor or state.user_id, key)
            plan(batch, state)
            try:
                return await self._commit(batch, branch, expected=head)
            except ConflictError as exc:
                head = self._retry_head(exc, expected)
                await asyncio.sleep(random.random() * 0.001 * min(attempt, 10))
        raise ConflictError(session_id, branch, head, self._heads.get((session_id, branch)))

    def _retry_head(self, exc: ConflictError, expected: str | None) -> str:
        if expected is not None or exc.current is None:
            raise exc
        self._heads[(exc.session_id, exc.branch)] = exc.current
        return exc.current

    async def _commit(self, batch: _Batch, branch: str, *, expected: str | None) -> list[Event]:
        last = batch.state
        request = AppendRequest(
            session_id=last.session_id,
            branch=branch,
            expected_head=expected,
            events=batch.events,
            status=last.status if branch == MAIN else None,
            max_branches=self.config.max_branches_per_session or None,
        )
        result = await self.store.append(request)
        if not result.replayed:
            for event, state in zip(batch.events, batch.states, strict=True):
                self._remember(event, state)
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
        known = self._heads.get((session_id, branch))
        if known is not None:
            return known
        heads = await self.store.heads(session_id)
        if not heads:
            raise SessionNotFoundError(session_id)
        if branch not in heads:
            raise BranchNotFoundError(session_id, branch)
        return heads[branch]

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

    def _check_size(self, event: Event) -> None:
        size = len(encode_event(event))
        if size > self.config.max_event_bytes:
            raise EventTooLargeError(event.session, size, self.config.max_event_bytes)


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
