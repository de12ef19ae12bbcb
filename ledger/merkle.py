"""An RFC 9162 Merkle log: tree heads, inclusion proofs and consistency proofs.

The tree is the one of RFC 9162, section 2.1 (the same as RFC 6962's)::

    MTH({})     = HASH()
    MTH({d0})   = HASH(0x00 || d0)                      leaf
    MTH(D[n])   = HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n]))  node, k the largest power of 2 < n

with blake3 as ``HASH`` by default (any ``bytes -> 32 bytes`` function can be
given, which is how the tests check this code against SHA-256 test vectors).
Proofs are generated as the RFC defines ``PATH`` and ``PROOF`` (2.1.3.1,
2.1.4.1) and verified with the RFC's own algorithms (2.1.3.2, 2.1.4.2).

``MerkleLog`` keeps every complete subtree's hash, level by level, in one
``bytearray`` per level (32 bytes a node, 64 MB for a million leaves), so a
tree head or a proof for any size costs O(log^2 n) hashes however long the log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

import blake3

__all__ = [
    "HASH_SIZE",
    "MerkleLog",
    "StreamingRoot",
    "blake3_hash",
    "leaf_hash",
    "root_from_inclusion",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE: Final = 32
Hash = Callable[[bytes], bytes]


def blake3_hash(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def leaf_hash(data: bytes, *, hash: Hash = blake3_hash) -> bytes:
    """The RFC's leaf hash, ``HASH(0x00 || data)``."""
    return hash(b"\x00" + data)


def _hash_each(hash: Hash, prefix: bytes, packed: bytes | bytearray, width: int) -> bytes:
    """``hash(prefix + item)`` of each whole ``width``-byte item of ``packed``, back to back."""
    starts = range(0, len(packed) - len(packed) % width, width)
    if hash is blake3_hash:  # the hot path of a long log
        # One hasher reset for each node: making a new one costs as much as the hashing.
        hasher = blake3.blake3()
        reset, update, digest = hasher.reset, hasher.update, hasher.digest
        hashes = []
        for i in starts:
            reset()
            update(prefix + packed[i : i + width])
            hashes.append(digest())
        return b"".join(hashes)
    return b"".join([hash(prefix + packed[i : i + width]) for i in starts])


_MEMO_SIZE: Final = 4096
"""At most this many incomplete subtrees' hashes are kept (a few dozen per tree head)."""


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleLog:
    """An append-only list of leaves and the RFC 9162 tree over any prefix of it.

    Example::

        log = MerkleLog()
        log.extend(bytes.fromhex(event_id) for event_id in ids)
        head = log.root()                       # MTH of all leaves
        proof = log.inclusion_proof(3)          # leaf 3 in the whole tree
        assert verify_inclusion(log.leaf_hash(ids_3), 3, log.size, proof, head)
    """

    __slots__ = ("_hash", "_levels", "_memo")

    def __init__(self, leaves: Iterable[bytes] = (), *, hash: Hash = blake3_hash) -> None:
        self._hash = hash
        self._memo: dict[tuple[int, int], bytes] = {}  # incomplete subtrees' hashes
        # _levels[h] holds the hashes of the complete subtrees of 2**h leaves, in order.
        self._levels: list[bytearray] = [bytearray()]
        self.extend(leaves)

    @classmethod
    def from_leaves(
        cls, packed: bytes | bytearray, *, width: int = HASH_SIZE, hash: Hash = blake3_hash
    ) -> MerkleLog:
        """A log of leaves packed back to back, ``width`` bytes each (event ids: 32)."""
        if len(packed) % width:
            raise ValueError(f"{len(packed)} bytes are not a whole number of {width}-byte leaves")
        return cls.from_subtrees([_hash_each(hash, b"\x00", packed, width)], hash=hash)

    @classmethod
    def from_subtrees(
        cls, levels: Sequence[bytes | bytearray], *, hash: Hash = blake3_hash
    ) -> MerkleLog:
        """A log from its lowest levels, as ``levels`` gives them; the rest is hashed here.

        ``levels[h]`` holds the hashes of every complete subtree of ``2**h`` leaves,
        in order (so ``levels[0]`` holds the leaf hashes): the lower levels can be
        hashed elsewhere, in pieces that start at a multiple of a power of two.
        """
        log = cls(hash=hash)
        log._levels = [bytearray(level) for level in levels] or [bytearray()]
        pair = 2 * HASH_SIZE
        level = log._levels[-1]
        while len(level) >= pair:
            level = bytearray(_hash_each(hash, b"\x01", level, pair))
            log._levels.append(level)
        return log

    @classmethod
    def from_chunks(cls, chunks: Sequence[Sequence[bytes]]) -> MerkleLog:
        """A log from the levels of its leaves' consecutive chunks (each as ``levels``
        gives them), every chunk but the last of the same power-of-two size."""
        depth = max((len(levels) for levels in chunks), default=1)
        return cls.from_subtrees(
            [b"".join(levels[h] for levels in chunks if h < len(levels)) for h in range(depth)]
        )

    @property
    def levels(self) -> list[bytearray]:
        """Every level of complete subtrees (see ``from_subtrees``)."""
        return self._levels

    @property
    def size(self) -> int:
        return len(self._levels[0]) // HASH_SIZE

    def leaf_hash(self, data: bytes) -> bytes:
        return self._hash(b"\x00" + data)

    def leaf(self, index: int) -> bytes:
        """The stored hash of leaf ``index``."""
        if not 0 <= index < self.size:
            raise IndexError(f"Leaf {index} is not in a tree of {self.size} leaves")
        return self._node(0, index)

    def node_hash(self, left: bytes, right: bytes) -> bytes:
        return self._hash(b"\x01" + left + right)

    def append(self, data: bytes) -> None:
        """Add one leaf (its data, hashed here as the RFC's leaf)."""
        self._append_hash(self.leaf_hash(data))

    def extend(self, leaves: Iterable[bytes]) -> None:
        for data in leaves:
            self._append_hash(self.leaf_hash(data))

    def _append_hash(self, node: bytes) -> None:
        levels = self._levels
        levels[0] += node
        index = self.size - 1
        height = 0
        while index & 1:  # a right child completes its parent: carry it up
            level = levels[height]
            node = self.node_hash(bytes(level[-2 * HASH_SIZE : -HASH_SIZE]), node)
            height += 1
            index >>= 1
            if height == len(levels):
                levels.append(bytearray())
            levels[height] += node

    def _node(self, height: int, index: int) -> bytes:
        start = index * HASH_SIZE
        return bytes(self._levels[height][start : start + HASH_SIZE])

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) where ``start`` is a multiple of the range's split power."""
        n = end - start
        if n & (n - 1) == 0:  # a complete subtree: stored
            return self._node(n.bit_length() - 1, start // n)
        memo = self._memo
        node = memo.get((start, end))
        if node is None:
            # An incomplete one (on a tree head's right edge): every proof at that size
            # hashes the same ones again, so they are kept. A range of leaves never
            # changes; the memo is only bounded.
            k = _split(n)
            node = self.node_hash(self._subtree(start, start + k), self._subtree(start + k, end))
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo[start, end] = node
        return node

    def root(self, size: int | None = None) -> bytes:
        """The tree head of the first ``size`` leaves (all of them by default)."""
        size = self._check_size(size)
        return self._hash(b"") if size == 0 else self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 ``PATH(index, D[0:size])``: the audit path of one leaf."""
        size = self._check_size(size)
        if not 0 <= index < size:
            raise IndexError(f"Leaf {index} is not in a tree of {size} leaves")
        path: list[bytes] = []
        start, end = 0, size
        while end - start > 1:
            k = _split(end - start)
            if index < start + k:
                path.append(self._subtree(start + k, end))
                end = start + k
            else:
                path.append(self._subtree(start, start + k))
                start += k
        path.reverse()  # the RFC lists the path from the leaf up
        return path

    def consistency_proof(self, old_size: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 ``PROOF(old_size, D[0:size])``; empty when ``old_size`` is 0 or ``size``."""
        size = self._check_size(size)
        if not 0 <= old_size <= size:
            raise IndexError(f"A tree of {old_size} leaves is not a prefix of one of {size}")
        if old_size in (0, size):
            return []
        proof: list[bytes] = []
        start, end, whole = 0, size, True
        m = old_size
        while m != end - start:  # SUBPROOF(m, D[start:end], whole)
            k = _split(end - start)
            if m <= k:
                proof.append(self._subtree(start + k, end))
                end = start + k
            else:
                proof.append(self._subtree(start, start + k))
                start += k
                m -= k
                whole = False
        if not whole:
            proof.append(self._subtree(start, end))
        proof.reverse()
        return proof

    def _check_size(self, size: int | None) -> int:
        if size is None:
            return self.size
        if not 0 <= size <= self.size:
            raise IndexError(f"The log has {self.size} leaves, not {size}")
        return size


class StreamingRoot:
    """The tree head of a growing log in O(log n) memory, for a single pass.

    It keeps only the hashes of the complete subtrees the leaves so far split
    into (``MerkleLog`` keeps every node); the root is their fold from the
    right, exactly as the RFC's recursion.
    """

    __slots__ = ("_hash", "_stack", "size")

    def __init__(self, *, hash: Hash = blake3_hash) -> None:
        self._hash = hash
        self._stack: list[tuple[int, bytes]] = []  # (height, hash), left to right
        self.size = 0

    def append(self, data: bytes) -> None:
        """Add one leaf (its data, hashed here as the RFC's leaf)."""
        self._push(0, self._hash(b"\x00" + data))

    def extend(self, packed: bytes | bytearray) -> None:
        """Add leaves packed back to back, ``HASH_SIZE`` bytes each (event ids).

        Each complete subtree they fill is hashed as a whole (``MerkleLog.from_leaves``),
        level by level: a few calls per thousand leaves rather than two per leaf.
        """
        if len(packed) % HASH_SIZE:
            raise ValueError(
                f"{len(packed)} bytes are not a whole number of {HASH_SIZE}-byte leaves"
            )
        start, count = 0, len(packed) // HASH_SIZE
        while start < count:
            # The largest subtree that starts here (a multiple of its size) and fits.
            aligned = (self.size & -self.size).bit_length() - 1 if self.size else count.bit_length()
            height = min(aligned, (count - start).bit_length() - 1)
            end = start + (1 << height)
            leaves = packed[start * HASH_SIZE : end * HASH_SIZE]
            top = MerkleLog.from_leaves(leaves, hash=self._hash).levels[-1]
            self._push(height, bytes(top))
            start = end

    def _push(self, height: int, node: bytes) -> None:
        """Add a complete subtree of ``2**height`` leaves, given its hash."""
        self.size += 1 << height
        stack = self._stack
        while stack and stack[-1][0] == height:
            node = self._hash(b"\x01" + stack.pop()[1] + node)
            height += 1
        stack.append((height, node))

    def root(self) -> bytes:
        if not self._stack:
            return self._hash(b"")
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = self._hash(b"\x01" + left + node)
        return node


def root_from_inclusion(
    leaf_hash: bytes, index: int, size: int, path: Sequence[bytes], *, hash: Hash = blake3_hash
) -> bytes | None:
    """The root an inclusion path leads to (RFC 9162 2.1.3.2), or None for a malformed path."""
    if not 0 <= index < size:
        return None
    fn, sn = index, size - 1
    r = leaf_hash
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = hash(b"\x01" + p + r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = hash(b"\x01" + r + p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(
    leaf_hash: bytes,
    index: int,
    size: int,
    path: Sequence[bytes],
    root: bytes,
    *,
    hash: Hash = blake3_hash,
) -> bool:
    """RFC 9162 2.1.3.2: does ``path`` prove leaf ``index`` in the tree of ``size`` at ``root``?"""
    return root_from_inclusion(leaf_hash, index, size, path, hash=hash) == root


def verify_consistency(
    old_size: int,
    size: int,
    old_root: bytes,
    root: bytes,
    proof: Sequence[bytes],
    *,
    hash: Hash = blake3_hash,
) -> bool:
    """RFC 9162 2.1.4.2: is the tree of ``old_size`` at ``old_root`` a prefix of this one?"""
    if not 0 <= old_size <= size:
        return False
    if old_size == size:
        return not proof and old_root == root
    if old_size == 0:
        return not proof  # the empty tree is a prefix of every tree
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: its root is a node of the new tree
        path.insert(0, old_root)
    fn, sn = old_size - 1, size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = hash(b"\x01" + c + fr)
            sr = hash(b"\x01" + c + sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = hash(b"\x01" + sr + c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == root and sn == 0
