"""Group commit: concurrent appends of one process share one transaction and one flush.

A durable commit costs one flush of the log to disk (an ``fsync``), whatever
it holds, and the flush dominates a small append. So a store that sees many
appends at once runs them as a *group*: one transaction, in which each request
runs as the unit it would be alone (in a savepoint, or a step the database
checks as a whole), then one commit and one flush for all of them. Every caller
is answered only after that commit has returned, so ``append`` still means
"durable when it returns".

Batching needs no timer: one writer task runs one group at a time, and the
appends that arrive while a group commits form the next group (at most
``max_size`` requests, oldest first). An append alone is committed at once;
under load an append waits for the commit in flight and then for its own
group's, never for company. This is the group commit of database logs
(PostgreSQL's WAL writer, InnoDB's binlog group commit) moved one level up.

A group's runner returns one outcome per request, a result or the exception
that request alone raised (a conflict, an unknown session, ...): one bad
request fails only its own caller. If the runner itself raises (the commit
failed, the connection was lost), nothing of the group committed and every
caller of the group gets that error.

With ``direct``, an append that finds the writer idle and the queue empty
runs at once on its caller's task, as a group of one: the same runner, without
the hop through the writer task (one task start and one future, tens of
microseconds, against a commit of a few hundred). Appends arriving meanwhile
queue behind it and form the next group. A writer that has emptied the queue
lingers one turn of the event loop before it ends, so the callers it has just
answered, appending again at once, group together rather than one of them
going alone. Only one request or group runs at a time either way, which is
what lets a store keep one connection for its writes.

A caller cancelled while its request waits in the queue is dropped from it
(nothing of it is written); once its group runs, the request may still commit,
as an append cancelled in flight always could. ``close`` lets the queued
appends (and one running directly) complete, then refuses new ones.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from ledger.errors import StoreClosedError, StoreError

__all__ = ["GroupCommit", "GroupStats"]

_Request = TypeVar("_Request")
_Result = TypeVar("_Result")


class GroupStats:
    """Counters of one store's group commits, for tests and tuning."""

    __slots__ = ("appends", "groups", "largest", "split")

    def __init__(self) -> None:
        self.groups = 0
        """Groups run (each one transaction)."""
        self.appends = 0
        """Requests run in those groups."""
        self.largest = 0
        """The most requests one group has held."""
        self.split = 0
        """Groups that failed whole and were run again one request at a time."""

    def __repr__(self) -> str:
        return (
            f"GroupStats(groups={self.groups}, appends={self.appends}, "
            f"largest={self.largest}, split={self.split})"
        )


class GroupCommit(Generic[_Request, _Result]):
    """A queue of append requests and the one writer task that commits them in groups.

    Args:
        run: Runs one group in one transaction and returns one outcome per
            request, in order: its result, or the exception it alone raised.
            Raising fails the whole group.
        max_size: The most requests in one group; 1 gives one transaction
            per request.
        name: What the store is, for error messages.
        direct: Run an append alone on its caller's task when nothing else
            is queued or running (see the module's docstring).
    """

    def __init__(
        self,
        run: Callable[[list[_Request]], Awaitable[Sequence[_Result | BaseException]]],
        *,
        max_size: int,
        name: str,
        direct: bool = False,
    ) -> None:
        self._run = run
        self.max_size = max_size
        self.name = name
        self.direct = direct
        self.stats = GroupStats()
        self._queue: collections.deque[tuple[_Request, asyncio.Future[_Result]]] = (
            collections.deque()
        )
        self._writer: asyncio.Task[None] | None = None
        self._running_direct = False
        self._direct_done: asyncio.Future[None] | None = None  # what close waits on
        self._closed = False

    async def submit(self, request: _Request) -> _Result:
        """Queue ``request``; return its result once its group has committed.

        Raises the request's own error, or the group's when the group failed.
        """
        if self._closed:
            raise StoreClosedError(f"Store was closed: {self.name}")
        idle = self._writer is None and not self._running_direct
        if idle and self.direct:  # then the queue is empty too
            return await self._submit_direct(request)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Result] = loop.create_future()
        self._queue.append((request, future))
        if idle:
            self._writer = loop.create_task(self._write())
        # Cancelling the caller cancels the future: the writer then skips it
        # if its group has not started yet.
        return await future

    async def close(self) -> None:
        """Refuse new requests and wait until every queued one is answered."""
        self._closed = True
        # A direct run, ending, starts the writer for what queued behind it.
        while self._writer is not None or self._running_direct:
            if self._writer is not None:
                # Shielded: a cancelled close must not cancel the writer mid-group.
                await asyncio.shield(self._writer)
            else:
                if self._direct_done is None:
                    self._direct_done = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._direct_done)

    async def _submit_direct(self, request: _Request) -> _Result:
        """``request`` as a group of one, run on the caller's task.

        Cancelling the caller interrupts the runner: the request commits whole
        or not at all, as in a group. The queue is served once this run ends.
        """
        self._running_direct = True
        self._count([request])
        try:
            outcomes = await self._run([request])
        finally:
            self._running_direct = False
            if self._queue:
                self._writer = asyncio.get_running_loop().create_task(self._write())
            done, self._direct_done = self._direct_done, None
            if done is not None and not done.done():
                done.set_result(None)
        if len(outcomes) != 1:  # a runner's bug, never a caller's
            raise StoreError(f"Group commit answered {len(outcomes)} of 1")
        outcome = outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _write(self) -> None:
        """Run groups until the queue is empty; then end (the next submit starts another)."""
        try:
            while self._queue:
                group: list[tuple[_Request, asyncio.Future[_Result]]] = []
                while self._queue and len(group) < self.max_size:
                    item = self._queue.popleft()
                    if not item[1].done():  # a cancelled caller's request is dropped
                        group.append(item)
                if group:
                    await self._commit(group)
                if self.direct and not self._queue:
                    # Linger one turn: the callers just answered, appending again
                    # at once, queue here together instead of one running direct.
                    await asyncio.sleep(0)
        finally:
            self._writer = None
            # Only reached with requests queued when this task was cancelled
            # (the event loop is shutting down): answer them, never leave them hanging.
            while self._queue:
                _, future = self._queue.popleft()
                if not future.done():
                    future.set_exception(
                        StoreClosedError(f"Store was closed with this append queued: {self.name}")
                    )

    def _count(self, group: Sequence[object]) -> None:
        stats = self.stats
        stats.groups += 1
        stats.appends += len(group)
        stats.largest = max(stats.largest, len(group))

    async def _commit(self, group: list[tuple[_Request, asyncio.Future[_Result]]]) -> None:
        self._count(group)
        try:
            outcomes = await self._run([request for request, _ in group])
        except asyncio.CancelledError:
            # The writer itself was cancelled mid-group: the database may or may
            # not have committed it, and its callers must hear so.
            _fail(group, StoreError(f"Append interrupted, outcome unknown: {self.name}"))
            raise
        except BaseException as exc:
            _fail(group, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if len(outcomes) != len(group):  # a runner's bug, never a caller's
            _fail(group, StoreError(f"Group commit answered {len(outcomes)} of {len(group)}"))
            return
        for (_, future), outcome in zip(group, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def _fail(group: Sequence[tuple[object, asyncio.Future[_Result]]], error: BaseException) -> None:
    """Give every waiting caller of ``group`` the group's error, each its own copy."""
    for _, future in group:
        if not future.done():
            future.set_exception(_own_copy(error))


def _own_copy(error: BaseException) -> BaseException:
    """The same error as a new instance, so tracebacks do not pile up on one.

    Made without calling ``__init__``: the ledger's errors build their message
    from ids, and calling one again with its message would garble it.
    """
    clone = type(error).__new__(type(error), *error.args)
    clone.__dict__.update(error.__dict__)
    clone.__cause__, clone.__context__ = error.__cause__, error.__context__
    clone.__suppress_context__ = error.__suppress_context__
    return clone
