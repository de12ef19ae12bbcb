"""Redaction: erased lines rewritten in place, through a redo file."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import orjson

from ledger.errors import IntegrityError, StoreError
from ledger.events import Event, encode_event
from stores.base import AppendRequest, check_erase
from stores.jsonl import index, reads, snapshots, write
from stores.jsonl.files import _commit_file
from stores.jsonl.format import _LINE, _damaged, _stored
from stores.jsonl.index import _bisect, _Session

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore


def erase_locked(
    store: JSONLStore, request: AppendRequest, session: _Session, payloads: list[bytes], cache: bool
) -> None:
    """Append the batch and overwrite the erased events' lines (holds the lock).

    Each new line is padded with spaces to the old one's length, so every
    offset (``feed.log``, every process's index) stays right and no file is
    replaced under another process's open descriptor. The new lines go
    first to ``redact.redo`` (synced), then the batch is appended (its
    commit point), then the lines are written in place and synced, then the
    redo file is removed. A crash in between is finished at the next open
    or redaction: the redo is applied if the batch committed, dropped if not.
    """
    finish_erase(store)
    lines: list[tuple[int, bytes]] = []
    for erased in request.erase:
        found = index.find(store, erased.id)
        stored = reads.read_event(store, *found) if found is not None else None
        check_erase(request, stored, erased)
        assert found is not None
        lines.append(erased_line(store, found[0], found[1], erased))
    redo = orjson.dumps(
        {
            "session": session.session_id,
            "batch": request.events[-1].id,
            "lines": [[offset, line.decode()] for offset, line in lines],
        }
    )
    _commit_file(store._redo_path, redo, store.directory)
    write.write_batch(store, request, session, payloads, cache)
    finish_erase(store)


def erased_line(store: JSONLStore, session: _Session, k: int, erased: Event) -> tuple[int, bytes]:
    """Line ``k``'s offset and its redacted form, padded to the old line's length."""
    start, end = session.starts[k], session.ends[k]
    old = reads.pread(store, session, start, end - start, False)
    lineno = k + 2
    match = _LINE.match(old)
    if match is None:
        raise _damaged(session.path, lineno, "not an event line of this format", erased.id)
    line = old[: match.end()] + (encode_event if session.version == 1 else _stored)(erased)
    pad = len(old) - len(line) - 2
    if pad < 0:  # an Erased body and no salt are always shorter; be sure
        raise StoreError(f"Redacted line is longer than {erased.id!r} in {str(session.path)!r}")
    return start, line + b" " * pad + b"}\n"


def finish_erase(store: JSONLStore) -> None:
    """Apply ``redact.redo`` if its batch committed, then remove it (holds the lock)."""
    try:
        redo = orjson.loads(store._redo_path.read_bytes())
    except FileNotFoundError:
        return
    except orjson.JSONDecodeError:
        redo = None  # written whole before its rename: never half there
    session = store._sessions.get(redo["session"]) if isinstance(redo, dict) else None
    if session is not None and redo["batch"] in store._by_id:
        fd = os.open(session.path, os.O_WRONLY | os.O_CLOEXEC)  # no O_APPEND: pwrite
        try:
            for offset, line in redo["lines"]:
                data = line.encode()
                k = _bisect(session.starts, offset)
                if k < 0 or session.ends[k] - offset != len(data):
                    raise IntegrityError(
                        f"{str(store._redo_path)!r} names no line at byte {offset} "
                        f"of {str(session.path)!r}"
                    )
                os.pwrite(fd, data, offset)
            if store.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        snapshots.drop_snapshots(store, session.session_id)
    os.unlink(store._redo_path)
