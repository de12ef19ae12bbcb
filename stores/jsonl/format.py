"""The session files' line format: header, event lines and their envelopes, the
encoders and decoders of both versions (see the package docstring)."""

from __future__ import annotations

import collections
import itertools
import operator
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final, Literal, TypeAlias, TypeVar

import msgspec
import orjson

from ledger.errors import IntegrityError, StoreError
from ledger.events import FORMAT_VERSION as EVENT_FORMAT
from ledger.events import Body, Event, decode_event, gc_paused

if TYPE_CHECKING:
    from stores.jsonl.index import _Session


FORMAT: Final = "session-ledger/jsonl"
FORMAT_VERSION: Final = 2
"""The ``version`` in the header line of the session files this code makes (it reads 1 and 2)."""
_LINE: Final = re.compile(
    rb'\{"pos":([1-9][0-9]{0,14})(?:,"batch":\[([1-9][0-9]{0,8}),([1-9][0-9]{0,8})\])?'
    rb'(?:,"status":"(active|suspended|closed|expired)")?'
    rb'(?:,"parent":(null|"[^"\\]*(?:\\.[^"\\]*)*"))?,"event":'
)
"""An event line's envelope: position, batch, status, parent. Version 1 lines always
have ``batch`` and never ``parent`` (their events hold it)."""
_STEPS: Final = {
    1: re.compile(
        rb'\{"pos":[0-9]+,"batch":\[[0-9]+,[0-9]+\](?:,"status":"[a-z]+")?,"event":\{"id":'
        rb'"[0-9a-f]+","session":"[0-9a-f-]+","parent":(null|"([0-9a-f]+)"),"seq":([0-9]+),'
    ),
    2: re.compile(
        rb'\{"pos":[0-9]+(?:,"batch":\[[0-9]+,[0-9]+\])?(?:,"status":"[a-z]+")?'
        rb'(?:,"parent":(null|"([0-9a-f]+)"))?,"event":\{"id":"[0-9a-f]+","seq":([0-9]+),'
    ),
}
"""The start of an event line as this code writes it, by file version: ``path_index``
takes an event's parent and seq from it without decoding the line. Groups: the parent
(None when left out: the event of the line before), its id (None for null), the seq."""
_SESSION_ID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_STATUSES: Final = frozenset({"active", "suspended", "closed", "expired"})
_SUFFIX: Final = ".jsonl"
_GC_PAUSE_FROM: Final = 64
"""Pages of at least this many lines are decoded with the garbage collector paused."""


class _StoredEvent(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """An event as a version 2 line holds it: ``Event`` less its session (the header
    names it) and parent (the line's envelope gives it), its defaults left out."""

    id: str
    seq: int
    branch: str
    at: int
    actor: str
    body: Body
    body_digest: str
    salt: str
    idempotency_key: str | None = None
    format: int = EVENT_FORMAT


_stored_encoder = msgspec.json.Encoder()
_json = msgspec.json.encode
_set = msgspec.structs.force_setattr


def _stored(event: Event) -> bytes:
    """``event`` as a version 2 line holds it."""
    return _stored_encoder.encode(
        _StoredEvent(
            id=event.id,
            seq=event.seq,
            branch=event.branch,
            at=event.at,
            actor=event.actor,
            body=event.body,
            body_digest=event.body_digest,
            salt=event.salt,
            idempotency_key=event.idempotency_key,
            format=event.format,
        )
    )


def _parent_field(event: Event, previous: str | None) -> bytes:
    """A version 2 line's ``parent``: left out when it is the event of the line before
    (``previous``; None on the first line, where a left out parent is null)."""
    if event.parent == previous:
        return b""
    return b',"parent":%s' % _json(event.parent)


class _Head(msgspec.Struct):
    """The envelope fields the index needs; the body is skipped, not decoded."""

    id: str
    session: str
    branch: str
    at: int
    seq: int
    idempotency_key: str | None = None


_head_decoder = msgspec.json.Decoder(_Head)


class _Line(msgspec.Struct):
    pos: int
    index: int
    count: int
    status: str | None
    event: bytes
    version: int
    parent: bytes | None
    """Version 2: the envelope's parent (JSON), None when left out."""


def _header_line(session_id: str) -> bytes:
    """The first line of a new session file (always of the current version)."""
    return orjson.dumps({"ledger": FORMAT, "version": FORMAT_VERSION, "session": session_id}) + (
        b"\n"
    )


def _damaged(
    path: Path | str, lineno: int, why: str, event_id: str | None = None
) -> IntegrityError:
    return IntegrityError(f"Damaged line in {str(path)!r}, line {lineno}: {why}", event_id)


def _parse(line: bytes, path: Path | str, lineno: int, version: int, session: bytes) -> _Line:
    """A line of a file of ``version`` (whose session id is ``session``, as JSON).

    A version 2 event gets back its session, and a null parent that ``_event``
    replaces: a line of its own, no more text to parse than version 1's.
    """
    match = _LINE.match(line)
    if (
        match is None
        or not line.endswith(b"}\n")
        or (version == 1 and (match[2] is None or match[5] is not None))
    ):
        raise _damaged(path, lineno, "not an event line of this format")
    pos, index, count, status, parent = match.groups()
    i, n = (int(index), int(count)) if index else (1, 1)
    if i > n:
        raise _damaged(path, lineno, f"batch [{i}, {n}]")
    event = line[match.end() : -2]
    if version != 1:
        if not event.startswith(b"{"):
            raise _damaged(path, lineno, "not an event line of this format")
        event = b'{"session":%s,"parent":null,%s' % (session, event[1:])
    return _Line(int(pos), i, n, status.decode() if status else None, event, version, parent)


def _head(parsed: _Line, path: Path | str, lineno: int) -> _Head:
    try:
        return _head_decoder.decode(parsed.event)
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise _damaged(path, lineno, f"the event does not decode ({exc})") from None


def _event(parsed: _Line, path: Path | str, lineno: int, previous: str | None = None) -> Event:
    """The event of a line; ``previous``: the id of the event of the line before, if any."""
    try:
        event = decode_event(parsed.event)
        if parsed.version != 1:
            parent = previous if parsed.parent is None else _parent_decoder.decode(parsed.parent)
            _set(event, "parent", parent)
        return event
    except (msgspec.MsgspecError, TypeError) as exc:
        raise _damaged(path, lineno, f"the event does not decode ({exc})") from None


_parent_decoder = msgspec.json.Decoder(str | None)
_Batch = tuple[Annotated[int, msgspec.Meta(ge=1)], Annotated[int, msgspec.Meta(ge=1)]]


class _Envelope(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A whole event line of version 1, decoded at once by the readers' fast path."""

    pos: Annotated[int, msgspec.Meta(ge=1)]
    batch: _Batch
    event: Event
    status: Literal["active", "suspended", "closed", "expired"] | None = None


class _Envelope2(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A whole event line of version 2 (its event given a session and a null parent)."""

    pos: Annotated[int, msgspec.Meta(ge=1)]
    event: Event
    batch: _Batch = (1, 1)
    status: Literal["active", "suspended", "closed", "expired"] | None = None
    parent: str | msgspec.UnsetType | None = msgspec.UNSET


_line_decoders: Final[
    dict[int, msgspec.json.Decoder[_Envelope] | msgspec.json.Decoder[_Envelope2]]
] = {
    1: msgspec.json.Decoder(_Envelope),
    2: msgspec.json.Decoder(_Envelope2),
}
"""Each decodes a page's lines at once (``decode_lines``), by file version."""
_get_event = operator.attrgetter("event")
_get_id = operator.attrgetter("id")
_get_session = operator.attrgetter("session")
_get_parent = operator.attrgetter("parent")
_step_parent = operator.itemgetter(2)
_Step = tuple[str, int, str | None]
"""An event's ``(id, seq, parent)``: what ``path_index`` gives."""
_Item = TypeVar("_Item", Event, _Step)
_Page: TypeAlias = "tuple[bytes, _Session, int, int]"
"""A run of a session file's lines as read, ``(data, session, first, stop)``."""
_EVENT_KEY: Final = b'"event":{'
_WRITTEN_EVENT_KEY: Final = b',"event":{"id":"'
"""A version 2 line's event key as ``_stored`` writes it: after ``pos``, the id first."""


def _decode_page(data: bytes, session: _Session, first: int, stop: int) -> list[Event] | None:
    """Lines ``first`` to ``stop - 1`` of ``session`` (``data``), or None if any looks wrong."""
    return _decode_pages([(data, session, first, stop)])


def _decode_pages(pages: Sequence[_Page]) -> list[Event] | None:
    """The events of ``pages`` (each ``(data, session, first, stop)``: lines ``first`` to
    ``stop - 1`` of ``session``), in order, or None if any looks wrong (or their files
    are not all of one version).

    One decode for them all (a feed's page of many sessions' lines as one); every line
    must end where the index says and hold the event it names. On None the caller
    goes page by page, then line by line (``_parse``, ``_event``, the checks of
    ``reads.decode``), which names the damaged line.
    """
    version = pages[0][1].version
    texts: list[bytes] = []
    ids: list[str] = []
    sessions: list[str] = []
    before: list[str | None] = []
    for data, session, first, stop in pages:
        text = _page_text(data, session, first, stop) if session.version == version else None
        if text is None:
            return None
        texts.append(text)
        own = list(map(session.ids.__getitem__, range(first, stop)))
        ids += own
        sessions += itertools.repeat(session.session_id, stop - first)
        if version != 1:  # each line's parent, if its envelope leaves it out
            before.append(session.ids[first - 1] if first else None)
            before += own[:-1]
    data = texts[0] if len(texts) == 1 else b"".join(texts)
    decoder = _line_decoders[version]
    try:
        if len(ids) < _GC_PAUSE_FROM:
            envelopes = decoder.decode_lines(data)
        else:
            with gc_paused():  # a bulk decode: see ledger.events.gc_paused
                envelopes = decoder.decode_lines(data)
    except (msgspec.MsgspecError, UnicodeDecodeError, TypeError):
        return None
    events: list[Event] = list(map(_get_event, envelopes))
    if list(map(_get_id, events)) != ids or list(map(_get_session, events)) != sessions:
        return None
    if version != 1:
        _link(events, list(map(_get_parent, envelopes)), before)
    return events


def _page_text(data: bytes, session: _Session, first: int, stop: int) -> bytes | None:
    """``data``, lines ``first`` to ``stop - 1`` of ``session``, as ``_decode_pages``
    decodes them (version 2 events given a session and a null parent), or None if
    they do not end where the index says."""
    count = stop - first
    base = session.starts[first]
    if len(data) != session.ends[stop - 1] - base:
        return None
    last_bytes = operator.itemgetter(*map((-1 - base).__add__, session.ends[first:stop]))(data)
    if (last_bytes.count(10) if count > 1 else int(last_bytes == 10)) != count:
        return None
    # Decoded as a run of JSON values, one per line: a newline anywhere else is
    # refused in a string (so no string comes out changed) and is whitespace
    # between values, as ``_parse`` takes it; a page that does not give exactly
    # the events the index names, in its order, goes line by line.
    if session.version == 1:
        return data
    # _parse's work: the first "event":{ of a line is its envelope's key (one
    # in a body comes after it; a line without its own fails to decode). When
    # the page holds one per line as this code writes it, all are replaced
    # with one split and one join: a single search, for a longer key (found
    # faster), where a replace searches twice.
    token = _json(session.session_id)
    parts = data.split(_WRITTEN_EVENT_KEY)
    if len(parts) == count + 1:
        return (b',"event":{"session":%s,"parent":null,"id":"' % token).join(parts)
    inserted = b'"event":{"session":%s,"parent":null,' % token
    bounds = zip(session.starts[first:stop], session.ends[first:stop], strict=True)
    return b"".join([data[s - base : e - base].replace(_EVENT_KEY, inserted, 1) for s, e in bounds])


def _link(
    events: list[Event],
    parents: list[str | msgspec.UnsetType | None],
    before: list[str | None],
) -> None:
    """Give the events of version 2 lines their parents: the envelope's (``parents``,
    UNSET when left out), or the event of the line before in its file (``before``)."""
    if parents.count(msgspec.UNSET) != len(parents):  # not one linear run
        before = [b if p is msgspec.UNSET else p for p, b in zip(parents, before, strict=True)]
    collections.deque(map(_set, events, itertools.repeat("parent"), before), maxlen=0)


def _check_header(line: bytes, path: Path, session_id: str) -> int:
    """The version of the session file whose first line is ``line``."""
    try:
        header = orjson.loads(line)
    except orjson.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("ledger") != FORMAT:
        raise _damaged(path, 1, f"not a {FORMAT} header")
    version = header.get("version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise StoreError(
            f"{str(path)!r} has format version {version}, newer than this code knows "
            f"({FORMAT_VERSION}): upgrade the session ledger to open it"
        )
    if version not in (1, FORMAT_VERSION) or header.get("session") != session_id:
        raise _damaged(path, 1, "the header's version or session is wrong")
    assert isinstance(version, int)
    return version
