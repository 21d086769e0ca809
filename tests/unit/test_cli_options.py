"""Shared CLI options: config file over nothing, env over file, flags over env; extras named."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from sardis_ledger.streams.chain.solc import precompiled
from sardis_ledger.streams.cli import build_parser, main
from sardis_ledger.streams.cli_options import (
    EXIT_COULD_NOT_CHECK,
    apply_settings,
    config_file_env,
    failure_exit,
    missing_extra,
)
from sardis_ledger.streams.errors import ConfigError


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_flags_over_environment_over_file(tmp_path: Path) -> None:
    config = tmp_path / "ledger.toml"
    config.write_text('kafka_bootstrap = "file:9092"\ntopic_prefix = "from-file."\npartitions = 6\n')
    environ = {"SARDIS_TOPIC_PREFIX": "from-env."}
    apply_settings(_args("--config", str(config), "--bootstrap-server", "flag:9092",
                         "topics", "check"), environ)
    assert environ == {"SARDIS_KAFKA_BOOTSTRAP": "flag:9092", "SARDIS_TOPIC_PREFIX": "from-env.",
                       "SARDIS_PARTITIONS": "6"}


@pytest.mark.parametrize(("text", "message"), [
    ("bogus = 1\n", "unknown setting 'bogus'"),
    ("partitions = 1.5\n", "string or a whole number"),
    ("partitions = true\n", "string or a whole number"),
    ("kafka_bootstrap = \n", "not TOML"),
])
def test_bad_config_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config_file_env(config)


def test_global_config_and_chain_watch_config_are_apart(tmp_path: Path) -> None:
    config = tmp_path / "ledger.toml"
    config.write_text('topic_prefix = "p."\n')
    args = _args("--config", str(config), "chain", "watch", "--config", "watch.yaml")
    assert (args.config_file, str(args.config)) == (config, "watch.yaml")
    environ: dict[str, str] = {}
    apply_settings(args, environ)
    assert environ == {"SARDIS_TOPIC_PREFIX": "p."}


def test_one_log_level_for_every_command() -> None:
    worker = _args("--log-level", "warning", "worker")
    apply_settings(worker, {})
    assert worker.loglevel == "warn"
    sink = _args("--log-level", "critical", "sink", "postgres")
    apply_settings(sink, {})
    assert sink.loglevel == "crit"
    anchor = _args("--log-level", "debug", "anchor")
    apply_settings(anchor, {})
    assert anchor.loglevel == "debug"


@pytest.mark.parametrize(("module", "extra"), [
    ("asyncpg", "postgres"), ("immudb.client", "immudb"), ("web3", "anchoring"),
    ("yaml", "anchoring"),
])
def test_missing_extra_is_named_in_one_line(module: str, extra: str) -> None:
    line = missing_extra(ModuleNotFoundError(f"No module named {module!r}", name=module))
    assert line is not None and "\n" not in line
    assert f"pip install 'sardis-ledger[{extra}]'" in line


def test_unrelated_missing_module_is_not_blamed_on_an_extra() -> None:
    assert missing_extra(ModuleNotFoundError("x", name="numpy")) is None


@pytest.mark.parametrize(("command", "code"), [("verify", EXIT_COULD_NOT_CHECK),
                                               ("receipt", EXIT_COULD_NOT_CHECK),
                                               ("reconcile", EXIT_COULD_NOT_CHECK),
                                               ("topics", 1)])
def test_checking_commands_say_could_not_check(command: str, code: int) -> None:
    assert failure_exit(command, 1) == code


def test_verify_that_cannot_reach_postgres_exits_could_not_check(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SARDIS_PG_DSN", "postgresql://nobody@127.0.0.1:1/none")
    assert main(["verify", "--no-immudb", "--no-anchors"]) == EXIT_COULD_NOT_CHECK
    assert "127.0.0.1:1" in capsys.readouterr().err


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("sardis-ledger ")


def test_shipped_contract_matches_its_source() -> None:
    """After editing LedgerAnchor.sol, run `python -m streams.chain.solc LedgerAnchor`."""
    shipped = precompiled("LedgerAnchor")
    assert shipped is not None, "contracts/LedgerAnchor.json is stale or missing"
    assert shipped.bytecode and any(item.get("name") == "anchor" for item in shipped.abi)


@pytest.mark.parametrize(("argv", "extras"), [
    (["produce"], []), (["worker"], []), (["balance", "a"], []),
    (["balance", "a", "--at", "2026-01-01"], ["postgres"]),
    (["sink", "immudb"], ["immudb"]), (["sink", "postgres"], ["postgres"]),
    (["history", "a"], ["postgres"]), (["receipt", "ent_x"], ["postgres", "immudb"]),
    (["verify"], ["postgres", "immudb"]), (["verify", "--no-immudb"], ["postgres"]),
    (["reconcile", "--start-block", "1", "--end-block", "2"], ["postgres"]),
    (["anchor"], ["anchoring"]), (["chain", "watch", "--config", "w.yaml"], ["anchoring"]),
])
def test_each_command_declares_its_extras(argv: list[str], extras: list[str]) -> None:
    from sardis_ledger.streams.cli_options import required_extras

    assert required_extras(_args(*argv)) == extras


def test_dev_outside_a_checkout_says_so(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    for name in [m for m in sys.modules if m == "infra" or m.startswith("infra.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "infra", None)  # as in the wheel: no harness installed
    assert main(["dev", "status"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "source repository only" in err


def test_a_console_script_finds_the_dev_harness_of_its_own_checkout(tmp_path: Path) -> None:
    # A console script's sys.path holds its bin folder, not the checkout: `sardis-ledger dev up`
    # from an editable install said the harness was missing. -I keeps the working directory (an
    # empty folder here) off sys.path, as for the console script.
    code = ("from sardis_ledger.streams.cli_options import add_checkout_to_path; "
            "root = add_checkout_to_path(); import infra.harness; print(root); "
            "print(infra.harness.__file__)")
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, check=True, timeout=60)
    root, harness_file = done.stdout.split()
    checkout = Path(__file__).resolve().parents[2]
    assert Path(root) == checkout
    assert Path(harness_file) == checkout / "infra" / "harness.py"
