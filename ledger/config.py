"""Configuration: limits, lifecycle and store settings, also read from ``LEDGER_*``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec

from ledger.errors import ConfigError

__all__ = ["DEFAULT_URL", "LedgerConfig"]

DEFAULT_URL = "sqlite:///ledger.db"


class LedgerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting of a ledger, with its default.

    Each field can also come from the environment variable ``LEDGER_<FIELD>``
    (``LEDGER_MAX_TURNS_PER_SESSION=500``); see ``LedgerConfig.from_env``.
    Zero disables a limit or a feature where the field says so.
    """

    url: str = DEFAULT_URL
    """Where the store is: ``sqlite:///path.db``, ``memory://``, ``postgresql://...``."""
    session_ttl_s: float = 0
    """Idle seconds after which an open session expires (0: never)."""
    auto_checkpoint_every: int = 0
    """Take a checkpoint after every N turns on a branch (0: never)."""
    max_turns_per_session: int = 100_000
    """Turns on one branch's path (0: no limit)."""
    max_open_sessions_per_user: int = 1_000
    """Active or suspended sessions per user (0: no limit)."""
    max_branches_per_session: int = 100
    max_checkpoints_per_session: int = 1_000
    """Checkpoints on one branch's path (0: no limit)."""
    max_event_bytes: int = 1 << 20
    """The encoded size of one event (1 MiB)."""
    snapshot_every: int = 256
    """Persist a projection snapshot every N events of depth."""
    max_retries: int = 100
    """Compare-and-swap retries of a write that did not name an ``expected_head``."""
    key: str | None = None
    """A 32-byte key, as 64 hex digits: checkpoint checksums become keyed MACs."""

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, int | float) and value < 0:
                raise ConfigError(f"Invalid {name}: {value!r} (must be >= 0)")
        for name in ("snapshot_every", "max_event_bytes", "max_retries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Invalid {name}: {getattr(self, name)!r} (must be >= 1)")
        if self.key is not None:
            try:
                ok = len(bytes.fromhex(self.key)) == 32
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError("Invalid key: expected 32 bytes as 64 hex digits")
        if "://" not in self.url:
            raise ConfigError(f"Invalid url: {self.url!r} (expected scheme://...)")

    @property
    def key_bytes(self) -> bytes | None:
        return bytes.fromhex(self.key) if self.key else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> LedgerConfig:
        """Defaults, then ``LEDGER_*`` variables, then ``overrides`` (None values ignored).

        Raises:
            ConfigError: a variable that does not parse, naming it and its value.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.__struct_fields__:
            variable = f"LEDGER_{name.upper()}"
            if variable in env:
                values[name] = _parse(variable, env[variable], cls.__annotations__[name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(cls.__struct_fields__)
        if unknown:
            raise ConfigError(f"Unknown setting: {sorted(unknown)[0]!r}")
        return cls(**values)


def _parse(variable: str, raw: str, annotation: str) -> Any:
    kind = "a number" if "float" in annotation else "an integer" if "int" in annotation else None
    try:
        if kind == "a number":
            return float(raw)
        if kind == "an integer":
            return int(raw.replace("_", ""))
    except ValueError:
        raise ConfigError(f"Invalid {variable}: {raw!r} (expected {kind})") from None
    return raw
