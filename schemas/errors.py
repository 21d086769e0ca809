"""The ledger's exception root and the codec's error (streams.errors re-exports both)."""

from __future__ import annotations


class LedgerError(Exception):
    """Root of all sardis-ledger errors. `retriable` says whether retrying the same call can help."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class CodecError(LedgerError):
    """Bytes that cannot be decoded or a record that cannot be encoded; `reason` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
