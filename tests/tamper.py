"""Tampering with an SQLite ledger file the way someone with write access to it could."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import msgspec

from ledger.events import (
    Event,
    canonical,
    compute_body_digest,
    compute_id,
    decode_event,
    encode_event,
)


def rows(path: Path, session_id: str) -> list[tuple[int, Event]]:
    """The session's (position, event) in append order."""
    with sqlite3.connect(path) as db:
        found = db.execute(
            "SELECT position, data FROM events WHERE session_id = ? ORDER BY position",
            (session_id,),
        ).fetchall()
    return [(position, decode_event(bytes(data))) for position, data in found]


def delete(path: Path, event_ids: list[str]) -> None:
    """Remove events (and point any head at a removed event back at its parent)."""
    with sqlite3.connect(path) as db:
        for event_id in event_ids:
            (data,) = db.execute("SELECT data FROM events WHERE id = ?", (event_id,)).fetchone()
            event = decode_event(bytes(data))
            db.execute("DELETE FROM events WHERE id = ?", (event_id,))
            if event.parent is None:
                continue
            db.execute("UPDATE heads SET head = ? WHERE head = ?", (event.parent, event_id))
        db.execute("DELETE FROM heads WHERE head NOT IN (SELECT id FROM events)")


def swap_positions(path: Path, first: str, second: str) -> None:
    """Exchange the append-order positions of two events."""
    with sqlite3.connect(path) as db:
        (a,) = db.execute("SELECT position FROM events WHERE id = ?", (first,)).fetchone()
        (b,) = db.execute("SELECT position FROM events WHERE id = ?", (second,)).fetchone()
        db.execute("UPDATE events SET position = -1 WHERE id = ?", (first,))
        db.execute("UPDATE events SET position = ? WHERE id = ?", (a, second))
        db.execute("UPDATE events SET position = ? WHERE id = ?", (b, first))


def readdress(event: Event, parent: str | None = None) -> Event:
    """The event with its digest and id recomputed (after a new parent or body)."""
    event = msgspec.structs.replace(event, parent=parent if parent else event.parent)
    digest = compute_body_digest(event.salt, canonical(event.body))
    event = msgspec.structs.replace(event, body_digest=digest)
    return msgspec.structs.replace(event, id=compute_id(event))


def forge_linear(path: Path, session_id: str, index: int, change: Callable[[Event], Event]) -> str:
    """Rewrite event ``index`` of a linear session and re-address every event after it,
    as a forger without the key would: every id and parent link checks again.
    Returns the forged event's new id."""
    events = [event for _, event in rows(path, session_id)]
    renamed: dict[str, str] = {}
    with sqlite3.connect(path) as db:
        for event in events[index:]:
            new = change(event) if event is events[index] else event
            new = readdress(new, renamed.get(event.parent or "", event.parent))
            renamed[event.id] = new.id
            db.execute(
                "UPDATE events SET id = ?, parent = ?, data = ? WHERE id = ?",
                (new.id, new.parent, encode_event(new), event.id),
            )
        for old, new_id in renamed.items():
            db.execute("UPDATE heads SET head = ? WHERE head = ?", (new_id, old))
    return renamed[events[index].id]


def anchors_table(path: Path, session_id: str) -> list[tuple[int, bytes]]:
    with sqlite3.connect(path) as db:
        found = db.execute(
            "SELECT n, data FROM anchors WHERE session_id = ? ORDER BY n", (session_id,)
        ).fetchall()
    return [(n, bytes(data)) for n, data in found]


def set_anchor(path: Path, n: int, data: bytes) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE anchors SET data = ? WHERE n = ?", (data, n))
