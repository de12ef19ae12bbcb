"""The in-memory index: one ``_Session`` per session (where its lines are, its
heads, keys and listing row), and the store-wide maps that find an event."""

from __future__ import annotations

import array
import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec

from ledger.events import SessionCreated
from stores.base import OPEN_STATUSES, SessionRow
from stores.jsonl import snapshots
from stores.jsonl.format import _SUFFIX, FORMAT_VERSION, _damaged, _Head

if TYPE_CHECKING:
    from stores.jsonl.store import JSONLStore


_LINE_BITS: Final = 40
_LINE_MASK: Final = (1 << _LINE_BITS) - 1


class _Session:
    """One session's index: where its lines are, its heads, keys and listing row."""

    __slots__ = (
        "_path",
        "agent",
        "create_key",
        "created_at",
        "ends",
        "folder",
        "heads",
        "ids",
        "keys",
        "last_at",
        "number",
        "session_id",
        "starts",
        "status",
        "user_id",
        "version",
    )

    def __init__(self, session_id: str, folder: Path) -> None:
        self.session_id = session_id
        self.folder = folder
        self._path: Path | None = None
        self.starts = array.array("q")
        self.ends = array.array("q")
        # line index -> event id: a dict of ints and strings, which the garbage
        # collector does not track (a list it would scan at every full collection)
        self.ids: dict[int, str] = {}
        self.heads: dict[str, str] = {}
        self.keys: dict[str, int] = {}
        self.user_id = ""
        self.agent = ""
        self.status = "active"
        self.created_at = 0
        self.last_at = 0
        self.create_key: str | None = None
        self.number = -1  # in ``JSONLStore._numbered``, once indexed
        self.version = FORMAT_VERSION  # of its file

    @property
    def path(self) -> Path:
        """The session file (made on first use: opening a store makes many sessions)."""
        if self._path is None:
            self._path = self.folder / (self.session_id + _SUFFIX)
        return self._path

    @property
    def file(self) -> str:
        """``path`` as a string, for the OS: cheaper to make than a ``Path`` (a read of
        the feed opens many sessions' files once each)."""
        if self._path is None:
            return f"{self.folder}/{self.session_id}{_SUFFIX}"
        return str(self._path)

    @property
    def size(self) -> int:
        return self.ends[-1] if self.ends else 0

    def row(self) -> SessionRow:
        return SessionRow(
            session_id=self.session_id,
            user_id=self.user_id,
            agent=self.agent,
            status=self.status,
            created_at=self.created_at,
            last_activity_at=self.last_at,
            event_count=len(self.ids),
        )


class _Pending(msgspec.Struct):
    """A line read from a file, checked, waiting for the rest of its batch."""

    start: int
    end: int
    pos: int
    status: str | None
    head: _Head
    root: SessionCreated | None


def _bisect(starts: array.array[int], offset: int) -> int:
    """The index of ``offset`` in the sorted ``starts``, or -1."""
    k = bisect.bisect_left(starts, offset)
    return k if k < len(starts) and starts[k] == offset else -1


def forget_all(store: JSONLStore) -> None:
    """Empty the index (before a full scan, after a saved index was not usable)."""
    store._sessions.clear()
    store._by_id.clear()
    store._numbered.clear()
    store._created.clear()
    store._open_count.clear()
    store._purged.clear()
    store._n = 0


def apply(
    store: JSONLStore, session: _Session, batch: Sequence[_Pending], first_lineno: int
) -> None:
    """Index a complete batch of ``session`` (caller holds ``_sync``)."""
    for lineno, p in enumerate(batch, first_lineno):
        head = p.head
        if head.session != session.session_id:
            raise _damaged(session.path, lineno, f"event of session {head.session!r}", head.id)
        if head.id in store._by_id:
            raise _damaged(session.path, lineno, f"event {head.id!r} appears twice", head.id)
    was_open = bool(session.ids) and session.status in OPEN_STATUSES
    old_key = (session.last_at, session.session_id) if session.ids else None
    if session.number < 0:
        session.number = len(store._numbered)
        store._numbered.append(session)
    where = session.number << _LINE_BITS
    for p in batch:
        head = p.head
        k = len(session.ids)
        session.ids[k] = head.id
        session.ends.append(p.end)
        session.starts.append(p.start)
        store._by_id[head.id] = where | k
        session.heads[head.branch] = head.id
        if head.idempotency_key is not None:
            session.keys.setdefault(head.idempotency_key, k)
        if p.root is not None:
            session.user_id, session.agent = p.root.user_id, p.root.agent
            session.created_at = session.last_at = head.at
            session.create_key = head.idempotency_key
            if head.idempotency_key is not None:
                store._created.setdefault((p.root.user_id, head.idempotency_key), (session, k))
        session.last_at = max(session.last_at, head.at)
    if store._ordered:
        reorder(store, old_key, (session.last_at, session.session_id))
    status = batch[-1].status
    if status is not None:
        session.status = status
    now_open = session.status in OPEN_STATUSES
    if now_open != was_open:
        user = session.user_id
        store._open_count[user] = store._open_count.get(user, 0) + (1 if now_open else -1)


def reorder(store: JSONLStore, old: tuple[int, str] | None, new: tuple[int, str]) -> None:
    """Move a session's key in ``_order`` (``old`` None: a new session)."""
    if old == new:
        return
    order = store._order
    if old is not None:
        del order[bisect.bisect_left(order, old)]
    bisect.insort(order, new)


def forget(store: JSONLStore, session_id: str) -> None:
    """Drop a purged session from the index (holds ``_sync``)."""
    session = store._sessions.pop(session_id, None)
    if session is None:
        return
    for event_id in session.ids.values():
        store._by_id.pop(event_id, None)
    created = (session.user_id, session.create_key or "")
    if store._created.get(created, (None, 0))[0] is session:
        del store._created[created]
    if session.status in OPEN_STATUSES:
        store._open_count[session.user_id] -= 1
    del store._order[bisect.bisect_left(store._order, (session.last_at, session_id))]
    # its number is never handed out again; an empty entry frees its index
    store._numbered[session.number] = _Session(session_id, store._sessions_dir)
    snapshots.drop_snapshots(store, session_id)
    store._stale.add(session_id)


def find(store: JSONLStore, event_id: str) -> tuple[_Session, int] | None:
    where = store._by_id.get(event_id)
    if where is None:
        return None
    return store._numbered[where >> _LINE_BITS], where & _LINE_MASK
