"""The import codemod: what it rewrites, what it leaves, and that a second run changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.packaging.rename_imports import main, rename, rewrite_commands, rewrite_python

# Sources are built from parts so the codemod, run on this repository, leaves this file alone.
S, K, C = "stre" + "ams", "si" + "nks", "sche" + "mas"

CASES = [
    (f"from {S}.config import Settings\n", f"from sardis_ledger.{S}.config import Settings\n", 1),
    (f"from {S} import core\n", f"from sardis_ledger.{S} import core\n", 1),
    (f"    from {K}.queries import balance_at\n",
     f"    from sardis_ledger.{K}.queries import balance_at\n", 1),
    (f"import {C}.codec as codec\n", f"import sardis_ledger.{C}.codec as codec\n", 1),
    (f"from {S}.client import (\n    LedgerClient,\n)\n",
     f"from sardis_ledger.{S}.client import (\n    LedgerClient,\n)\n", 1),
    (f'cmd = [sys.executable, "-m", "{S}.cli", "verify"]\n',
     f'cmd = [sys.executable, "-m", "sardis_ledger.{S}.cli", "verify"]\n', 1),
    # Not imports of the moved packages: left alone.
    (f"from {S}x import y\nfrom infra import harness\nimport {S}_extra\n",
     f"from {S}x import y\nfrom infra import harness\nimport {S}_extra\n", 0),
    (f"# see {S}/core.py and `from {S}.core import decide`\n",
     f"# see {S}/core.py and `from {S}.core import decide`\n", 0),
    (f"from sardis_ledger.{S}.core import decide\n", f"from sardis_ledger.{S}.core import decide\n", 0),
    (f'name = "{S}"\n', f'name = "{S}"\n', 0),
]


@pytest.mark.parametrize(("source", "expected", "count"), CASES)
def test_rewrite_python(source: str, expected: str, count: int) -> None:
    assert rewrite_python(source) == (expected, count)
    assert rewrite_python(expected)[0] == expected  # idempotent


def test_rewrite_commands_in_makefile_and_readme() -> None:
    text = f"\t$(BIN)/python -m {K}.bench 50000 3\n```python\nfrom {S}.client import LedgerClient\n```\n"
    new, count = rewrite_commands(text)
    assert count == 2
    assert f"-m sardis_ledger.{K}.bench 50000" in new
    assert f"from sardis_ledger.{S}.client import LedgerClient" in new
    assert rewrite_commands(new) == (new, 0)


def test_makefile_mypy_line_names_packages() -> None:
    before = "\t$(BIN)/mypy sardis_ledger " + f"{S} {C} {K} infra tests\n"
    assert rewrite_commands(before) == ("\t$(BIN)/mypy -p sardis_ledger -p infra -p tests\n", 1)


def test_rename_tree_is_idempotent_and_skips_venvs(tmp_path: Path) -> None:
    (tmp_path / "sardis_ledger").mkdir()
    (tmp_path / S).mkdir()
    (tmp_path / S / "a.py").write_text(f"from {S}.b import c\n")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "x.py").write_text(f"from {S}.b import c\n")
    (tmp_path / "Makefile").write_text(f"run:\n\tpython -m {S}.cli demo\n")
    changes = rename(tmp_path)
    assert sorted(c.path.name for c in changes) == sorted(["Makefile", S, "a.py"])
    assert (tmp_path / "sardis_ledger" / S / "a.py").read_text() == f"from sardis_ledger.{S}.b import c\n"
    assert (tmp_path / ".venv" / "lib" / "x.py").read_text() == f"from {S}.b import c\n"
    assert rename(tmp_path) == []
    assert main([str(tmp_path), "--check"]) == 0


def test_check_mode_changes_nothing_and_fails(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(f"from {K}.verify import verify\n")
    assert main([str(tmp_path), "--check"]) == 1
    assert (tmp_path / "a.py").read_text() == f"from {K}.verify import verify\n"
