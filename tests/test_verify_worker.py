"""The worker of a parallel verify gives ``event_problem``'s verdict, whatever was changed.

The worker digests each body as the bytes it is sent instead of encoding it again:
these tests hold it to the exact verdict of ``ledger.events.event_problem`` on
valid, tampered, erased and forged events, alone and in chunks.
"""

from __future__ import annotations

import blake3
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.events import (
    Erased,
    Event,
    Recorded,
    TurnAdded,
    canonical,
    compute_body_digest,
    compute_id,
    decode_event,
    encode_event,
    erase,
    event_problem,
    make_event,
)
from ledger.merkle import MerkleLog
from ledger.verify_worker import (
    check_chunk,
    check_events,
    encode_request,
    event_id_if_sound,
    sound_id,
)
from tests.strategies import events

BYTES = st.sampled_from(b"0123456789abcdefA z") | st.integers(0, 255)
"""A new byte: often one that leaves the JSON an event, so that the digests are what fails."""


def worker_verdict(chunk: list[Event], log: bool = True) -> tuple[bool, list[bytes]]:
    """What the worker process answers for these events, sent as ``ledger.verify`` sends them."""
    request = encode_request(chunk)
    assert int.from_bytes(request[:8], "big") == len(request) - 8
    return check_chunk(request[8:], log)


def levels_of(chunk: list[Event]) -> list[bytes]:
    return [bytes(level) for level in MerkleLog.from_leaves(b"".join(ids_of(chunk))).levels]


def ids_of(chunk: list[Event]) -> list[bytes]:
    return [bytes.fromhex(event.id) for event in chunk]


def tampered(event: Event, at: int, byte: int) -> Event | None:
    """The event with one byte of its stored JSON changed, if that still reads as an event."""
    data = bytearray(encode_event(event))
    data[at % len(data)] = byte
    try:
        return decode_event(bytes(data))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@settings(max_examples=300, deadline=None)
@given(event=events(), at=st.integers(min_value=0), byte=BYTES, redact=st.booleans())
def test_the_worker_gives_event_problems_verdict_on_any_changed_byte(
    event: Event, at: int, byte: int, redact: bool
) -> None:
    if redact and isinstance(event.body, TurnAdded | Recorded):
        event = erase(event)  # the worker's other path: erased bodies go through event_problem
    changed = tampered(event, at, byte) or event
    expected = event_problem(changed) is None
    for chunk in ([changed], [event, changed, event]):
        verdict = event_problem(chunk[0]) is None and expected
        answer = (verdict, levels_of(chunk) if verdict else [])
        assert worker_verdict(chunk) == answer, (changed, event_problem(changed))
        assert check_events(chunk, True) == answer
        assert worker_verdict(chunk, log=False) == (verdict, [])
    leaf = event_id_if_sound(changed)
    assert (leaf is not None) == expected and (leaf is None or leaf.hex() == changed.id)
    if not isinstance(changed.body, Erased):
        body = canonical(changed.body)
        leaf = sound_id(changed, type(changed.body).__name__, body)
        assert (leaf is not None) == expected
        assert leaf is None or leaf.hex() == changed.id
        dirty = blake3.blake3(b"what the event before left in a reused hasher")
        assert sound_id(changed, type(changed.body).__name__, body, dirty) == leaf


def test_a_chunk_of_valid_events_answers_the_merkle_levels_of_their_ids() -> None:
    chunk = [
        erase(event) if n % 3 == 0 and isinstance(event.body, TurnAdded) else event
        for n, event in enumerate(sample(37))
    ]
    assert any(isinstance(event.body, Erased) for event in chunk)
    ok, levels = worker_verdict(chunk)
    assert ok and levels == levels_of(chunk) and len(levels) == 6  # subtrees of 1 to 32 leaves
    clean = [event for event in chunk if not isinstance(event.body, Erased)]
    assert worker_verdict(clean) == (True, levels_of(clean))


def test_one_bad_event_in_a_chunk_is_caught_wherever_it_is() -> None:
    chunk = sample(20)
    for index in (0, 7, 19):
        bad = list(chunk)
        body = msgspec.structs.replace(bad[index].body, content="changed")  # type: ignore[arg-type]
        bad[index] = msgspec.structs.replace(bad[index], body=body)
        assert event_problem(bad[index]) == "body does not match its digest"
        assert worker_verdict(bad) == (False, [])
        assert check_events(bad, True) == (False, [])


def test_a_body_digested_in_a_non_canonical_form_is_caught_as_event_problem_does() -> None:
    # Someone rewrote an event and its id with the digest of its body's JSON with
    # unsorted keys: it is the same content, but not its canonical bytes.
    event = sample(1)[0]
    body = TurnAdded(role="user", content={"b": 1, "a": 2}, metadata={"z": 0, "y": 1})
    raw = msgspec.json.encode(body)
    assert raw != canonical(body)
    digest = compute_body_digest(event.salt, raw)
    forged = msgspec.structs.replace(event, body=body, body_digest=digest)
    forged = msgspec.structs.replace(forged, id=compute_id(forged))
    assert event_problem(forged) == "body does not match its digest"
    assert worker_verdict([forged]) == (False, [])
    assert check_events([forged], True) == (False, [])


def sample(n: int) -> list[Event]:
    """``n`` valid turns of one session, with dict content (whose keys canonical JSON sorts)."""
    return [
        make_event(
            session="00000000-0000-4000-8000-000000000001",
            parent="ab" * 32,
            seq=i + 1,
            branch="main",
            at=i,
            actor="tester",
            body=TurnAdded(role="user", content={"text": f"turn {i}", "n": i}, tokens_in=i),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(
    "salt",
    ["AB" * 16, "ab" * 15 + "a ", " " + "ab" * 15 + "a", "ab" * 15, "ab" * 17, "zz" * 16, ""],
)
def test_a_salt_of_anything_but_32_lower_case_hex_digits_does_not_verify(salt: str) -> None:
    event = msgspec.structs.replace(sample(1)[0], salt=salt)
    assert event_problem(event) == "salt is not 32 lower-case hex digits"
    assert event_id_if_sound(event) is None
    assert check_events([event], True) == (False, [])
