"""The installed distribution's version, for `--version` and `sardis_ledger.__version__`."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "sardis-ledger"
# A source checkout that was never installed has no metadata; say so rather than guess a number.
UNINSTALLED = "0+unknown"


def installed_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNINSTALLED


__version__ = installed_version()
