"""docker-compose.yml (services, images, health checks, dependencies, volumes, secrets) and the
Grafana dashboard (every panel's query names a metric the processes export)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from sardis_ledger.streams.config import METRICS_PORTS_DEFAULT, Settings
from sardis_ledger.streams.metrics import EXPORTED_NAMES

ROOT = Path(__file__).resolve().parents[2]
SERVERS = {"kafka", "postgres", "immudb", "anvil", "schema-registry"}
LEDGER = {"worker": "worker", "sink-postgres": "sink-postgres", "sink-immudb": "sink-immudb",
          "chain-watch": "chain-watch"}
SECRETS = {"SARDIS_IMMUDB_PASSWORD", "SARDIS_SCHEMA_REGISTRY_USER", "SARDIS_SCHEMA_REGISTRY_PASSWORD",
           "SARDIS_CHAIN_PRIVATE_KEY", "SARDIS_PG_PASSWORD", "SARDIS_KAFKA_USER",
           "SARDIS_KAFKA_PASSWORD", "SARDIS_KAFKA_KEY_PASSWORD"}
DURATION = re.compile(r"^\d+(ms|s|m)$")
PROMQL_FUNCTIONS = {"sum", "max", "min", "avg", "rate", "irate", "increase", "histogram_quantile",
                    "by", "without", "count"}


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_every_service_has_an_image_and_a_health_check() -> None:
    services = compose()["services"]
    assert SERVERS | set(LEDGER) <= set(services)
    for name, service in services.items():
        assert isinstance(service.get("image"), str) and service["image"], name
        check = service.get("healthcheck")
        assert check is not None, f"{name} has no health check"
        assert isinstance(check["test"], list) and check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert len(check["test"]) > 1, name
        for key in ("interval", "timeout"):
            assert DURATION.match(str(check[key])), (name, key)
        assert int(check["retries"]) > 0, name


def test_ledger_processes_are_checked_on_their_own_readyz_and_stop_in_time() -> None:
    services = compose()["services"]
    for name, kind in LEDGER.items():
        service = services[name]
        probe = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{METRICS_PORTS_DEFAULT[kind]}/readyz" in probe, name
        assert service["stop_grace_period"] == "10s", name
        assert service["command"][0] == "sardis-ledger", name
    assert "build" in services["worker"]  # builds the image the other ledger services run


def test_dependencies_name_services_and_wait_for_health() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            assert condition["condition"] in ("service_healthy", "service_started"), name
            if dependency in SERVERS:
                assert condition["condition"] == "service_healthy", (name, dependency)
    for name in LEDGER:
        assert services[name]["depends_on"]["kafka"] == {"condition": "service_healthy"}


def test_named_volumes_are_declared_and_used() -> None:
    document = compose()
    declared = set(document["volumes"])
    used = set()
    for service in document["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith("."):
                used.add(source)
            else:
                assert (ROOT / source).exists(), source
    assert used == declared
    for server in ("kafka", "postgres", "immudb"):
        assert document["services"][server].get("volumes"), server


def test_secrets_come_from_the_env_file_never_the_compose_file() -> None:
    services = compose()["services"]
    example = ROOT / "infra/compose/secrets.env.example"
    in_file = {line.split("=", 1)[0] for line in example.read_text().splitlines()
               if line and not line.startswith("#")}
    assert in_file == SECRETS
    for name in LEDGER:
        service = services[name]
        assert not SECRETS & set(service["environment"]), name
        paths = [entry["path"] for entry in service["env_file"]]
        assert paths == ["infra/compose/secrets.env.example", "infra/compose/secrets.env"]
        assert set(service["environment"]) | in_file >= set(Settings().as_env())
    assert "infra/compose/secrets.env" in (ROOT / ".gitignore").read_text()


def test_published_ports_bind_to_loopback() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers not inside {...} or [...] and not
    functions, keywords or label names."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    bare = re.sub(r"\b(by|without)\s*\([^)]*\)", "", bare)
    return {name for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
            if name not in PROMQL_FUNCTIONS and not name.replace(".", "").isdigit()}


def test_every_dashboard_query_names_an_exported_metric() -> None:
    dashboard = json.loads((ROOT / "infra/grafana/sardis-ledger.json").read_text())
    panels = dashboard["panels"]
    assert len(panels) >= 10
    queried = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, target["expr"]
            assert names <= EXPORTED_NAMES, (panel["title"], names - EXPORTED_NAMES)
            queried |= names
    for wanted in ("sardis_commands_decided_total", "sardis_consumer_lag_records",
                   "sardis_discrepancies_open", "sardis_dead_letters_total"):
        assert wanted in queried


def test_metric_name_parser() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(x_bucket{a="b"}[5m])))') == \
        {"x_bucket"}
