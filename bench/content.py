"""What every system stores: one deterministic conversation of realistic turns.

Agent conversations are mostly long assistant answers and short user questions,
so turn lengths are drawn (with a fixed seed) from 40 to 600 characters for the
user and 200 to 3,000 for the assistant: about 900 bytes a turn on average.
Every system of a scenario gets the same turns; the raw drivers get the very
bytes the ledger stores for them (``Turn.data``, an encoded event of a real
chain), so a raw row is the floor under the ledger's row.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

from ledger.events import Event, SessionCreated, TurnAdded, encode_event, make_event

__all__ = ["Turn", "chain", "conversation", "raw_content_bytes"]

_VOCABULARY = (
    "the order shipment status customer refund policy account please could you check "
    "it was due yesterday thanks tool call result error retry payment invoice address "
    "delivery window tracking number carrier warehouse update model answer context "
    "summary we found two matching records and one pending request let me look into"
)
_WORDS = _VOCABULARY.split()


@dataclass(frozen=True, slots=True)
class Turn:
    role: str
    content: str
    tokens_in: int
    tokens_out: int
    data: bytes
    """The encoded ledger event holding this turn: what the raw drivers write."""

    def message(self) -> dict[str, str]:
        """The turn as the peers' message dicts (``{"role", "content"}``)."""
        return {"role": self.role, "content": self.content}

    def json(self) -> bytes:
        return orjson.dumps(self.message())


def _text(rng: random.Random, low: int, high: int) -> str:
    target = rng.randint(low, high)
    words: list[str] = []
    size = 0
    while size < target:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:target]


def conversation(n: int = 200, seed: int = 7) -> list[Turn]:
    """``n`` turns, alternating user and assistant, the same in every run."""
    rng = random.Random(seed)
    session = "00000000-0000-4000-8000-000000000000"
    root = make_event(
        session=session,
        parent=None,
        seq=0,
        branch="main",
        at=time.time_ns(),
        actor="bench",
        body=SessionCreated(user_id="bench", agent="bench"),
    )
    turns: list[Turn] = []
    parent = root
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        content = _text(rng, 40, 600) if role == "user" else _text(rng, 200, 3000)
        tokens_in, tokens_out = (len(content) // 4, 0) if role == "user" else (0, len(content) // 4)
        body = TurnAdded(role=role, content=content, tokens_in=tokens_in, tokens_out=tokens_out)
        event = make_event(
            session=session,
            parent=parent.id,
            seq=parent.seq + 1,
            branch="main",
            at=parent.at + 1,
            actor="bench",
            body=body,
        )
        turns.append(Turn(role, content, tokens_in, tokens_out, encode_event(event)))
        parent = event
    return turns


def raw_content_bytes(turns: list[Turn]) -> int:
    """The UTF-8 bytes of the turns' contents: what a conversation says, nothing else."""
    return sum(len(t.content.encode()) for t in turns)


def chain(session: str, n: int, content: str, *, user_id: str = "bench") -> Iterator[Event]:
    """A real chain of ``n`` valid events (a root, then turns): verifiable, as appended."""
    at = time.time_ns()
    event = make_event(
        session=session,
        parent=None,
        seq=0,
        branch="main",
        at=at,
        actor=user_id,
        body=SessionCreated(user_id=user_id, agent="bench"),
    )
    yield event
    for seq in range(1, n):
        role = "user" if seq % 2 else "assistant"
        body = TurnAdded(role=role, content=f"{content} #{seq}", tokens_in=12, tokens_out=30)
        event = make_event(
            session=session,
            parent=event.id,
            seq=seq,
            branch="main",
            at=at + seq,
            actor=user_id,
            body=body,
        )
        yield event
