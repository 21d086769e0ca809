// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title LedgerAnchor: Merkle tree heads of the sardis ledger's partitions, anchored on chain.
/// @notice Only the deployer anchors. A partition's tree only grows, and a (partition, size) pair
///         keeps the first root anchored for it forever, so a later rewrite of the ledger cannot
///         be matched by a rewritten anchor.
contract LedgerAnchor {
    struct Head {
        uint64 treeSize;
        bytes32 root;
        uint64 blockNumber;
    }

    address public immutable owner;
    mapping(uint32 => Head) private _latest;
    mapping(uint32 => mapping(uint64 => bytes32)) private _roots;

    event Anchored(uint32 indexed partition, uint64 indexed treeSize, bytes32 root);

    error NotOwner(address caller);
    error ZeroRoot(uint32 partition);
    error TreeShrank(uint32 partition, uint64 latestSize, uint64 givenSize);
    error ConflictingRoot(uint32 partition, uint64 treeSize, bytes32 anchored, bytes32 given);
    error LengthMismatch();

    constructor() {
        owner = msg.sender;
    }

    function anchor(uint32 partition, uint64 treeSize, bytes32 root) external {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        _anchor(partition, treeSize, root);
    }

    /// @notice One transaction for many partitions (the `sardis-ledger anchor` default).
    function anchorBatch(uint32[] calldata partitions, uint64[] calldata treeSizes, bytes32[] calldata roots)
        external
    {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        if (partitions.length != treeSizes.length || partitions.length != roots.length) revert LengthMismatch();
        for (uint256 i = 0; i < partitions.length; i++) {
            _anchor(partitions[i], treeSizes[i], roots[i]);
        }
    }

    /// @notice The latest anchored head of a partition; treeSize 0 and root 0 when none.
    function latest(uint32 partition) external view returns (uint64 treeSize, bytes32 root, uint64 blockNumber) {
        Head storage head = _latest[partition];
        return (head.treeSize, head.root, head.blockNumber);
    }

    /// @notice The root anchored for exactly this tree size of a partition; 0 when never anchored.
    function rootAt(uint32 partition, uint64 treeSize) external view returns (bytes32) {
        return _roots[partition][treeSize];
    }

    function _anchor(uint32 partition, uint64 treeSize, bytes32 root) private {
        if (root == bytes32(0)) revert ZeroRoot(partition);
        Head storage head = _latest[partition];
        if (head.root != bytes32(0) && treeSize < head.treeSize) {
            revert TreeShrank(partition, head.treeSize, treeSize);
        }
        bytes32 anchored = _roots[partition][treeSize];
        if (anchored == root) return; // already anchored: idempotent, no second event
        if (anchored != bytes32(0)) revert ConflictingRoot(partition, treeSize, anchored, root);
        _roots[partition][treeSize] = root;
        _latest[partition] = Head(treeSize, root, uint64(block.number));
        emit Anchored(partition, treeSize, root);
    }
}
