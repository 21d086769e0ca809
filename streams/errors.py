"""Exception root of the ledger: every error the ledger raises derives from LedgerError."""

from __future__ import annotations

# The root and the codec's error live with the codec, the lowest layer (schemas imports nothing
# of streams); they are the same classes here.
from sardis_ledger.schemas.errors import CodecError, LedgerError

__all__ = ["CodecError", "ConfigError", "InfraError", "InvariantViolation", "LedgerError",
           "MerkleError", "RegistryError"]


class InvariantViolation(LedgerError):
    """A broken internal invariant: a bug, never a business rejection. Never caught to continue."""


class ConfigError(LedgerError):
    """Configuration from the environment is missing or malformed."""


class MerkleError(LedgerError):
    """A Merkle proof was requested for sizes or indexes that do not exist."""


class InfraError(LedgerError):
    """A dev-harness server could not be provisioned or started."""


class RegistryError(LedgerError):
    """A schema registry call failed. `status` is the HTTP status (None: no answer) and
    `error_code` the registry's own code from its error body (e.g. 40401), when it gave one."""

    def __init__(self, message: str, *, status: int | None = None, error_code: int | None = None,
                 retriable: bool | None = None) -> None:
        super().__init__(message, retriable=retriable)
        self.status = status
        self.error_code = error_code
