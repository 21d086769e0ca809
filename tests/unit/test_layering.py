"""The code's layers hold: a pure core without I/O, and no import cycles between packages."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = "sardis_ledger"  # the one import name; the packages below are its subpackages
PACKAGES = ("schemas", "streams", "sinks")

# Decisions: synchronous functions of their inputs (time and ids passed in), no I/O.
PURE_CORE = (
    "sardis_ledger.streams.core", "sardis_ledger.streams.money", "sardis_ledger.streams.merkle",
    "sardis_ledger.streams.canonical", "sardis_ledger.streams.batches",
    "sardis_ledger.streams.records", "sardis_ledger.streams.reconcile",
    "sardis_ledger.schemas.codec", "sardis_ledger.schemas.resolution",
)
IO_LIBRARIES = frozenset({"faust", "mode", "aiokafka", "asyncio", "asyncpg", "immudb", "web3",
                          "confluent_kafka", "grpc", "socket", "urllib", "http", "subprocess"})

# Package -> packages it may import. schemas is the lowest layer, sinks builds on streams.
ALLOWED = {"schemas": {"schemas"}, "streams": {"schemas", "streams"},
           "sinks": {"schemas", "streams", "sinks"}}
# The commands that compose every package (the console script, the demo, `status`, which reads
# the sinks' progress too) sit above the layers although they live in streams/.
COMPOSITION_ROOTS = frozenset({"sardis_ledger.streams.cli", "sardis_ledger.streams.demo",
                               "sardis_ledger.streams.status"})


def _package(module: str) -> str | None:
    """Which of PACKAGES a module name belongs to (None: not this project's code)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == TOP and parts[1] in PACKAGES:
        return parts[1]
    return None


def _path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


@cache
def imports_of(module: str) -> frozenset[str]:
    """Every module a module imports, at the top or inside functions (TYPE_CHECKING too)."""
    path = _path(module)
    if path is None:
        return frozenset()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if _path(f"{node.module}.{alias.name}") is not None)
    return frozenset(found)


def closure(module: str) -> set[str]:
    """The module and every project module it imports, transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(m for m in imports_of(current) if _package(m) and _path(m))
    return seen


def _modules(package: str) -> list[str]:
    return sorted(TOP + "." + ".".join(p.relative_to(ROOT).with_suffix("").parts)
                  .removesuffix(".__init__") for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("module", PURE_CORE)
def test_pure_core_imports_no_io_library(module: str) -> None:
    assert _path(module) is not None, f"{module} moved: update PURE_CORE"
    offenders = {f"{inner} imports {name}" for inner in closure(module)
                 for name in imports_of(inner) if name.split(".")[0] in IO_LIBRARIES}
    assert not offenders, f"{module} is not pure: {sorted(offenders)}"


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_the_layers_below(package: str) -> None:
    offenders = {f"{module} imports {name}" for module in _modules(package)
                 if module not in COMPOSITION_ROOTS
                 for name in imports_of(module)
                 if _package(name) is not None and _package(name) not in ALLOWED[package]}
    assert not offenders, sorted(offenders)


def test_the_checker_sees_lazy_and_type_checking_imports() -> None:
    assert "sardis_ledger.schemas.codec" in imports_of("sardis_ledger.streams.wire")
    assert any(name.startswith("aiokafka") for name in imports_of("sardis_ledger.streams.client"))
    assert "sardis_ledger.streams.worker.compat" in closure("sardis_ledger.streams.worker.reconciler")
    # Not vacuous: the packages test sees each package's modules and their project imports.
    assert all(len(_modules(package)) > 3 for package in PACKAGES)
    assert any(_package(name) == "streams" for name in imports_of(f"{TOP}.sinks.postgres"))
