"""Anchors: signed tree heads of a session's Merkle log, and the ledger's key.

A session's log is its events in append order, each leaf the 32 bytes of an
event id (``ledger.merkle``). Since an id commits to the event's header, its
body digest and its parent, the log's root commits to the whole tree of
branches *and* to the order events were appended in, which the hash chain
alone does not: a truncated tail, a removed branch or a reordering changes the
root. An anchor is that root at one size, with a MAC when the ledger has a key;
a user keeps anchors elsewhere, and a consistency proof later shows that the
session still extends them. Redaction keeps ids, so it keeps roots.

    mac    = blake3(key=key, canonical([format, session, size, root, at, key_id, heads]))
    key_id = blake3(key=key, "session-ledger key id").hex()[:16]

The key id is public: it names a key without revealing it, so that a check
under the wrong key says so instead of reporting a forgery. ``heads`` (each
branch's head at that size) lets a failed check name the branch or event that
is gone. (An anchor without a key id or heads is signed without them.)
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from typing import Annotated, Final, Literal

import blake3
import msgspec

from ledger.errors import AnchorError
from ledger.events import canonical
from ledger.merkle import MerkleLog

__all__ = [
    "ANCHOR_FORMAT",
    "KEY_SIZE",
    "Anchor",
    "MacStatus",
    "anchor_mac",
    "anchor_of",
    "check_anchor_mac",
    "decode_anchor",
    "describe",
    "encode_anchor",
    "key_id",
    "mac_matches",
    "make_anchor",
    "new_key",
    "session_log",
    "signed",
]

ANCHOR_FORMAT: Final = 1
KEY_SIZE: Final = 32
_KEY_ID_MESSAGE: Final = b"session-ledger key id"

_Hex64 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
_Hex16 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{16}$")]

MacStatus = Literal["ok", "unsigned", "unchecked"]
"""``ok``: the MAC matches under this ledger's key; ``unsigned``: the anchor has
none; ``unchecked``: it has one, but this ledger holds no key to check it."""


class Anchor(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A session's Merkle tree head at ``size`` events; ``mac`` is None without a key."""

    session: str
    size: Annotated[int, msgspec.Meta(ge=0)]
    root: _Hex64
    at: int
    mac: _Hex64 | None = None
    format: int = ANCHOR_FORMAT
    key_id: _Hex16 | None = None
    """The id of the key that made ``mac`` (see ``key_id``)."""
    heads: dict[str, _Hex64] | None = None
    """Each branch's head at ``size`` events: what verify names when one is gone."""


def new_key() -> bytes:
    """A new random 32-byte key (``ledger keygen``)."""
    return os.urandom(KEY_SIZE)


def key_id(key: bytes) -> str:
    """A short public name of a key: 16 hex digits of its MAC of a constant."""
    return blake3.blake3(_KEY_ID_MESSAGE, key=key).hexdigest()[:16]


def anchor_mac(anchor: Anchor, key: bytes) -> str:
    fields: list[object] = [anchor.format, anchor.session, anchor.size, anchor.root, anchor.at]
    if anchor.key_id is not None or anchor.heads is not None:
        fields.append(anchor.key_id)
    if anchor.heads is not None:
        fields.append(anchor.heads)
    return blake3.blake3(canonical(fields), key=key).hexdigest()


def mac_matches(anchor: Anchor, key: bytes) -> bool:
    return anchor.mac is not None and hmac.compare_digest(anchor.mac, anchor_mac(anchor, key))


def session_log(event_ids: Sequence[str]) -> MerkleLog:
    """The Merkle log of a session's events, given their ids in append order."""
    return MerkleLog(bytes.fromhex(event_id) for event_id in event_ids)


def make_anchor(session_id: str, event_ids: Sequence[str], *, key: bytes | None, at: int) -> Anchor:
    """The anchor of a session whose events, in append order, have these ids."""
    return anchor_of(session_id, session_log(event_ids), key=key, at=at)


def anchor_of(
    session_id: str,
    log: MerkleLog,
    *,
    key: bytes | None,
    at: int,
    size: int | None = None,
    heads: dict[str, str] | None = None,
) -> Anchor:
    """The anchor of the first ``size`` leaves (all of them by default) of a session's log,
    whose branch heads are then ``heads``."""
    size = log.size if size is None else size
    root = log.root(size).hex()
    return signed(Anchor(session=session_id, size=size, root=root, at=at, heads=heads), key)


def signed(anchor: Anchor, key: bytes | None) -> Anchor:
    """``anchor`` with the key's id and its MAC under ``key`` (as it is without a key)."""
    if key is None:
        return anchor
    anchor = msgspec.structs.replace(anchor, key_id=key_id(key))
    return msgspec.structs.replace(anchor, mac=anchor_mac(anchor, key))


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Anchor)


def encode_anchor(anchor: Anchor) -> bytes:
    return _encoder.encode(anchor)


def decode_anchor(data: bytes | str, *, source: str = "anchor") -> Anchor:
    """Parse an anchor; ``source`` (a file name, say) is named in the error.

    Raises:
        AnchorError: (``reason="format"``) not an anchor, or of an unknown format.
    """
    try:
        anchor = _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise AnchorError(f"Not an anchor: {source} ({exc})", reason="format") from None
    if anchor.format != ANCHOR_FORMAT:
        raise AnchorError(
            f"Unknown anchor format {anchor.format} in {source} (this code reads {ANCHOR_FORMAT})",
            reason="format",
        )
    if anchor.key_id is not None and anchor.mac is None:
        raise AnchorError(f"Anchor has a key id but no MAC: {source}", reason="format")
    return anchor


def describe(anchor: Anchor) -> str:
    """``anchor of session 's-1' at 12 events (root 3f2a9c1b04d5...)``: for messages."""
    return (
        f"anchor of session {anchor.session!r} at {anchor.size} events (root {anchor.root[:12]}...)"
    )


def check_anchor_mac(anchor: Anchor, key: bytes | None) -> MacStatus:
    """Check an anchor's MAC under ``key``; what could be checked, or an error.

    Raises:
        AnchorError: ``reason="key"`` the anchor names another key than ``key``;
            ``reason="mac"`` the MAC does not match: the anchor was altered or forged.
    """
    if anchor.mac is None:
        return "unsigned"
    if key is None:
        return "unchecked"
    mine = key_id(key)
    if anchor.key_id is not None and anchor.key_id != mine:
        raise AnchorError(
            f"Wrong key for {describe(anchor)}: it was signed with key {anchor.key_id}, "
            f"this ledger holds key {mine}",
            reason="key",
        )
    if not mac_matches(anchor, key):
        raise AnchorError(
            f"MAC does not match for {describe(anchor)}: the anchor was altered or forged "
            f"(checked under key {mine})",
            reason="mac",
        )
    return "ok"
