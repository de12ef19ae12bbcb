"""The second process of a parallel ``verify``: each event's digest and id, and the Merkle log.

Run as ``python -m ledger.verify_worker [--log]`` by ``ledger.verify``, which
writes chunks of encoded events to its stdin and reads one answer per chunk
from its stdout. A plain subprocess rather than ``multiprocessing``: nothing of
the caller's ``__main__`` is imported again, so any script can verify.

Request: an 8-byte big-endian length, then that many bytes: a JSON array of
events encoded canonically (``encode_request``), so that each body's bytes are
the very bytes its digest covers; length 0 ends. Answer: one byte (1: every
event verifies on its own, 0: one does not), one byte the number of Merkle
levels, then each level as an 8-byte length and its bytes: with ``--log``, the
hashes of the complete subtrees of the chunk's ids (a chunk starts at a
multiple of a power of two, so they are subtrees of the session's log), else
none.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO

import blake3
import msgspec

from ledger.events import (
    _SALT,
    FORMAT_VERSION,
    Erased,
    Event,
    canonical,
    event_problem,
)
from ledger.merkle import MerkleLog

__all__ = [
    "Envelope",
    "check_chunk",
    "check_events",
    "encode_request",
    "main",
    "read_answer",
    "sound_id",
]

_blake3 = blake3.blake3
_encode_canonical = msgspec.json.Encoder(order="deterministic").encode


class Envelope(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, gc=False):
    """An event as the worker reads it: the envelope, and the body left as its JSON bytes."""

    id: str
    session: str
    parent: str | None
    seq: int
    branch: str
    at: int
    actor: str
    body: msgspec.Raw
    body_digest: str
    salt: str
    idempotency_key: str | None = None
    format: int = FORMAT_VERSION


_decode_envelopes = msgspec.json.Decoder(list[Envelope]).decode
_decode_events = msgspec.json.Decoder(list[Event]).decode


def sound_id(event: Event | Envelope, kind: str, body: bytes) -> bytes | None:
    """The event's id (bytes) when it verifies on its own, else None: ``event_problem``'s
    checks of an event whose body is not ``Erased``, given the body's kind and its
    canonical bytes (whatever form the body itself has)."""
    if event.format != FORMAT_VERSION or not _SALT.fullmatch(event.salt):
        return None
    if _blake3(bytes.fromhex(event.salt) + body).hexdigest() != event.body_digest:
        return None
    header = canonical(
        [
            event.format,
            event.session,
            event.parent,
            event.seq,
            event.branch,
            event.at,
            event.actor,
            kind,
            event.idempotency_key,
            event.body_digest,
        ]
    )
    digest = _blake3(header).digest()
    return digest if digest.hex() == event.id else None


def check_events(events: Sequence[Event], log: bool) -> tuple[bool, list[bytes]]:
    """Do these events verify on their own? And (``log``) the Merkle levels of their ids.

    The answer the worker gives for the same events: the caller checks some chunks itself.
    """
    ids = []
    for event in events:
        body = event.body
        if type(body) is Erased:
            if event_problem(event) is not None:
                return False, []
            ids.append(bytes.fromhex(event.id))
            continue
        leaf = sound_id(event, type(body).__name__, canonical(body))
        if leaf is None:
            return False, []
        ids.append(leaf)
    return True, _levels(ids) if log else []


def check_chunk(blob: bytes | bytearray, log: bool) -> tuple[bool, list[bytes]]:
    """``check_events`` of a request's events (a JSON array, as ``encode_request`` writes it).

    Each body is digested as the bytes it came in, which are canonical; an erased
    body (rare) makes the whole chunk decode again as events, for ``event_problem``.
    """
    ids = []
    for envelope in _decode_envelopes(blob):
        body = bytes(envelope.body)
        kind = body[9 : body.index(b'"', 9)].decode()  # the tag comes first: {"kind":"..."
        leaf = sound_id(envelope, kind, body) if kind != "Erased" else None
        if leaf is None:
            return check_events(_decode_events(blob), log)  # exactly event_problem's verdict
        ids.append(leaf)
    return True, _levels(ids) if log else []


def _levels(ids: list[bytes]) -> list[bytes]:
    return [bytes(level) for level in MerkleLog.from_leaves(b"".join(ids)).levels]


def encode_request(events: Sequence[Event]) -> bytes:
    """One request of these events (none: the request that ends the worker).

    Canonical encoding: the bytes of each body are ``canonical(body)``, what its digest covers.
    """
    if not events:
        return bytes(8)
    blob = _encode_canonical(events)
    return len(blob).to_bytes(8, "big") + blob


def _answer(ok: bool, levels: list[bytes]) -> bytes:
    parts = [bytes([int(ok), len(levels)])]
    for level in levels:
        parts += [len(level).to_bytes(8, "big"), level]
    return b"".join(parts)


def read_answer(stream: IO[bytes]) -> tuple[bool, list[bytes]] | None:
    """One answer from the worker's stdout; None at its end (raises ``EOFError`` if cut)."""
    head = stream.read(2)
    if not head:
        return None
    if len(head) != 2:
        raise EOFError("the worker closed its stdout in the middle of an answer")
    levels = [_read(stream, int.from_bytes(_read(stream, 8), "big")) for _ in range(head[1])]
    return bool(head[0]), levels


def _read(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the other process closed the pipe")
    return data


def main() -> None:
    log = "--log" in sys.argv[1:]
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        size = int.from_bytes(_read(source, 8), "big")
        if size == 0:
            return
        sink.write(_answer(*check_chunk(_read(source, size), log)))
        sink.flush()


if __name__ == "__main__":
    main()
