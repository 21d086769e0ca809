"""Kafka security settings: parsing, refusals, the kwargs every client gets, and a scan that every
Kafka client in streams/, sinks/ and infra/ is built through them."""

from __future__ import annotations

import ast
import ssl
import subprocess
from pathlib import Path

import pytest

from sardis_ledger.streams.config import Settings, pg_dsn_with_password, redact_url
from sardis_ledger.streams.errors import ConfigError
from sardis_ledger.streams.kafka_security import KafkaSecurity, Mechanism, Protocol

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("streams", "sinks", "infra") for p in (ROOT / d).rglob("*.py"))
CLIENTS = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"}
# The only ways a client may get its connection settings (streams/kafka_security.py).
CONNECTION_CALLS = {"kafka_connection", "aiokafka_kwargs"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a client certificate made with openssl (real files for ssl.SSLContext)."""
    out = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", str(out / "ca.key"), "-out",
                    str(out / "ca.crt"), "-days", "2", "-subj", "/CN=test-ca"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", str(out / "c.key"), "-out",
                    str(out / "c.crt"), "-days", "2", "-subj", "/CN=client"],
                   check=True, capture_output=True)
    return out


def test_plaintext_is_the_default_and_adds_nothing_but_the_protocol() -> None:
    settings = Settings.from_env({})
    assert settings.kafka_security == KafkaSecurity()
    assert settings.kafka_connection() == {"bootstrap_servers": "127.0.0.1:9092",
                                           "security_protocol": "PLAINTEXT"}
    assert settings.kafka_security.faust_credentials() is None


def test_sasl_ssl_builds_a_verifying_context_and_scram_credentials(pki: Path) -> None:
    settings = Settings.from_env({
        "SARDIS_KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "SARDIS_KAFKA_USER": "worker",
        "SARDIS_KAFKA_PASSWORD": "s3cret", "SARDIS_KAFKA_CA_FILE": str(pki / "ca.crt")})
    kwargs = settings.kafka_connection()
    context = kwargs.pop("ssl_context")
    assert kwargs == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "SASL_SSL",
                      "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "worker",
                      "sasl_plain_password": "s3cret"}
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    credentials = settings.kafka_security.faust_credentials()
    assert (credentials.username, credentials.mechanism.value) == ("worker", "SCRAM-SHA-512")
    assert credentials.ssl_context is context
    assert "s3cret" not in repr(settings)


def test_mutual_tls_loads_the_client_certificate(pki: Path) -> None:
    security = Settings.from_env({
        "SARDIS_KAFKA_SECURITY_PROTOCOL": "SSL", "SARDIS_KAFKA_CA_FILE": str(pki / "ca.crt"),
        "SARDIS_KAFKA_CERT_FILE": str(pki / "c.crt"),
        "SARDIS_KAFKA_KEY_FILE": str(pki / "c.key")}).kafka_security
    assert security.protocol is Protocol.SSL
    assert security.aiokafka_kwargs()["security_protocol"] == "SSL"
    assert "sasl_plain_password" not in security.aiokafka_kwargs()


def test_the_password_comes_from_a_file(tmp_path: Path, pki: Path) -> None:
    secret = tmp_path / "kafka.pw"
    secret.write_text("from-file\n")
    security = Settings.from_env({
        "SARDIS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SARDIS_KAFKA_USER": "u",
        "SARDIS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "SARDIS_KAFKA_PASSWORD_FILE": str(secret)}).kafka_security
    assert (security.password, security.mechanism) == ("from-file", Mechanism.SCRAM_SHA_256)


@pytest.mark.parametrize(("env", "message"), [
    ({"SARDIS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "unencrypted"),
    ({"SARDIS_KAFKA_SECURITY_PROTOCOL": "TLS"}, "use PLAINTEXT|SSL|SASL_SSL"),
    ({"SARDIS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs SARDIS_KAFKA_USER"),
    ({"SARDIS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SARDIS_KAFKA_USER": "u"}, "needs"),
    ({"SARDIS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SARDIS_KAFKA_USER": "u",
      "SARDIS_KAFKA_PASSWORD": "p", "SARDIS_KAFKA_SASL_MECHANISM": "PLAIN"}, "SCRAM-SHA-512"),
    ({"SARDIS_KAFKA_USER": "u", "SARDIS_KAFKA_PASSWORD": "p"}, "would not be used"),
    ({"SARDIS_KAFKA_CA_FILE": "/etc/hostname"}, "PLAINTEXT"),
    ({"SARDIS_KAFKA_SECURITY_PROTOCOL": "SSL", "SARDIS_KAFKA_CERT_FILE": "/etc/hostname"},
     "both SARDIS_KAFKA_CERT_FILE"),
    ({"SARDIS_KAFKA_SECURITY_PROTOCOL": "SSL", "SARDIS_KAFKA_CA_FILE": "/nonexistent/ca.crt"},
     "no such file"),
    ({"SARDIS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SARDIS_KAFKA_USER": "u",
      "SARDIS_KAFKA_PASSWORD": "p", "SARDIS_KAFKA_PASSWORD_FILE": "/etc/hostname"}, "not both"),
])
def test_settings_that_cannot_work_or_weaken_the_connection_are_refused(
        env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_a_ca_file_that_is_not_a_certificate_is_a_config_error(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.crt"
    bogus.write_text("not a certificate")
    security = Settings.from_env({"SARDIS_KAFKA_SECURITY_PROTOCOL": "SSL",
                                  "SARDIS_KAFKA_CA_FILE": str(bogus)}).kafka_security
    with pytest.raises(ConfigError, match="Kafka TLS files"):
        security.ssl_context()


def test_as_env_round_trips_with_secrets_and_overrides_a_parents_file_variables(pki: Path) -> None:
    env = {"SARDIS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SARDIS_KAFKA_USER": "u",
           "SARDIS_KAFKA_PASSWORD": "p", "SARDIS_KAFKA_CA_FILE": str(pki / "ca.crt"),
           "SARDIS_PG_DSN": "postgresql://sink@127.0.0.1:5432/sardis?sslmode=verify-full",
           "SARDIS_PG_PASSWORD": "pg pw/@"}
    settings = Settings.from_env(env)
    parent = {"SARDIS_KAFKA_PASSWORD_FILE": "/run/secrets/kafka", "SARDIS_PG_PASSWORD_FILE": "/x"}
    assert Settings.from_env({**parent, **settings.as_env()}) == settings


@pytest.mark.parametrize(("dsn", "password", "expected"), [
    ("postgresql://sink@h:5432/db", "", "postgresql://sink@h:5432/db"),
    ("postgresql://sink@h:5432/db?sslmode=verify-full", "a b/@:",
     "postgresql://sink:a%20b%2F%40%3A@h:5432/db?sslmode=verify-full"),
])
def test_the_pg_password_is_quoted_into_the_dsn(dsn: str, password: str, expected: str) -> None:
    assert pg_dsn_with_password(dsn, password) == expected


@pytest.mark.parametrize("dsn", ["postgresql://sink:old@h/db", "h:5432", "postgresql://h/db"])
def test_a_pg_password_that_cannot_go_into_the_dsn_is_refused(dsn: str) -> None:
    with pytest.raises(ConfigError):
        pg_dsn_with_password(dsn, "pw")


@pytest.mark.parametrize(("url", "expected"), [
    ("https://mainnet.infura.io/v3/0123456789abcdef", "https://mainnet.infura.io/***"),
    ("https://eth.example:8443/?apikey=k", "https://eth.example:8443?***"),
    ("https://user:key@eth.example/", "https://user:***@eth.example"),
    ("http://127.0.0.1:8545", "http://127.0.0.1:8545"),
    ("postgresql://sink:pw@127.0.0.1:5432/sardis?sslmode=verify-full",
     "postgresql://sink:***@127.0.0.1:5432/sardis?sslmode=verify-full"),
    ("postgresql://sink@h/db?password=pw&sslmode=require", "postgresql://sink@h/db?sslmode=require"),
])
def test_urls_lose_their_secrets_in_messages(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def _kafka_clients() -> list[tuple[str, ast.Call]]:
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            owner = getattr(getattr(node.func, "value", None), "id", None)
            if name in CLIENTS or (name == "App" and owner == "faust"):
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node))
    return found


def test_the_scan_finds_the_clients() -> None:
    assert len(_kafka_clients()) >= 25  # worker, client, sinks, watcher, CLI, benches, harness


@pytest.mark.parametrize(("where", "call"), _kafka_clients(), ids=[w for w, _ in _kafka_clients()])
def test_every_kafka_client_gets_the_security_settings(where: str, call: ast.Call) -> None:
    keywords = {k.arg for k in call.keywords}
    if getattr(call.func, "attr", None) == "App":  # the Faust worker
        assert "broker_credentials" in keywords, f"{where}: faust.App without broker_credentials"
        return
    spread = [k.value for k in call.keywords if k.arg is None]
    assert any(isinstance(v, ast.Call) and getattr(v.func, "attr", None) in CONNECTION_CALLS
               for v in spread), f"{where}: not built with **settings.kafka_connection()"
    assert not keywords & {"security_protocol", "ssl_context", "sasl_plain_password"}, \
        f"{where}: security settings given by hand"
