"""Settings come from SARDIS_* variables with loopback defaults and clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sardis_ledger.schemas.codec import Framing
from sardis_ledger.streams.config import (
    IMMUDB_DEV_PASSWORD,
    PARTITIONS_DEFAULT,
    SCHEMA_REGISTRY_URL_DEFAULT,
    SECRET_FILE_BYTES_MAX,
    WORKER_ID_LENGTH_MAX,
    Settings,
    host_port,
    worker_id,
)
from sardis_ledger.streams.errors import ConfigError


def test_defaults_point_at_the_loopback_dev_harness() -> None:
    settings = Settings.from_env({})
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.pg_dsn.startswith("postgresql://sardis@127.0.0.1:5432/")
    assert settings.immudb_addr == "127.0.0.1:3322"
    assert settings.chain_rpc == "http://127.0.0.1:8545"
    assert settings.partitions == PARTITIONS_DEFAULT
    assert settings.topic("ledger.commands") == "ledger.commands"
    assert settings.wire_format is Framing.SINGLE_OBJECT
    assert settings.schema_registry_url == SCHEMA_REGISTRY_URL_DEFAULT
    assert SCHEMA_REGISTRY_URL_DEFAULT == "http://127.0.0.1:8081/apis/ccompat/v7"


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
        ({"SARDIS_WIRE_FORMAT": "avro"}, "SARDIS_WIRE_FORMAT='avro': use single-object|confluent"),
        ({"SARDIS_WIRE_FORMAT": "confluent", "SARDIS_SCHEMA_REGISTRY_URL": ""},
         "confluent needs a schema registry"),
        ({"SARDIS_SCHEMA_REGISTRY_URL": "registry:8081"}, "not an http"),
        ({"SARDIS_SCHEMA_REGISTRY_URL": "https://u:p@registry"}, "must not carry credentials"),
        ({"SARDIS_SCHEMA_REGISTRY_URL": "https://registry/?x=1"}, "no query"),
        ({"SARDIS_SCHEMA_REGISTRY_USER": "ledger"}, "set both SARDIS_SCHEMA_REGISTRY_USER"),
        ({"SARDIS_SCHEMA_REGISTRY_USER": "a", "SARDIS_SCHEMA_REGISTRY_PASSWORD": "b",
          "SARDIS_SCHEMA_REGISTRY_PASSWORD_FILE": "/x"}, "not both"),
        ({"SARDIS_SCHEMA_REGISTRY_USER": "a",
          "SARDIS_SCHEMA_REGISTRY_PASSWORD_FILE": "/nonexistent/secret"}, "cannot read it"),
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


def test_registry_credentials_come_from_files_and_stay_out_of_repr(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    settings = Settings.from_env({"SARDIS_WIRE_FORMAT": "confluent",
                                  "SARDIS_SCHEMA_REGISTRY_URL": "https://registry.internal:8081/",
                                  "SARDIS_SCHEMA_REGISTRY_USER": "ledger",
                                  "SARDIS_SCHEMA_REGISTRY_PASSWORD_FILE": str(secret)})
    assert settings.wire_format is Framing.CONFLUENT
    assert settings.schema_registry_url == "https://registry.internal:8081"
    assert (settings.schema_registry_user, settings.schema_registry_password) == ("ledger", "s3cret")
    assert "s3cret" not in repr(settings)
    secret.write_bytes(b"x" * (SECRET_FILE_BYTES_MAX + 1))
    with pytest.raises(ConfigError, match="longer than"):
        Settings.from_env({"SARDIS_SCHEMA_REGISTRY_USER": "ledger",
                           "SARDIS_SCHEMA_REGISTRY_PASSWORD_FILE": str(secret)})


def test_an_empty_registry_url_means_no_registry() -> None:
    assert Settings.from_env({"SARDIS_SCHEMA_REGISTRY_URL": ""}).schema_registry_url == ""


def test_as_env_round_trips() -> None:
    settings = Settings.from_env({"SARDIS_TOPIC_PREFIX": "x.", "SARDIS_PARTITIONS": "3",
                                  "SARDIS_RECONCILE_GRACE_S": "5",
                                  "SARDIS_RECONCILE_GRACE_BLOCKS": "0",
                                  "SARDIS_WIRE_FORMAT": "confluent",
                                  "SARDIS_SCHEMA_REGISTRY_USER": "u",
                                  "SARDIS_SCHEMA_REGISTRY_PASSWORD": "p"})
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


@pytest.mark.parametrize(("env", "hostname", "datadir", "expected"), [
    ({"SARDIS_WORKER_ID": "worker-1"}, "h", "/d", "worker-1"),
    ({"SARDIS_WORKER_ID": "pod_7.eu"}, "h", "/d", "pod_7.eu"),
    ({}, "ledger-host", "/var/lib/w", "ledger-host-" + hashlib.sha256(b"/var/lib/w").hexdigest()[:8]),
    ({}, "odd host!", "/d", "odd-host-" + hashlib.sha256(b"/d").hexdigest()[:8]),
    ({}, "!!!", "/d", "host-" + hashlib.sha256(b"/d").hexdigest()[:8]),
])
def test_worker_id_is_given_or_derived_from_host_and_data_directory(
        env: dict[str, str], hostname: str, datadir: str, expected: str) -> None:
    assert worker_id(env, hostname, datadir) == expected


def test_workers_with_their_own_data_directories_get_distinct_ids() -> None:
    assert worker_id({}, "h", "/w/1") != worker_id({}, "h", "/w/2")
    assert len(worker_id({}, "h" * 500, "/d")) <= WORKER_ID_LENGTH_MAX


@pytest.mark.parametrize("given", ["", "has space", "a/b", "x" * (WORKER_ID_LENGTH_MAX + 1)])
def test_a_malformed_worker_id_is_refused(given: str) -> None:
    with pytest.raises(ConfigError, match="SARDIS_WORKER_ID"):
        worker_id({"SARDIS_WORKER_ID": given}, "h", "/d")
