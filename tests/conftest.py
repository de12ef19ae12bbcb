pytest_plugins = ["ledger.testing"]
