"""RFC 6962 append-only Merkle log: tree hashes, inclusion and consistency proofs, frontier."""

# Byte layouts (all hashes are SHA-256, HASH_SIZE_BYTES long):
#
#   leaf hash   = SHA-256(0x00 || entry_bytes)
#   node hash   = SHA-256(0x01 || left || right)
#   empty root  = SHA-256(b"")
#
# The 0x00 / 0x01 prefixes separate the leaf and node domains, so no entry can be passed off as
# an interior node (second-preimage attack on the tree shape).
#
# MTH (RFC 6962 §2.1): for n > 1 leaves, split at k = the largest power of two smaller than n;
# MTH(D[n]) = node_hash(MTH(D[0:k]), MTH(D[k:n])). A single leaf's MTH is its leaf hash. The
# split keeps the left side a perfect subtree, which is what makes the log append-only: the
# perfect subtrees never change once full, so a frontier of their roots is enough to extend it.
#
# Serialized frontier (MerkleFrontier.to_bytes / from_bytes):
#
#   offset 0   8 bytes   tree_size, unsigned big-endian (top bit always 0, see TREE_SIZE_MAX)
#   offset 8   32 bytes  root of the largest (leftmost) perfect subtree
#   ...        32 bytes  each further subtree root, in decreasing size
#
# There is one subtree root per set bit of tree_size, so the total length is
# 8 + 32 * popcount(tree_size); any other length is corrupt and rejected.

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from sardis_ledger.streams.errors import MerkleError

HASH_SIZE_BYTES = 32
# Sizes must fit a signed 64-bit integer (Kafka offsets, PostgreSQL bigint, Java long) so that
# every consumer of a tree size can store it without overflow.
TREE_SIZE_MAX = 2**63 - 1
EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()

TREE_SIZE_FIELD_SIZE_BYTES = 8
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE_BYTES:
        raise MerkleError(f"{what} must be {HASH_SIZE_BYTES} bytes")


def _check_size(size: int, what: str) -> None:
    if size < 0:
        raise MerkleError(f"{what} must not be negative, got {size}")
    if size > TREE_SIZE_MAX:
        raise MerkleError(f"{what} {size} exceeds TREE_SIZE_MAX")


def _check_leaf_hashes(leaf_hashes: Sequence[bytes], count: int) -> None:
    for position in range(count):
        _check_hash(leaf_hashes[position], f"leaf hash {position}")


def _is_hash(value: bytes) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE_BYTES


def _split_point(leaf_count: int) -> int:
    """Largest power of two strictly smaller than leaf_count (which must be >= 2)."""
    return 1 << ((leaf_count - 1).bit_length() - 1)


def leaf_hash(entry_bytes: bytes) -> bytes:
    """Hash of one log entry as a leaf: SHA-256(0x00 || entry_bytes)."""
    return hashlib.sha256(_LEAF_PREFIX + entry_bytes).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an interior node from its two children: SHA-256(0x01 || left || right)."""
    _check_hash(left, "left child hash")
    _check_hash(right, "right child hash")
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _unchecked_node_hash(left: bytes, right: bytes) -> bytes:
    # Inner loops call this after their inputs were validated once, up front.
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _subtree_root(leaf_hashes: Sequence[bytes], start: int, end: int) -> bytes:
    """MTH of leaf_hashes[start:end] (non-empty), hashes already validated."""
    # Pairing neighbours level by level and carrying a lone last node up unchanged builds exactly
    # the RFC 6962 tree (the left part of every split is a perfect subtree) without recursion.
    level = [leaf_hashes[position] for position in range(start, end)]
    while len(level) > 1:
        next_level = [
            _unchecked_node_hash(level[position], level[position + 1])
            for position in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2 == 1:
            next_level.append(level[-1])
        level = next_level
    return level[0]


def root_from_leaf_hashes(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves; EMPTY_ROOT for no leaves."""
    _check_size(len(leaf_hashes), "tree size")
    _check_leaf_hashes(leaf_hashes, len(leaf_hashes))
    if not leaf_hashes:
        return EMPTY_ROOT
    return _subtree_root(leaf_hashes, 0, len(leaf_hashes))


def _inclusion_path(
    leaf_hashes: Sequence[bytes], leaf_index: int, start: int, end: int
) -> list[bytes]:
    # RFC 6962 §2.1.1 PATH(m, D[start:end]), leaf_index absolute; siblings ordered leaf to root.
    leaf_count = end - start
    if leaf_count == 1:
        return []
    split = start + _split_point(leaf_count)
    if leaf_index < split:
        path = _inclusion_path(leaf_hashes, leaf_index, start, split)
        path.append(_subtree_root(leaf_hashes, split, end))
    else:
        path = _inclusion_path(leaf_hashes, leaf_index, split, end)
        path.append(_subtree_root(leaf_hashes, start, split))
    return path


def inclusion_proof(leaf_hashes: Sequence[bytes], leaf_index: int, tree_size: int) -> list[bytes]:
    """RFC 6962 PATH(leaf_index, D[tree_size]) over the first tree_size leaf hashes."""
    _check_size(tree_size, "tree size")
    if tree_size > len(leaf_hashes):
        raise MerkleError(f"tree size {tree_size} exceeds the {len(leaf_hashes)} leaves given")
    if leaf_index < 0 or leaf_index >= tree_size:
        raise MerkleError(f"leaf index {leaf_index} is outside a tree of size {tree_size}")
    _check_leaf_hashes(leaf_hashes, tree_size)
    return _inclusion_path(leaf_hashes, leaf_index, 0, tree_size)


def verify_inclusion(
    leaf_hash: bytes, leaf_index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """True when proof shows leaf_hash at leaf_index in the tree of tree_size with this root."""
    # RFC 9162 §2.1.3.2. Proofs come from untrusted peers, so every malformed proof is a plain
    # False; only arguments that name no possible leaf are the caller's bug and raise.
    _check_size(tree_size, "tree size")
    if leaf_index < 0 or leaf_index >= tree_size:
        raise MerkleError(f"leaf index {leaf_index} is outside a tree of size {tree_size}")
    if not _is_hash(leaf_hash) or not _is_hash(root):
        return False
    if not all(_is_hash(element) for element in proof):
        return False
    index_at_level = leaf_index
    last_index_at_level = tree_size - 1
    computed_root = leaf_hash
    for sibling in proof:
        if last_index_at_level == 0:
            return False  # proof longer than the path to the root
        if index_at_level & 1 or index_at_level == last_index_at_level:
            computed_root = _unchecked_node_hash(sibling, computed_root)
            # A rightmost node without a sibling is carried up unchanged through these levels.
            while index_at_level & 1 == 0 and index_at_level != 0:
                index_at_level >>= 1
                last_index_at_level >>= 1
        else:
            computed_root = _unchecked_node_hash(computed_root, sibling)
        index_at_level >>= 1
        last_index_at_level >>= 1
    return last_index_at_level == 0 and computed_root == root


def _consistency_subproof(
    leaf_hashes: Sequence[bytes], old_size: int, start: int, end: int, old_is_whole: bool
) -> list[bytes]:
    # RFC 6962 §2.1.2 SUBPROOF(m, D[start:end], b), old_size relative to start.
    leaf_count = end - start
    if old_size == leaf_count:
        # The verifier already knows the old root when this subtree is the whole old tree.
        return [] if old_is_whole else [_subtree_root(leaf_hashes, start, end)]
    split_count = _split_point(leaf_count)
    split = start + split_count
    if old_size <= split_count:
        proof = _consistency_subproof(leaf_hashes, old_size, start, split, old_is_whole)
        proof.append(_subtree_root(leaf_hashes, split, end))
    else:
        proof = _consistency_subproof(leaf_hashes, old_size - split_count, split, end, False)
        proof.append(_subtree_root(leaf_hashes, start, split))
    return proof


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int, new_size: int) -> list[bytes]:
    """RFC 6962 PROOF(old_size, D[new_size]); empty when old_size is 0 or equals new_size."""
    _check_size(old_size, "old size")
    _check_size(new_size, "new size")
    if old_size > new_size:
        raise MerkleError(f"old size {old_size} exceeds new size {new_size}")
    if new_size > len(leaf_hashes):
        raise MerkleError(f"new size {new_size} exceeds the {len(leaf_hashes)} leaves given")
    _check_leaf_hashes(leaf_hashes, new_size)
    if old_size == 0 or old_size == new_size:
        return []
    return _consistency_subproof(leaf_hashes, old_size, 0, new_size, True)


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True when proof shows the tree of old_size/old_root is a prefix of new_size/new_root."""
    # RFC 9162 §2.1.4.2. As with inclusion, malformed proofs and roots are False, never raised.
    _check_size(old_size, "old size")
    _check_size(new_size, "new size")
    if old_size > new_size:
        raise MerkleError(f"old size {old_size} exceeds new size {new_size}")
    if not _is_hash(old_root) or not _is_hash(new_root):
        return False
    if not all(_is_hash(element) for element in proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        # The old tree is a perfect subtree of the new one, so its root is the path's start and
        # the prover leaves it out.
        path.insert(0, old_root)
    index_at_level = old_size - 1
    last_index_at_level = new_size - 1
    while index_at_level & 1:
        index_at_level >>= 1
        last_index_at_level >>= 1
    computed_old_root = path[0]
    computed_new_root = path[0]
    for element in path[1:]:
        if last_index_at_level == 0:
            return False  # proof longer than the path to the root
        if index_at_level & 1 or index_at_level == last_index_at_level:
            computed_old_root = _unchecked_node_hash(element, computed_old_root)
            computed_new_root = _unchecked_node_hash(element, computed_new_root)
            while index_at_level & 1 == 0 and index_at_level != 0:
                index_at_level >>= 1
                last_index_at_level >>= 1
        else:
            computed_new_root = _unchecked_node_hash(computed_new_root, element)
        index_at_level >>= 1
        last_index_at_level >>= 1
    return (
        last_index_at_level == 0 and computed_old_root == old_root and computed_new_root == new_root
    )


@dataclass(frozen=True, slots=True)
class MerkleFrontier:
    """Compact state of an append-only log: its perfect subtrees' roots, so append is O(log n)."""

    tree_size: int = 0
    # Roots of perfect subtrees, largest (leftmost) first; one per set bit of tree_size.
    subtree_roots: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _check_size(self.tree_size, "tree size")
        if not isinstance(self.subtree_roots, tuple):
            raise MerkleError("subtree_roots must be a tuple")
        if len(self.subtree_roots) != self.tree_size.bit_count():
            raise MerkleError(
                f"a tree of size {self.tree_size} has {self.tree_size.bit_count()} perfect "
                f"subtrees, got {len(self.subtree_roots)} roots"
            )
        for position, subtree_root in enumerate(self.subtree_roots):
            _check_hash(subtree_root, f"subtree root {position}")

    @classmethod
    def _trusted(cls, tree_size: int, subtree_roots: tuple[bytes, ...]) -> MerkleFrontier:
        """A frontier whose invariants the caller has just established (append, from_bytes):
        __post_init__ re-checking every root cost more than the append itself, per entry."""
        frontier = object.__new__(cls)
        object.__setattr__(frontier, "tree_size", tree_size)
        object.__setattr__(frontier, "subtree_roots", subtree_roots)
        return frontier

    def append(self, leaf_hash: bytes) -> MerkleFrontier:
        """The frontier after appending one leaf hash; self is unchanged."""
        _check_hash(leaf_hash, "leaf hash")
        if self.tree_size >= TREE_SIZE_MAX:
            raise MerkleError("tree is full: appending would exceed TREE_SIZE_MAX")
        subtree_roots = list(self.subtree_roots)
        carried_root = leaf_hash
        # Like binary increment: each trailing set bit is a same-sized subtree that the new one
        # completes, so the two merge into the next size up.
        remaining_size = self.tree_size
        while remaining_size & 1:
            carried_root = _unchecked_node_hash(subtree_roots.pop(), carried_root)
            remaining_size >>= 1
        subtree_roots.append(carried_root)
        # tree_size + 1 has one set bit per root: the carries replaced its trailing ones by one.
        return MerkleFrontier._trusted(self.tree_size + 1, tuple(subtree_roots))

    def root(self) -> bytes:
        """MTH of every leaf appended so far; EMPTY_ROOT when empty."""
        if not self.subtree_roots:
            return EMPTY_ROOT
        # RFC 6962 splits off the largest perfect subtree on the left at every level, so the root
        # folds the subtree roots together from the smallest (rightmost) one.
        computed_root = self.subtree_roots[-1]
        for subtree_root in reversed(self.subtree_roots[:-1]):
            computed_root = _unchecked_node_hash(subtree_root, computed_root)
        return computed_root

    def to_bytes(self) -> bytes:
        """Serialized frontier: 8-byte big-endian tree_size, then each subtree root in order."""
        return self.tree_size.to_bytes(TREE_SIZE_FIELD_SIZE_BYTES, "big") + b"".join(
            self.subtree_roots
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> MerkleFrontier:
        """Parse to_bytes output; MerkleError when the length does not match the tree size."""
        if len(data) < TREE_SIZE_FIELD_SIZE_BYTES:
            raise MerkleError(f"frontier of {len(data)} bytes is shorter than its size field")
        tree_size = int.from_bytes(data[:TREE_SIZE_FIELD_SIZE_BYTES], "big")
        if tree_size > TREE_SIZE_MAX:
            raise MerkleError(f"frontier tree size {tree_size} exceeds TREE_SIZE_MAX")
        subtree_count = tree_size.bit_count()
        expected_size_bytes = TREE_SIZE_FIELD_SIZE_BYTES + HASH_SIZE_BYTES * subtree_count
        if len(data) != expected_size_bytes:
            raise MerkleError(
                f"frontier of tree size {tree_size} must be {expected_size_bytes} bytes, "
                f"got {len(data)}"
            )
        subtree_roots = tuple(
            bytes(data[offset : offset + HASH_SIZE_BYTES])
            for offset in range(TREE_SIZE_FIELD_SIZE_BYTES, len(data), HASH_SIZE_BYTES)
        )
        # The length check above gave exactly one 32-byte root per set bit of tree_size.
        return cls._trusted(tree_size, subtree_roots)
