"""Codemod: move `streams`, `schemas`, `sinks` under the one import name `sardis_ledger`.

The wheel maps the repository's folders to `sardis_ledger.streams`, `sardis_ledger.schemas` and
`sardis_ledger.sinks` (pyproject.toml, [tool.setuptools] package-dir), so every import of them
must name the package. Other branches change those modules in parallel; running this once after
they merge moves every import in one commit instead of conflicting on each.

Deterministic and idempotent: a second run changes nothing. It rewrites, in .py files,
`from streams... import` / `import streams...` statements and the quoted module paths used as
`python -m streams.cli` arguments; in Makefile, README.md and .ci files the `-m streams...`
command lines, the README's Python examples and the Makefile's mypy line (`mypy -p ...`). It
links sardis_ledger/streams -> ../streams (and schemas, sinks), so mypy and editors see the
installed layout (at run time sardis_ledger/__init__.py finds the folders even without the links),
then sorts the moved imports with ruff when ruff is installed. The harness (`infra`) and `tests`
stay top-level folders outside the wheel.

    python -m infra.packaging.rename_imports [ROOT] [--check]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "sardis_ledger"
MOVED = ("streams", "schemas", "sinks")
# Folders never rewritten: virtual environments, caches, VCS data, build output.
SKIPPED_DIRS = frozenset({".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__",
                          ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"})
# Text files besides *.py whose command lines name modules (`python -m sinks.bench`).
COMMAND_FILES = ("Makefile", "README.md", ".ci/run")
# The lint line of the Makefile before and after: mypy must see the files under their new names.
MYPY_BEFORE = "mypy sardis_ledger streams schemas sinks infra tests"
MYPY_AFTER = "mypy -p sardis_ledger -p infra -p tests"
RUFF_TIMEOUT_S = 300
FILE_BYTES_MAX = 2_000_000  # a source file larger than this is not ours; refuse to guess

_NAMES = "|".join(MOVED)
# `from streams.x import y`, `import schemas.codec as c` at any indentation (lazy imports too).
_IMPORT = re.compile(rf"^(?P<lead>[ \t]*(?:from|import)[ \t]+)(?P<mod>(?:{_NAMES})(?:\.\w+)*)"
                     rf"(?=[ \t]|$|,)", re.MULTILINE)
# A quoted dotted path naming one of the moved packages, e.g. "-m", "sardis_ledger.streams.cli".
_QUOTED = re.compile(rf"(?P<quote>[\"'])(?P<mod>(?:{_NAMES})\.\w+(?:\.\w+)*)(?P=quote)")
# A `-m pkg.module` on a command line (Makefile recipes, README examples).
_DASH_M = re.compile(rf"(?P<lead>-m[ \t]+)(?P<mod>(?:{_NAMES})\.\w+(?:\.\w+)*)")


@dataclass(frozen=True, slots=True)
class Change:
    path: Path
    replacements: int


def rewrite_python(text: str) -> tuple[str, int]:
    """The source with every import of a moved package under PACKAGE; and how many changed."""
    count = 0

    def quoted(match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"{match['quote']}{PACKAGE}.{match['mod']}{match['quote']}"

    text, count = rewrite_python_imports(text)
    text = _QUOTED.sub(quoted, text)
    return text, count


def rewrite_commands(text: str) -> tuple[str, int]:
    """`-m streams.cli` -> `-m sardis_ledger.streams.cli` in a Makefile or a README, and the
    README's Python examples (`from streams.client import ...` lines)."""
    count = 0

    def dash_m(match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"{match['lead']}{PACKAGE}.{match['mod']}"

    text = _DASH_M.sub(dash_m, text)
    text, imports = rewrite_python_imports(text)
    count += text.count(MYPY_BEFORE)
    return text.replace(MYPY_BEFORE, MYPY_AFTER), count + imports


def rewrite_python_imports(text: str) -> tuple[str, int]:
    count = 0

    def imp(match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"{match['lead']}{PACKAGE}.{match['mod']}"

    return _IMPORT.sub(imp, text), count


def python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not SKIPPED_DIRS.intersection(path.relative_to(root).parts):
            yield path


def _apply(path: Path, rewrite: Callable[[str], tuple[str, int]], write: bool) -> Change | None:
    if path.stat().st_size > FILE_BYTES_MAX:
        raise SystemExit(f"rename_imports: {path} is over {FILE_BYTES_MAX} bytes; not rewriting it")
    text = path.read_text(encoding="utf-8")
    new_text, count = rewrite(text)
    if new_text == text:
        return None
    if write:
        path.write_text(new_text, encoding="utf-8")
    return Change(path, count)


def rename(root: Path, *, write: bool = True) -> list[Change]:
    """Rewrite the tree at root; the files changed (none on a second run)."""
    changes: list[Change | None] = [_apply(p, rewrite_python, write) for p in python_files(root)]
    changes += [_apply(root / name, rewrite_commands, write) for name in COMMAND_FILES
                if (root / name).is_file()]
    changes += [link_package(root, name, write) for name in MOVED]
    return [c for c in changes if c is not None]


def link_package(root: Path, name: str, write: bool) -> Change | None:
    """sardis_ledger/<name> -> ../<name>, the layout the wheel installs."""
    link = root / PACKAGE / name
    if link.is_symlink() or link.exists() or not (root / name).is_dir():
        return None
    if write:
        link.symlink_to(Path("..") / name, target_is_directory=True)
    return Change(link, 1)


def sort_imports(root: Path) -> str:
    """ruff's import sorting on the tree (a moved import may now sort elsewhere)."""
    if importlib.util.find_spec("ruff") is None:
        return "ruff is not installed: run `ruff check --fix --select I .` yourself"
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--fix", "--select", "I",
                           "--quiet", str(root)], capture_output=True, text=True,
                          timeout=RUFF_TIMEOUT_S, check=False)
    return "imports sorted" if done.returncode == 0 else f"ruff: {done.stdout}{done.stderr}"


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.packaging.rename_imports",
        description=f"Rewrite imports of {', '.join(MOVED)} to {PACKAGE}.<name> across the tree "
        "(idempotent). Run once after merging, then `make lint test`.")
    parser.add_argument("root", nargs="?", default=".", type=Path, help="repository root (default .)")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if any file still needs rewriting")
    args = parser.parse_args(list(argv) if argv is not None else None)
    changes = rename(args.root.resolve(), write=not args.check)
    for change in changes:
        print(f"{change.path.relative_to(args.root.resolve())}: {change.replacements}")
    total = sum(c.replacements for c in changes)
    verb = "need rewriting" if args.check else "rewritten"
    print(f"{len(changes)} files, {total} references {verb}", file=sys.stderr)
    if changes and not args.check:
        print(sort_imports(args.root.resolve()), file=sys.stderr)
    return 1 if args.check and changes else 0


if __name__ == "__main__":
    sys.exit(main())
