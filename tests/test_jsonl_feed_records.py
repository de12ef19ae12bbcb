"""The check of a run of ``feed.log`` records that reads of the feed start from."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from ledger.events import new_session_id
from stores.jsonl.feed_log import _record, _record_fields, _tombstone

RECORDS = re.compile(rb"(?:[0-9]{15} [0-9a-f-]{36} [0-9]{14} [0-9]{11}\n)*")
"""The records as a regular expression: what ``_record_fields`` must say, faster."""

records = st.lists(
    st.builds(
        _record,
        st.integers(1, 10**15 - 1),
        st.builds(new_session_id),
        st.integers(0, 10**14 - 1),
        st.integers(1, 10**11 - 1),
    ),
    max_size=5,
).map(b"".join)


@given(
    data=records,
    changes=st.lists(
        st.tuples(st.integers(0, 399), st.sampled_from(b"0a9f- \t\n\x0bgA+_\xff")), max_size=3
    ),
    cut=st.integers(0, 2),
)
def test_records_are_well_formed_exactly_as_the_expression_says(
    data: bytes, changes: list[tuple[int, int]], cut: int
) -> None:
    damaged = bytearray(data)
    for at, byte in changes:
        if at < len(damaged):
            damaged[at] = byte
    run = bytes(damaged[: len(damaged) - cut])
    fields = _record_fields(run)
    assert (fields is not None) == (RECORDS.fullmatch(run) is not None)
    if fields is not None:
        assert fields == run.split()


def test_a_tombstone_is_not_a_record() -> None:
    session_id = new_session_id()
    assert _record_fields(_record(1, session_id, 0, 10) + _tombstone(2, session_id)) is None
    assert _record_fields(b"") == []
