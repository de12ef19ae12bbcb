"""The ledger's errors: one tree, drawn once.

LedgerError
├── ConfigError(ValueError)              a bad setting or environment variable
├── StoreError                           the store failed or cannot be reached
│   ├── StoreClosedError                 the store (or ledger) is closed
│   └── ImportIncompleteError            the store failed midway through an import
├── NotFoundError(LookupError)
│   ├── SessionNotFoundError
│   ├── BranchNotFoundError
│   ├── CheckpointNotFoundError
│   └── EventNotFoundError
├── InvalidEventError(ValueError)        content that cannot be encoded, a bad name
│   ├── EventTooLargeError
│   ├── EventNotRedactableError          only TurnAdded and Recorded bodies can be erased
│   └── AlreadyRedactedError             the event's body was erased before
├── ConflictError                        the branch head moved (compare-and-swap)
│   ├── BranchExistsError
│   └── BundleConflictError              the target holds a bundle's session, different
├── SessionStateError                    the session's lifecycle refuses the write
│   ├── SessionClosedError
│   ├── SessionExpiredError
│   ├── SessionSuspendedError
│   └── SessionTransitionError
├── SessionCapacityError                 a configured limit would be exceeded
└── IntegrityError                       stored data does not verify (tampered or corrupt)
    ├── AnchorError                      an anchor that does not check (MAC, key, session, format)
    ├── ProofError                       a proof that does not check, or cannot be made
    └── BundleError                      a bundle damaged, cut short or tampered with
        └── BundleKeyError               a bundle exported with another key (or none)

Every message names the ids involved, in the form ``Session not found: 'abc-123'``.
Every refused operation writes nothing.
"""

from __future__ import annotations

__all__ = [
    "AlreadyRedactedError",
    "AnchorError",
    "BranchExistsError",
    "BranchNotFoundError",
    "BundleConflictError",
    "BundleError",
    "BundleKeyError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ConflictError",
    "EventNotFoundError",
    "EventNotRedactableError",
    "EventTooLargeError",
    "ImportIncompleteError",
    "IntegrityError",
    "InvalidEventError",
    "LedgerError",
    "NotFoundError",
    "ProofError",
    "SessionCapacityError",
    "SessionClosedError",
    "SessionExpiredError",
    "SessionNotFoundError",
    "SessionStateError",
    "SessionSuspendedError",
    "SessionTransitionError",
    "StoreClosedError",
    "StoreError",
]


class LedgerError(Exception):
    """Base class of every error the ledger raises."""


class ConfigError(LedgerError, ValueError):
    """A configuration value is missing or invalid."""


class StoreError(LedgerError):
    """The store failed, or cannot be reached."""


class StoreClosedError(StoreError):
    """The store or ledger was used after it was closed (or before it was opened)."""


class NotFoundError(LedgerError, LookupError):
    """Something named by id does not exist."""


class SessionNotFoundError(NotFoundError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session not found: {session_id!r}")
        self.session_id = session_id


class BranchNotFoundError(NotFoundError):
    def __init__(self, session_id: str, branch: str) -> None:
        super().__init__(f"Branch not found in session {session_id!r}: {branch!r}")
        self.session_id = session_id
        self.branch = branch


class CheckpointNotFoundError(NotFoundError):
    def __init__(self, session_id: str, checkpoint_id: str) -> None:
        super().__init__(f"Checkpoint not found in session {session_id!r}: {checkpoint_id!r}")
        self.session_id = session_id
        self.checkpoint_id = checkpoint_id


class EventNotFoundError(NotFoundError):
    def __init__(self, event_id: str, session_id: str | None = None) -> None:
        where = f" in session {session_id!r}" if session_id else ""
        super().__init__(f"Event not found{where}: {event_id!r}")
        self.event_id = event_id
        self.session_id = session_id


class InvalidEventError(LedgerError, ValueError):
    """The event cannot be built: content that is not JSON, a bad name or value."""


class EventTooLargeError(InvalidEventError):
    def __init__(self, session_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"Event too large for session {session_id!r}: {size} bytes (limit {limit})"
        )
        self.session_id = session_id
        self.size = size
        self.limit = limit


class EventNotRedactableError(InvalidEventError):
    def __init__(self, event_id: str, kind: str) -> None:
        super().__init__(
            f"Event cannot be redacted: {event_id!r} is a {kind} "
            "(only TurnAdded and Recorded events can be)"
        )
        self.event_id = event_id
        self.kind = kind


class AlreadyRedactedError(InvalidEventError):
    def __init__(self, event_id: str, redaction_id: str | None = None) -> None:
        by = f" (by {redaction_id!r})" if redaction_id else ""
        super().__init__(f"Event already redacted: {event_id!r}{by}")
        self.event_id = event_id
        self.redaction_id = redaction_id


class ConflictError(LedgerError):
    """The branch head is not the one the write expected."""

    def __init__(
        self, session_id: str, branch: str, expected: str | None, current: str | None
    ) -> None:
        super().__init__(
            f"Conflict on session {session_id!r} branch {branch!r}: "
            f"expected head {expected!r}, current head {current!r}"
        )
        self.session_id = session_id
        self.branch = branch
        self.expected = expected
        self.current = current


class BranchExistsError(ConflictError):
    def __init__(self, session_id: str, branch: str, current: str | None) -> None:
        LedgerError.__init__(self, f"Branch already exists in session {session_id!r}: {branch!r}")
        self.session_id = session_id
        self.branch = branch
        self.expected = None
        self.current = current


class SessionStateError(LedgerError):
    """The session's lifecycle status refuses the operation."""


class SessionClosedError(SessionStateError):
    def __init__(self, session_id: str, branch: str = "main") -> None:
        super().__init__(f"Session is closed: {session_id!r} (branch {branch!r})")
        self.session_id = session_id
        self.branch = branch


class SessionExpiredError(SessionStateError):
    def __init__(self, session_id: str, branch: str = "main") -> None:
        super().__init__(f"Session has expired: {session_id!r} (branch {branch!r})")
        self.session_id = session_id
        self.branch = branch


class SessionSuspendedError(SessionStateError):
    def __init__(self, session_id: str, branch: str = "main") -> None:
        super().__init__(
            f"Session is suspended: {session_id!r} (branch {branch!r}); resume it first"
        )
        self.session_id = session_id
        self.branch = branch


class SessionTransitionError(SessionStateError):
    def __init__(self, session_id: str, current: str, target: str) -> None:
        super().__init__(
            f"Invalid transition for session {session_id!r}: {current!r} -> {target!r}"
        )
        self.session_id = session_id
        self.current = current
        self.target = target


class SessionCapacityError(LedgerError):
    """A configured limit (turns, sessions, branches, checkpoints) would be exceeded."""

    def __init__(self, subject: str, what: str, limit: int) -> None:
        super().__init__(f"Limit reached for {subject}: {what} (limit {limit})")
        self.subject = subject
        self.what = what
        self.limit = limit


class IntegrityError(LedgerError):
    """Stored data does not verify: it was tampered with or is corrupt."""

    def __init__(self, message: str, event_id: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id


class AnchorError(IntegrityError):
    """An anchor that does not check: unreadable, of another session, forged, or another key.

    ``reason`` says which, for programs: ``format``, ``session``, ``mac``, ``key``,
    ``unsigned`` or ``extends`` (the session no longer extends it).
    """

    def __init__(self, message: str, *, reason: str, event_id: str | None = None) -> None:
        super().__init__(message, event_id)
        self.reason = reason


class ProofError(IntegrityError):
    """A proof that does not check, or that cannot be made; ``reason`` says which."""

    def __init__(self, message: str, *, reason: str, event_id: str | None = None) -> None:
        super().__init__(message, event_id)
        self.reason = reason


class BundleError(IntegrityError):
    """A bundle that does not verify: ``line``, and the session and event when there is one."""

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        session_id: str | None = None,
        event_id: str | None = None,
    ) -> None:
        super().__init__(message, event_id)
        self.line = line
        self.session_id = session_id


class BundleKeyError(BundleError):
    """The bundle was exported with another key than the importing ledger's (or one has none)."""


class BundleConflictError(ConflictError):
    """The target store holds a session of the bundle, and it differs from the bundle's."""

    def __init__(
        self,
        message: str,
        *,
        session_id: str,
        branch: str,
        expected: str | None,
        current: str | None,
    ) -> None:
        LedgerError.__init__(self, message)
        self.session_id = session_id
        self.branch = branch
        self.expected = expected
        self.current = current


class ImportIncompleteError(StoreError):
    """The store failed midway through an import; ``report`` (an ``ImportReport``) says
    what was written. Running the import again finishes it."""

    def __init__(self, message: str, *, session_id: str, report: object) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.report = report
