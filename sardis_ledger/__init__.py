"""sardis-ledger: the stream ledger, and sardis-ledger 1.x's public API over it (see README)."""

from __future__ import annotations

from pathlib import Path as _Path

# In the wheel, streams/, schemas/ and sinks/ are installed as sardis_ledger.streams, ... (the
# pyproject maps them). In a source checkout they are folders beside this one, so this package
# also looks there; an installed package has them inside and never reaches this branch.
_here = _Path(__file__).resolve().parent
if not (_here / "streams").is_dir() and (_here.parent / "streams" / "__init__.py").is_file():
    __path__.append(str(_here.parent))

from sardis_ledger.audit import (  # noqa: E402
    AuditReceipt,
    AuditTrail,
    ImmutableConfig,
    Verification,
    VerificationStatus,
    create_audit_trail,
)
from sardis_ledger.engine import (  # noqa: E402
    Batch,
    ConcurrencyError,
    Entry,
    HybridReceipt,
    LedgerEngine,
    LedgerEntryType,
    LockManager,
)
from sardis_ledger.hybrid import HybridConfig, HybridLedger, ReceiptTimeout, create_hybrid_ledger  # noqa: E402
from sardis_ledger.reconciliation import ChainProvider, ReconciliationEngine  # noqa: E402
from sardis_ledger.version import __version__  # noqa: E402

__all__ = [
    "AuditReceipt",
    "AuditTrail",
    "Batch",
    "ChainProvider",
    "ConcurrencyError",
    "Entry",
    "HybridConfig",
    "HybridLedger",
    "HybridReceipt",
    "ImmutableConfig",
    "LedgerEngine",
    "LedgerEntryType",
    "LockManager",
    "ReceiptTimeout",
    "ReconciliationEngine",
    "Verification",
    "VerificationStatus",
    "__version__",
    "create_audit_trail",
    "create_hybrid_ledger",
]
