"""The store contract suite against every selected backend (see ``--backends``)."""

from __future__ import annotations

from typing import Any

import pytest

from ledger.testing import StoreContract


class TestStoreContract(StoreContract):
    @pytest.fixture(autouse=True)
    def _durability(self, backend: Any) -> None:
        # pytest makes one instance per test, so this sets the flag for this test only
        self.durable = backend.durable
