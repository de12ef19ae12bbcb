"""The event model: bodies, the envelope, canonical encoding and content addressing.

An event's id commits to everything about it and to its whole ancestry::

    body_digest = blake3(salt || canonical(body))
    id          = blake3(canonical(header))
    header      = [format, session, parent, seq, branch, at, actor, kind,
                   idempotency_key, body_digest]

Canonical means msgspec JSON with deterministic key order and default values
omitted, so adding a field with a default to a body (msgspec's schema-evolution
rule) leaves every earlier digest unchanged. The salt lets a redaction erase a
body while its digest, and so every id after it, still verifies.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import threading
import uuid
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Final

import blake3
import msgspec
import zstandard

from ledger.errors import (
    AlreadyRedactedError,
    EventNotRedactableError,
    EventTooLargeError,
    InvalidEventError,
)

__all__ = [
    "ENVELOPE_BYTES",
    "FORMAT_VERSION",
    "REDACTABLE",
    "Body",
    "Branched",
    "Checkpointed",
    "Closed",
    "Erased",
    "Event",
    "Expired",
    "MetadataSet",
    "Recorded",
    "Redacted",
    "Restored",
    "Resumed",
    "SessionCreated",
    "Suspended",
    "TurnAdded",
    "canonical",
    "compute_body_digest",
    "compute_id",
    "decode_event",
    "decode_stored",
    "decode_stored_all",
    "encode_event",
    "encode_stored",
    "erase",
    "erased_digest",
    "event_header",
    "event_problem",
    "gc_paused",
    "header_bytes",
    "make_event",
    "new_session_id",
    "normalize_body",
    "validate_name",
]

FORMAT_VERSION: Final = 1


class _Body(
    msgspec.Struct,
    frozen=True,
    tag=True,
    tag_field="kind",
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,  # immutable and acyclic: untracked, so a million of them don't slow the GC
):
    """Base of every event body; the tag (the class name) is the event's kind."""


class SessionCreated(_Body, frozen=True):
    user_id: str
    agent: str
    metadata: dict[str, Any] = {}
    ttl_s: float | None = None


class TurnAdded(_Body, frozen=True):
    role: str
    content: Any
    name: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    model: str | None = None
    tool_calls: list[Any] = []
    turn_id: str | None = None
    metadata: dict[str, Any] = {}


class Checkpointed(_Body, frozen=True):
    entry: str
    checksum: str
    label: str | None = None


class Branched(_Body, frozen=True):
    name: str
    fork_point: str


class Restored(_Body, frozen=True):
    checkpoint: str
    entry: str


class Suspended(_Body, frozen=True):
    reason: str | None = None


class Resumed(_Body, frozen=True):
    reason: str | None = None


class Closed(_Body, frozen=True):
    reason: str | None = None


class Expired(_Body, frozen=True):
    idle_s: float
    ttl_s: float


class MetadataSet(_Body, frozen=True):
    """Merge into the session's metadata; a ``None`` value removes the key."""

    metadata: dict[str, Any]


class Recorded(_Body, frozen=True):
    """Anything else an agent keeps: tool calls, state deltas, framework records."""

    type: str
    data: Any = None


class Erased(_Body, frozen=True):
    """What a redaction leaves of a body: its kind and the accounting a session's state folds.

    The tokens and cost of an erased turn are kept so that turn counts, token
    totals and checkpoint checksums, which cover the session state, still verify.
    """

    original: str
    """The erased body's kind: ``TurnAdded`` or ``Recorded``."""
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0


class Redacted(_Body, frozen=True):
    """The record of a redaction, appended to the erased event's branch."""

    event: str
    """The id of the erased event."""
    reason: str
    erased: str | None = None
    """``erased_digest`` of the body the redaction left: this event's id commits to
    it, so ``verify`` catches a change to the erased body's kept accounting."""


Body = (
    SessionCreated
    | TurnAdded
    | Checkpointed
    | Branched
    | Restored
    | Suspended
    | Resumed
    | Closed
    | Expired
    | MetadataSet
    | Recorded
    | Erased
    | Redacted
)

REDACTABLE: Final = frozenset({"TurnAdded", "Recorded"})
"""The kinds whose body a redaction may erase: the others carry the session's
state or its tree, which checkpoints and branches depend on."""


class Event(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """One immutable entry of a session's tree."""

    id: str
    session: str
    parent: str | None
    seq: int
    branch: str
    at: int
    actor: str
    body: Body
    body_digest: str
    salt: str
    idempotency_key: str | None = None
    format: int = FORMAT_VERSION

    @property
    def kind(self) -> str:
        """The body's tag; for an erased body, the kind it had (the id commits to it)."""
        body = self.body
        if type(body) is Erased:
            return body.original
        return type(body).__name__


_canonical = msgspec.json.Encoder(order="deterministic")
_body_decoder = msgspec.json.Decoder(Body)
_event_decoder = msgspec.json.Decoder(Event)
_event_encoder = msgspec.json.Encoder()

canonical = _canonical.encode
encode_event = _event_encoder.encode


def decode_event(data: bytes | str) -> Event:
    """Raises ``msgspec.DecodeError`` (or ``ValidationError``) for anything but an event."""
    try:
        return _event_decoder.decode(data)
    except UnicodeDecodeError as exc:  # msgspec lets invalid UTF-8 through as this
        raise msgspec.DecodeError(f"Invalid UTF-8: {exc}") from None


# --- the stored form: large events compressed -------------------------------------

COMPRESS_FROM: Final = 1024
"""Events whose JSON is at least this many bytes are stored compressed."""

_DEFLATED: Final = b"\x01"  # JSON starts with "{": this byte marks a deflated event
_ZSTD: Final = b"\x02"  # and this one a zstd frame, what encode_stored writes now
_MAX_INFLATED: Final = 1 << 27  # a bound on what a (damaged) stored event inflates to

# A preset dictionary: what every event's JSON repeats, and common English
# words. The compressor finds the envelope's keys in it even in a short event
# (a 1.4 KB turn shrinks to ~51% with it, ~59% without). Part of the stored
# format: never change it; a new one needs a new marker byte.
_ZDICT: Final = (
    b" the of and to a in is that for it with as on be this are by or an not you"
    b" can from at we which your will have if all has one they was more can't"
    b' "tool_calls":[],"metadata":{}},"name":"model":"gpt-"tokens_in":"tokens_out":'
    b'"cost":"turn_id":"kind":"Recorded","type":"data":"kind":"TurnAdded","role":"user'
    b'","content":"kind":"TurnAdded","role":"assistant","content":"'
    b'"body_digest":"","salt":"","idempotency_key":null,"format":1}'
    b'{"id":"","session":"","parent":"","seq":,"branch":"main","at":,"actor":"","body":{'
)
_ZSTD_DICT: Final = zstandard.ZstdCompressionDict(_ZDICT, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


class _Codecs(threading.local):
    """One zstd compressor and decompressor per thread: they keep their context
    (and the digested dictionary) from call to call, and are not thread-safe."""

    def __init__(self) -> None:
        self.packer = zstandard.ZstdCompressor(
            level=1, dict_data=_ZSTD_DICT, write_checksum=True, write_dict_id=False
        )
        self.unpacker = zstandard.ZstdDecompressor(dict_data=_ZSTD_DICT)


_codecs = _Codecs()


def encode_stored(event: Event, *, compress_from: int = COMPRESS_FROM) -> bytes:
    """The bytes a store keeps for an event: its JSON, compressed when it is large.

    Small events stay plain JSON (decoding them costs nothing extra); large
    ones are ``0x02`` and a zstd frame (level 1, the preset dictionary, a
    checksum of the content). zstd, not zlib: a deflate stream with a preset
    dictionary costs ~10x the time to make (its state is set up afresh for
    each event) for the same size. ``compress_from`` is the writer's choice.
    """
    data = _event_encoder.encode(event)
    if len(data) < compress_from:
        return data
    packed = _ZSTD + _codecs.packer.compress(data)
    return packed if len(packed) < len(data) else data


def decode_stored(data: bytes) -> Event:
    """An event from ``encode_stored``'s bytes (or plain event JSON, or a deflate
    stream as earlier versions wrote large events).

    Raises ``msgspec.DecodeError`` for anything else, a damaged frame or stream included.
    """
    marker = data[:1]
    if marker == _ZSTD:
        data = _unzstd(memoryview(data)[1:])
    elif marker == _DEFLATED:
        unpacker = zlib.decompressobj(-15, _ZDICT)
        try:
            data = unpacker.decompress(memoryview(data)[1:], _MAX_INFLATED)
        except zlib.error as exc:
            raise msgspec.DecodeError(f"Damaged deflated event: {exc}") from None
        if unpacker.unconsumed_tail or unpacker.unused_data or not unpacker.eof:
            raise msgspec.DecodeError("Damaged deflated event: cut short, too large or trailed")
    return decode_event(data)


def _unzstd(frame: memoryview) -> bytes:
    try:
        size = zstandard.frame_content_size(frame)  # -1: not given, -2: no frame header
        if not 0 <= size <= _MAX_INFLATED:
            raise zstandard.ZstdError(f"content size {size} out of bounds")
        return _codecs.unpacker.decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise msgspec.DecodeError(f"Damaged compressed event: {exc}") from None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector around a bulk decode.

    Events are untracked, but a decoded ``TurnAdded`` holds a list (its
    ``tool_calls``) and driver rows are tuples: a read of thousands of events
    allocates enough tracked objects to set off collections that scan every
    object the process keeps alive, again and again. None of these objects can
    form a cycle, so nothing is lost by collecting once afterwards, as the
    collector does on its own at the next allocation. The pause holds for the
    whole process: hold it for a page or a chunk, never for a read that awaits
    page after page while the application's other tasks run.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def normalize_body(body: Body, session_id: str) -> tuple[Body, bytes]:
    """Validate a body through its canonical form; return it and its canonical bytes.

    The round trip makes a body equal to what any store will give back (tuples
    become lists, an int given for a float becomes a float), so its digest is
    the digest every later reader recomputes.
    """
    try:
        raw = canonical(body)
        normal = _body_decoder.decode(raw)
    except (TypeError, UnicodeError, msgspec.EncodeError) as exc:
        raise InvalidEventError(
            f"Content is not JSON-encodable for session {session_id!r}: {exc}"
        ) from None
    except msgspec.ValidationError as exc:
        raise InvalidEventError(
            f"Invalid {type(body).__name__} for session {session_id!r}: {exc}"
        ) from None
    return normal, canonical(normal)


def compute_body_digest(salt: str, body_bytes: bytes) -> str:
    return _body_digest(bytes.fromhex(salt), body_bytes)


def _body_digest(salt: bytes, body_bytes: bytes) -> str:
    """``blake3(salt || body_bytes)``, fed in two parts: the body is not copied."""
    hasher = blake3.blake3(salt)
    hasher.update(body_bytes)
    return hasher.digest().hex()  # hexdigest's Rust hex encoder costs ~1,600 instructions more


def header_bytes(
    format: int,
    session: str,
    parent: str | None,
    seq: int,
    branch: str,
    at: int,
    actor: str,
    kind: str,
    idempotency_key: str | None,
    body_digest: str,
) -> bytes:
    """What an event's id hashes: its envelope, in this order, canonically encoded."""
    return canonical(
        [format, session, parent, seq, branch, at, actor, kind, idempotency_key, body_digest]
    )


def event_header(event: Event) -> bytes:
    """``header_bytes`` of a made event: what its id hashes."""
    return header_bytes(
        event.format,
        event.session,
        event.parent,
        event.seq,
        event.branch,
        event.at,
        event.actor,
        event.kind,
        event.idempotency_key,
        event.body_digest,
    )


def compute_id(event: Event) -> str:
    return blake3.blake3(event_header(event)).digest().hex()


_SALT = re.compile(r"[0-9a-f]{32}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_name(kind: str, value: str, session_id: str) -> str:
    """Branch names and the like: short, printable, no path separators or dot-dot."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise InvalidEventError(
            f"Invalid {kind} for session {session_id!r}: {value!r} "
            "(letters, digits, '.', '_', '-'; at most 128; no '..')"
        )
    return value


ENVELOPE_BYTES: Final = 256
"""A bound on what ``encode_event(event)`` holds beyond its body's canonical bytes and
its id's header: the field names, the id and the salt (221 bytes). So an event
whose body and header leave this much room under a size limit is under it
without being encoded to know."""


def make_event(
    *,
    session: str,
    parent: str | None,
    seq: int,
    branch: str,
    at: int,
    actor: str,
    body: Body,
    idempotency_key: str | None = None,
    max_bytes: int | None = None,
) -> Event:
    """Build a new event: normalize its body, salt and digest it, and address it.

    Raises:
        InvalidEventError: an ``Erased`` body (only a redaction makes one).
        EventTooLargeError: ``encode_event(event)`` would be over ``max_bytes``.
    """
    if isinstance(body, Erased):
        raise InvalidEventError(
            f"Invalid event for session {session!r}: an Erased body is made only by a redaction"
        )
    normal, raw = normalize_body(body, session)
    salt = os.urandom(16)
    body_digest = _body_digest(salt, raw)
    # The header from the fields at hand (the body is not Erased: its kind is its
    # tag), so that the event is built once rather than drafted and replaced.
    header = header_bytes(
        FORMAT_VERSION,
        session,
        parent,
        seq,
        branch,
        at,
        actor,
        type(normal).__name__,
        idempotency_key,
        body_digest,
    )
    event = Event(
        id=blake3.blake3(header).digest().hex(),
        session=session,
        parent=parent,
        seq=seq,
        branch=branch,
        at=at,
        actor=actor,
        body=normal,
        body_digest=body_digest,
        salt=salt.hex(),
        idempotency_key=idempotency_key,
    )
    if max_bytes is not None and len(raw) + len(header) + ENVELOPE_BYTES > max_bytes:
        size = len(encode_event(event))  # near the limit: its exact size
        if size > max_bytes:
            raise EventTooLargeError(session, size, max_bytes)
    return event


def event_problem(event: Event) -> str | None:
    """Why this event does not verify on its own, or None when it does."""
    if event.format != FORMAT_VERSION:
        return f"unknown format version {event.format}"
    if isinstance(event.body, Erased):
        # A redacted event: its body and salt are gone, its digest (and so its id) stays.
        if event.salt != "":
            return "an erased body must have an empty salt"
        if event.body.original not in REDACTABLE:
            return f"a {event.body.original} body cannot be erased"
        if compute_id(event) != event.id:
            return "id does not match its header"
        return None
    if not _SALT.fullmatch(event.salt):
        # Exactly one spelling: fromhex() would read an upper-case twin the same.
        return "salt is not 32 lower-case hex digits"
    digest = compute_body_digest(event.salt, canonical(event.body))
    if digest != event.body_digest:
        return "body does not match its digest"
    if compute_id(event) != event.id:
        return "id does not match its header"
    return None


def erase(event: Event) -> Event:
    """The redacted form of ``event``: same id and digest, an ``Erased`` body, no salt.

    Raises:
        EventNotRedactableError: its kind is not one of ``REDACTABLE``.
        AlreadyRedactedError: its body is erased already.
    """
    body = event.body
    if isinstance(body, Erased):
        raise AlreadyRedactedError(event.id)
    if isinstance(body, TurnAdded):
        erased = Erased(
            original="TurnAdded",
            tokens_in=body.tokens_in,
            tokens_out=body.tokens_out,
            cost=body.cost,
        )
    elif isinstance(body, Recorded):
        erased = Erased(original="Recorded")
    else:
        raise EventNotRedactableError(event.id, event.kind)
    return msgspec.structs.replace(event, body=erased, salt="")


def erased_digest(body: Erased) -> str:
    """The digest a ``Redacted`` record keeps of the ``Erased`` body it left."""
    return blake3.blake3(canonical(body)).hexdigest()


def new_session_id() -> str:
    """A random, unguessable session id (uuid4: 122 random bits)."""
    return str(uuid.uuid4())


def decode_stored_all(datas: Sequence[bytes]) -> list[Event]:
    """``decode_stored`` of many (a replay's hot loop): when none is compressed, one
    pass of the decoder with no Python call per event; else each in turn.

    Raises what ``decode_stored`` raises for the first bad one.
    """
    try:
        # A compressed event starts with its marker byte, which no JSON text does: it fails here.
        return list(map(_event_decoder.decode, datas))
    except (msgspec.MsgspecError, UnicodeDecodeError):
        return list(map(decode_stored, datas))
