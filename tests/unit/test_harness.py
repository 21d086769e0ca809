"""Pure parts of the dev harness, and that docker-compose.yml matches it."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from infra import harness
from sardis_ledger.streams.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_kafka_cluster_id_is_a_kafka_uuid() -> None:
    for _ in range(200):
        cid = harness._kafka_cluster_id()
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_kafka_properties_are_filled_in_and_bound_to_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SARDIS_RUN_DIR", str(tmp_path))
    text = harness._kafka_properties().read_text()
    assert "${" not in text
    assert f"listeners=PLAINTEXT://127.0.0.1:{harness.KAFKA_PORT}," in text
    assert f"log.dirs={tmp_path / 'kafka' / 'data'}" in text
    assert "transaction.state.log.replication.factor=1" in text


def test_inputs_digest_changes_with_content(tmp_path: Path) -> None:
    path = tmp_path / "pom.xml"
    path.write_text("a")
    first = harness._inputs_digest([path])
    path.write_text("b")
    assert harness._inputs_digest([path]) != first


def test_a_server_is_external_when_its_variable_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = harness.servers(Settings())[0]
    monkeypatch.delenv("SARDIS_KAFKA_BOOTSTRAP", raising=False)
    assert not harness.external(kafka)
    monkeypatch.setenv("SARDIS_KAFKA_BOOTSTRAP", "broker:9092")
    assert harness.external(kafka)


def test_failure_message_names_server_log_and_last_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SARDIS_RUN_DIR", str(tmp_path))
    server = harness.servers(Settings())[2]
    server.log_file.write_text("\n".join(f"line {i}" for i in range(100)))
    message = str(server.failure("the process exited"))
    assert "immudb did not start: the process exited" in message
    assert str(server.log_file) in message
    assert "line 99" in message and "line 10\n" not in message


def test_docker_compose_matches_the_harness() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "postgres", "immudb", "anvil", "schema-registry"} <= set(services)
    expected_ports = {"kafka": harness.KAFKA_PORT, "postgres": 5432,
                      "immudb": harness.IMMUDB_PORT, "anvil": harness.ANVIL_PORT}
    for name, port in expected_ports.items():
        assert f"127.0.0.1:{port}:{port}" in services[name]["ports"], name
    registry = services["schema-registry"]
    assert f"127.0.0.1:{harness.REGISTRY_PORT}:8080" in registry["ports"]
    assert registry["image"].endswith(harness.APICURIO_VERSION)
    assert services["kafka"]["image"].endswith(harness.KAFKA_VERSION)
    assert services["immudb"]["image"].endswith(harness.IMMUDB_VERSION.lstrip("v"))
    worker_env = services["worker"]["environment"]
    # Secrets come from the env file (tests/unit/test_compose.py); everything else is here.
    assert set(Settings().as_env()) - set(worker_env) == {
        "SARDIS_IMMUDB_PASSWORD", "SARDIS_SCHEMA_REGISTRY_USER", "SARDIS_SCHEMA_REGISTRY_PASSWORD",
        "SARDIS_PG_PASSWORD", "SARDIS_KAFKA_USER", "SARDIS_KAFKA_PASSWORD",
        "SARDIS_KAFKA_KEY_PASSWORD"}

class _Clock:
    """A fake monotonic clock that sleep() advances: the wait loop runs without waiting."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def monotonic(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds


def _flaky_server(monkeypatch: pytest.MonkeyPatch, healthy_after_s: float,
                  timeout_s: float) -> tuple[harness.Server, _Clock]:
    clock = _Clock()
    monkeypatch.setattr(harness.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(harness.time, "sleep", clock.sleep)
    started_s = clock.now_s

    def health() -> None:
        if clock.now_s - started_s < healthy_after_s:
            raise harness.InfraError("still recovering logs", retriable=True)

    server = harness.Server("kafka", (1,), health, lambda: None, lambda: [],
                            health_timeout_s=timeout_s)
    monkeypatch.setattr(harness.Server, "pid", lambda self: 4242)
    return server, clock


def test_wait_healthy_gives_each_server_its_own_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # 200 s of log recovery is within Kafka's own limit, whatever the other servers took.
    server, clock = _flaky_server(monkeypatch, healthy_after_s=200, timeout_s=300)
    harness._wait_healthy(server)
    assert 200 <= clock.now_s - 1000.0 < 201


def test_wait_healthy_fails_with_the_last_check_after_the_limit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server, clock = _flaky_server(monkeypatch, healthy_after_s=1e9, timeout_s=60)
    with pytest.raises(harness.InfraError, match=r"not healthy after 60s \(last check: "
                                                 r"still recovering logs\)"):
        harness._wait_healthy(server)
    assert 60 <= clock.now_s - 1000.0 < 61
    # Progress lines every HEALTH_PROGRESS_S, so a slow start is visible while it happens.
    assert capsys.readouterr().err.count("kafka: not healthy yet after") == 3


def test_wait_healthy_checks_once_even_with_no_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = _flaky_server(monkeypatch, healthy_after_s=0, timeout_s=0)
    harness._wait_healthy(server)


def test_the_registry_is_a_fifth_server_on_loopback_keyed_by_its_maven_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SARDIS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SARDIS_RUN_DIR", str(tmp_path / "run"))
    registry = harness.servers(Settings())[-1]
    assert (registry.name, registry.ports) == ("schema-registry", (8081,))
    command = registry.command()
    assert "-Dquarkus.http.host=127.0.0.1" in command and "-Dquarkus.http.port=8081" in command
    assert command[-1].startswith(str(tmp_path / "cache" / "schema-registry-2.4.2.Final-"))
    # Ids outlive a restart: a file-backed database in the run directory.
    assert registry.env["REGISTRY_DATASOURCE_URL"] == \
        f"jdbc:h2:file:{tmp_path / 'run' / 'schema-registry' / 'registry'}"
    inputs = harness._registry_inputs()
    assert {path.name for path in inputs} == {"pom.xml", "DynamicConfigPropertyListProducer.java"}
    assert harness.APICURIO_VERSION in (harness.INFRA_DIR / "registry" / "pom.xml").read_text()


def test_no_registry_server_when_the_url_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    names = [server.name for server in harness.servers(Settings(schema_registry_url=""))]
    assert names == ["kafka", "postgres", "immudb", "anvil"]
    registry = harness.servers(Settings())[-1]
    monkeypatch.setenv("SARDIS_SCHEMA_REGISTRY_URL", "https://registry.internal")
    assert harness.external(registry)


def test_registry_health_fails_retriably_when_nothing_answers() -> None:
    with pytest.raises(harness.InfraError, match="schema-registry health check") as caught:
        harness.health_registry(Settings(schema_registry_url="http://127.0.0.1:9"))
    assert caught.value.retriable


def test_postgres_stops_fast_and_kafka_gets_time_to_stop_cleanly() -> None:
    by_name = {server.name: server for server in harness.servers(Settings())}
    assert by_name["postgres"].stop_signal == harness.signal.SIGINT
    assert by_name["kafka"].stop_timeout_s == harness.KAFKA_STOP_TIMEOUT_S
    assert by_name["kafka"].health_timeout_s == harness.KAFKA_HEALTH_TIMEOUT_S
