"""The secured dev stack's configuration, without servers: who gets which identity, and the
broker settings that make it secure."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra import secure_stack
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.kafka_security import Protocol


@pytest.fixture(autouse=True)
def own_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SARDIS_SECURE_RUN_DIR", str(tmp_path))
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    return tmp_path


@pytest.mark.parametrize(("role", "kafka_user", "pg_role"), [
    ("client", "sardis-client", "ledger_reader"),
    ("worker", "sardis-worker", "ledger_reader"),
    ("sink", "sardis-sink", "ledger_sink"),
    ("watcher", "sardis-watcher", "ledger_reader"),
    ("operator", "sardis-operator", "ledger_reader"),
])
def test_each_role_gets_its_own_kafka_user_and_the_least_database_role(
        role: str, kafka_user: str, pg_role: str) -> None:
    env = secure_stack.role_env(role)
    assert env["SARDIS_KAFKA_USER"] == kafka_user
    assert env["SARDIS_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["SARDIS_PG_DSN"].startswith(f"postgresql://{pg_role}@127.0.0.1:25432/sardis?"
                                           "sslmode=verify-full&sslrootcert=")
    assert not any(name.endswith("PASSWORD") for name in env), "passwords only as *_FILE paths"
    password = Path(env["SARDIS_KAFKA_PASSWORD_FILE"])
    assert password.stat().st_mode & 0o777 == 0o600
    assert secure_stack.role_env(role)["SARDIS_KAFKA_PASSWORD_FILE"] == str(password)  # kept


def test_the_admin_uses_mutual_tls_and_owns_the_schema() -> None:
    env = secure_stack.role_env("admin")
    assert env["SARDIS_KAFKA_SECURITY_PROTOCOL"] == "SSL"
    assert env["SARDIS_KAFKA_BOOTSTRAP"] == "127.0.0.1:29094"
    assert env["SARDIS_PG_DSN"].startswith("postgresql://ledger_owner@")
    assert "SARDIS_KAFKA_USER" not in env


def test_generated_passwords_differ_and_meet_immudbs_rules() -> None:
    values = {secure_stack._read_secret(name) for name in ("a", "b", "c")}
    assert len(values) == 3
    for value in values:
        assert any(c.isupper() for c in value) and any(c.islower() for c in value)
        assert any(c.isdigit() for c in value) and any(not c.isalnum() for c in value)
        assert 8 <= len(value) <= 64


def test_the_broker_denies_by_default_and_has_no_plaintext_listener() -> None:
    text = secure_stack._kafka_properties().read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines()
                    if line and not line.startswith("#"))
    assert settings["allow.everyone.if.no.acl.found"] == "false"
    assert settings["auto.create.topics.enable"] == "false"
    assert settings["authorizer.class.name"].endswith("StandardAuthorizer")
    assert "PLAINTEXT" not in settings["listener.security.protocol.map"].replace("SASL_SSL", "")
    assert settings["listener.name.mtls.ssl.client.auth"] == "required"
    assert settings["ssl.endpoint.identification.algorithm"] == "https"
    assert "password" not in text


def test_admin_identity_is_a_verifying_mtls_client() -> None:
    admin = secure_stack.admin_kafka()
    assert admin.protocol is Protocol.SSL and admin.cert_file.endswith("admin.crt")
    assert Settings().kafka_security.protocol is Protocol.PLAINTEXT
