"""Projection snapshots: ``snapshots/<session-id>.snap``, appended, searched, never
kept in memory."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import mmap
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from ledger.errors import InvalidEventError
from stores.jsonl.files import _translate, _write_all
from stores.jsonl.format import _SESSION_ID, _SUFFIX

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore

log = logging.getLogger("stores.jsonl")


_SNAP_SUFFIX: Final = ".snap"


def drop_snapshots(store: JSONLStore, session_id: str) -> None:
    """A redaction changed what folds of this session see: its snapshot file goes."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(store._snapshots_dir / (session_id + _SNAP_SUFFIX))


async def put_snapshots(
    store: JSONLStore, session_id: str, key: str, states: Sequence[tuple[str, bytes]]
) -> None:
    store._check_open()
    if not states:
        return
    if not _SESSION_ID.fullmatch(session_id):
        raise InvalidEventError(f"Invalid session id for a snapshot: {session_id!r}")
    for event_id, _ in states:
        if "\n" in key or not event_id or any(c in event_id for c in " \n"):
            raise InvalidEventError(
                f"Invalid snapshot key for session {session_id!r}: {key!r}, {event_id!r}"
            )
    # "<event id> <projection key> <base64 state>\n" each; the write starts
    # with a newline, so a line left torn by a crash never swallows the next.
    lines = b"\n" + b"".join(
        b"%s %s %s" % (event_id.encode(), key.encode(), binascii.b2a_base64(bytes(state)))
        for event_id, state in states
    )
    with _translate(store._snapshots_dir, session_id):
        await asyncio.to_thread(write_snapshots, store, session_id, lines)


def write_snapshots(store: JSONLStore, session_id: str, lines: bytes) -> None:
    if not store._snapshots_dir.is_dir():
        store._snapshots_dir.mkdir(mode=0o700, exist_ok=True)
        store._snapshots_dir.chmod(0o700)
    path = store._snapshots_dir / (session_id + _SNAP_SUFFIX)
    # O_APPEND: the kernel places each write at the end, so the lines of
    # processes writing at once never overwrite one another.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, lines)
    finally:
        os.close(fd)
    # Written without the writers' lock: a purge may have removed the session
    # meanwhile, and its folded content must not outlive it here.
    if not (store._sessions_dir / (session_id + _SUFFIX)).exists():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def find_snapshot(store: JSONLStore, session_id: str, key: str, event_id: str) -> bytes | None:
    """The base64 state of the newest line for ``(key, event_id)`` in the session's file.

    A search of the mapped file, not an index of its lines: one lookup of a
    session with thousands of snapshots costs a fraction of a millisecond.
    """
    path = store._snapshots_dir / (session_id + _SNAP_SUFFIX)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_size == 0:
            return None
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
            prefix = b"%s %s " % (event_id.encode(), key.encode())
            at = data.rfind(b"\n" + prefix) + 1
            if at == 0 and data[: len(prefix)] != prefix:
                return None
            start = at + len(prefix)
            end = data.find(b"\n", start)
            # A line still being written (no newline yet) is not there yet.
            return data[start:end] if end >= 0 else None
    finally:
        os.close(fd)


async def get_snapshot(store: JSONLStore, session_id: str, key: str, event_id: str) -> bytes | None:
    store._check_open()
    if session_id not in store._sessions:
        return None
    # Nothing kept in memory: the file is searched each time (the fold
    # engine caches states), so any process's snapshots are seen.
    with _translate(store._snapshots_dir, session_id):
        encoded = find_snapshot(store, session_id, key, event_id)
    if encoded is None:
        return None
    try:
        return binascii.a2b_base64(encoded, strict_mode=True)
    except binascii.Error as exc:
        # Derived data: the fold engine rebuilds what it cannot find.
        log.warning(
            "Damaged snapshot ignored in %r: event %r, projection %r: %s",
            str(store._snapshots_dir / (session_id + _SNAP_SUFFIX)),
            event_id,
            key,
            exc,
        )
        return None
