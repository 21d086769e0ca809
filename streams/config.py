"""Settings of every sardis-ledger process, read from SARDIS_* environment variables in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from streams.errors import ConfigError

# Loopback defaults of the local dev harness (`sardis-ledger dev up`). The dev-only credentials
# below apply only while the matching address is left at its default; pointing a setting at an
# external server requires its credentials from the environment.
KAFKA_BOOTSTRAP_DEFAULT = "127.0.0.1:9092"
PG_PORT_DEFAULT = 5432
PG_DSN_DEFAULT = f"postgresql://sardis@127.0.0.1:{PG_PORT_DEFAULT}/sardis"
IMMUDB_ADDR_DEFAULT = "127.0.0.1:3322"
IMMUDB_DEV_USER = "immudb"
IMMUDB_DEV_PASSWORD = "immudb"  # immudb's own first-start admin password; dev harness only
IMMUDB_DATABASE_DEFAULT = "defaultdb"
CHAIN_RPC_DEFAULT = "http://127.0.0.1:8545"
PARTITIONS_DEFAULT = 12
PARTITIONS_MAX = 1024
TOPIC_PREFIX_LENGTH_MAX = 100
# The streaming reconciler's grace window: a one-sided chain transfer or entry becomes a
# missing_* discrepancy only after both have passed. Defaults cover ordinary latency between a
# booking and the watcher publishing (12 confirmations, ~2.5 min on Ethereum, then the poll).
RECONCILE_GRACE_S_DEFAULT = 900
RECONCILE_GRACE_BLOCKS_DEFAULT = 64
RECONCILE_GRACE_S_MAX = 30 * 24 * 3600
RECONCILE_GRACE_BLOCKS_MAX = 10_000_000
# SARDIS_REPLICATION_FACTOR: "auto" (the default) picks it from the cluster's broker count at start
# (streams/topic_policy.py); a number is checked against that count.
REPLICATION_AUTO = "auto"
REPLICATION_FACTOR_MAX = 7

ENV_NAMES = (
    "SARDIS_KAFKA_BOOTSTRAP",
    "SARDIS_TOPIC_PREFIX",
    "SARDIS_PG_DSN",
    "SARDIS_IMMUDB_ADDR",
    "SARDIS_IMMUDB_USER",
    "SARDIS_IMMUDB_PASSWORD",
    "SARDIS_IMMUDB_DATABASE",
    "SARDIS_CHAIN_RPC",
    "SARDIS_PARTITIONS",
    "SARDIS_RECONCILE_GRACE_S",
    "SARDIS_RECONCILE_GRACE_BLOCKS",
    "SARDIS_REPLICATION_FACTOR",
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Connection settings and sizing shared by the worker, sinks, CLI and tests."""

    kafka_bootstrap: str = KAFKA_BOOTSTRAP_DEFAULT
    topic_prefix: str = ""
    pg_dsn: str = PG_DSN_DEFAULT
    immudb_addr: str = IMMUDB_ADDR_DEFAULT
    immudb_user: str = IMMUDB_DEV_USER
    immudb_password: str = IMMUDB_DEV_PASSWORD
    immudb_database: str = IMMUDB_DATABASE_DEFAULT
    chain_rpc: str = CHAIN_RPC_DEFAULT
    partitions: int = PARTITIONS_DEFAULT
    reconcile_grace_s: int = RECONCILE_GRACE_S_DEFAULT
    reconcile_grace_blocks: int = RECONCILE_GRACE_BLOCKS_DEFAULT
    replication_factor: int | None = None  # None: chosen from the broker count at start

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        immudb_addr = env.get("SARDIS_IMMUDB_ADDR", IMMUDB_ADDR_DEFAULT)
        immudb_user = env.get("SARDIS_IMMUDB_USER")
        immudb_password = env.get("SARDIS_IMMUDB_PASSWORD")
        if immudb_addr != IMMUDB_ADDR_DEFAULT and (not immudb_user or not immudb_password):
            # No default credentials for a real server: say what is missing instead of guessing.
            raise ConfigError(
                "SARDIS_IMMUDB_ADDR points at an external immudb; set SARDIS_IMMUDB_USER and "
                "SARDIS_IMMUDB_PASSWORD too (dev defaults apply only to the local harness)"
            )
        prefix = env.get("SARDIS_TOPIC_PREFIX", "")
        if len(prefix) > TOPIC_PREFIX_LENGTH_MAX or not all(
            c.isalnum() or c in "._-" for c in prefix
        ):
            raise ConfigError(
                f"SARDIS_TOPIC_PREFIX={prefix!r}: use at most {TOPIC_PREFIX_LENGTH_MAX} "
                "characters from [A-Za-z0-9._-]"
            )
        partitions = _whole(env, "SARDIS_PARTITIONS", PARTITIONS_DEFAULT, 1, PARTITIONS_MAX)
        return cls(
            kafka_bootstrap=env.get("SARDIS_KAFKA_BOOTSTRAP", KAFKA_BOOTSTRAP_DEFAULT),
            topic_prefix=prefix,
            pg_dsn=env.get("SARDIS_PG_DSN", PG_DSN_DEFAULT),
            immudb_addr=immudb_addr,
            immudb_user=immudb_user or IMMUDB_DEV_USER,
            immudb_password=immudb_password or IMMUDB_DEV_PASSWORD,
            immudb_database=env.get("SARDIS_IMMUDB_DATABASE", IMMUDB_DATABASE_DEFAULT),
            chain_rpc=env.get("SARDIS_CHAIN_RPC", CHAIN_RPC_DEFAULT),
            partitions=partitions,
            reconcile_grace_s=_whole(env, "SARDIS_RECONCILE_GRACE_S", RECONCILE_GRACE_S_DEFAULT,
                                     0, RECONCILE_GRACE_S_MAX),
            reconcile_grace_blocks=_whole(env, "SARDIS_RECONCILE_GRACE_BLOCKS",
                                          RECONCILE_GRACE_BLOCKS_DEFAULT, 0,
                                          RECONCILE_GRACE_BLOCKS_MAX),
            replication_factor=_replication_factor(env),
        )

    def topic(self, name: str) -> str:
        """Full topic name of a ledger topic such as `ledger.commands`, prefix included."""
        return f"{self.topic_prefix}{name}"

    def as_env(self) -> dict[str, str]:
        """The settings as SARDIS_* variables (passwords included: for child processes only)."""
        return {
            "SARDIS_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "SARDIS_TOPIC_PREFIX": self.topic_prefix,
            "SARDIS_PG_DSN": self.pg_dsn,
            "SARDIS_IMMUDB_ADDR": self.immudb_addr,
            "SARDIS_IMMUDB_USER": self.immudb_user,
            "SARDIS_IMMUDB_PASSWORD": self.immudb_password,
            "SARDIS_IMMUDB_DATABASE": self.immudb_database,
            "SARDIS_CHAIN_RPC": self.chain_rpc,
            "SARDIS_PARTITIONS": str(self.partitions),
            "SARDIS_RECONCILE_GRACE_S": str(self.reconcile_grace_s),
            "SARDIS_RECONCILE_GRACE_BLOCKS": str(self.reconcile_grace_blocks),
            "SARDIS_REPLICATION_FACTOR": (REPLICATION_AUTO if self.replication_factor is None
                                          else str(self.replication_factor)),
        }


def _whole(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, str(default))
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from exc
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} must be {low}..{high}")
    return value


def _replication_factor(env: Mapping[str, str]) -> int | None:
    raw = env.get("SARDIS_REPLICATION_FACTOR", REPLICATION_AUTO).strip()
    if raw in ("", REPLICATION_AUTO):
        return None
    return _whole(env, "SARDIS_REPLICATION_FACTOR", 0, 1, REPLICATION_FACTOR_MAX)


def host_port(address: str) -> tuple[str, int]:
    """Split `host:port` (the form of SARDIS_KAFKA_BOOTSTRAP's first entry and SARDIS_IMMUDB_ADDR)."""
    first = address.split(",")[0].strip()
    host, sep, port = first.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{address!r} is not host:port")
    return host, int(port)
