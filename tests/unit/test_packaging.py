"""The wheel's layout rules, checked without building: packages listed, harness kept out."""

from __future__ import annotations

import pytest

from infra.packaging.check_wheel import (
    REPO,
    CommandCase,
    command_problem,
    folder_packages,
    pyproject_packages,
    wheel_problems,
)


def test_every_package_folder_is_listed_in_pyproject() -> None:
    """A new subpackage (e.g. streams/worker/) must be added to [tool.setuptools] packages."""
    assert pyproject_packages(REPO) == folder_packages(REPO)


@pytest.mark.parametrize(("names", "problems"), [
    (["sardis_ledger/__init__.py", "sardis_ledger/streams/cli.py",
      "sardis_ledger-2.0.0a1.dist-info/RECORD"], 0),
    (["streams/cli.py"], 1),
    (["sardis_ledger/infra/kafka/pom.xml"], 1),
    (["sardis_ledger/x/package-lock.json"], 1),
])
def test_wheel_problems(names: list[str], problems: int) -> None:
    assert len(wheel_problems(names)) == problems


CASE = CommandCase(("receipt", "ent_x"), ("postgres", "immudb"))


@pytest.mark.parametrize(("installed", "rc", "stderr", "ok"), [
    (set(), 1, "sardis-ledger receipt: ... pip install 'sardis-ledger[postgres]'\n", True),
    (set(), 1, "pip install 'sardis-ledger[immudb]'\n", False),  # names the wrong extra
    ({"postgres"}, 3, "pip install 'sardis-ledger[immudb]'\n", True),
    ({"postgres", "immudb"}, 3, "sardis-ledger: error: PostgreSQL at ...: refused\n", True),
    ({"postgres", "immudb"}, 1, "Traceback (most recent call last):\n", False),
    ({"postgres", "immudb"}, None, "", True),  # still running at the timeout: it started
])
def test_command_problem(installed: set[str], rc: int | None, stderr: str, ok: bool) -> None:
    assert (command_problem(CASE, installed, rc, stderr) is None) is ok
