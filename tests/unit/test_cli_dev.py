"""`sardis-ledger dev status` is healthy with the single Kafka node or with the whole cluster."""

from __future__ import annotations

import pytest

from sardis_ledger.streams.cli import _stack_healthy

OTHERS = {"postgres": "running (pid 2), healthy", "immudb": "running (pid 3), healthy"}
NODE = "running (pid 9), broker 127.0.0.1:19192, controller 127.0.0.1:19193, registered"
CLUSTER = {"kafka-node-1": NODE, "kafka-node-2": NODE, "kafka-node-3": NODE,
           "quorum": "active controller: node 1 (epoch 2), high watermark 9; voters ..."}


@pytest.mark.parametrize(("kafka", "cluster", "healthy"), [
    ("running (pid 1), healthy", {}, True),
    ("stopped", CLUSTER, True),
    ("stopped", {}, False),
    ("stopped", {**CLUSTER, "kafka-node-2": "stopped (broker 127.0.0.1:19194, ...)"}, False),
    ("stopped", {**CLUSTER, "kafka-node-3": NODE.replace("registered",
                                                        "not registered with the cluster")}, False),
    ("stopped", {**CLUSTER, "quorum": "unavailable: no leader"}, False),
    ("running (pid 1), unhealthy: timeout", {}, False),
])
def test_kafka_is_the_single_node_or_the_whole_cluster(kafka: str, cluster: dict[str, str],
                                                       healthy: bool) -> None:
    assert _stack_healthy({"kafka": kafka, **OTHERS}, cluster) is healthy


def test_every_other_server_must_be_healthy() -> None:
    states = {"kafka": "running (pid 1), healthy", **OTHERS, "immudb": "stopped"}
    assert not _stack_healthy(states, CLUSTER)
