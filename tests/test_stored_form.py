"""The stored form of events: large ones compressed (SQLite), read back exactly, damage named."""

from __future__ import annotations

import contextlib
import sqlite3
import zlib
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import Ledger, LedgerConfig
from ledger.errors import IntegrityError
from ledger.events import (
    _ZDICT,
    COMPRESS_FROM,
    Event,
    TurnAdded,
    decode_stored,
    decode_stored_all,
    encode_event,
    encode_stored,
    make_event,
    new_session_id,
)
from stores.base import decode_checked
from stores.sqlite import SCHEMA_VERSION, SQLiteStore
from tests.strategies import chains, events, json_values

LONG = "The assistant explains the refund policy in detail, step by step. " * 40

large_events = events(
    st.builds(TurnAdded, role=st.just("assistant"), content=st.text(min_size=600, max_size=3000))
)


@given(st.one_of(events(), large_events))
def test_the_stored_form_round_trips(event: Event) -> None:
    stored = encode_stored(event)
    assert decode_stored(stored) == event
    if len(encode_event(event)) < COMPRESS_FROM:
        assert stored == encode_event(event)  # small events stay plain JSON
    else:
        assert len(stored) <= len(encode_event(event))


@given(json_values)
def test_plain_event_json_is_still_read(content: object) -> None:
    event = _turn(content)
    assert decode_stored(encode_event(event)) == event


def _turn(content: object) -> Event:
    return make_event(
        session=new_session_id(),
        parent="a" * 64,
        seq=1,
        branch="main",
        at=1,
        actor="u",
        body=TurnAdded(role="assistant", content=content),
    )


@given(st.lists(st.one_of(events(), large_events), max_size=8))
def test_decoding_many_stored_events_is_decoding_each(batch: list[Event]) -> None:
    stored = [encode_stored(event) for event in batch]
    assert decode_stored_all(stored) == [decode_stored(data) for data in stored] == batch


@given(chains(), st.data())
def test_a_checked_page_is_its_events_or_none_when_any_row_differs(
    chain: list[Event], data: st.DataObject
) -> None:
    stored = [encode_stored(event) for event in chain]
    ids = [event.id for event in chain]
    session = chain[0].session
    for sessions in (session, [session] * len(chain)):  # one for all, or one per row
        assert decode_checked(stored, ids, sessions, decode_stored_all) == chain
    k = data.draw(st.integers(0, len(chain) - 1))
    other = _turn("elsewhere")  # another session's event
    wrong_id = [*ids[:k], other.id, *ids[k + 1 :]]
    assert decode_checked(stored, wrong_id, session, decode_stored_all) is None
    foreign = [*stored[:k], encode_stored(other), *stored[k + 1 :]]
    for ids_given in (ids, wrong_id):
        assert decode_checked(foreign, ids_given, session, decode_stored_all) is None
    assert decode_checked(stored[:k] + stored[k + 1 :], ids, session, decode_stored_all) is None
    assert (
        decode_checked([*stored[:k], b"{", *stored[k + 1 :]], ids, session, decode_stored_all)
        is None
    )


@pytest.mark.parametrize("bad", [b"{}", b"\x01", b'{"id": "\xff"}', b"[]"])
@pytest.mark.parametrize("deflated", [False, True])
def test_one_bad_stored_event_among_many_is_a_decode_error(bad: bytes, deflated: bool) -> None:
    good = encode_stored(_turn(LONG if deflated else "short"))
    with pytest.raises(msgspec.DecodeError):
        decode_stored_all([good, bad, good])


LONG_EVENT = _turn(LONG)


def _deflated(event: Event) -> bytes:
    """A large event as versions before zstd stored it: 0x01 and a raw deflate stream."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, _ZDICT)
    return b"\x01" + packer.compress(encode_event(event)) + packer.flush()


@given(large_events)
def test_a_deflated_event_of_earlier_versions_is_still_read(event: Event) -> None:
    assert decode_stored(_deflated(event)) == event


def test_a_damaged_compressed_event_is_a_decode_error() -> None:
    event = _turn(LONG)
    for stored, marker in ((encode_stored(event), b"\x02"), (_deflated(event), b"\x01")):
        assert stored[:1] == marker
        flipped = stored[:1] + bytes([stored[1] ^ 0xFF]) + stored[2:]
        for bad in (stored[:-5], flipped, stored + b"\x00", marker):
            with pytest.raises(msgspec.DecodeError):
                decode_stored(bad)


@given(st.data())
def test_a_flipped_bit_in_a_compressed_event_never_reads_as_another_event(
    data: st.DataObject,
) -> None:
    event = LONG_EVENT
    stored = bytearray(encode_stored(event))
    at = data.draw(st.integers(1, len(stored) - 1))
    stored[at] ^= 1 << data.draw(st.integers(0, 7))
    # Named as damaged (the frame has a checksum of its content), or a bit it does not use.
    with contextlib.suppress(msgspec.DecodeError):
        assert decode_stored(bytes(stored)) == event


async def _ledger_with_a_long_turn(db: Path) -> tuple[str, Event, Event]:
    async with Ledger(SQLiteStore(db), LedgerConfig(url="memory://")) as led:
        s = await led.create(user_id="u", agent="a")
        short = await led.add_turn(s.session_id, role="user", content="Refund?")
        long = await led.add_turn(s.session_id, role="assistant", content=LONG)
        return s.session_id, short, long


async def test_sqlite_keeps_large_events_compressed_and_reads_them_back(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    sid, short, long = await _ledger_with_a_long_turn(db)
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT id, data FROM events").fetchall())
    assert rows[short.id] == encode_event(short)
    assert rows[long.id][:1] == b"\x02"
    assert len(rows[long.id]) < len(encode_event(long)) / 2
    async with Ledger(SQLiteStore(db), LedgerConfig(url="memory://")) as led:
        assert (await led.history(sid))[1:] == [short, long]
        assert (await led.verify(sid)).ok


async def test_a_damaged_compressed_row_is_named(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    sid, _, long = await _ledger_with_a_long_turn(db)
    with sqlite3.connect(db) as conn:
        (data,) = conn.execute("SELECT data FROM events WHERE id = ?", (long.id,)).fetchone()
        conn.execute("UPDATE events SET data = ? WHERE id = ?", (data[:-9], long.id))
    async with SQLiteStore(db) as store:
        with pytest.raises(IntegrityError) as info:
            await store.get(long.id)
        assert long.id in str(info.value) and info.value.event_id == long.id
    async with Ledger(SQLiteStore(db), LedgerConfig(url="memory://")) as led:
        with pytest.raises(IntegrityError):
            await led.history(sid)


async def test_a_version_1_file_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    async with Ledger(SQLiteStore(db), LedgerConfig(url="memory://")) as led:
        s = await led.create(user_id="u", agent="a")
        turn = await led.add_turn(s.session_id, role="user", content="hello")
    with sqlite3.connect(db) as conn:  # what version 1 wrote: plain JSON rows
        conn.execute("PRAGMA user_version = 1")
    async with Ledger(SQLiteStore(db), LedgerConfig(url="memory://")) as led:
        assert (await led.history(s.session_id))[-1] == turn
        await led.add_turn(s.session_id, role="assistant", content=LONG)
        assert (await led.verify(s.session_id)).ok
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
