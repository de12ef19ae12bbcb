"""Anchors: ``anchors/<session-id>.jsonl``, one line each, appended under the
writers' lock."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ledger.errors import IntegrityError, InvalidEventError
from stores.jsonl.files import _fsync_dir, _read_if_there, _translate
from stores.jsonl.format import _SESSION_ID, _SUFFIX

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore


def anchors_path(store: JSONLStore, session_id: str) -> Path:
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise InvalidEventError(
            f"Invalid session id for the JSONL store: {session_id!r} (a lower-case uuid4 string)"
        )
    return store.directory / "anchors" / (session_id + _SUFFIX)


async def put_anchor(store: JSONLStore, session_id: str, anchor: bytes) -> None:
    store._check_open()
    path = anchors_path(store, session_id)
    line = bytes(anchor)
    if b"\n" in line:
        raise InvalidEventError(f"Anchor of session {session_id!r} encodes with a newline")
    async with store._write_lock:
        store._check_open()
        with _translate(path, session_id):
            await asyncio.to_thread(put_anchor_sync, store, path, line + b"\n")


def put_anchor_sync(store: JSONLStore, path: Path, line: bytes) -> None:
    with store._locked():
        folder = path.parent
        if not folder.is_dir():
            folder.mkdir(mode=0o700, exist_ok=True)
            if store.fsync:
                _fsync_dir(folder.parent)
        new = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size:  # cut off a line a killed writer left without its newline
                tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
                if not tail.endswith(b"\n"):
                    cut = tail.rfind(b"\n")
                    if cut < 0 and size > len(tail):
                        raise IntegrityError(f"Damaged anchor file: {str(path)!r}")
                    size = size - len(tail) + cut + 1
                    os.ftruncate(fd, size)
            view = memoryview(line)
            while view:
                written = os.pwrite(fd, view, size)
                view, size = view[written:], size + written
            if store.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if new and store.fsync:
            _fsync_dir(folder)


async def anchors(store: JSONLStore, session_id: str) -> list[bytes]:
    store._check_open()
    path = anchors_path(store, session_id)
    with _translate(path, session_id):
        data = await asyncio.to_thread(_read_if_there, path)
    lines = data.split(b"\n")
    return lines[:-1]  # the last piece is empty, or a write still in flight
