"""The Merkle log against RFC 6962/9162 test vectors (SHA-256) and a naive reference."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.anchors import anchor_mac, key_id, mac_matches, make_anchor
from ledger.merkle import (
    MerkleLog,
    StreamingRoot,
    blake3_hash,
    root_from_inclusion,
    verify_consistency,
    verify_inclusion,
)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# The eight leaves of the Certificate Transparency reference tests and the
# published SHA-256 tree heads of their prefixes (sizes 0 to 8).
CT_LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# Published consistency proofs between prefixes of the same tree.
CT_CONSISTENCY = {
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}
# Published audit path of leaf 0 in the tree of the first 7 leaves.
CT_PATH_0_OF_7 = [
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "837dbb152e9b079010717e84e865da4ebc0fa198a806d59d31bf15accef22d0e",
]


# A reference written straight from the RFC's recursive definitions, naive on purpose.
def ref_mth(d: list[bytes], h=sha256) -> bytes:  # type: ignore[no-untyped-def]
    if not d:
        return h(b"")
    if len(d) == 1:
        return h(b"\x00" + d[0])
    k = 1
    while k * 2 < len(d):
        k *= 2
    return h(b"\x01" + ref_mth(d[:k], h) + ref_mth(d[k:], h))


def ref_path(m: int, d: list[bytes], h=sha256) -> list[bytes]:  # type: ignore[no-untyped-def]
    if len(d) == 1:
        return []
    k = 1
    while k * 2 < len(d):
        k *= 2
    if m < k:
        return [*ref_path(m, d[:k], h), ref_mth(d[k:], h)]
    return [*ref_path(m - k, d[k:], h), ref_mth(d[:k], h)]


def ref_subproof(m: int, d: list[bytes], b: bool, h=sha256) -> list[bytes]:  # type: ignore[no-untyped-def]
    if m == len(d):
        return [] if b else [ref_mth(d, h)]
    k = 1
    while k * 2 < len(d):
        k *= 2
    if m <= k:
        return [*ref_subproof(m, d[:k], b, h), ref_mth(d[k:], h)]
    return [*ref_subproof(m - k, d[k:], False, h), ref_mth(d[:k], h)]


def hexes(values: list[bytes]) -> list[str]:
    return [v.hex() for v in values]


def test_tree_heads_match_the_published_vectors() -> None:
    log = MerkleLog(hash=sha256)
    assert log.root().hex() == CT_ROOTS[0]
    for size, leaf in enumerate(CT_LEAVES, start=1):
        log.append(leaf)
        assert [log.root(n).hex() for n in range(size + 1)] == CT_ROOTS[: size + 1]


def test_proofs_match_the_published_vectors() -> None:
    log = MerkleLog(CT_LEAVES, hash=sha256)
    assert hexes(log.inclusion_proof(0, 7)) == CT_PATH_0_OF_7
    for (old, new), proof in CT_CONSISTENCY.items():
        assert hexes(log.consistency_proof(old, new)) == proof
        assert verify_consistency(
            old,
            new,
            bytes.fromhex(CT_ROOTS[old]),
            bytes.fromhex(CT_ROOTS[new]),
            [bytes.fromhex(p) for p in proof],
            hash=sha256,
        )


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 8, 9, 16, 17, 31, 33])
def test_every_proof_equals_the_rfc_definition_and_verifies(size: int) -> None:
    leaves = [i.to_bytes(4, "big") for i in range(size)]
    log = MerkleLog(leaves, hash=sha256)
    for n in range(1, size + 1):
        root = log.root(n)
        assert root == ref_mth(leaves[:n])
        for m in range(n):
            path = log.inclusion_proof(m, n)
            assert path == ref_path(m, leaves[:n])
            assert verify_inclusion(log.leaf_hash(leaves[m]), m, n, path, root, hash=sha256)
        for m in range(1, n):
            proof = log.consistency_proof(m, n)
            assert proof == ref_subproof(m, leaves[:n], True)
            assert verify_consistency(m, n, log.root(m), root, proof, hash=sha256)


@pytest.mark.parametrize("memo_size", [1, 3])
def test_proofs_stay_the_rfc_definition_when_the_memo_of_subtrees_overflows(
    memo_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ledger.merkle._MEMO_SIZE", memo_size)
    leaves = [i.to_bytes(4, "big") for i in range(45)]
    log = MerkleLog(leaves[:20], hash=sha256)
    for n in (13, 20, 7, 13):  # the memo kept, cleared and filled again, in any order
        assert log.root(n) == ref_mth(leaves[:n])
        assert [log.inclusion_proof(m, n) for m in range(n)] == [
            ref_path(m, leaves[:n]) for m in range(n)
        ]
    log.extend(leaves[20:])  # appends leave the kept ranges as they were
    for n in (45, 20, 33):
        assert log.root(n) == ref_mth(leaves[:n])
        assert log.consistency_proof(n - 6, n) == ref_subproof(n - 6, leaves[:n], True)


@given(st.lists(st.binary(max_size=8), min_size=1, max_size=70), st.data())
def test_tampered_proofs_and_roots_are_refused(leaves: list[bytes], data: st.DataObject) -> None:
    log = MerkleLog(leaves)
    size = len(leaves)
    index = data.draw(st.integers(0, size - 1))
    root = log.root()
    path = log.inclusion_proof(index)
    leaf = log.leaf_hash(leaves[index])
    assert verify_inclusion(leaf, index, size, path, root)
    if path:
        i = data.draw(st.integers(0, len(path) - 1))
        bad = [*path[:i], bytes([path[i][0] ^ 1]) + path[i][1:], *path[i + 1 :]]
        assert not verify_inclusion(leaf, index, size, bad, root)
        assert not verify_inclusion(leaf, index, size, path[:-1], root)
    assert not verify_inclusion(leaf, index, size, [*path, leaf], root)
    assert root_from_inclusion(leaf, size, size, path) is None
    old = data.draw(st.integers(1, size))
    proof = log.consistency_proof(old)
    assert verify_consistency(old, size, log.root(old), root, proof)
    flipped = bytes([root[0] ^ 1]) + root[1:]
    assert not verify_consistency(old, size, log.root(old), flipped, proof)
    if old < size:
        assert not verify_consistency(old, size, blake3_hash(b"forged"), root, proof)


@given(st.lists(st.binary(min_size=32, max_size=32), max_size=40), st.data())
def test_a_log_grown_leaf_by_leaf_equals_one_built_at_once(
    leaves: list[bytes], data: st.DataObject
) -> None:
    grown = MerkleLog()
    for leaf in leaves:
        grown.append(leaf)
    whole = MerkleLog(leaves)
    assert [grown.root(n) for n in range(len(leaves) + 1)] == [
        ref_mth(leaves[:n], blake3_hash) for n in range(len(leaves) + 1)
    ]
    assert grown.root() == whole.root()


def test_sizes_out_of_range_are_refused() -> None:
    log = MerkleLog([b"a", b"b"])
    with pytest.raises(IndexError, match="2 leaves, not 3"):
        log.root(3)
    with pytest.raises(IndexError, match="Leaf 2"):
        log.inclusion_proof(2)
    with pytest.raises(IndexError, match="3 leaves is not a prefix"):
        log.consistency_proof(3)


def test_an_anchor_is_a_tree_head_with_a_mac_only_under_a_key() -> None:
    ids = [blake3_hash(bytes([i])).hex() for i in range(5)]
    plain = make_anchor("s-1", ids, key=None, at=7)
    assert plain.mac is None
    assert plain.size == 5
    assert plain.root == MerkleLog(bytes.fromhex(i) for i in ids).root().hex()
    key = bytes(range(32))
    signed = make_anchor("s-1", ids, key=key, at=7)
    assert signed.root == plain.root and signed.key_id == key_id(key)
    assert signed.mac == anchor_mac(msgspec.structs.replace(plain, key_id=key_id(key)), key)
    assert mac_matches(signed, key)
    assert not mac_matches(signed, bytes(32))
    assert not mac_matches(plain, key)
    forged = msgspec.structs.replace(signed, size=4)
    assert not mac_matches(forged, key)


def test_a_log_built_level_by_level_matches_the_rfc_definition() -> None:
    for size in range(len(CT_LEAVES) + 1):
        # The CT leaves have different lengths: pad them to one width, as ids are.
        width = max(len(leaf) for leaf in CT_LEAVES) + 1
        padded = [leaf.ljust(width - 1, b"\x00") + bytes([len(leaf)]) for leaf in CT_LEAVES]
        whole = MerkleLog.from_leaves(b"".join(padded[:size]), width=width, hash=sha256)
        assert whole.root() == ref_mth(padded[:size])
        assert whole.levels == MerkleLog(padded[:size], hash=sha256).levels


@given(st.lists(st.binary(min_size=32, max_size=32), max_size=70), st.integers(0, 5))
def test_a_log_from_subtrees_hashed_in_aligned_pieces_is_the_same_log(
    leaves: list[bytes], power: int
) -> None:
    piece = 1 << power
    whole = MerkleLog(leaves)
    parts = [
        MerkleLog.from_leaves(b"".join(leaves[i : i + piece])) for i in range(0, len(leaves), piece)
    ]
    depth = max((len(p.levels) for p in parts), default=1)
    joined = MerkleLog.from_subtrees(
        [b"".join(p.levels[h] for p in parts if h < len(p.levels)) for h in range(depth)]
    )
    assert joined.levels == whole.levels and joined.root() == whole.root()
    if leaves:
        assert MerkleLog.from_leaves(b"".join(leaves)).inclusion_proof(0) == whole.inclusion_proof(
            0
        )
    with pytest.raises(ValueError, match="whole number"):
        MerkleLog.from_leaves(b"x" * 33)


@given(st.lists(st.binary(min_size=32, max_size=32), max_size=300))
def test_streaming_root_is_the_rfc_9162_tree_head(leaves: list[bytes]) -> None:
    root = StreamingRoot()
    log = MerkleLog()
    for leaf in leaves:
        root.append(leaf)
        log.append(leaf)
        assert root.root() == log.root() and root.size == log.size
    assert StreamingRoot().root() == MerkleLog().root()


@given(st.lists(st.binary(min_size=32, max_size=32), max_size=300), st.data())
def test_streaming_root_extended_in_any_pieces_is_the_tree_head(
    leaves: list[bytes], data: st.DataObject
) -> None:
    root = StreamingRoot()
    done = 0
    while done < len(leaves):
        end = data.draw(st.integers(done + 1, len(leaves)))
        root.extend(b"".join(leaves[done:end]))
        done = end
        expected = MerkleLog.from_leaves(b"".join(leaves[:done]))
        assert root.root() == expected.root() and root.size == expected.size
    root.extend(b"")
    assert root.size == len(leaves)
    with pytest.raises(ValueError, match="whole number"):
        root.extend(b"x" * 33)
