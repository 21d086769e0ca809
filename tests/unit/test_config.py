"""Settings come from SARDIS_* variables with loopback defaults and clear errors."""

from __future__ import annotations

import pytest

from streams.config import (
    IMMUDB_DEV_PASSWORD,
    PARTITIONS_DEFAULT,
    Settings,
    host_port,
)
from streams.errors import ConfigError


def test_defaults_point_at_the_loopback_dev_harness() -> None:
    settings = Settings.from_env({})
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.pg_dsn.startswith("postgresql://sardis@127.0.0.1:5432/")
    assert settings.immudb_addr == "127.0.0.1:3322"
    assert settings.chain_rpc == "http://127.0.0.1:8545"
    assert settings.partitions == PARTITIONS_DEFAULT
    assert settings.topic("ledger.commands") == "ledger.commands"


def test_topic_prefix_is_prepended() -> None:
    settings = Settings.from_env({"SARDIS_TOPIC_PREFIX": "acme."})
    assert settings.topic("ledger.entries") == "acme.ledger.entries"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SARDIS_PARTITIONS": "twelve"}, "not a whole number"),
        ({"SARDIS_PARTITIONS": "0"}, "must be 1.."),
        ({"SARDIS_PARTITIONS": "100000"}, "must be 1.."),
        ({"SARDIS_TOPIC_PREFIX": "bad prefix"}, "SARDIS_TOPIC_PREFIX"),
        ({"SARDIS_IMMUDB_ADDR": "immudb.internal:3322"}, "SARDIS_IMMUDB_USER"),
        ({"SARDIS_RECONCILE_GRACE_S": "15m"}, "SARDIS_RECONCILE_GRACE_S.*not a whole number"),
        ({"SARDIS_RECONCILE_GRACE_BLOCKS": "-1"}, "SARDIS_RECONCILE_GRACE_BLOCKS=-1 must be 0.."),
        ({"SARDIS_REPLICATION_FACTOR": "three"}, "SARDIS_REPLICATION_FACTOR.*not a whole number"),
        ({"SARDIS_REPLICATION_FACTOR": "0"}, "SARDIS_REPLICATION_FACTOR=0 must be 1.."),
    ],
)
def test_bad_settings_raise_config_error_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_external_immudb_takes_credentials_from_environment_not_defaults() -> None:
    settings = Settings.from_env({"SARDIS_IMMUDB_ADDR": "immudb.internal:3322",
                                  "SARDIS_IMMUDB_USER": "ledger",
                                  "SARDIS_IMMUDB_PASSWORD": "s3cret"})
    assert (settings.immudb_user, settings.immudb_password) == ("ledger", "s3cret")
    assert settings.immudb_password != IMMUDB_DEV_PASSWORD


def test_as_env_round_trips() -> None:
    settings = Settings.from_env({"SARDIS_TOPIC_PREFIX": "x.", "SARDIS_PARTITIONS": "3",
                                  "SARDIS_RECONCILE_GRACE_S": "5",
                                  "SARDIS_RECONCILE_GRACE_BLOCKS": "0"})
    assert (settings.reconcile_grace_s, settings.reconcile_grace_blocks) == (5, 0)
    assert Settings.from_env(settings.as_env()) == settings


@pytest.mark.parametrize(("raw", "expected"), [(None, None), ("auto", None), ("", None),
                                               ("1", 1), ("3", 3), ("5", 5)])
def test_replication_factor_is_auto_unless_a_number_is_given(raw: str | None,
                                                             expected: int | None) -> None:
    settings = Settings.from_env({} if raw is None else {"SARDIS_REPLICATION_FACTOR": raw})
    assert settings.replication_factor == expected
    assert Settings.from_env(settings.as_env()) == settings


@pytest.mark.parametrize(("address", "expected"),
                         [("127.0.0.1:9092", ("127.0.0.1", 9092)),
                          ("a:1,b:2", ("a", 1))])
def test_host_port(address: str, expected: tuple[str, int]) -> None:
    assert host_port(address) == expected


def test_host_port_rejects_missing_port() -> None:
    with pytest.raises(ConfigError):
        host_port("localhost")
