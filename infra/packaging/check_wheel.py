"""`make test-wheel`: build the wheel as users get it and check it in fresh virtual environments.

In a temporary copy of the repository (tracked and new files, as committed or about to be), the
import codemod runs first (the wheel maps the folders under sardis_ledger), then `pip wheel`
builds. The wheel must hold only sardis_ledger (no harness files); then for no extra and each
of [postgres], [immudb], [anchoring], [all] a fresh venv installs it (exact versions from
infra/packaging/dev.lock) and every command either works or names its missing extra in one line.
Servers are pointed at closed ports: "works" means it got as far as connecting (or kept
running), with no traceback. Prints each venv's installed size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.packaging.rename_imports import rename

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "infra" / "packaging" / "dev.lock"
TOP_LEVEL = "sardis_ledger"
MAPPED_FOLDERS = {"sardis_ledger": "sardis_ledger", "streams": "sardis_ledger.streams",
                  "schemas": "sardis_ledger.schemas", "sinks": "sardis_ledger.sinks"}
HARNESS_NAMES = ("pom.xml", "go.mod", "go.sum", "tools.go", "package.json", "package-lock.json",
                 ".java", "Dockerfile", "harness.py")
VARIANTS: dict[str, set[str]] = {"none": set(), "postgres": {"postgres"}, "immudb": {"immudb"},
                                 "anchoring": {"anchoring"},
                                 "all": {"postgres", "immudb", "anchoring"}}
COMMAND_TIMEOUT_S = 25.0
INSTALL_TIMEOUT_S = 1800.0
BUILD_TIMEOUT_S = 600.0
CLOSED = "127.0.0.1:1"  # nothing listens: commands fail at connecting, after their imports
UNREACHABLE_ENV = {"SARDIS_KAFKA_BOOTSTRAP": CLOSED, "SARDIS_PG_DSN": f"postgresql://x@{CLOSED}/x",
                   "SARDIS_IMMUDB_ADDR": CLOSED, "SARDIS_IMMUDB_USER": "x",
                   "SARDIS_IMMUDB_PASSWORD": "x", "SARDIS_CHAIN_RPC": f"http://{CLOSED}",
                   "SARDIS_SCHEMA_REGISTRY_URL": "", "SARDIS_TOPIC_PREFIX": "wheel-check."}


@dataclass(frozen=True, slots=True)
class CommandCase:
    argv: tuple[str, ...]
    extras: tuple[str, ...]  # what it needs, in the order it checks them


COMMANDS = (
    CommandCase(("produce",), ()),
    CommandCase(("balance", "acc_1"), ()),
    CommandCase(("history", "acc_1"), ("postgres",)),
    CommandCase(("sink", "postgres"), ("postgres",)),
    CommandCase(("sink", "immudb"), ("immudb",)),
    CommandCase(("receipt", "ent_x"), ("postgres", "immudb")),
    CommandCase(("verify", "--no-immudb"), ("postgres",)),
    CommandCase(("reconcile", "--start-block", "1", "--end-block", "2"), ("postgres",)),
    CommandCase(("anchor",), ("anchoring",)),
    CommandCase(("chain", "watch", "--config", "watch.yaml"), ("anchoring",)),
)


class WheelCheckError(Exception):
    """The wheel or an install of it is not what users must get."""


def pyproject_packages(root: Path) -> list[str]:
    data = tomllib.loads((root / "pyproject.toml").read_text())
    return sorted(data["tool"]["setuptools"]["packages"])


def folder_packages(root: Path) -> list[str]:
    """Every package folder under the mapped folders, by the name it has in the wheel."""
    found = []
    for folder, name in MAPPED_FOLDERS.items():
        for init in sorted((root / folder).rglob("__init__.py")):
            parts = init.parent.relative_to(root / folder).parts
            # sardis_ledger/streams etc. are links to the folders (after the codemod).
            linked = any((root / folder).joinpath(*parts[:i + 1]).is_symlink()
                         for i in range(len(parts)))
            if "__pycache__" not in parts and not linked:
                found.append(".".join((name, *parts)))
    return sorted(found)


def wheel_problems(names: Iterable[str]) -> list[str]:
    """What a wheel's file list has that it must not: other top-level names, harness files."""
    problems = []
    for name in names:
        top = name.split("/")[0]
        if top != TOP_LEVEL and not top.endswith(".dist-info"):
            problems.append(f"top-level {top!r} ({name})")
        if any(name.endswith(marker) for marker in HARNESS_NAMES) or "/infra/" in f"/{name}":
            problems.append(f"harness file {name}")
    return problems


def command_problem(case: CommandCase, installed: set[str], returncode: int | None,
                    stderr: str) -> str | None:
    """None if the command behaved: named its first missing extra, or worked (no traceback)."""
    missing = [extra for extra in case.extras if extra not in installed]
    if missing:
        line = f"pip install 'sardis-ledger[{missing[0]}]'"
        if line not in stderr or returncode in (0, None) or "Traceback" in stderr:
            return f"expected one line naming [{missing[0]}], got rc={returncode}: {stderr[-400:]}"
        return None
    if "Traceback" in stderr or "pip install 'sardis-ledger[" in stderr:
        return f"rc={returncode}: {stderr[-600:]}"
    return None


def _run(cmd: Sequence[str], timeout_s: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s,
                          check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise WheelCheckError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return done


def build_wheel(work: Path) -> Path:
    """The repository's files copied to work/src, imports moved, wheel built into work/dist."""
    source = work / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        target = source / name
        if (REPO / name).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target)
    changed = rename(source)
    print(f"codemod: {sum(c.replacements for c in changed)} references in {len(changed)} files")
    # What builds must be lint-clean too: the codemod's import sorting, then ruff and mypy.
    from infra.packaging.rename_imports import sort_imports

    print(f"codemod: {sort_imports(source)}")
    _run([sys.executable, "-m", "ruff", "check", "--quiet", str(source)], BUILD_TIMEOUT_S)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"),
          str(source)], BUILD_TIMEOUT_S)
    return next((work / "dist").glob("*.whl"))


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def check_variant(wheel: Path, work: Path, variant: str) -> tuple[float, list[str]]:
    """Install into a fresh venv; (installed MB beyond a bare venv, problems)."""
    venv = work / f"venv-{variant}"
    _run([sys.executable, "-m", "venv", str(venv)], INSTALL_TIMEOUT_S)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     60).stdout.strip())
    bare_mb = _size_mb(site)
    spec = f"{wheel}[{variant}]" if variant != "none" else str(wheel)
    _run([str(python), "-m", "pip", "install", "-q", "-c", str(LOCK), spec], INSTALL_TIMEOUT_S)
    size_mb = _size_mb(site) - bare_mb
    problems = [f"{variant}: {p}" for p in _installed_problems(python, venv)]
    installed = VARIANTS[variant]
    run_dir = work / f"run-{variant}"
    run_dir.mkdir()
    (run_dir / "watch.yaml").write_text("tokens: []\n")
    env = {**os.environ, **UNREACHABLE_ENV, "SARDIS_STATE_DIR": str(run_dir / "state")}
    env.pop("PYTHONPATH", None)
    for case in COMMANDS:
        cmd = [str(venv / "bin" / "sardis-ledger"), *case.argv]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                                  cwd=run_dir, env=env, stdin=subprocess.DEVNULL, check=False)
            returncode, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired as exc:  # still running (a sink retrying): it started
            returncode = None
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        problem = command_problem(case, installed, returncode, stderr)
        status = "ok" if problem is None else "PROBLEM"
        print(f"  [{variant}] {' '.join(case.argv)}: rc={returncode} {status}")
        if problem:
            problems.append(f"{variant}: {' '.join(case.argv)}: {problem}")
    return size_mb, problems


def _installed_problems(python: Path, venv: Path) -> list[str]:
    probe = (
        "import importlib.metadata as m, importlib.util as u, sys\n"
        "files = m.distribution('sardis-ledger').files\n"
        "tops = sorted({f.parts[0] for f in files if f.parts[0] not in ('..',)})\n"
        "print(' '.join(tops))\n"
        "print(' '.join(n for n in ('streams', 'schemas', 'sinks', 'infra', 'tests')\n"
        "               if u.find_spec(n) is not None))\n"
        "import sardis_ledger, sardis_ledger.streams.worker, sardis_ledger.streams.client\n"
        "from sardis_ledger import LedgerEngine, create_hybrid_ledger, create_audit_trail\n"
        "from sardis_ledger.streams.chain.solc import precompiled\n"
        "print(sardis_ledger.__version__, precompiled('LedgerAnchor') is not None)\n")
    out = _run([str(python), "-c", probe], 120, cwd=venv).stdout.splitlines()
    problems = []
    tops = set(out[0].split())
    if tops - {TOP_LEVEL} and not all(t == TOP_LEVEL or t.endswith(".dist-info") for t in tops):
        problems.append(f"installed top-level names {sorted(tops)}")
    if out[1].strip():
        problems.append(f"importable besides sardis_ledger: {out[1]}")
    if not out[2].endswith("True"):
        problems.append(f"version/precompiled contract: {out[2]}")
    return problems


WORKER_READY_MARKER = "Worker]: Ready"  # streams.worker_process.READY_MARKER
WORKER_READY_TIMEOUT_S = 180.0
LIVE_COMMAND = ('{"command_id": "wheel-c1", "account_id": "acc_wheel", "entry_type": "credit", '
                '"amount": "10.50", "currency": "USD"}\n')


def live_base_check(work: Path) -> list[str]:
    """The base install (no extra) on the dev servers: create topics, run the worker, produce a
    command and wait for its result, consume the entry, read the balance. Topics are deleted."""
    import asyncio
    import dataclasses
    import uuid

    from sardis_ledger.streams.config import Settings
    from sardis_ledger.streams.topics import delete_topics_with_prefix

    venv_bin = work / "venv-none" / "bin"
    run_dir = work / "live"
    run_dir.mkdir()
    settings = dataclasses.replace(Settings.from_env(),
                                   topic_prefix=f"t-wheel{uuid.uuid4().hex[:8]}.")
    env = {**os.environ, **settings.as_env(), "SARDIS_WORKER_DATADIR": str(run_dir / "worker")}
    env.pop("PYTHONPATH", None)
    cli = str(venv_bin / "sardis-ledger")
    problems: list[str] = []
    log_path = run_dir / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    try:
        _run([cli, "topics", "create"], 120, cwd=run_dir, env=env)
        with log_path.open("wb") as log:
            # info: Faust logs its ready line at that level.
            worker = subprocess.Popen([cli, "--log-level", "info", "worker"], cwd=run_dir,
                                      env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        while WORKER_READY_MARKER not in log_path.read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                return [f"live: the worker did not get ready: {log_path.read_text()[-1500:]}"]
            time.sleep(0.5)
        produced = _run([cli, "produce", "--wait"], 120, cwd=run_dir, env=env, input=LIVE_COMMAND)
        if '"committed"' not in produced.stdout:
            problems.append(f"live: produce --wait: {produced.stdout} {produced.stderr[-500:]}")
        consumed = _run([cli, "consume", "ledger.entries", "--from-beginning", "--max", "1",
                         "--timeout", "10"], 60, cwd=run_dir, env=env)
        if "wheel-c1" not in consumed.stdout:
            problems.append(f"live: consume found no entry: {consumed.stdout[-500:]}")
        balance = _run([cli, "balance", "acc_wheel", "--currency", "USD"], 60, cwd=run_dir, env=env)
        if '"10.50"' not in balance.stdout:
            problems.append(f"live: balance: {balance.stdout}")
        print(f"  [none] live: topics create, worker, produce --wait, consume, balance: "
              f"{'ok' if not problems else 'PROBLEM'}")
    except WheelCheckError as exc:
        problems.append(f"live: {exc}")
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        asyncio.run(delete_topics_with_prefix(settings))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.packaging.check_wheel",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--variant", action="append", choices=list(VARIANTS),
                        help="only these installs (repeatable; default: all five)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-live", action="store_true",
                        help="skip running the no-extra install on the dev servers (topics, "
                        "worker, produce, consume, balance)")
    args = parser.parse_args(argv)
    problems = [f"pyproject packages {pyproject_packages(REPO)} != folders {folder_packages(REPO)}"
                ] if pyproject_packages(REPO) != folder_packages(REPO) else []
    work = Path(tempfile.mkdtemp(prefix="sardis-wheel-"))
    try:
        wheel = build_wheel(work)
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
        problems += wheel_problems(names)
        print(f"wheel: {wheel.name}, {wheel.stat().st_size / 1e3:.0f} kB, {len(names)} files")
        for variant in args.variant or list(VARIANTS):
            size_mb, found = check_variant(wheel, work, variant)
            print(f"installed size [{variant}]: {size_mb:.1f} MB")
            problems += found
            if variant == "none" and not args.no_live:
                problems += live_base_check(work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print("wheel check: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
