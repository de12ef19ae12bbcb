"""A session's lines as the index holds them, read in another process (the verify
worker's reader)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from ledger.errors import IntegrityError
from ledger.events import Event
from stores.jsonl import catch_up
from stores.jsonl.format import _damaged, _decode_page
from stores.jsonl.index import _Session

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore


class SessionLines(msgspec.Struct, frozen=True, kw_only=True):
    """A run of a session file's lines as the index holds them (``session_lines``): the
    line before the run (the parent of a version 2 line that leaves its own out), then
    the run. ``starts`` and ``ends`` are ``array("q")`` bytes, one per line."""

    path: str
    version: int
    session: str
    first: int
    """The index of the line before the run in the file (line 0: its first event)."""
    starts: bytes
    ends: bytes
    ids: list[str]


def read_session_lines(lines: SessionLines, page_size: int) -> Iterator[list[Event]]:
    """The events of the run of ``lines`` (all but its first line), ``page_size`` at a
    time, each line checked against the index as the store's own reads check it.

    Raises:
        IntegrityError: a page that does not read as the index says (the store's
            own read names the line).
    """
    session = _Session(lines.session, Path(lines.path).parent)
    session._path = Path(lines.path)
    session.version = lines.version
    session.starts.frombytes(lines.starts)
    session.ends.frombytes(lines.ends)
    session.ids = dict(enumerate(lines.ids))
    count = len(session.ids)
    if len(session.starts) != count or len(session.ends) != count:
        raise IntegrityError(
            f"Not a run of lines of {lines.path!r}: {count} ids, {len(session.starts)} lines"
        )
    fd = os.open(lines.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for first in range(1, count, max(1, page_size)):
            stop = min(count, first + page_size)
            base = session.starts[first]
            data = os.pread(fd, session.ends[stop - 1] - base, base)
            events = _decode_page(data, session, first, stop)
            if events is None:
                raise _first_damaged(lines, session, data, first, stop)
            yield events
    finally:
        os.close(fd)


def _first_damaged(
    lines: SessionLines, session: _Session, data: bytes, first: int, stop: int
) -> IntegrityError:
    """The error naming the first line of a page (``data``) that does not read as the index says."""
    base = session.starts[first]
    for k in range(first, stop):
        line = data[session.starts[k] - base : session.ends[k] - base]
        if _decode_page(line, session, k, k + 1) is None:
            break
    lineno = lines.first + k + 2  # the file's header is line 1
    return _damaged(lines.path, lineno, "not the event the index names there", session.ids[k])


async def session_lines(store: JSONLStore, session_id: str, start: int) -> SessionLines | None:
    await catch_up.refresh(store)
    session = store._sessions.get(session_id)
    upper = len(session.ids) if session is not None else 0
    if session is None or not 1 <= start < upper:
        return None
    ids = session.ids
    return SessionLines(
        path=str(session.path),
        version=session.version,
        session=session_id,
        first=start - 1,
        starts=session.starts[start - 1 : upper].tobytes(),
        ends=session.ends[start - 1 : upper].tobytes(),
        ids=[ids[k] for k in range(start - 1, upper)],
    )
