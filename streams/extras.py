"""The optional extras (pip install 'sardis-ledger[postgres]'): which module each brings, and the
one-line error when code needs one that is not installed."""

from __future__ import annotations

import importlib.util

from sardis_ledger.streams.errors import LedgerError

# The import that proves each extra is installed.
EXTRA_PROBES = {"postgres": "asyncpg", "immudb": "immudb", "anchoring": "web3"}
# The module a missing import names -> the extra that installs it.
EXTRA_OF_MODULE = {"asyncpg": "postgres", "immudb": "immudb", "grpc": "immudb", "web3": "anchoring",
                   "eth_account": "anchoring", "eth_abi": "anchoring", "hexbytes": "anchoring",
                   "yaml": "anchoring"}


class MissingExtra(LedgerError):
    """An optional dependency is not installed; the message names the extra to install."""


def install_line(extras: list[str]) -> str:
    return f"pip install 'sardis-ledger[{','.join(extras)}]'"


def missing(extras: list[str]) -> list[str]:
    """Those of the extras that are not installed."""
    return [extra for extra in extras if importlib.util.find_spec(EXTRA_PROBES[extra]) is None]


def require(what: str, *extras: str) -> None:
    """Raise MissingExtra naming every extra `what` needs and lacks, in one line."""
    lacking = missing(list(extras))
    if lacking:
        names = " and ".join(f"[{extra}]" for extra in lacking)
        raise MissingExtra(f"{what} needs the {names} extra: {install_line(lacking)}")
