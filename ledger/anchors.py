"""Anchors: signed tree heads of a session's Merkle log.

A session's log is its events in append order, each leaf the 32 bytes of an
event id (``ledger.merkle``). Since an id commits to the event's header, its
body digest and its parent, the log's root commits to the whole tree of
branches *and* to the order events were appended in, which the hash chain
alone does not: a truncated tail, a removed branch or a reordering changes the
root. An anchor is that root at one size, with a MAC when the ledger has a key;
a user keeps anchors elsewhere, and a consistency proof later shows that the
session still extends them. Redaction keeps ids, so it keeps roots.

    mac = blake3(key=key, canonical([format, session, size, root, at]))
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Final

import blake3
import msgspec

from ledger.events import canonical
from ledger.merkle import MerkleLog

__all__ = ["ANCHOR_FORMAT", "Anchor", "anchor_mac", "mac_matches", "make_anchor", "session_log"]

ANCHOR_FORMAT: Final = 1


class Anchor(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A session's Merkle tree head at ``size`` events; ``mac`` is None without a key."""

    session: str
    size: int
    root: str
    at: int
    mac: str | None = None
    format: int = ANCHOR_FORMAT


def anchor_mac(anchor: Anchor, key: bytes) -> str:
    signed = canonical([anchor.format, anchor.session, anchor.size, anchor.root, anchor.at])
    return blake3.blake3(signed, key=key).hexdigest()


def mac_matches(anchor: Anchor, key: bytes) -> bool:
    return anchor.mac is not None and hmac.compare_digest(anchor.mac, anchor_mac(anchor, key))


def session_log(event_ids: Sequence[str]) -> MerkleLog:
    """The Merkle log of a session's events, given their ids in append order."""
    return MerkleLog(bytes.fromhex(event_id) for event_id in event_ids)


def make_anchor(session_id: str, event_ids: Sequence[str], *, key: bytes | None, at: int) -> Anchor:
    """The anchor of a session whose events, in append order, have these ids."""
    log = session_log(event_ids)
    anchor = Anchor(session=session_id, size=log.size, root=log.root().hex(), at=at)
    if key is None:
        return anchor
    return msgspec.structs.replace(anchor, mac=anchor_mac(anchor, key))
