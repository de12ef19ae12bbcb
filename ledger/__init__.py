"""The session ledger: append-only, content-addressed, event-sourced AI agent sessions.

The public surface, in one screen. Backend authors look at ``stores.base`` and
``ledger.testing`` instead.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ledger.config import LedgerConfig
from ledger.errors import (
    AlreadyRedactedError,
    AnchorError,
    BranchExistsError,
    BranchNotFoundError,
    BundleConflictError,
    BundleError,
    BundleKeyError,
    CheckpointNotFoundError,
    ConfigError,
    ConflictError,
    EventNotFoundError,
    EventNotRedactableError,
    EventTooLargeError,
    ImportIncompleteError,
    IntegrityError,
    InvalidEventError,
    LedgerError,
    NotFoundError,
    ProofError,
    SessionCapacityError,
    SessionClosedError,
    SessionExpiredError,
    SessionNotFoundError,
    SessionStateError,
    SessionSuspendedError,
    SessionTransitionError,
    StoreClosedError,
    StoreError,
)
from ledger.events import (
    Branched,
    Checkpointed,
    Closed,
    Erased,
    Event,
    Expired,
    MetadataSet,
    Recorded,
    Redacted,
    Restored,
    Resumed,
    SessionCreated,
    Suspended,
    TurnAdded,
)

if TYPE_CHECKING:
    from ledger.anchors import Anchor
    from ledger.bundle import ExportReport, ImportReport
    from ledger.ledger import Ledger
    from ledger.proofs import ConsistencyProof, InclusionProof, ProofCheck, check_proof
    from ledger.replay import BranchDiff
    from ledger.verify import AnchorCheck, Problem, VerifyReport
    from projections.base import Projection
    from projections.session import Checkpoint, SessionState
    from projections.transcript import Turn, context_window
    from projections.tree import BranchInfo, Tree
    from stores.base import FeedItem, SessionPage, SessionRow

# Names from the layers above the event model load on first use (PEP 562), so that
# `projections` and `stores`, which import `ledger.events`, can be imported first.
_LAZY = {
    "Anchor": "ledger.anchors",
    "AnchorCheck": "ledger.verify",
    "ConsistencyProof": "ledger.proofs",
    "InclusionProof": "ledger.proofs",
    "ProofCheck": "ledger.proofs",
    "check_proof": "ledger.proofs",
    "ExportReport": "ledger.bundle",
    "ImportReport": "ledger.bundle",
    "Ledger": "ledger.ledger",
    "BranchDiff": "ledger.replay",
    "Problem": "ledger.verify",
    "VerifyReport": "ledger.verify",
    "Projection": "projections.base",
    "Checkpoint": "projections.session",
    "SessionState": "projections.session",
    "Turn": "projections.transcript",
    "context_window": "projections.transcript",
    "BranchInfo": "projections.tree",
    "Tree": "projections.tree",
    "FeedItem": "stores.base",
    "SessionPage": "stores.base",
    "SessionRow": "stores.base",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ledger' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AlreadyRedactedError",
    "Anchor",
    "AnchorCheck",
    "AnchorError",
    "BranchDiff",
    "BranchExistsError",
    "BranchInfo",
    "BranchNotFoundError",
    "Branched",
    "BundleConflictError",
    "BundleError",
    "BundleKeyError",
    "Checkpoint",
    "CheckpointNotFoundError",
    "Checkpointed",
    "Closed",
    "ConfigError",
    "ConflictError",
    "ConsistencyProof",
    "Erased",
    "Event",
    "EventNotFoundError",
    "EventNotRedactableError",
    "EventTooLargeError",
    "Expired",
    "ExportReport",
    "FeedItem",
    "ImportIncompleteError",
    "ImportReport",
    "InclusionProof",
    "IntegrityError",
    "InvalidEventError",
    "Ledger",
    "LedgerConfig",
    "LedgerError",
    "MetadataSet",
    "NotFoundError",
    "Problem",
    "Projection",
    "ProofCheck",
    "ProofError",
    "Recorded",
    "Redacted",
    "Restored",
    "Resumed",
    "SessionCapacityError",
    "SessionClosedError",
    "SessionCreated",
    "SessionExpiredError",
    "SessionNotFoundError",
    "SessionPage",
    "SessionRow",
    "SessionState",
    "SessionStateError",
    "SessionSuspendedError",
    "SessionTransitionError",
    "StoreClosedError",
    "StoreError",
    "Suspended",
    "Tree",
    "Turn",
    "TurnAdded",
    "VerifyReport",
    "check_proof",
    "context_window",
]
