"""The multi-broker dev and test cluster: N combined KRaft nodes on loopback, from the provisioned jars."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra import harness
from sardis_ledger.streams.errors import InfraError
from sardis_ledger.streams.kafka_security import KafkaSecurity
from sardis_ledger.streams.topic_policy import REPLICATION_FACTOR_SAFE, min_insync_for

CLUSTER_NODES = 3
# Node n listens on PORT_BASE + 2n (broker) and PORT_BASE + 2n + 1 (controller): 19192-19197 for
# three nodes, clear of the single node's 9092/9093.
PORT_BASE = 19190
NODE_HEAP_MB = 512
REQUEST_TIMEOUT_MS = 10_000
HEALTH_POLL_S = 0.5
METADATA_TOPIC = "__cluster_metadata"  # the KRaft log the controllers replicate
# A voter this many records behind the leader's high watermark is not caught up.
QUORUM_LAG_MAX = 100


def node_ids(nodes: int = CLUSTER_NODES) -> range:
    return range(1, nodes + 1)


def broker_port(node_id: int) -> int:
    return PORT_BASE + 2 * node_id


def controller_port(node_id: int) -> int:
    return PORT_BASE + 2 * node_id + 1


def bootstrap(nodes: int = CLUSTER_NODES) -> str:
    """SARDIS_KAFKA_BOOTSTRAP for the cluster: every node, so clients start with any one down."""
    return ",".join(f"127.0.0.1:{broker_port(n)}" for n in node_ids(nodes))


def voters(nodes: int = CLUSTER_NODES) -> str:
    """controller.quorum.voters: a static quorum of every node."""
    return ",".join(f"{n}@127.0.0.1:{controller_port(n)}" for n in node_ids(nodes))


def cluster_dir() -> Path:
    """Data, properties and the cluster id of every node (apart from the single node's)."""
    return harness.run_dir() / "kafka-cluster"


def node_dir(node_id: int) -> Path:
    return cluster_dir() / f"node-{node_id}"


def node_properties(node_id: int, nodes: int = CLUSTER_NODES) -> Path:
    replicas = min(REPLICATION_FACTOR_SAFE, nodes)
    fill = {"NODE_ID": str(node_id), "VOTERS": voters(nodes), "PORT": str(broker_port(node_id)),
            "CONTROLLER_PORT": str(controller_port(node_id)),
            "LOG_DIRS": str(node_dir(node_id) / "data"), "REPLICAS": str(replicas),
            "MIN_ISR": str(min_insync_for(replicas))}
    text = (harness.INFRA_DIR / "kafka" / "cluster.properties").read_text()
    for name, value in fill.items():
        text = text.replace(f"${{{name}}}", value)
    path = node_dir(node_id) / "server.properties"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _cluster_id(nodes: int) -> str:
    """One id for every node's storage, made once; the voter set it was made for is kept with it."""
    cluster_dir().mkdir(parents=True, exist_ok=True)
    id_file, voters_file = cluster_dir() / "cluster.id", cluster_dir() / "voters"
    if voters_file.exists() and voters_file.read_text().strip() != voters(nodes):
        raise InfraError(f"the Kafka cluster in {cluster_dir()} was formatted for the quorum "
                         f"{voters_file.read_text().strip()}; stop it (`sardis-ledger dev down`) "
                         "and remove that directory to run another number of nodes")
    if not id_file.exists():
        id_file.write_text(harness._kafka_cluster_id())
        voters_file.write_text(voters(nodes))
    return id_file.read_text().strip()


def _prepare(node_id: int, nodes: int) -> None:
    props = node_properties(node_id, nodes)
    data = node_dir(node_id) / "data"
    cluster_id = _cluster_id(nodes)
    if (data / "meta.properties").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    # A static quorum (controller.quorum.voters): format without --standalone or
    # --initial-controllers, every node with the same cluster id.
    harness._run([harness._java(), "-cp", f"{harness._kafka_home() / 'libs'}/*",
                  "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
                 what=f"kafka node {node_id}: formatting KRaft storage",
                 log=harness.run_dir() / f"kafka-node-{node_id}.log")


def _command(node_id: int, nodes: int) -> list[str]:
    return [harness._java(), f"-Xms{NODE_HEAP_MB // 2}m", f"-Xmx{NODE_HEAP_MB}m", "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={harness.INFRA_DIR / 'kafka' / 'log4j2.properties'}",
            "-cp", f"{harness._kafka_home() / 'libs'}/*", "kafka.Kafka",
            str(node_properties(node_id, nodes))]


def _listening(node_id: int) -> None:
    if not harness._port_open("127.0.0.1", broker_port(node_id)):
        raise InfraError(f"kafka node {node_id}: nothing listens on 127.0.0.1:"
                         f"{broker_port(node_id)} yet", retriable=True)


def node(node_id: int, nodes: int = CLUSTER_NODES) -> harness.Server:
    """One node as a harness server (pid file and log `kafka-node-N.*` in the run directory)."""
    return harness.Server(
        f"kafka-node-{node_id}", (broker_port(node_id), controller_port(node_id)),
        lambda: _listening(node_id), harness.provision_kafka, lambda: _command(node_id, nodes),
        prepare=lambda: _prepare(node_id, nodes), health_timeout_s=harness.KAFKA_HEALTH_TIMEOUT_S,
        stop_timeout_s=harness.KAFKA_STOP_TIMEOUT_S)


def nodes_of(nodes: int = CLUSTER_NODES) -> list[harness.Server]:
    return [node(n, nodes) for n in node_ids(nodes)]


def running(nodes: int = CLUSTER_NODES) -> bool:
    return any(server.pid() is not None for server in nodes_of(nodes))


# ---------------------------------------------------------------- the controller quorum


@dataclass(frozen=True, slots=True)
class Voter:
    node_id: int
    log_end_offset: int
    last_caught_up_ms: int


@dataclass(frozen=True, slots=True)
class Quorum:
    """The KRaft controller quorum as its leader reports it (DescribeQuorum)."""

    leader_id: int
    leader_epoch: int
    high_watermark: int
    voters: tuple[Voter, ...]

    def lagging(self) -> list[int]:
        """Voters not caught up with the leader's high watermark."""
        return [v.node_id for v in self.voters
                if v.log_end_offset < 0 or self.high_watermark - v.log_end_offset > QUORUM_LAG_MAX]

    def __str__(self) -> str:
        parts = [f"{v.node_id}" + (" (leader)" if v.node_id == self.leader_id else
                                   f" (behind by {max(0, self.high_watermark - v.log_end_offset)})")
                 for v in self.voters]
        return (f"active controller: node {self.leader_id} (epoch {self.leader_epoch}), "
                f"high watermark {self.high_watermark}; voters {', '.join(parts)}")


@functools.cache
def _quorum_request() -> Any:
    """DescribeQuorum v1 (KIP-595, KIP-836) in aiokafka's protocol types: aiokafka has no call
    for it and the provisioned jars hold no kafka-tools (MetadataQuorumCommand)."""
    from aiokafka.protocol.api import Request, RequestStruct, Response
    from aiokafka.protocol.types import (
        CompactArray,
        CompactString,
        Int16,
        Int32,
        Int64,
        Schema,
        TaggedFields,
    )

    replica = (("replica_id", Int32), ("log_end_offset", Int64), ("last_fetch_timestamp", Int64),
               ("last_caught_up_timestamp", Int64), ("tags", TaggedFields))

    class DescribeQuorumResponseV1(Response):
        API_KEY = 55
        API_VERSION = 1
        SCHEMA = Schema(
            ("error_code", Int16),
            ("topics", CompactArray(
                ("topic_name", CompactString("utf-8")),
                ("partitions", CompactArray(
                    ("partition_index", Int32), ("error_code", Int16), ("leader_id", Int32),
                    ("leader_epoch", Int32), ("high_watermark", Int64),
                    ("current_voters", CompactArray(*replica)),
                    ("observers", CompactArray(*replica)), ("tags", TaggedFields))),
                ("tags", TaggedFields))),
            ("tags", TaggedFields))

    class DescribeQuorumRequestV1(RequestStruct):
        FLEXIBLE_VERSION = True
        API_KEY = 55
        API_VERSION = 1
        RESPONSE_TYPE = DescribeQuorumResponseV1
        SCHEMA = Schema(
            ("topics", CompactArray(
                ("topic_name", CompactString("utf-8")),
                ("partitions", CompactArray(("partition_index", Int32), ("tags", TaggedFields))),
                ("tags", TaggedFields))),
            ("tags", TaggedFields))

    class DescribeQuorumRequest(Request[DescribeQuorumRequestV1]):
        API_KEY = 55

        def build(self, request_struct_class: type[DescribeQuorumRequestV1]) -> DescribeQuorumRequestV1:
            return request_struct_class([(METADATA_TOPIC, [(0, {})], {})], {})

    return DescribeQuorumRequest


async def describe_quorum(bootstrap_servers: str) -> Quorum:
    """Ask any reachable broker (it forwards to the controllers) for the quorum's state."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    # The dev cluster's PLAINTEXT listeners: these helpers manage the harness's own brokers.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers,
                                **KafkaSecurity().aiokafka_kwargs(),
                                request_timeout_ms=REQUEST_TIMEOUT_MS)
    try:
        await admin.start()
        response = await admin._client.send(admin._client.get_random_node(), _quorum_request()())
    except KafkaError as exc:
        raise InfraError(f"describing the controller quorum: {exc!r}", retriable=True) from exc
    finally:
        await admin.close()
    reply = response.to_object()
    partition = reply["topics"][0]["partitions"][0] if reply["topics"] else None
    if reply["error_code"] or partition is None or partition["error_code"]:
        raise InfraError(f"DescribeQuorum answered error {reply['error_code']}", retriable=True)
    return Quorum(partition["leader_id"], partition["leader_epoch"], partition["high_watermark"],
                  tuple(Voter(v["replica_id"], v["log_end_offset"], v["last_caught_up_timestamp"])
                        for v in partition["current_voters"]))


async def registered_brokers(bootstrap_servers: str) -> list[int]:
    """Ids of the brokers the cluster's metadata lists now (a fenced broker drops out)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    # The dev cluster's PLAINTEXT listeners: these helpers manage the harness's own brokers.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers,
                                **KafkaSecurity().aiokafka_kwargs(),
                                request_timeout_ms=REQUEST_TIMEOUT_MS)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
    except KafkaError as exc:
        raise InfraError(f"describing the cluster: {exc!r}", retriable=True) from exc
    finally:
        await admin.close()
    return sorted(b["node_id"] for b in cluster["brokers"])


# ---------------------------------------------------------------- health, up, down, status


def health_cluster(nodes: int = CLUSTER_NODES) -> None:
    """Every node listens, the quorum has a leader and every voter caught up, every broker is
    registered, and a transactional produce + read_committed consume works on the bootstrap list."""
    for node_id in node_ids(nodes):
        _listening(node_id)
    servers = bootstrap(nodes)
    quorum = asyncio.run(describe_quorum(servers))
    if quorum.leader_id < 0 or quorum.lagging():
        raise InfraError(f"controller quorum not ready: {quorum}", retriable=True)
    brokers = asyncio.run(registered_brokers(servers))
    if brokers != list(node_ids(nodes)):
        raise InfraError(f"registered brokers {brokers}, expected {list(node_ids(nodes))}",
                         retriable=True)
    harness.health_kafka(servers)


def wait_healthy(nodes: int = CLUSTER_NODES,
                 timeout_s: float = harness.KAFKA_HEALTH_TIMEOUT_S) -> float:
    """Wait until the whole cluster is healthy (progress lines on the way); returns the seconds
    it took. Fails at once, naming the node and its log, if a node process exits."""
    started = time.monotonic()
    next_progress = started + harness.HEALTH_PROGRESS_S
    last_error: Exception | None = None
    while True:
        for server in nodes_of(nodes):
            if server.pid() is None:
                raise server.failure("the process exited")
        try:
            health_cluster(nodes)
            return time.monotonic() - started
        except InfraError as exc:
            last_error = exc
        now = time.monotonic()
        if now - started >= timeout_s:
            raise InfraError(f"kafka cluster not healthy after {timeout_s:.0f}s (last check: "
                             f"{last_error}); logs: {harness.run_dir()}/kafka-node-*.log")
        if now >= next_progress:
            harness._say(f"kafka cluster: not healthy yet after {now - started:.0f}s "
                         f"(last check: {last_error})")
            next_progress = now + harness.HEALTH_PROGRESS_S
        time.sleep(HEALTH_POLL_S)


def up(nodes: int = CLUSTER_NODES) -> list[str]:
    """Provision Kafka if needed, start every node not running, wait until the cluster is
    healthy. Returns the names of the nodes this call started."""
    if nodes < REPLICATION_FACTOR_SAFE:
        raise InfraError(f"a cluster needs at least {REPLICATION_FACTOR_SAFE} nodes "
                         f"(a quorum that survives one loss); got {nodes}")
    harness.provision_kafka()
    started: list[str] = []
    for server in nodes_of(nodes):
        if server.pid() is not None:
            continue
        busy = [p for p in server.ports if harness._port_open("127.0.0.1", p)]
        if busy:
            raise server.failure(f"port(s) {busy} on 127.0.0.1 are taken by another process")
        harness._say(f"starting {server.name}")
        server.start()
        started.append(server.name)
    took_s = wait_healthy(nodes)
    harness._say(f"kafka cluster: {nodes} nodes healthy ({took_s:.1f} s), bootstrap "
                 f"{bootstrap(nodes)}")
    return started


def down(nodes: int = CLUSTER_NODES) -> list[str]:
    """Stop every node at once: stopped one by one, the last nodes would wait for a quorum that
    is already gone before their controlled shutdown gives up."""
    alive = [server for server in nodes_of(nodes) if server.pid() is not None]
    for server in alive:
        pid = server.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, server.stop_signal)
    for server in alive:
        server.stop()  # waits for the exit (SIGKILL after its limit), removes the pid file
    return [server.name for server in alive]


def kill9(node_id: int, nodes: int = CLUSTER_NODES) -> None:
    """SIGKILL one node, no controlled shutdown: what a crashed broker looks like (tests)."""
    server = node(node_id, nodes)
    pid = server.pid()
    if pid is None:
        raise InfraError(f"kafka node {node_id} is not running")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    while server.pid() is not None:
        harness._reap(pid)
        time.sleep(0.05)
    server.pid_file.unlink(missing_ok=True)


def start(node_id: int, nodes: int = CLUSTER_NODES) -> None:
    """Start one stopped node again (it rejoins with its data; tests)."""
    node(node_id, nodes).start()


def status(nodes: int = CLUSTER_NODES) -> dict[str, str]:
    """Each node (process, listeners, whether the cluster lists it) and the controller quorum."""
    servers = bootstrap(nodes)
    try:
        registered = set(asyncio.run(registered_brokers(servers)))
    except InfraError:
        registered = set()
    result: dict[str, str] = {}
    for node_id, server in zip(node_ids(nodes), nodes_of(nodes), strict=True):
        pid = server.pid()
        listeners = f"broker 127.0.0.1:{broker_port(node_id)}, controller " \
                    f"127.0.0.1:{controller_port(node_id)}"
        if pid is None:
            result[server.name] = f"stopped ({listeners})"
        else:
            state = "registered" if node_id in registered else "not registered with the cluster"
            result[server.name] = f"running (pid {pid}), {listeners}, {state}"
    try:
        result["quorum"] = str(asyncio.run(describe_quorum(servers)))
    except InfraError as exc:
        result["quorum"] = f"unavailable: {exc}"
    return result
