"""Errors of the chain package: ChainError and its kinds, all LedgerErrors with `retriable`."""

from __future__ import annotations

from sardis_ledger.streams.errors import LedgerError


class ChainError(LedgerError):
    """Root of errors from the chain watcher, anchoring and contract compilation."""


class ChainConfigError(ChainError):
    """The watch or anchor configuration is missing or malformed; fix it, retrying cannot help."""


class ChainRpcError(ChainError):
    """A JSON-RPC call failed (after bounded retries when `retriable`)."""


class RangeTooLargeError(ChainRpcError):
    """The node refused an eth_getLogs range as too large; the caller splits the range."""


class ChainReorgTooDeepError(ChainError):
    """A reorg reaches below every block hash the watcher kept: it cannot find the fork point."""


class ChainMovedError(ChainError):
    """The chain changed while a block range was read; the range is read again."""

    retriable = True


class LogDecodeError(ChainError):
    """A Transfer log of a configured token cannot be represented exactly (never skipped)."""


class WatchStateError(ChainError):
    """The watcher's durable progress cannot be read or written."""


class CompileError(ChainError):
    """solc-js failed or reported errors."""


class AnchorError(ChainError):
    """An anchor transaction failed or anchors cannot be read."""
