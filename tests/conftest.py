"""Shared fixtures: the store backends the contract suite runs against.

``pytest --backends=memory,sqlite`` picks backends; by default every backend
whose module imports is run, and PostgreSQL only when asked for or when
``LEDGER_TEST_POSTGRES_URL`` names a server.

PostgreSQL: ``LEDGER_TEST_POSTGRES_URL`` names the server (through any
database on it, e.g. ``postgresql://postgres@127.0.0.1:5432/postgres``). The
run creates a database ``ledger_test_<random>`` of its own there the first
time a test needs it and drops it at the end; each test works in a schema of
its own inside it (``?schema=t_<random>``), as each SQLite test has a file of
its own. Under CI (``CI`` set) the variable is required: the PostgreSQL tests
run, never skip.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import os
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

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
    backend can be closed and reopened. Add a backend here. PostgreSQL: each
    factory gets a schema of its own in the run's database.
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
        postgres_url = run_database_url()
        # A schema of its own: the facade tests (the sweeper, listings) expect
        # a store holding only their own sessions.
        sep = "&" if "?" in postgres_url else "?"
        pg_url = f"{postgres_url}{sep}schema=t_{uuid.uuid4().hex[:16]}"
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
    if os.environ.get("CI") and not os.environ.get(POSTGRES_URL_ENV):
        raise pytest.UsageError(
            f"CI runs the PostgreSQL tests: set {POSTGRES_URL_ENV} (.ci/run does)"
        )
    # Check --backends once, up front, so a bad value is a usage error.
    config.stash[_SELECTED] = selected_backends(config)


# --- the run's PostgreSQL database ---------------------------------------------------

_RUN_DATABASE: dict[str, str] = {}
"""``server``, ``name`` and ``url`` of the run's database, once made."""


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run ``coroutine`` to the end, even from code already inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coroutine).result()


def run_database_url() -> str:
    """The URL of the run's own database, ``ledger_test_<random>``: made at first use."""
    if "url" not in _RUN_DATABASE:
        server = os.environ.get(POSTGRES_URL_ENV)
        if not server:
            raise pytest.UsageError(f"the postgres backend needs {POSTGRES_URL_ENV}")
        name = f"ledger_test_{uuid.uuid4().hex[:12]}"
        _run(create_database(server, name))
        _RUN_DATABASE.update(server=server, name=name, url=with_database(server, name))
    return _RUN_DATABASE["url"]


def pytest_unconfigure(config: pytest.Config) -> None:
    if "url" in _RUN_DATABASE:
        _run(drop_database(_RUN_DATABASE["server"], _RUN_DATABASE["name"]))
        _RUN_DATABASE.clear()


def with_database(server_url: str, database: str) -> str:
    """``server_url`` pointing at ``database`` instead (its query string kept)."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def create_database(server_url: str, database: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


async def drop_database(server_url: str, database: str) -> None:
    """Terminate whatever still uses ``database``, then drop it."""
    import asyncpg

    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The server named by ``LEDGER_TEST_POSTGRES_URL`` (skips when unset, outside CI)."""
    server = os.environ.get(POSTGRES_URL_ENV)
    if not server:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_URL_ENV}")
    return server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: str) -> str:
    """The run's own database, ``ledger_test_<random>``, dropped when the run ends."""
    return run_database_url()


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Durable-only tests are not collected for a backend that keeps nothing."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec else None
        not_durable = isinstance(backend, Backend) and not backend.durable
        (dropped if not_durable and item.get_closest_marker("durable") else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
