"""Proofs about a session's Merkle log that anyone can check offline.

- ``InclusionProof``: one event (a single turn, say) belongs to a session at an
  anchor. It carries the event itself, so its id is recomputed from its
  content; its index in the session's append order; the RFC 9162 audit path;
  and the anchor (with its MAC) it proves against. Nothing else of the session
  is needed to check it.
- ``ConsistencyProof``: the session at a later anchor extends an earlier one
  (RFC 9162 consistency proof): nothing anchored was truncated, rewritten,
  reordered or removed since.

``check_proof`` checks either kind. With the ledger's key it also checks the
anchor's MAC, which is what makes a proof mean something against someone who
can write to the store; without a key, or with an unsigned anchor, it checks
integrity only, unless you compare the proof's anchor with one you kept
(``trusted=``).
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from ledger.anchors import Anchor, MacStatus, check_anchor_mac, describe
from ledger.errors import ProofError
from ledger.events import Event, event_problem
from ledger.merkle import MerkleLog, leaf_hash, root_from_inclusion, verify_consistency

__all__ = [
    "PROOF_FORMAT",
    "ConsistencyProof",
    "InclusionProof",
    "Proof",
    "ProofCheck",
    "check_proof",
    "consistency_proof",
    "decode_proof",
    "encode_proof",
    "inclusion_proof",
]

PROOF_FORMAT: Final = 1

_Hex64 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class InclusionProof(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="proof",
    tag="inclusion",
):
    """``event`` is leaf ``index`` of the session's log at ``anchor`` (size ``anchor.size``)."""

    event: Event
    index: Annotated[int, msgspec.Meta(ge=0)]
    path: list[_Hex64]
    anchor: Anchor
    format: int = PROOF_FORMAT


class ConsistencyProof(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="proof",
    tag="consistency",
):
    """The session's log at ``new`` extends its log at ``old``."""

    old: Anchor
    new: Anchor
    path: list[_Hex64]
    format: int = PROOF_FORMAT


Proof = InclusionProof | ConsistencyProof


class ProofCheck(msgspec.Struct, frozen=True, kw_only=True):
    """What a proof that checked shows. ``mac`` says how far to trust its anchor."""

    proof: str
    session: str
    size: int
    root: str
    mac: MacStatus
    key_id: str | None
    event_id: str | None = None
    index: int | None = None
    kind: str | None = None
    """The proven event's kind (inclusion proofs)."""
    old_size: int | None = None
    old_root: str | None = None


def inclusion_proof(event: Event, index: int, log: MerkleLog, anchor: Anchor) -> InclusionProof:
    """The proof that ``event`` is leaf ``index`` of ``log`` at ``anchor.size``.

    Raises:
        ProofError: the event is not that leaf, or the log does not match the anchor.
    """
    if not 0 <= index < anchor.size <= log.size:
        raise ProofError(
            f"Event {event.id!r} (index {index}) is not covered by {describe(anchor)}",
            reason="index",
            event_id=event.id,
        )
    if log.leaf(index) != leaf_hash(bytes.fromhex(event.id)):
        raise ProofError(
            f"Event {event.id!r} is not at index {index} of session {event.session!r}",
            reason="index",
            event_id=event.id,
        )
    if log.root(anchor.size).hex() != anchor.root:
        raise ProofError(
            f"Session {anchor.session!r} no longer matches {describe(anchor)}: "
            "run verify with this anchor",
            reason="extends",
        )
    path = [node.hex() for node in log.inclusion_proof(index, anchor.size)]
    return InclusionProof(event=event, index=index, path=path, anchor=anchor)


def consistency_proof(old: Anchor, log: MerkleLog, new: Anchor) -> ConsistencyProof:
    """The proof that the log at ``new`` extends the log at ``old`` (both of ``log``)."""
    path = [node.hex() for node in log.consistency_proof(old.size, new.size)]
    return ConsistencyProof(old=old, new=new, path=path)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Proof)


def encode_proof(proof: Proof) -> bytes:
    return _encoder.encode(proof)


def decode_proof(data: bytes | str, *, source: str = "proof") -> Proof:
    """Parse a proof file; ``source`` is named in the error.

    Raises:
        ProofError: (``reason="format"``) not a proof, or of an unknown format.
    """
    try:
        proof: Proof = _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProofError(f"Not a proof: {source} ({exc})", reason="format") from None
    if proof.format != PROOF_FORMAT:
        raise ProofError(
            f"Unknown proof format {proof.format} in {source} (this code reads {PROOF_FORMAT})",
            reason="format",
        )
    return proof


def check_proof(
    proof: Proof, *, key: bytes | None = None, trusted: Anchor | None = None
) -> ProofCheck:
    """Check a proof offline; what it shows, or the error that names what failed.

    Args:
        key: The ledger's key: the proof's anchor must carry a MAC under it.
        trusted: An anchor you kept: the proof must be against it (inclusion), or
            start from it (consistency).

    Raises:
        AnchorError: a MAC that does not match, or made with another key.
        ProofError: the event, the index, the path or the anchors do not check.
    """
    if isinstance(proof, InclusionProof):
        return _check_inclusion(proof, key, trusted)
    return _check_consistency(proof, key, trusted)


def _same_head(a: Anchor, b: Anchor) -> bool:
    return (a.session, a.size, a.root) == (b.session, b.size, b.root)


def _check_inclusion(
    proof: InclusionProof, key: bytes | None, trusted: Anchor | None
) -> ProofCheck:
    anchor, event = proof.anchor, proof.event
    mac = check_anchor_mac(anchor, key)
    if trusted is not None:
        check_anchor_mac(trusted, key)
        if not _same_head(anchor, trusted):
            raise ProofError(
                f"The proof is against {describe(anchor)}, not the {describe(trusted)} given",
                reason="anchor",
            )
    problem = event_problem(event)
    if problem:
        raise ProofError(
            f"The proven event does not verify: {event.id!r}: {problem}",
            reason="event",
            event_id=event.id,
        )
    if event.session != anchor.session:
        raise ProofError(
            f"Event {event.id!r} belongs to session {event.session!r}, "
            f"the proof's anchor to session {anchor.session!r}",
            reason="session",
            event_id=event.id,
        )
    if proof.index >= anchor.size:
        raise ProofError(
            f"Index {proof.index} of event {event.id!r} is outside {describe(anchor)}",
            reason="index",
            event_id=event.id,
        )
    path = [bytes.fromhex(node) for node in proof.path]
    leaf = leaf_hash(bytes.fromhex(event.id))
    if root_from_inclusion(leaf, proof.index, anchor.size, path) != bytes.fromhex(anchor.root):
        raise ProofError(
            f"Inclusion proof does not check: event {event.id!r} at index {proof.index} "
            f"does not lead to the root of {describe(anchor)} (a changed path, index or anchor)",
            reason="path",
            event_id=event.id,
        )
    return ProofCheck(
        proof="inclusion",
        session=anchor.session,
        size=anchor.size,
        root=anchor.root,
        mac=mac,
        key_id=anchor.key_id,
        event_id=event.id,
        index=proof.index,
        kind=event.kind,
    )


def _check_consistency(
    proof: ConsistencyProof, key: bytes | None, trusted: Anchor | None
) -> ProofCheck:
    old, new = proof.old, proof.new
    mac = check_anchor_mac(new, key)
    check_anchor_mac(old, key)
    if trusted is not None:
        check_anchor_mac(trusted, key)
        if not _same_head(old, trusted):
            raise ProofError(
                f"The proof starts from {describe(old)}, not the {describe(trusted)} given",
                reason="anchor",
            )
    if old.session != new.session:
        raise ProofError(
            f"The proof joins anchors of two sessions: {old.session!r} and {new.session!r}",
            reason="session",
        )
    path = [bytes.fromhex(node) for node in proof.path]
    if not verify_consistency(
        old.size, new.size, bytes.fromhex(old.root), bytes.fromhex(new.root), path
    ):
        raise ProofError(
            f"Consistency proof does not check: the {describe(new)} does not extend the "
            f"{describe(old)}",
            reason="path",
        )
    return ProofCheck(
        proof="consistency",
        session=new.session,
        size=new.size,
        root=new.root,
        mac=mac,
        key_id=new.key_id,
        old_size=old.size,
        old_root=old.root,
    )
