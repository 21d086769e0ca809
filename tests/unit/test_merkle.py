"""Tests of streams.merkle against the public RFC 6962 vectors and by property."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sardis_ledger.streams.errors import MerkleError
from sardis_ledger.streams.merkle import (
    EMPTY_ROOT,
    HASH_SIZE_BYTES,
    TREE_SIZE_MAX,
    MerkleFrontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

# Known-answer vectors: transparency-dev/merkle (successor of google/trillian's merkle package),
# testonly/constants.go (LeafInputs, NodeHashes, RootHashes, CompactTrees) and
# proof/verify_test.go (inclusionProofs, consistencyProofs). verify_test.go numbers leaves from 1;
# the indexes below are converted to 0-based.
LEAF_INPUTS_HEX = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
LEAF_INPUTS = [bytes.fromhex(entry_hex) for entry_hex in LEAF_INPUTS_HEX]

# NodeHashes()[level][index]: level 0 are the leaf hashes.
NODE_HASHES_HEX = [
    [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    [
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    [
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    [
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ],
]
NODE_HASHES = [[bytes.fromhex(hash_hex) for hash_hex in level] for level in NODE_HASHES_HEX]

EMPTY_ROOT_HEX = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

# RootHashes()[tree_size] for tree sizes 0..8.
ROOT_HASHES_HEX = [
    EMPTY_ROOT_HEX,
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
ROOT_HASHES = [bytes.fromhex(root_hex) for root_hex in ROOT_HASHES_HEX]

# CompactTrees()[tree_size]: the frontier's subtree roots, as (level, index) into NODE_HASHES.
COMPACT_TREES = [
    [],
    [(0, 0)],
    [(1, 0)],
    [(1, 0), (0, 2)],
    [(2, 0)],
    [(2, 0), (0, 4)],
    [(2, 0), (1, 2)],
    [(2, 0), (1, 2), (0, 6)],
    [(3, 0)],
]

# inclusionProofs: (0-based leaf index, tree size, proof).
INCLUSION_VECTORS = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        3,
        [
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        ],
    ),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (0, 1, []),
]

# consistencyProofs: (old size, new size, proof).
CONSISTENCY_VECTORS = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]

VECTOR_LEAF_HASHES = [leaf_hash(entry) for entry in LEAF_INPUTS]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def _flip_first_byte(value: bytes) -> bytes:
    return bytes([value[0] ^ 0x08]) + value[1:]


# ---- known answers ----------------------------------------------------------------------------


def test_empty_root_is_sha256_of_nothing() -> None:
    assert EMPTY_ROOT == hashlib.sha256(b"").digest() == bytes.fromhex(EMPTY_ROOT_HEX)
    assert root_from_leaf_hashes([]) == EMPTY_ROOT
    assert MerkleFrontier().root() == EMPTY_ROOT


@pytest.mark.parametrize("position", range(len(LEAF_INPUTS)))
def test_leaf_hash_known_answers(position: int) -> None:
    assert leaf_hash(LEAF_INPUTS[position]) == NODE_HASHES[0][position]


@pytest.mark.parametrize(
    ("level", "index"),
    [
        (level, index)
        for level in range(1, len(NODE_HASHES))
        for index in range(len(NODE_HASHES[level]))
    ],
)
def test_node_hash_known_answers(level: int, index: int) -> None:
    children = NODE_HASHES[level - 1]
    assert node_hash(children[2 * index], children[2 * index + 1]) == NODE_HASHES[level][index]


@pytest.mark.parametrize("tree_size", range(len(ROOT_HASHES)))
def test_root_known_answers(tree_size: int) -> None:
    assert root_from_leaf_hashes(VECTOR_LEAF_HASHES[:tree_size]) == ROOT_HASHES[tree_size]


@pytest.mark.parametrize("tree_size", range(len(ROOT_HASHES)))
def test_frontier_known_answers(tree_size: int) -> None:
    frontier = MerkleFrontier()
    for hashed_leaf in VECTOR_LEAF_HASHES[:tree_size]:
        frontier = frontier.append(hashed_leaf)
    expected_subtree_roots = tuple(
        NODE_HASHES[level][index] for level, index in COMPACT_TREES[tree_size]
    )
    assert frontier == MerkleFrontier(tree_size, expected_subtree_roots)
    assert frontier.root() == ROOT_HASHES[tree_size]


@pytest.mark.parametrize(("leaf_index", "tree_size", "proof_hex"), INCLUSION_VECTORS)
def test_inclusion_known_answers(leaf_index: int, tree_size: int, proof_hex: list[str]) -> None:
    expected_proof = [bytes.fromhex(hash_hex) for hash_hex in proof_hex]
    assert inclusion_proof(VECTOR_LEAF_HASHES, leaf_index, tree_size) == expected_proof
    root = ROOT_HASHES[tree_size]
    hashed_leaf = VECTOR_LEAF_HASHES[leaf_index]
    assert verify_inclusion(hashed_leaf, leaf_index, tree_size, expected_proof, root)

    # The corruptions verify_test.go probes; each must fail without raising.
    assert not verify_inclusion(
        leaf_hash(b"WrongLeaf"), leaf_index, tree_size, expected_proof, root
    )
    assert not verify_inclusion(hashed_leaf, leaf_index, tree_size, expected_proof, EMPTY_ROOT)
    assert not verify_inclusion(hashed_leaf, leaf_index, tree_size, expected_proof, SOME_HASH)
    assert not verify_inclusion(hashed_leaf, leaf_index, tree_size * 2, expected_proof, root)
    assert not verify_inclusion(hashed_leaf, leaf_index, tree_size, [*expected_proof, root], root)
    assert not verify_inclusion(hashed_leaf, leaf_index, tree_size, [root, *expected_proof], root)
    assert not verify_inclusion(hashed_leaf, leaf_index, tree_size, [*expected_proof, b""], root)
    for wrong_index in (leaf_index - 1, leaf_index + 1, leaf_index ^ 2):
        if 0 <= wrong_index < tree_size:
            assert not verify_inclusion(hashed_leaf, wrong_index, tree_size, expected_proof, root)
    if tree_size // 2 > leaf_index:
        assert not verify_inclusion(hashed_leaf, leaf_index, tree_size // 2, expected_proof, root)
    for position in range(len(expected_proof)):
        wrong_proof = list(expected_proof)
        wrong_proof[position] = _flip_first_byte(wrong_proof[position])
        assert not verify_inclusion(hashed_leaf, leaf_index, tree_size, wrong_proof, root)
    if expected_proof:
        assert not verify_inclusion(hashed_leaf, leaf_index, tree_size, expected_proof[:-1], root)


@pytest.mark.parametrize(("old_size", "new_size", "proof_hex"), CONSISTENCY_VECTORS)
def test_consistency_known_answers(old_size: int, new_size: int, proof_hex: list[str]) -> None:
    expected_proof = [bytes.fromhex(hash_hex) for hash_hex in proof_hex]
    assert consistency_proof(VECTOR_LEAF_HASHES, old_size, new_size) == expected_proof
    old_root = ROOT_HASHES[old_size]
    new_root = ROOT_HASHES[new_size]
    assert verify_consistency(old_size, new_size, old_root, new_root, expected_proof)
    if not expected_proof:
        return

    # The corruptions verify_test.go probes for non-trivial proofs; each must fail.
    probes: list[tuple[int, int, bytes, bytes, list[bytes]]] = [
        (old_size - 1, new_size, old_root, new_root, expected_proof),
        (old_size + 1, new_size, old_root, new_root, expected_proof),
        (old_size ^ 2, new_size, old_root, new_root, expected_proof),
        (old_size, new_size * 2, old_root, new_root, expected_proof),
        (old_size, new_size, SOME_HASH, new_root, expected_proof),
        (old_size, new_size, old_root, SOME_HASH, expected_proof),
        (old_size, new_size, new_root, old_root, expected_proof),
        (old_size, new_size, old_root, new_root, []),
        (old_size, new_size, old_root, new_root, [*expected_proof, old_root]),
        (old_size, new_size, old_root, new_root, [*expected_proof, new_root]),
        (old_size, new_size, old_root, new_root, [old_root, *expected_proof]),
        (old_size, new_size, old_root, new_root, [new_root, *expected_proof]),
        (old_size, new_size, old_root, new_root, [expected_proof[0], *expected_proof]),
        (old_size, new_size, old_root, new_root, expected_proof[:-1]),
    ]
    if new_size // 2 >= old_size:
        probes.append((old_size, new_size // 2, old_root, new_root, expected_proof))
    for position in range(len(expected_proof)):
        wrong_proof = list(expected_proof)
        wrong_proof[position] = _flip_first_byte(wrong_proof[position])
        probes.append((old_size, new_size, old_root, new_root, wrong_proof))
    for probe_old_size, probe_new_size, probe_old_root, probe_new_root, probe_proof in probes:
        if 0 <= probe_old_size <= probe_new_size:
            assert not verify_consistency(
                probe_old_size, probe_new_size, probe_old_root, probe_new_root, probe_proof
            ), (probe_old_size, probe_new_size)


def test_consistency_trivial_cases() -> None:
    assert consistency_proof(VECTOR_LEAF_HASHES, 0, 5) == []
    assert consistency_proof(VECTOR_LEAF_HASHES, 3, 3) == []
    assert consistency_proof([], 0, 0) == []
    # Equal sizes: roots must match and the proof must be empty.
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert verify_consistency(3, 3, ROOT_HASHES[3], ROOT_HASHES[3], [])
    assert not verify_consistency(3, 3, ROOT_HASHES[3], ROOT_HASHES[4], [])
    assert not verify_consistency(0, 0, EMPTY_ROOT, SOME_HASH, [])
    assert not verify_consistency(3, 3, ROOT_HASHES[3], ROOT_HASHES[3], [EMPTY_ROOT])
    # The empty tree is a prefix of every tree, but only with an empty proof.
    assert verify_consistency(0, 5, EMPTY_ROOT, ROOT_HASHES[5], [])
    assert not verify_consistency(0, 1, EMPTY_ROOT, ROOT_HASHES[1], [EMPTY_ROOT])
    # A growing tree needs a non-empty proof.
    assert not verify_consistency(1, 2, ROOT_HASHES[1], ROOT_HASHES[2], [])


# ---- errors -----------------------------------------------------------------------------------


def test_node_hash_rejects_wrong_hash_sizes() -> None:
    with pytest.raises(MerkleError):
        node_hash(b"short", SOME_HASH)
    with pytest.raises(MerkleError):
        node_hash(SOME_HASH, SOME_HASH + b"\x00")


def test_root_rejects_wrong_hash_sizes() -> None:
    with pytest.raises(MerkleError):
        root_from_leaf_hashes([SOME_HASH, b"\x00" * (HASH_SIZE_BYTES - 1)])


@pytest.mark.parametrize(
    ("leaf_index", "tree_size"),
    [(0, 0), (3, 3), (8, 8), (-1, 3), (0, -1), (0, 9), (0, TREE_SIZE_MAX + 1)],
)
def test_inclusion_proof_rejects_impossible_arguments(leaf_index: int, tree_size: int) -> None:
    with pytest.raises(MerkleError):
        inclusion_proof(VECTOR_LEAF_HASHES, leaf_index, tree_size)


def test_inclusion_proof_rejects_wrong_hash_sizes() -> None:
    with pytest.raises(MerkleError):
        inclusion_proof([SOME_HASH, b"bad"], 0, 2)


@pytest.mark.parametrize(
    ("leaf_index", "tree_size"),
    [(0, 0), (1, 0), (2, 1), (5, 5), (-1, 3), (0, -1), (0, TREE_SIZE_MAX + 1)],
)
def test_verify_inclusion_rejects_impossible_arguments(leaf_index: int, tree_size: int) -> None:
    with pytest.raises(MerkleError):
        verify_inclusion(SOME_HASH, leaf_index, tree_size, [], EMPTY_ROOT)


def test_verify_inclusion_returns_false_for_malformed_hashes() -> None:
    hashed_leaf = VECTOR_LEAF_HASHES[0]
    assert verify_inclusion(hashed_leaf, 0, 1, [], hashed_leaf)
    assert not verify_inclusion(b"", 0, 1, [], hashed_leaf)
    assert not verify_inclusion(hashed_leaf, 0, 1, [], b"")
    assert not verify_inclusion(b"", 0, 1, [], b"")
    assert not verify_inclusion(hashed_leaf, 0, 2, [b"short"], ROOT_HASHES[2])


@pytest.mark.parametrize(
    ("old_size", "new_size"),
    [(5, 4), (1, 0), (-1, 3), (0, -1), (0, 9), (0, TREE_SIZE_MAX + 1)],
)
def test_consistency_proof_rejects_impossible_arguments(old_size: int, new_size: int) -> None:
    with pytest.raises(MerkleError):
        consistency_proof(VECTOR_LEAF_HASHES, old_size, new_size)


@pytest.mark.parametrize(
    ("old_size", "new_size"),
    [(5, 4), (1, 0), (-1, 3), (0, -1), (0, TREE_SIZE_MAX + 1)],
)
def test_verify_consistency_rejects_impossible_arguments(old_size: int, new_size: int) -> None:
    with pytest.raises(MerkleError):
        verify_consistency(old_size, new_size, EMPTY_ROOT, EMPTY_ROOT, [])


def test_verify_consistency_returns_false_for_malformed_hashes() -> None:
    proof = consistency_proof(VECTOR_LEAF_HASHES, 2, 5)
    assert not verify_consistency(2, 5, b"x", ROOT_HASHES[5], proof)
    assert not verify_consistency(2, 5, ROOT_HASHES[2], b"x", proof)
    assert not verify_consistency(2, 5, ROOT_HASHES[2], ROOT_HASHES[5], [b"x", *proof[1:]])


def test_frontier_rejects_inconsistent_state() -> None:
    with pytest.raises(MerkleError):
        MerkleFrontier(-1, ())
    with pytest.raises(MerkleError):
        MerkleFrontier(TREE_SIZE_MAX + 1, ())
    with pytest.raises(MerkleError):
        MerkleFrontier(3, (SOME_HASH,))  # size 3 has two perfect subtrees
    with pytest.raises(MerkleError):
        MerkleFrontier(1, (b"short",))
    with pytest.raises(MerkleError):
        MerkleFrontier().append(b"short")


def test_frontier_refuses_to_grow_past_the_size_limit() -> None:
    full_size = TREE_SIZE_MAX
    full = MerkleFrontier(full_size, (SOME_HASH,) * full_size.bit_count())
    with pytest.raises(MerkleError):
        full.append(SOME_HASH)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 7,
        (1).to_bytes(8, "big"),  # one leaf but no root
        (0).to_bytes(8, "big") + SOME_HASH,  # empty tree with a root
        (3).to_bytes(8, "big") + SOME_HASH,  # two subtrees, one root
        (1).to_bytes(8, "big") + SOME_HASH + b"\x00",
        (2**63).to_bytes(8, "big") + SOME_HASH,  # size over TREE_SIZE_MAX
    ],
)
def test_frontier_from_bytes_rejects_malformed_data(data: bytes) -> None:
    with pytest.raises(MerkleError):
        MerkleFrontier.from_bytes(data)


def test_frontier_to_bytes_layout() -> None:
    frontier = MerkleFrontier(3, (NODE_HASHES[1][0], NODE_HASHES[0][2]))
    expected = b"\x00" * 7 + b"\x03" + NODE_HASHES[1][0] + NODE_HASHES[0][2]
    assert frontier.to_bytes() == expected
    assert MerkleFrontier().to_bytes() == b"\x00" * 8
    assert MerkleFrontier.from_bytes(b"\x00" * 8) == MerkleFrontier()


# ---- properties -------------------------------------------------------------------------------

# Each entry starts with its position so that distinct leaves stay distinct: a proof checked at a
# wrong index then cannot succeed through two equal subtrees. The count is drawn first because a
# bare st.lists rarely grows past a few dozen elements, and trees of 100+ leaves are where
# multi-level splits and carried-up nodes show.
leaf_entry_lists = st.integers(min_value=1, max_value=200).flatmap(
    lambda leaf_count: st.lists(
        st.binary(max_size=12), min_size=leaf_count, max_size=leaf_count
    ).map(
        lambda payloads: [
            position.to_bytes(2, "big") + payload for position, payload in enumerate(payloads)
        ]
    )
)
property_settings = settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@property_settings
@given(leaf_entry_lists)
def test_frontier_root_matches_root_of_every_prefix(entries: list[bytes]) -> None:
    leaf_hashes = [leaf_hash(entry) for entry in entries]
    frontier = MerkleFrontier()
    for appended_count, hashed_leaf in enumerate(leaf_hashes, start=1):
        frontier = frontier.append(hashed_leaf)
        assert frontier.tree_size == appended_count
        assert frontier.root() == root_from_leaf_hashes(leaf_hashes[:appended_count])
        assert MerkleFrontier.from_bytes(frontier.to_bytes()) == frontier


@property_settings
@given(leaf_entry_lists, st.data())
def test_every_inclusion_proof_verifies_and_resists_tampering(
    entries: list[bytes], data: st.DataObject
) -> None:
    leaf_hashes = [leaf_hash(entry) for entry in entries]
    tree_size = data.draw(st.integers(min_value=1, max_value=len(leaf_hashes)), label="tree_size")
    root = root_from_leaf_hashes(leaf_hashes[:tree_size])
    for leaf_index in range(tree_size):
        proof = inclusion_proof(leaf_hashes, leaf_index, tree_size)
        hashed_leaf = leaf_hashes[leaf_index]
        assert verify_inclusion(hashed_leaf, leaf_index, tree_size, proof, root)
        assert not verify_inclusion(
            _flip_first_byte(hashed_leaf), leaf_index, tree_size, proof, root
        )
        assert not verify_inclusion(
            hashed_leaf, leaf_index, tree_size, proof, _flip_first_byte(root)
        )
        for position in range(len(proof)):
            wrong_proof = list(proof)
            wrong_proof[position] = _flip_first_byte(wrong_proof[position])
            assert not verify_inclusion(hashed_leaf, leaf_index, tree_size, wrong_proof, root)
        if tree_size > 1:
            wrong_index = (leaf_index + 1) % tree_size
            assert not verify_inclusion(hashed_leaf, wrong_index, tree_size, proof, root)
            assert not verify_inclusion(hashed_leaf, leaf_index, tree_size, [*proof, root], root)


@property_settings
@given(leaf_entry_lists, st.data())
def test_every_consistency_proof_verifies_and_resists_tampering(
    entries: list[bytes], data: st.DataObject
) -> None:
    leaf_hashes = [leaf_hash(entry) for entry in entries]
    new_size = data.draw(st.integers(min_value=1, max_value=len(leaf_hashes)), label="new_size")
    new_root = root_from_leaf_hashes(leaf_hashes[:new_size])
    # Prefix roots come from the frontier (checked against root_from_leaf_hashes above) to keep
    # this test O(n log n) in hashing beyond the proofs themselves.
    old_frontier = MerkleFrontier()
    for old_size in range(new_size + 1):
        if old_size > 0:
            old_frontier = old_frontier.append(leaf_hashes[old_size - 1])
        old_root = old_frontier.root()
        proof = consistency_proof(leaf_hashes, old_size, new_size)
        assert verify_consistency(old_size, new_size, old_root, new_root, proof)
        if old_size == 0:
            continue  # the empty tree is consistent with any root
        wrong_old_root = _flip_first_byte(old_root)
        wrong_new_root = _flip_first_byte(new_root)
        assert not verify_consistency(old_size, new_size, wrong_old_root, new_root, proof)
        assert not verify_consistency(old_size, new_size, old_root, wrong_new_root, proof)
        for position in range(len(proof)):
            wrong_proof = list(proof)
            wrong_proof[position] = _flip_first_byte(wrong_proof[position])
            assert not verify_consistency(old_size, new_size, old_root, new_root, wrong_proof)


@property_settings
@given(leaf_entry_lists)
def test_frontier_from_bytes_rejects_truncated_data(entries: list[bytes]) -> None:
    frontier = MerkleFrontier()
    for entry in entries:
        frontier = frontier.append(leaf_hash(entry))
    serialized = frontier.to_bytes()
    assert MerkleFrontier.from_bytes(serialized) == frontier
    for truncated_length in range(len(serialized)):
        with pytest.raises(MerkleError):
            MerkleFrontier.from_bytes(serialized[:truncated_length])
