"""The Python API names a missing extra in one line, like the commands do."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from sardis_ledger import HybridConfig, ImmutableConfig, create_audit_trail, create_hybrid_ledger
from sardis_ledger.streams.extras import MissingExtra, require


def _without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in modules else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_hybrid_ledger_without_its_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "asyncpg", "immudb")
    with pytest.raises(MissingExtra) as missing:
        create_hybrid_ledger(config=HybridConfig(postgres_url="postgresql://..."))
    assert str(missing.value) == ("create_hybrid_ledger needs the [postgres] and [immudb] extra: "
                                  "pip install 'sardis-ledger[postgres,immudb]'")


def test_audit_trail_without_immudb(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "immudb")
    with pytest.raises(MissingExtra, match=r"pip install 'sardis-ledger\[immudb\]'"):
        create_audit_trail(config=ImmutableConfig(database="sardis_audit"))


def test_installed_extras_pass() -> None:
    require("anything", "postgres", "immudb", "anchoring")  # the dev environment has them all
