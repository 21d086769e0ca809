"""Options every `sardis-ledger` command shares: --config, --bootstrap-server, --log-level,
--version; the exit codes of checking commands; naming the extra a command is missing."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tomllib
from collections.abc import MutableMapping
from pathlib import Path

from sardis_ledger.streams.config import ENV_NAMES
from sardis_ledger.streams.errors import ConfigError
from sardis_ledger.streams.extras import EXTRA_OF_MODULE, EXTRA_PROBES, install_line, missing

# `verify`, `receipt`, `reconcile`: 1 = checked and found a problem, 3 = could not check (a server
# unreachable, a missing extra, bad settings). 2 stays argparse's usage error.
EXIT_FOUND_PROBLEM = 1
EXIT_COULD_NOT_CHECK = 3
CHECKING_COMMANDS = frozenset({"verify", "receipt", "reconcile"})
CONFIG_FILE_BYTES_MAX = 1_000_000
# One set of level names for every command (the worker's Faust and the sinks' logging alike).
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR, "critical": logging.CRITICAL}
STANDARD_NAMED_COMMANDS = frozenset({"chain", "anchor"})
# Faust's own names for the same levels (the worker's and the sinks' --loglevel).
FAUST_LOG_LEVELS = {"debug": "debug", "info": "info", "warning": "warn", "error": "error",
                    "critical": "crit"}
def add_common_options(parser: argparse.ArgumentParser, version: str) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    # dest differs from `chain watch --config` (its YAML watch file), which shares the namespace.
    parser.add_argument("--config", dest="config_file", metavar="FILE", type=Path,
                        help="TOML file of settings: keys are the SARDIS_* names without the "
                        "prefix, lower case (kafka_bootstrap = \"host:9092\", topic_prefix, "
                        "pg_dsn, immudb_addr, ...). The environment overrides the file, flags "
                        "override both")
    parser.add_argument("--bootstrap-server", metavar="HOST:PORT[,...]",
                        help="Kafka bootstrap servers (overrides SARDIS_KAFKA_BOOTSTRAP)")
    parser.add_argument("--log-level", choices=list(LOG_LEVELS), default=None,
                        help="log level of every command (default: each command's own, warning "
                        "for the worker, info for sinks)")


def config_file_env(path: Path) -> dict[str, str]:
    """The SARDIS_* variables a TOML config file sets; unknown keys are errors, not ignored."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(CONFIG_FILE_BYTES_MAX + 1)
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror})") from exc
    if len(raw) > CONFIG_FILE_BYTES_MAX:
        raise ConfigError(f"--config {path}: larger than {CONFIG_FILE_BYTES_MAX} bytes")
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: not TOML ({exc})") from exc
    known = {name.removeprefix("SARDIS_").lower(): name for name in ENV_NAMES}
    known.update({"pg_schema": "SARDIS_PG_SCHEMA", "state_dir": "SARDIS_STATE_DIR"})
    env: dict[str, str] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"--config {path}: unknown setting {key!r}; known: "
                              f"{', '.join(sorted(known))}")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ConfigError(f"--config {path}: {key} must be a string or a whole number")
        env[known[key]] = str(value)
    return env


def apply_settings(args: argparse.Namespace, environ: MutableMapping[str, str]) -> None:
    """Flags over environment over file: the file fills what the environment leaves unset, the
    flags overwrite. Every command then reads its settings from the environment as before."""
    if args.config_file is not None:
        for name, value in config_file_env(args.config_file).items():
            environ.setdefault(name, value)
    if args.bootstrap_server:
        environ["SARDIS_KAFKA_BOOTSTRAP"] = args.bootstrap_server
    if args.log_level is not None:
        if hasattr(args, "loglevel"):
            # Commands with their own logging setup take the shared level: the worker and the
            # sinks in Faust's names, the chain commands in logging's.
            args.loglevel = (args.log_level if args.command in STANDARD_NAMED_COMMANDS
                             else FAUST_LOG_LEVELS[args.log_level])
        else:
            logging.basicConfig(level=LOG_LEVELS[args.log_level])


def required_extras(args: argparse.Namespace) -> list[str]:
    """The extras a parsed command needs, checked before it connects anywhere."""
    command = args.command
    if command in ("chain", "anchor"):
        return ["anchoring"]
    if command == "sink":
        return [args.kind]
    if command in ("history", "replay", "reconcile") or (command == "balance" and args.at):
        return ["postgres"]
    if command == "receipt" or (command == "verify" and not args.no_immudb):
        return ["postgres", "immudb"]
    if command == "verify":
        return ["postgres"]
    return []


def add_checkout_to_path() -> Path | None:
    """Make the dev harness (`infra/`, source repository only) importable when this package runs
    from a checkout: the console script's sys.path holds its bin folder, not the checkout, so an
    editable install's `sardis-ledger dev up` (and `make up`) could not find it. The root is this
    file's own checkout (never the working directory); it is appended, so it shadows nothing.
    Returns the root added, or None (already importable, or an installed wheel)."""
    if importlib.util.find_spec("infra") is not None:
        return None
    root = Path(__file__).resolve().parents[1]
    if not (root / "infra" / "harness.py").is_file() or not (root / "pyproject.toml").is_file():
        return None
    sys.path.append(str(root))
    return root


def check_extras(args: argparse.Namespace) -> None:
    """Raise ModuleNotFoundError for the first extra the command needs and lacks."""
    for extra in missing(required_extras(args)):
        module = EXTRA_PROBES[extra]
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra that installs the missing module, or None if it is not ours."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is not None:
        return (f"this command needs the [{extra}] extra ({top} is not installed): "
                f"{install_line([extra])}")
    if top == "infra":
        return ("this command runs the dev harness, which is in the source repository only "
                "(not in the installed package): run it from a checkout")
    return None


def failure_exit(command: str, default: int) -> int:
    """The exit code of a command that raised: checking commands say they could not check."""
    return EXIT_COULD_NOT_CHECK if command in CHECKING_COMMANDS else default
