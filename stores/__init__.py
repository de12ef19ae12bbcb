"""Storage backends, opened from a URL.

``memory://``, ``sqlite:///path.db``, ``jsonl:///dir``, ``postgresql://...``.
This package imports no driver: each backend's module is imported only when a
URL asks for it, so ``import stores.postgres`` is the only import of asyncpg.
"""

from __future__ import annotations

import importlib
from typing import Any

from ledger.errors import ConfigError
from stores.base import (
    AppendRequest,
    AppendResult,
    EventStore,
    FeedItem,
    FeedStore,
    SessionPage,
    SessionQuery,
    SessionRow,
)

__all__ = [
    "BACKENDS",
    "AppendRequest",
    "AppendResult",
    "EventStore",
    "FeedItem",
    "FeedStore",
    "SessionPage",
    "SessionQuery",
    "SessionRow",
    "open_store",
]

BACKENDS: dict[str, str] = {
    "memory": "stores.memory:MemoryStore",
    "sqlite": "stores.sqlite:SQLiteStore",
    "jsonl": "stores.jsonl:JSONLStore",
    "postgresql": "stores.postgres:PostgresStore",
    "postgres": "stores.postgres:PostgresStore",
}


def open_store(url: str, **options: Any) -> FeedStore:
    """The (not yet opened) store for a URL; ``await store.open()`` or ``async with`` it."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in BACKENDS:
        known = ", ".join(f"{s}://" for s in BACKENDS)
        raise ConfigError(f"Unknown store URL: {url!r} (expected one of {known})")
    module_name, _, class_name = BACKENDS[scheme].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"The {scheme}:// store is not available: {exc} "
            f"(install the package's '{scheme}' extra)"
        ) from None
    store: FeedStore = getattr(module, class_name).from_url(url, **options)
    return store
