"""Laws of the event model, as property tests: encoding, normalization, addressing."""

from __future__ import annotations

import itertools
from typing import Any

import blake3
import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ledger.errors import InvalidEventError
from ledger.events import (
    Body,
    Event,
    Recorded,
    SessionCreated,
    TurnAdded,
    canonical,
    compute_body_digest,
    compute_id,
    decode_event,
    encode_event,
    event_problem,
    make_event,
    normalize_body,
    validate_name,
)
from tests.strategies import bodies, chains, events, json_values

moderate = settings(max_examples=150, deadline=None)

SESSION = "00000000-0000-4000-8000-000000000000"

# The known vector. Derived once, by hand, from the rules in ledger/events.py:
#   body bytes  = canonical(SessionCreated(user_id="user-1", agent="agent-1"))
#               = b'{"kind":"SessionCreated","user_id":"user-1","agent":"agent-1"}'
#   body_digest = blake3(bytes.fromhex(SALT) + body bytes)   (salt = bytes 0x00..0x0f)
#   header      = canonical([format, session, parent, seq, branch, at, actor, kind,
#                            idempotency_key, body_digest])  -- written out below
#   id          = blake3(header)
# A change to any of these rules (field order, encoding, hash) changes the id of
# every stored event, so it must show up here first.
SALT = "000102030405060708090a0b0c0d0e0f"
BODY_BYTES = b'{"kind":"SessionCreated","user_id":"user-1","agent":"agent-1"}'
BODY_DIGEST = "629197c8fd110f8507daf1791b7eb73cf39c3402584eb8185bedf0045d024c72"
HEADER = (
    b'[1,"00000000-0000-4000-8000-000000000000",null,0,"main",1700000000000000000,'
    b'"user-1","SessionCreated",null,'
    b'"629197c8fd110f8507daf1791b7eb73cf39c3402584eb8185bedf0045d024c72"]'
)
KNOWN_ID = "bb917a2ba65dddfef7bc3018283e3d646b8cf62a3f48cf1f133e39ac58c0759a"


def known_event() -> Event:
    """The known vector's event, built by hand (no random salt)."""
    return Event(
        id=KNOWN_ID,
        session=SESSION,
        parent=None,
        seq=0,
        branch="main",
        at=1_700_000_000_000_000_000,
        actor="user-1",
        body=SessionCreated(user_id="user-1", agent="agent-1"),
        body_digest=BODY_DIGEST,
        salt=SALT,
    )


# encoding


@moderate
@given(events())
def test_decode_inverts_encode(event: Event) -> None:
    decoded = decode_event(encode_event(event))
    assert decoded == event
    assert type(decoded.body) is type(event.body)
    assert decoded.kind == event.kind


@moderate
@given(chains())
def test_chain_round_trips_and_links(chain: list[Event]) -> None:
    for parent, child in itertools.pairwise(chain):
        assert child.parent == parent.id
    assert [decode_event(encode_event(e)) for e in chain] == chain
    assert all(event_problem(e) is None for e in chain)


@moderate
@given(bodies)
def test_normalize_body_is_idempotent_and_decodes_back(body: Body) -> None:
    normal, raw = normalize_body(body, SESSION)
    assert normalize_body(normal, SESSION) == (normal, raw)
    assert msgspec.json.decode(raw, type=Body) == normal
    assert canonical(normal) == raw


@moderate
@given(json_values)
def test_normalize_turns_any_json_into_what_a_reader_gets_back(content: Any) -> None:
    # tuples and other encodable shapes become what decoding yields
    body = TurnAdded(role="user", content=(content, [content]))
    normal, raw = normalize_body(body, SESSION)
    assert isinstance(normal, TurnAdded)
    assert normal.content == msgspec.json.decode(canonical([content, [content]]))
    assert normalize_body(normal, SESSION) == (normal, raw)


# addressing


@moderate
@given(events())
def test_id_is_stable_across_decode(event: Event) -> None:
    decoded = decode_event(encode_event(event))
    assert compute_id(decoded) == event.id
    assert compute_body_digest(decoded.salt, canonical(decoded.body)) == event.body_digest


@moderate
@given(events())
def test_rebuilding_the_same_header_gives_the_same_id(event: Event) -> None:
    rebuilt = Event(
        id="",
        session=event.session,
        parent=event.parent,
        seq=event.seq,
        branch=event.branch,
        at=event.at,
        actor=event.actor,
        body=event.body,
        body_digest=event.body_digest,
        salt=event.salt,
        idempotency_key=event.idempotency_key,
    )
    assert compute_id(rebuilt) == event.id


def test_known_vector() -> None:
    event = known_event()
    assert canonical(event.body) == BODY_BYTES
    assert blake3.blake3(bytes.fromhex(SALT) + BODY_BYTES).hexdigest() == BODY_DIGEST
    assert compute_body_digest(SALT, BODY_BYTES) == BODY_DIGEST
    assert blake3.blake3(HEADER).hexdigest() == KNOWN_ID
    assert compute_id(event) == KNOWN_ID
    assert event_problem(event) is None


def test_id_commits_to_every_header_field() -> None:
    event = known_event()
    changes: dict[str, object] = {
        "session": "00000000-0000-4000-8000-000000000001",
        "parent": KNOWN_ID,
        "seq": 1,
        "branch": "alt",
        "at": 1_700_000_000_000_000_001,
        "actor": "user-2",
        "idempotency_key": "k",
        "body_digest": "0" * 64,
        "format": 2,
    }
    ids = {KNOWN_ID}
    for field, value in changes.items():
        changed = msgspec.structs.replace(event, **{field: value})
        ids.add(compute_id(changed))
        assert event_problem(changed) is not None, field
    assert len(ids) == len(changes) + 1


@moderate
@given(events())
def test_a_fresh_event_verifies(event: Event) -> None:
    assert event_problem(event) is None


@moderate
@given(events(), events())
def test_a_body_moved_to_another_event_does_not_verify(one: Event, two: Event) -> None:
    swapped = msgspec.structs.replace(one, body=two.body)
    assert (event_problem(swapped) is None) == (canonical(one.body) == canonical(two.body))


# tampering


def _salt_letter_index() -> int:
    encoded = encode_event(known_event())
    return encoded.index(SALT.encode()) + SALT.index("a")


ACCENTED = make_event(
    session=SESSION,
    parent=None,
    seq=0,
    branch="main",
    at=0,
    actor="user-1",
    body=TurnAdded(role="user", content="café"),
)


def _where(event: Event, index: int) -> float:
    return (index + 0.5) / len(encode_event(event))


@moderate
@given(
    event=events(),
    where=st.floats(min_value=0, max_value=1, exclude_max=True),
    change=st.one_of(st.integers(min_value=1, max_value=255), st.just(0x20)),
)
# A hex letter of the salt changed to upper case: the salt decodes to the same
# bytes, so the digest and the id still match although the event differs.
@example(
    event=known_event(), where=_salt_letter_index() / len(encode_event(known_event())), change=0x20
)
# The lead byte of "é" cleared of its high bit: the bytes are no longer UTF-8,
# which decoding must report as a msgspec error like any other bad input.
@example(event=ACCENTED, where=_where(ACCENTED, encode_event(ACCENTED).index(b"\xc3")), change=0x80)
def test_any_single_byte_change_is_caught(event: Event, where: float, change: int) -> None:
    """Decoding fails, or the result does not verify, or it is the very same event.

    ``change`` is XORed into one byte; 0x20 flips the case of a letter, the
    change most likely to slip through.
    """
    encoded = bytearray(encode_event(event))
    index = int(where * len(encoded))
    encoded[index] ^= change
    try:
        decoded = decode_event(bytes(encoded))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    assert decoded == event or event_problem(decoded) is not None, (
        f"byte {index} changed to {bytes([encoded[index]])!r}: {decoded!r} verifies"
    )


# bad input


class NotJSON:
    pass


@pytest.mark.parametrize(
    "body",
    [
        TurnAdded(role="user", content=object()),
        TurnAdded(role="user", content={NotJSON(), NotJSON()}),
        TurnAdded(role="user", content={"nested": [1, {"deeper": object()}]}),
        TurnAdded(role="user", content={1: "int key"}),
        TurnAdded(role="user", content="x", metadata={"k": object()}),
        TurnAdded(role="user", content="x", tool_calls=[NotJSON()]),
        Recorded(type="t", data=object()),
        SessionCreated(user_id="u", agent="a", metadata={"k": NotJSON()}),
    ],
    ids=[
        "object",
        "set-of-objects",
        "nested-object",
        "int-key",
        "metadata",
        "tool-calls",
        "recorded",
        "session-metadata",
    ],
)
def test_content_that_is_not_json_is_refused_naming_the_session(body: Body) -> None:
    with pytest.raises(InvalidEventError, match=SESSION):
        normalize_body(body, SESSION)
    with pytest.raises(InvalidEventError, match=SESSION):
        make_event(session=SESSION, parent=None, seq=0, branch="main", at=0, actor="a", body=body)


def test_a_lone_surrogate_is_refused_as_invalid_content() -> None:
    # "\ud800" is a str in Python but no Unicode text: it cannot be encoded as
    # UTF-8 JSON, so it is content that is not JSON-encodable like any other.
    body = TurnAdded(role="user", content="half a pair: \ud800")
    with pytest.raises(InvalidEventError, match=SESSION):
        normalize_body(body, SESSION)


@pytest.mark.parametrize(
    "body",
    [
        TurnAdded(role="user", content="x", tokens_in="x"),  # type: ignore[arg-type]
        TurnAdded(role="user", content="x", tokens_out=1.5),  # type: ignore[arg-type]
        TurnAdded(role="user", content="x", tokens_in=True),
        TurnAdded(role="user", content="x", cost="free"),  # type: ignore[arg-type]
        TurnAdded(role=5, content="x"),  # type: ignore[arg-type]
        TurnAdded(role="user", content="x", tool_calls={"a": 1}),  # type: ignore[arg-type]
        SessionCreated(user_id=None, agent="a"),  # type: ignore[arg-type]
        Recorded(type=["t"], data=None),  # type: ignore[arg-type]
    ],
    ids=[
        "tokens-str",
        "tokens-float",
        "tokens-bool",
        "cost",
        "role",
        "tool-calls",
        "user-none",
        "type-list",
    ],
)
def test_wrong_field_types_are_refused_naming_the_session(body: Body) -> None:
    with pytest.raises(InvalidEventError, match=SESSION) as info:
        normalize_body(body, SESSION)
    assert type(body).__name__ in str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        "a..b",
        "../etc",
        "/",
        "a/b",
        "\\",
        "a\\b",
        "a\x00b",
        "\x00",
        "x" * 129,
        ".hidden",
        "-flag",
        "a b",
        "a\nb",
        "é",
    ],
)
def test_validate_name_refuses(name: str) -> None:
    with pytest.raises(InvalidEventError, match=SESSION):
        validate_name("branch name", name, SESSION)


@pytest.mark.parametrize("name", ["main", "alt.2", "feature_x-1", "A", "x" * 128, "2024.01"])
def test_validate_name_accepts(name: str) -> None:
    assert validate_name("branch name", name, SESSION) == name


@moderate
@given(st.text(max_size=140))
def test_accepted_names_are_safe(name: str) -> None:
    try:
        validate_name("branch name", name, SESSION)
    except InvalidEventError:
        return
    assert 1 <= len(name) <= 128
    for bad in ("..", "/", "\\", "\x00", "\n"):
        assert bad not in name
    assert name[0].isascii() and name[0].isalnum()
