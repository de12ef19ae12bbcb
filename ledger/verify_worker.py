"""The second process of a parallel ``verify``: each event's digest and id, and the Merkle log.

Run as ``python -m ledger.verify_worker`` by ``ledger.verify``, which writes
chunks of encoded events to its stdin and reads one answer per chunk from its
stdout. A plain subprocess rather than ``multiprocessing``: nothing of the
caller's ``__main__`` is imported again, so any script can verify.

Request: an 8-byte big-endian length, then that many bytes: a JSON array of
events (each as ``ledger.events.encode_event`` writes it, encoded by the caller
straight into one buffer, see ``Batch``); length 0 ends. Answer: one byte
(1: every event verifies on its own, 0: one does not), one byte the number of
Merkle levels, then each level as an 8-byte length and its bytes: the hashes of
the complete subtrees of the chunk's ids (a chunk starts at a multiple of a
power of two, so they are subtrees of the session's log).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import BinaryIO

import msgspec

from ledger.events import Event, encode_event, event_problem
from ledger.merkle import MerkleLog

__all__ = ["Batch", "Checked", "check_chunk", "main", "read_answer", "write_request"]

_decode_events = msgspec.json.Decoder(list[Event]).decode
_encode_into = msgspec.json.Encoder().encode_into


class Batch:
    """A request being built: events encoded into one growing buffer, with no copy of each."""

    __slots__ = ("_buffer", "count")

    def __init__(self) -> None:
        self._buffer = bytearray(8) + b"["  # the length goes first, once known
        self.count = 0

    def add(self, event: Event) -> None:
        _encode_into(event, self._buffer, -1)
        self._buffer += b","
        self.count += 1

    def request(self) -> bytearray:
        """The framed request (empty when no event was added); the batch is spent."""
        if not self.count:
            return bytearray()
        buffer = self._buffer
        buffer[-1:] = b"]"
        buffer[:8] = (len(buffer) - 8).to_bytes(8, "big")
        return buffer


class Checked:
    """A chunk checked where it is read: the answer the worker gives for the same events."""

    __slots__ = ("_ids", "count", "ok")

    def __init__(self) -> None:
        self._ids = bytearray()
        self.count = 0
        self.ok = True

    def add(self, event: Event) -> None:
        if event_problem(event) is not None:
            self.ok = False
        self._ids += bytes.fromhex(event.id)
        self.count += 1

    def answer(self) -> tuple[bool, list[bytes]]:
        """Did every event verify on its own? And the Merkle levels of their ids."""
        return self.ok, [bytes(level) for level in MerkleLog.from_leaves(self._ids).levels]


def check_chunk(blob: bytes | bytearray) -> tuple[bool, list[bytes]]:
    """Do these events (a JSON array) verify on their own? And the Merkle levels of their ids."""
    checked = Checked()
    for event in _decode_events(blob):
        checked.add(event)
    return checked.answer()


def write_request(events: list[Event]) -> bytes:
    """One request of these events (none: the request that ends the worker)."""
    if not events:
        return bytes(8)
    blob = b"[" + b",".join(map(encode_event, events)) + b"]"
    return len(blob).to_bytes(8, "big") + blob


def _answer(ok: bool, levels: list[bytes]) -> bytes:
    parts = [bytes([int(ok), len(levels)])]
    for level in levels:
        parts += [len(level).to_bytes(8, "big"), level]
    return b"".join(parts)


async def read_answer(readexactly: Callable[[int], Awaitable[bytes]]) -> tuple[bool, list[bytes]]:
    """One answer, read with an ``asyncio.StreamReader``'s ``readexactly``."""
    head = await readexactly(2)
    levels = []
    for _ in range(head[1]):
        size = int.from_bytes(await readexactly(8), "big")
        levels.append(await readexactly(size))
    return bool(head[0]), levels


def _read(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the verifying process closed the pipe")
    return data


def main() -> None:
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        size = int.from_bytes(_read(source, 8), "big")
        if size == 0:
            return
        sink.write(_answer(*check_chunk(_read(source, size))))
        sink.flush()


if __name__ == "__main__":
    main()
