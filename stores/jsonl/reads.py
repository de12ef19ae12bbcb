"""Reads of session lines: checked against the index, on the event loop when small."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ledger.errors import EventNotFoundError, IntegrityError, SessionNotFoundError
from ledger.events import Event
from stores.jsonl import catch_up, index
from stores.jsonl.files import _translate
from stores.jsonl.format import _STEPS, _damaged, _decode_page, _event, _Item, _json, _parse, _Step
from stores.jsonl.index import _Session

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore


_INLINE_BYTES: Final = 1 << 20
"""Reads up to this size run on the event loop (about a millisecond: a hop to a
worker thread and back costs more than that); bigger ones in a worker thread."""
_PATH_WINDOW: Final = 4096
"""Lines ``ancestors`` reads at once, ending at the next event of the path."""


def pread(store: JSONLStore, session: _Session, start: int, size: int, cache: bool) -> bytes:
    """``size`` bytes of the session file from ``start``; ``cache``: on the loop's thread."""
    fd = store._fds.get(session.session_id, -1) if cache else -1
    if fd >= 0:
        return os.pread(fd, size, start)
    try:
        fd = os.open(session.file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SessionNotFoundError(session.session_id) from None  # purged meanwhile
    try:
        return os.pread(fd, size, start)
    finally:
        os.close(fd)


def read_event(store: JSONLStore, session: _Session, k: int) -> Event:
    """Line ``k`` of ``session``, checked against the index."""
    start = session.starts[k]
    return decode(store, session, k, pread(store, session, start, session.ends[k] - start, False))


def decode(store: JSONLStore, session: _Session, k: int, line: bytes) -> Event:
    lineno = k + 2
    if len(line) != session.ends[k] - session.starts[k]:
        raise _damaged(session.path, lineno, "cut short", session.ids[k])
    parsed = _parse(line, session.path, lineno, session.version, _json(session.session_id))
    event = _event(parsed, session.path, lineno, session.ids[k - 1] if k else None)
    if event.id != session.ids[k] or event.session != session.session_id:
        raise _damaged(
            session.path,
            lineno,
            f"holds event {event.id!r} of session {event.session!r}, not {session.ids[k]!r}",
            session.ids[k],
        )
    return event


def read_range(
    store: JSONLStore, session: _Session, first: int, stop: int, cache: bool = False
) -> list[Event]:
    """Lines ``first`` to ``stop - 1`` of ``session``, with one read."""
    base = session.starts[first]
    data = pread(store, session, base, session.ends[stop - 1] - base, cache)
    return decode_range(store, data, session, first, stop)


def decode_range(
    store: JSONLStore, data: bytes, session: _Session, first: int, stop: int
) -> list[Event]:
    """Lines ``first`` to ``stop - 1`` of ``session``, read as ``data``."""
    events = _decode_page(data, session, first, stop)
    if events is not None:
        return events
    # Something is wrong: line by line, to name the line.
    starts, ends = session.starts, session.ends
    base = starts[first]
    return [
        decode(store, session, k, data[starts[k] - base : ends[k] - base])
        for k in range(first, stop)
    ]


def read_steps(
    store: JSONLStore, session: _Session, first: int, stop: int, cache: bool = False
) -> list[_Step]:
    """``(id, seq, parent)`` of lines ``first`` to ``stop - 1`` of ``session``, with
    one read: the id from the index, seq and parent from the start of the line,
    nothing decoded or checked (``ancestors`` checks what a fold reads)."""
    starts, ends, ids = session.starts, session.ends, session.ids
    base = starts[first]
    data = pread(store, session, base, ends[stop - 1] - base, cache)
    match = _STEPS[session.version].match
    steps: list[_Step] = []
    for k in range(first, stop):
        found = match(data, starts[k] - base)
        if found is None:  # not as this code writes lines: decode it, or name the damage
            event = decode(store, session, k, data[starts[k] - base : ends[k] - base])
            steps.append((event.id, event.seq, event.parent))
            continue
        if found[1] is None:  # left out (version 2): the event of the line before
            parent = ids[k - 1] if k else None
        else:
            parent = found[2].decode() if found[2] else None
        steps.append((ids[k], int(found[3]), parent))
    return steps


async def lines_between(
    store: JSONLStore,
    session: _Session,
    first: int,
    stop: int,
    read: Callable[[JSONLStore, _Session, int, int, bool], list[_Item]],
) -> list[_Item]:
    """``read`` of lines ``first`` to ``stop - 1``: on the event loop when small."""
    if stop <= first:
        return []
    with _translate(session):
        if session.ends[stop - 1] - session.starts[first] <= _INLINE_BYTES:
            return read(store, session, first, stop, True)
        return await asyncio.to_thread(read, store, session, first, stop, False)


async def events_between(
    store: JSONLStore, session: _Session, first: int, stop: int
) -> list[Event]:
    return await lines_between(store, session, first, stop, read_range)


async def path(
    store: JSONLStore,
    event_id: str,
    limit: int | None,
    read: Callable[[JSONLStore, _Session, int, int, bool], list[_Item]],
    parent_of: Callable[[_Item], str | None],
) -> list[_Item]:
    """``read``'s item for each event of the path from ``event_id`` back, newest
    first: ``limit`` of them, or all to the root."""
    await catch_up.refresh(store)
    if limit is not None and limit <= 0:
        return []
    found = index.find(store, event_id)
    if found is None:
        raise EventNotFoundError(event_id)
    session, k = found
    # A path is mostly a run of consecutive lines (a branch's events follow
    # one another): read windows of lines ending at the next event wanted,
    # and follow the parents through the index. Line numbers fall strictly
    # along the walk, so a damaged parent link cannot make it loop.
    ids = session.ids
    out: list[_Item] = []
    while True:
        want = _PATH_WINDOW if limit is None else min(limit - len(out), _PATH_WINDOW)
        first = max(0, k - want + 1)
        lines = await lines_between(store, session, first, k + 1, read)
        parents = list(map(parent_of, lines))
        if parents[1:] == list(map(ids.__getitem__, range(first, k))):
            # The whole window is one chain (the usual case): taken at once.
            out.extend(reversed(lines[1:]))
            k = first
        while True:
            out.append(lines[k - first])
            if len(out) == limit:
                return out
            parent = parent_line(store, session, k, parents[k - first])
            if parent is None:
                return out
            k = parent
            if k < first:
                break


def parent_line(store: JSONLStore, session: _Session, k: int, parent_id: str | None) -> int | None:
    """The line of ``parent_id``, the parent of line ``k``: None at the root;
    IntegrityError when it is not an earlier line of the session."""
    if parent_id is None:
        return None
    if k and session.ids[k - 1] == parent_id:  # the usual: the line before
        return k - 1
    found = index.find(store, parent_id)
    if found is None or found[0] is not session or found[1] >= k:
        child = session.ids[k]
        raise IntegrityError(
            f"Parent of event {child!r} is missing from {str(session.path)!r}: {parent_id!r}",
            child,
        )
    return found[1]
