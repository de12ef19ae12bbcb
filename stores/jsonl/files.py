"""OS-level helpers of the JSONL store: the one place ``OSError`` is translated,
reading lines, writing whole buffers, syncing directories."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Final

from ledger.errors import StoreClosedError, StoreError

if TYPE_CHECKING:
    from stores.jsonl.index import _Session

_CHUNK: Final = 1 << 22


class _translate:  # lower case: used as a function, ``with _translate(path):``
    """Turn every ``OSError`` raised inside the block into the ledger's ``StoreError``.

    A class, not a generator: it wraps every read, and costs a fifth as much.
    """

    __slots__ = ("session_id", "where")

    def __init__(self, where: str | Path | _Session, session_id: str | None = None) -> None:
        self.where = where  # a session: its file, whose ``Path`` is made only on an error
        self.session_id = session_id

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, OSError):
            session_id = self.session_id
            if isinstance(self.where, str | PurePath):
                where = str(self.where)
            else:
                where, session_id = str(self.where.path), self.where.session_id
            what = f" (session {session_id!r})" if session_id else ""
            if exc.errno == errno.EBADF:
                raise StoreClosedError(f"Store was closed: {where!r}") from None
            raise StoreError(f"I/O error on {where!r}{what}: {exc}") from None


def _lines(fd: int, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` for each line from ``start``; a last line cut short has no newline."""
    offset = start
    pending: list[bytes] = []
    while chunk := os.pread(fd, _CHUNK, offset + sum(map(len, pending)) if pending else offset):
        begin = 0
        while True:
            nl = chunk.find(b"\n", begin)
            if nl < 0:
                pending.append(chunk[begin:])
                break
            piece = chunk[begin : nl + 1]
            if pending:
                pending.append(piece)
                piece = b"".join(pending)
                pending = []
            yield offset, piece
            offset += len(piece)
            begin = nl + 1
            if begin == len(chunk):
                break
        pending = [p for p in pending if p]
    if pending:
        yield offset, b"".join(pending)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_if_there(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _size(fd: int) -> int:
    """The size of an ``O_APPEND`` file read only with ``pread``: ``fstat``'s answer without
    its stat result to build (a third of the cost), and moving the offset changes nothing."""
    return os.lseek(fd, 0, os.SEEK_END)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _commit_file(path: Path, data: bytes, directory: Path) -> None:
    """Put ``data`` at ``path`` whole or not at all, durably: a synced temporary
    file renamed into place, then the directory synced."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(directory)


def _clock_tick(fd: int) -> int:
    """The file system's clock (a modification time set now), once it has ticked.

    Waits for the coarse clock to move on (a few milliseconds at most), so a
    file changed before the call has an older time than any change after it.
    """
    os.utime(fd)
    first = os.fstat(fd).st_mtime_ns
    deadline = time.monotonic() + 0.05
    while True:
        os.utime(fd)
        now = os.fstat(fd).st_mtime_ns
        if now > first or time.monotonic() > deadline:
            return now
        time.sleep(0.001)
