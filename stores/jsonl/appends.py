"""Appends: the checks under the writers' lock, on the event loop's thread when it
pays."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ledger.errors import (
    BranchExistsError,
    InvalidEventError,
    SessionCapacityError,
    SessionNotFoundError,
)
from ledger.events import Event, SessionCreated, validate_name
from stores.base import AppendRequest, AppendResult, check_head, validate_request
from stores.jsonl import catch_up, erase, reads, retention, write
from stores.jsonl.files import _translate
from stores.jsonl.format import _SESSION_ID, _STATUSES, _stored
from stores.jsonl.reads import _INLINE_BYTES
from stores.jsonl.write import _SYNC_WINDOW

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore


async def append(store: JSONLStore, request: AppendRequest) -> AppendResult:
    store._check_open()
    validate_request(request)
    session_id = request.session_id
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise InvalidEventError(
            f"Invalid session id for the JSONL store: {session_id!r} (a lower-case uuid4 string)"
        )
    validate_name("branch", request.branch, session_id)
    if request.status is not None and request.status not in _STATUSES:
        raise InvalidEventError(
            f"Invalid status for session {session_id!r}: {request.status!r} "
            f"(one of {', '.join(sorted(_STATUSES))})"
        )
    # As a new file's lines hold them, each after its parent's line; the
    # writer redoes the first if its parent is not the file's last line.
    payloads = [_stored(e) for e in request.events]
    for payload in payloads:
        if b"\n" in payload:  # msgspec escapes control characters; be sure
            raise InvalidEventError(f"Event of session {session_id!r} encodes with a newline")
    inline, original = False, None
    if not store._write_lock.locked():
        # No append or close of this store is under way, and an inline append runs
        # to its end without awaiting: no task can come in between, so the lock
        # need not be taken (~5,000 instructions of an append's ~120,000).
        inline, original = try_inline(store, request, payloads)
    if not inline:
        async with store._write_lock:
            store._check_open()
            inline, original = try_inline(store, request, payloads)
            if not inline:
                original = await asyncio.to_thread(append_sync, store, request, payloads)
    if original is not None:
        return AppendResult([original], replayed=True)
    if store._appended is not None:
        store._appended.set()
        store._appended = None
    return AppendResult(list(request.events))


def try_inline(
    store: JSONLStore, request: AppendRequest, payloads: list[bytes]
) -> tuple[bool, Event | None]:
    """Append on the event loop's thread when it pays and the writers' lock is free at
    once: whether it did, and the original event of a replay."""
    if (
        store._slow_count > _SYNC_WINDOW // 2
        or sum(map(len, payloads)) > _INLINE_BYTES
        or request.erase
    ):
        return False, None
    with _translate(store.directory, request.session_id):
        if not store._try_lock():
            return False, None
        try:
            return True, append_locked(store, request, payloads, cache=True)
        finally:
            store._unlock()


def append_sync(store: JSONLStore, request: AppendRequest, payloads: list[bytes]) -> Event | None:
    with _translate(store.directory, request.session_id), store._locked():
        return append_locked(store, request, payloads, cache=False)


def append_locked(
    store: JSONLStore, request: AppendRequest, payloads: list[bytes], *, cache: bool
) -> Event | None:
    """Check and write the batch (holds the lock); the original event of a replay.

    ``cache``: running on the event loop's thread, which alone may use
    (and change) the cache of open session files.
    """
    session_id = request.session_id
    retention.finish_purge(store)
    catch_up.catch_up(store)
    catch_up.repair_intent(store)
    first = request.events[0]
    created = first.body if isinstance(first.body, SessionCreated) else None
    session = store._sessions.get(session_id)
    key = first.idempotency_key
    if key is not None:
        found = (
            store._created.get((created.user_id, key))
            if created is not None
            else (session, session.keys[key])
            if session is not None and key in session.keys
            else None
        )
        if found is not None:
            return reads.read_event(store, *found)
    if created is not None:
        limit = request.max_open_sessions
        if limit is not None and store._open_count.get(created.user_id, 0) >= limit:
            raise SessionCapacityError(f"user {created.user_id!r}", "open sessions", limit)
    elif session is None:
        raise SessionNotFoundError(session_id)
    check_head(request, session.heads.get(request.branch) if session else None)
    if created is not None and session is not None:
        raise BranchExistsError(session_id, request.branch, None)
    if (
        session is not None
        and request.expected_head is None
        and request.max_branches is not None
        and len(session.heads) >= request.max_branches
    ):
        raise SessionCapacityError(f"session {session_id!r}", "branches", request.max_branches)
    if request.erase:
        assert session is not None
        erase.erase_locked(store, request, session, payloads, cache)
        return None
    write.write_batch(store, request, session, payloads, cache)
    return None
