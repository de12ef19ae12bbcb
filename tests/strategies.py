"""Hypothesis strategies for the event model: JSON values, every body kind, events, chains."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from ledger.events import (
    Body,
    Branched,
    Checkpointed,
    Closed,
    Event,
    Expired,
    MetadataSet,
    Recorded,
    Restored,
    Resumed,
    SessionCreated,
    Suspended,
    TurnAdded,
    make_event,
)

__all__ = [
    "bodies",
    "chains",
    "event_ids",
    "events",
    "json_objects",
    "json_values",
    "names",
    "texts",
]

# Text that JSON can carry: hypothesis' default alphabet already leaves out lone
# surrogates, which are not Unicode scalar values.
texts = st.text(max_size=20)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)

json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(texts, inner, max_size=4),
    ),
    max_leaves=12,
)

json_objects: st.SearchStrategy[dict[str, Any]] = st.dictionaries(texts, json_values, max_size=4)

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True).filter(
    lambda n: ".." not in n
)

event_ids = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)

optional_texts = st.none() | texts
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=2**31)

bodies: st.SearchStrategy[Body] = st.one_of(
    st.builds(
        SessionCreated,
        user_id=texts,
        agent=texts,
        metadata=json_objects,
        ttl_s=st.none() | st.floats(min_value=0, max_value=1e9),
    ),
    st.builds(
        TurnAdded,
        role=st.sampled_from(["user", "assistant", "system", "tool"]),
        content=json_values,
        name=optional_texts,
        tokens_in=counts,
        tokens_out=counts,
        cost=finite_floats,
        model=optional_texts,
        tool_calls=st.lists(json_values, max_size=3),
        turn_id=optional_texts,
        metadata=json_objects,
    ),
    st.builds(Checkpointed, entry=event_ids, checksum=event_ids, label=optional_texts),
    st.builds(Branched, name=names, fork_point=event_ids),
    st.builds(Restored, checkpoint=event_ids, entry=event_ids),
    st.builds(Suspended, reason=optional_texts),
    st.builds(Resumed, reason=optional_texts),
    st.builds(Closed, reason=optional_texts),
    st.builds(Expired, idle_s=finite_floats, ttl_s=finite_floats),
    st.builds(MetadataSet, metadata=json_objects),
    st.builds(Recorded, type=texts, data=json_values),
)

sessions = st.uuids(version=4).map(str)
timestamps = st.integers(min_value=0, max_value=2**63 - 1)
idempotency_keys = st.none() | texts


@st.composite
def events(draw: st.DrawFn, body: st.SearchStrategy[Body] = bodies) -> Event:
    """One event anywhere in a tree (its parent need not exist)."""
    root = draw(st.booleans())
    return make_event(
        session=draw(sessions),
        parent=None if root else draw(event_ids),
        seq=0 if root else draw(st.integers(min_value=1, max_value=2**31)),
        branch=draw(names),
        at=draw(timestamps),
        actor=draw(texts),
        body=draw(body),
        idempotency_key=draw(idempotency_keys),
    )


@st.composite
def chains(draw: st.DrawFn, max_size: int = 8) -> list[Event]:
    """A session's main branch: a ``SessionCreated`` root and the events after it."""
    session = draw(sessions)
    at = draw(st.integers(min_value=0, max_value=2**62))
    actor = draw(texts)
    root = make_event(
        session=session,
        parent=None,
        seq=0,
        branch="main",
        at=at,
        actor=actor,
        body=draw(st.builds(SessionCreated, user_id=texts, agent=texts, metadata=json_objects)),
    )
    out = [root]
    for body in draw(
        st.lists(bodies.filter(lambda b: not isinstance(b, SessionCreated)), max_size=max_size - 1)
    ):
        at += draw(st.integers(min_value=0, max_value=10**9))
        out.append(
            make_event(
                session=session,
                parent=out[-1].id,
                seq=out[-1].seq + 1,
                branch="main",
                at=at,
                actor=actor,
                body=body,
                idempotency_key=draw(idempotency_keys),
            )
        )
    return out
