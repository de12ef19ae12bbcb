"""A long read pauses the cyclic collector a page or a chunk at a time, never for the
whole read: meanwhile the application's other tasks make garbage, which must go on
being collected (``gc.disable`` is for the whole process)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ledger import Ledger
from ledger.config import LedgerConfig
from ledger.events import Event, TurnAdded
from ledger.verify import PAGE
from projections.session import SESSION
from stores.memory import MemoryStore


class _AwaitingStore(MemoryStore):
    """The memory store, awaiting between pages as a store reading from disk or a
    server does (SQLite's and PostgreSQL's reads run in a thread or on a socket), so
    that other tasks run during a read."""

    async def event_pages(
        self, session_id: str, start: int = 0, *, page_size: int = 1000
    ) -> AsyncIterator[list[Event]]:
        async for page in super().event_pages(session_id, start, page_size=page_size):
            await asyncio.sleep(0)
            yield page


class _Node:
    """Garbage of another task: a cycle, which only the collector frees."""

    __slots__ = ("__weakref__", "other")

    def __init__(self) -> None:
        self.other: _Node = self


class _Churn:
    """Another task of the application, making cyclic garbage whenever it runs; it
    notes the most of it that was ever alive (freed: by the collector only)."""

    def __init__(self) -> None:
        self.made = self.freed = self.most_alive = 0
        self._refs: list[weakref.ref[_Node]] = []
        self.stop = asyncio.Event()

    def _free(self, _: object) -> None:
        self.freed += 1

    async def run(self) -> None:
        while not self.stop.is_set():
            self._refs.extend(weakref.ref(_Node(), self._free) for _ in range(_BURST))
            self.made += _BURST
            self.most_alive = max(self.most_alive, self.made - self.freed)
            await asyncio.sleep(0)


_BURST = 1000
"""Nodes a turn of the other task makes."""


_READS: dict[str, Callable[[Ledger, str], Awaitable[Any]]] = {
    "replay": lambda led, sid: led.replay(sid, into=SESSION),
    "verify": lambda led, sid: led.verify(sid),
}


@pytest.mark.parametrize("read", list(_READS))
async def test_a_long_read_lets_other_tasks_garbage_be_collected(read: str) -> None:
    assert gc.isenabled()
    async with Ledger(_AwaitingStore(), LedgerConfig(max_turns_per_session=0)) as led:
        sid = (await led.create(user_id="u", agent="a")).session_id
        for start in range(0, 5 * PAGE, 1000):  # pages of the read
            await led.add_turns(
                sid, [TurnAdded(role="user", content=f"{i}") for i in range(start, start + 1000)]
            )
        churn = _Churn()
        running = asyncio.create_task(churn.run())
        result = await _READS[read](led, sid)
        churn.stop.set()
        await running
        assert result is not None
        assert churn.made >= 5 * _BURST  # the other task ran while the read awaited the store
        # Paused for the whole read, the collector would free none of them meanwhile.
        assert churn.most_alive < churn.made / 2, (churn.most_alive, churn.made)
    assert gc.isenabled()
