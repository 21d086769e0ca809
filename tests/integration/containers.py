"""Testcontainers variant of the dev stack, used when SARDIS_TEST_CONTAINERS=1 and Docker runs."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from sardis_ledger.streams.config import Settings

KAFKA_IMAGE = "apache/kafka:4.1.1"
POSTGRES_IMAGE = "postgres:15"
IMMUDB_IMAGE = "codenotary/immudb:1.11.1"
ANVIL_IMAGE = "ghcr.io/foundry-rs/foundry:v1.7.1"
REGISTRY_IMAGE = "apicurio/apicurio-registry-mem:2.4.2.Final"
STARTUP_TIMEOUT_S = 120


def docker_available() -> bool:
    try:
        import docker

        docker.from_env().ping()
    except Exception:  # any failure to reach an engine means: not available
        return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def container_stack() -> Iterator[Settings]:
    """Start the five servers as containers bound to loopback; yield settings that point at them."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    kafka_port = _free_port()
    kafka = (
        DockerContainer(KAFKA_IMAGE)
        .with_bind_ports(9092, kafka_port)
        .with_env("KAFKA_NODE_ID", "1")
        .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093")
        .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://127.0.0.1:{kafka_port}")
        .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
    )
    postgres = (
        DockerContainer(POSTGRES_IMAGE)
        .with_exposed_ports(5432)
        .with_env("POSTGRES_USER", "sardis")
        .with_env("POSTGRES_DB", "sardis")
        .with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
    )
    immudb = (
        DockerContainer(IMMUDB_IMAGE)
        .with_exposed_ports(3322)
        .with_env("IMMUDB_PGSQL_SERVER", "false")
        .with_env("IMMUDB_WEB_SERVER", "false")
        .with_env("IMMUDB_METRICS_SERVER", "false")
    )
    anvil = (
        DockerContainer(ANVIL_IMAGE)
        .with_exposed_ports(8545)
        .with_command(["anvil", "--host", "0.0.0.0", "--port", "8545", "--chain-id", "31337"])
    )
    registry = DockerContainer(REGISTRY_IMAGE).with_exposed_ports(8080)
    with kafka, postgres, immudb, anvil, registry:
        wait_for_logs(kafka, "Kafka Server started", timeout=STARTUP_TIMEOUT_S)
        wait_for_logs(registry, "Listening on", timeout=STARTUP_TIMEOUT_S)
        wait_for_logs(postgres, "database system is ready to accept connections",
                      timeout=STARTUP_TIMEOUT_S)
        wait_for_logs(anvil, "Listening on", timeout=STARTUP_TIMEOUT_S)
        host = "127.0.0.1"
        yield Settings(
            kafka_bootstrap=f"{host}:{kafka_port}",
            pg_dsn=f"postgresql://sardis@{host}:{postgres.get_exposed_port(5432)}/sardis",
            immudb_addr=f"{host}:{immudb.get_exposed_port(3322)}",
            chain_rpc=f"http://{host}:{anvil.get_exposed_port(8545)}",
            schema_registry_url=f"http://{host}:{registry.get_exposed_port(8080)}/apis/ccompat/v7",
        )
