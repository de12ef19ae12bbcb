"""Reading the global feed: positions in commit order, purged ones skipped."""

from __future__ import annotations

import array
import asyncio
import bisect
import contextlib
import itertools
import os
from typing import TYPE_CHECKING

from ledger.errors import SessionNotFoundError
from stores.base import FeedItem
from stores.jsonl import catch_up, purge_log, reads
from stores.jsonl.feed_log import _REC, _RECORD, _record_fields
from stores.jsonl.files import _translate
from stores.jsonl.format import _damaged, _decode_pages, _Page
from stores.jsonl.index import _bisect, _Session
from stores.jsonl.reads import _INLINE_BYTES

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore


async def read_feed(store: JSONLStore, after: int = 0, limit: int = 1000) -> list[FeedItem]:
    await catch_up.refresh(store)
    items: list[FeedItem] = []
    position = max(after, 0)
    # Purged sessions leave gaps: read on past them until ``limit`` items.
    while len(items) < limit and position < store._n:
        stop = min(store._n, position + limit - len(items))
        for attempt in range(3):
            try:
                items.extend(await feed_between(store, position, stop))
                break
            except SessionNotFoundError:
                # A session file went between the record's read and the line's: a
                # purge, which tombstoned the records first; read them again.
                if attempt == 2:
                    raise
        position = stop
    return items


async def feed_between(store: JSONLStore, after: int, stop: int) -> list[FeedItem]:
    """The events at positions ``after + 1`` to ``stop``, less the purged ones."""
    with _translate(store._feed_path):
        data = os.pread(store._feed_fd, (stop - after) * _REC, (after + 1) * _REC)
    runs = feed_runs(store, after, data)
    if runs is None:
        runs = feed_runs_checked(store, after, data)
    if sum(s.ends[first + len(p) - 1] - s.starts[first] for s, first, p in runs) <= _INLINE_BYTES:
        return feed_inline(store, runs)
    items: list[FeedItem] = []
    for session, first, positions in runs:  # a large page: run by run, each where it fits
        events = await reads.events_between(store, session, first, first + len(positions))
        items.extend(map(FeedItem, positions, events))
    return items


def feed_inline(store: JSONLStore, runs: list[tuple[_Session, int, range]]) -> list[FeedItem]:
    """The events of ``runs`` (a page small enough to read on the event loop), all
    decoded at once: a feed of many sessions' lines reads as fast as one session's."""
    pages: list[_Page] = []
    for session, first, positions in runs:
        stop = first + len(positions)
        base = session.starts[first]
        with _translate(session):
            data = reads.pread(store, session, base, session.ends[stop - 1] - base, True)
        pages.append((data, session, first, stop))
    events = _decode_pages(pages) if pages else []
    if events is None:  # something is wrong: run by run, to name the line
        events = [e for page in pages for e in reads.decode_range(store, *page)]
    return list(map(FeedItem, itertools.chain.from_iterable(run[2] for run in runs), events))


def feed_runs(
    store: JSONLStore, after: int, data: bytes
) -> list[tuple[_Session, int, range]] | None:
    """``data``'s records as runs of consecutive lines of one session, or None.

    The fast path, for records that are all well formed, at their
    positions, and name indexed lines: anything else (a tombstone, a purged
    session, damage) returns None, and ``feed_runs_checked`` takes it.
    """
    fields = _record_fields(data)
    if fields is None:
        return None
    count = len(fields) // 4
    if list(map(int, fields[0::4])) != list(range(after + 1, after + 1 + count)):
        return None
    offsets = array.array("q", map(int, fields[2::4]))
    runs: list[tuple[_Session, int, range]] = []
    i = 0
    for raw_id, same in itertools.groupby(fields[1::4]):
        n = len(list(same))
        session = store._sessions.get(raw_id.decode())
        if session is None:
            return None
        starts = session.starts
        first = bisect.bisect_left(starts, offsets[i])
        # every record names the next line of the session
        if starts[first : first + n] != offsets[i : i + n]:
            return None
        runs.append((session, first, range(after + 1 + i, after + 1 + i + n)))
        i += n
    return runs


def feed_runs_checked(
    store: JSONLStore, after: int, data: bytes
) -> list[tuple[_Session, int, range]]:
    """``feed_runs`` record by record: skips purged positions, names a damaged record."""
    runs: list[tuple[_Session, int, range]] = []
    for i in range(len(data) // _REC):
        pos = after + 1 + i
        raw = data[i * _REC : (i + 1) * _REC]
        rec = _RECORD.fullmatch(raw)
        session = store._sessions.get(rec[2].decode()) if rec else None
        k = -1
        if rec is not None and session is not None and int(rec[1]) == pos:
            k = _bisect(session.starts, int(rec[3]))
        if session is None or k < 0:
            if purge_log.gone(store, pos, raw):
                continue
            raise _damaged(store._feed_path, pos + 1, "does not match the session files")
        if runs:
            last, first, positions = runs[-1]
            if last is session and first + len(positions) == k and positions[-1] + 1 == pos:
                runs[-1] = (session, first, range(positions[0], pos + 1))
                continue
        runs.append((session, k, range(pos, pos + 1)))
    return runs


async def wait_for_feed(store: JSONLStore, after: int, max_wait: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, max_wait)
    while True:
        appended = store._appended
        if appended is None:
            appended = store._appended = asyncio.Event()
        await catch_up.refresh(store)
        remaining = deadline - loop.time()
        if store._n > after or remaining <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(appended.wait(), min(remaining, store.poll_interval))
