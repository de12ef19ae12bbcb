"""Shared fixtures: the store backends the contract suite runs against.

``pytest --backends=memory,sqlite`` picks backends; by default every backend
whose module imports is run, and PostgreSQL only when asked for or when
``LEDGER_TEST_POSTGRES_URL`` names a server.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from stores.base import FeedStore

pytest_plugins = ["ledger.testing"]

POSTGRES_URL_ENV = "LEDGER_TEST_POSTGRES_URL"
KNOWN_BACKENDS = ("memory", "sqlite", "jsonl", "postgres")


@dataclass(frozen=True)
class Backend:
    name: str
    durable: bool
    """Data survives close and reopen."""


DURABLE = {"memory": False, "sqlite": True, "jsonl": True, "postgres": True}


def store_factory(name: str, tmp_path: Path) -> Callable[[], FeedStore]:
    """A zero-argument callable returning a new, unopened store over one test's data.

    Every call returns a new store object over the same data, so a durable
    backend can be closed and reopened. Add a backend here.
    """
    from stores import open_store

    if name == "memory":
        from stores.memory import MemoryStore

        return MemoryStore
    if name == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
        return lambda: open_store(url)
    if name == "jsonl":
        url = f"jsonl:///{tmp_path / 'jsonl'}"
        return lambda: open_store(url)
    if name == "postgres":
        # The contract suite uses fresh random ids and measures the feed from
        # where it stood, so one shared database serves every test.
        pg_url = os.environ.get(POSTGRES_URL_ENV)
        if not pg_url:
            raise pytest.UsageError(f"the postgres backend needs {POSTGRES_URL_ENV}")
        return lambda: open_store(pg_url)
    raise pytest.UsageError(f"unknown backend {name!r} (known: {', '.join(KNOWN_BACKENDS)})")


def _importable(name: str) -> bool:
    from stores import BACKENDS

    module = BACKENDS[name].partition(":")[0]
    try:
        importlib.import_module(module)
    except ImportError:  # not written yet, or its driver is not installed
        return False
    return True


def _default_backends() -> list[str]:
    chosen = [n for n in ("memory", "sqlite", "jsonl") if _importable(n)]
    if os.environ.get(POSTGRES_URL_ENV) and _importable("postgres"):
        chosen.append("postgres")
    return chosen


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backends",
        default=None,
        help=(
            "comma-separated store backends for the contract suite "
            f"({', '.join(KNOWN_BACKENDS)}); default: every importable one, "
            f"postgres only when {POSTGRES_URL_ENV} is set"
        ),
    )


def selected_backends(config: pytest.Config) -> list[str]:
    option = config.getoption("--backends")
    if option is None:
        return _default_backends()
    names = [n.strip() for n in str(option).split(",") if n.strip()]
    for name in names:
        if name not in KNOWN_BACKENDS:
            raise pytest.UsageError(
                f"--backends: unknown backend {name!r} (known: {', '.join(KNOWN_BACKENDS)})"
            )
        if not _importable(name):
            raise pytest.UsageError(f"--backends: the {name} backend cannot be imported")
        if name == "postgres" and not os.environ.get(POSTGRES_URL_ENV):
            raise pytest.UsageError(f"--backends: postgres needs {POSTGRES_URL_ENV} to be set")
    return names


_SELECTED = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    # Check --backends once, up front, so a bad value is a usage error.
    config.stash[_SELECTED] = selected_backends(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        names = metafunc.config.stash[_SELECTED]
        metafunc.parametrize(
            "backend", [Backend(n, DURABLE[n]) for n in names], ids=names, indirect=True
        )


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    param: Backend = request.param
    return param


@pytest.fixture
def make_store(backend: Backend, tmp_path: Path) -> Callable[[], FeedStore]:
    return store_factory(backend.name, tmp_path)
