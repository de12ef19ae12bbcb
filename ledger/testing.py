"""The store contract suite, shipped so that an outside backend can run it too.

Use it from a test module::

    from ledger.testing import StoreContract

    class TestMyStore(StoreContract):
        durable = True                      # data survives close and reopen

        @pytest.fixture
        def make_store(self, tmp_path):
            return lambda: MyStore(tmp_path / "data")   # a new, unopened store over the same data

and enable the plugin (it runs ``async def`` tests) with
``pytest_plugins = ["ledger.testing"]`` in a ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

__all__ = ["StoreContract", "pytest_pyfunc_call"]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests in a fresh event loop (no plugin dependency needed)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs: dict[str, Any] = {name: pyfuncitem.funcargs[name] for name in names}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


class StoreContract:
    """Every test a backend must pass. Filled in below."""

    durable: bool = False
