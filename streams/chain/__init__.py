"""On-chain side of the ledger: the ERC-20 transfer watcher, anchoring, and their contracts."""
