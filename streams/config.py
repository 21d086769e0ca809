"""Settings of every sardis-ledger process, read from SARDIS_* environment variables in one place."""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sardis_ledger.schemas.codec import Framing
from sardis_ledger.streams import kafka_security
from sardis_ledger.streams.errors import ConfigError
from sardis_ledger.streams.kafka_security import KafkaSecurity

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
# A worker's name among the group's workers (its transactional id is built from it).
WORKER_ID_LENGTH_MAX = 64
_WORKER_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
# The dev harness's Apicurio Registry, Confluent-compatible API. An empty value means no registry.
SCHEMA_REGISTRY_PORT_DEFAULT = 8081
SCHEMA_REGISTRY_URL_DEFAULT = f"http://127.0.0.1:{SCHEMA_REGISTRY_PORT_DEFAULT}/apis/ccompat/v7"
# A secret read from a *_FILE variable (a mounted secret) is at most this long.
SECRET_FILE_BYTES_MAX = 4096
# SARDIS_REPLICATION_FACTOR: "auto" (the default) picks it from the cluster's broker count at start
# (streams/topic_policy.py); a number is checked against that count.
REPLICATION_AUTO = "auto"
REPLICATION_FACTOR_MAX = 7
# SARDIS_LOCAL_BATCHES: 1 (the default) decides a batch whole in one event when the worker owns
# every partition it touches (streams/worker/local.py); 0 always runs the distributed protocol.
LOCAL_BATCHES_DEFAULT = 1

# Variables that may instead name a file holding the secret (NAME_FILE, e.g. a container secret).
SECRET_ENV_NAMES = (
    "SARDIS_PG_PASSWORD",
    "SARDIS_IMMUDB_PASSWORD",
    "SARDIS_SCHEMA_REGISTRY_USER",
    "SARDIS_SCHEMA_REGISTRY_PASSWORD",
    "SARDIS_KAFKA_PASSWORD",
    "SARDIS_KAFKA_KEY_PASSWORD",
)

ENV_NAMES = (
    "SARDIS_KAFKA_BOOTSTRAP",
    "SARDIS_TOPIC_PREFIX",
    "SARDIS_PG_DSN",
    "SARDIS_IMMUDB_ADDR",
    "SARDIS_IMMUDB_USER",
    "SARDIS_IMMUDB_PASSWORD",
    "SARDIS_IMMUDB_DATABASE",
    "SARDIS_IMMUDB_CA_FILE",
    "SARDIS_CHAIN_RPC",
    "SARDIS_PARTITIONS",
    "SARDIS_RECONCILE_GRACE_S",
    "SARDIS_RECONCILE_GRACE_BLOCKS",
    "SARDIS_WIRE_FORMAT",
    "SARDIS_SCHEMA_REGISTRY_URL",
    "SARDIS_SCHEMA_REGISTRY_USER",
    "SARDIS_SCHEMA_REGISTRY_PASSWORD",
    "SARDIS_REPLICATION_FACTOR",
    "SARDIS_LOCAL_BATCHES",
    "SARDIS_PG_PASSWORD",
    *kafka_security.ENV_NAMES,
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Connection settings and sizing shared by the worker, sinks, CLI and tests."""

    kafka_bootstrap: str = KAFKA_BOOTSTRAP_DEFAULT
    topic_prefix: str = ""
    # May carry the password (SARDIS_PG_PASSWORD(_FILE) is merged in): never printed whole.
    pg_dsn: str = field(default=PG_DSN_DEFAULT, repr=False)
    immudb_addr: str = IMMUDB_ADDR_DEFAULT
    immudb_user: str = IMMUDB_DEV_USER
    immudb_password: str = field(default=IMMUDB_DEV_PASSWORD, repr=False)
    immudb_database: str = IMMUDB_DATABASE_DEFAULT
    immudb_ca_file: str = ""  # set: TLS to immudb, trusting this CA bundle only
    chain_rpc: str = CHAIN_RPC_DEFAULT
    partitions: int = PARTITIONS_DEFAULT
    reconcile_grace_s: int = RECONCILE_GRACE_S_DEFAULT
    reconcile_grace_blocks: int = RECONCILE_GRACE_BLOCKS_DEFAULT
    wire_format: Framing = Framing.SINGLE_OBJECT
    schema_registry_url: str = SCHEMA_REGISTRY_URL_DEFAULT
    schema_registry_user: str = ""
    schema_registry_password: str = field(default="", repr=False)
    replication_factor: int | None = None  # None: chosen from the broker count at start
    local_batches: bool = True  # a batch whose partitions one worker owns: decided in one event
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        immudb_addr = env.get("SARDIS_IMMUDB_ADDR", IMMUDB_ADDR_DEFAULT)
        immudb_user = env.get("SARDIS_IMMUDB_USER")
        immudb_password = _secret(env, "SARDIS_IMMUDB_PASSWORD") or None
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
        wire_format, registry_url, registry_user, registry_password = _registry_settings(env)
        return cls(
            kafka_bootstrap=env.get("SARDIS_KAFKA_BOOTSTRAP", KAFKA_BOOTSTRAP_DEFAULT),
            topic_prefix=prefix,
            pg_dsn=pg_dsn_with_password(env.get("SARDIS_PG_DSN", PG_DSN_DEFAULT),
                                        _secret(env, "SARDIS_PG_PASSWORD")),
            immudb_addr=immudb_addr,
            immudb_user=immudb_user or IMMUDB_DEV_USER,
            immudb_password=immudb_password or IMMUDB_DEV_PASSWORD,
            immudb_database=env.get("SARDIS_IMMUDB_DATABASE", IMMUDB_DATABASE_DEFAULT),
            immudb_ca_file=env.get("SARDIS_IMMUDB_CA_FILE", ""),
            chain_rpc=env.get("SARDIS_CHAIN_RPC", CHAIN_RPC_DEFAULT),
            partitions=partitions,
            reconcile_grace_s=_whole(env, "SARDIS_RECONCILE_GRACE_S", RECONCILE_GRACE_S_DEFAULT,
                                     0, RECONCILE_GRACE_S_MAX),
            reconcile_grace_blocks=_whole(env, "SARDIS_RECONCILE_GRACE_BLOCKS",
                                          RECONCILE_GRACE_BLOCKS_DEFAULT, 0,
                                          RECONCILE_GRACE_BLOCKS_MAX),
            wire_format=wire_format,
            schema_registry_url=registry_url,
            schema_registry_user=registry_user,
            schema_registry_password=registry_password,
            replication_factor=_replication_factor(env),
            local_batches=_whole(env, "SARDIS_LOCAL_BATCHES", LOCAL_BATCHES_DEFAULT, 0, 1) == 1,
            kafka_security=kafka_security.from_env(env, _secret),
        )

    def kafka_connection(self) -> dict[str, Any]:
        """Keyword arguments every aiokafka client of the ledger is built with: the bootstrap
        servers and this process's security settings (streams/kafka_security.py)."""
        return {"bootstrap_servers": self.kafka_bootstrap, **self.kafka_security.aiokafka_kwargs()}

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
            "SARDIS_IMMUDB_CA_FILE": self.immudb_ca_file,
            "SARDIS_CHAIN_RPC": self.chain_rpc,
            "SARDIS_PARTITIONS": str(self.partitions),
            "SARDIS_RECONCILE_GRACE_S": str(self.reconcile_grace_s),
            "SARDIS_RECONCILE_GRACE_BLOCKS": str(self.reconcile_grace_blocks),
            "SARDIS_WIRE_FORMAT": self.wire_format.value,
            "SARDIS_SCHEMA_REGISTRY_URL": self.schema_registry_url,
            "SARDIS_SCHEMA_REGISTRY_USER": self.schema_registry_user,
            "SARDIS_SCHEMA_REGISTRY_PASSWORD": self.schema_registry_password,
            "SARDIS_REPLICATION_FACTOR": (REPLICATION_AUTO if self.replication_factor is None
                                          else str(self.replication_factor)),
            "SARDIS_LOCAL_BATCHES": str(int(self.local_batches)),
            **self.kafka_security.as_env(),
            # The values above win over any *_FILE the parent had (both set is an error).
            **{f"{name}_FILE": "" for name in SECRET_ENV_NAMES},
            "SARDIS_PG_PASSWORD": "",  # already in SARDIS_PG_DSN
        }


def pg_dsn_with_password(dsn: str, password: str) -> str:
    """`dsn` with `password` (from SARDIS_PG_PASSWORD or its _FILE) put in, URL-quoted."""
    if not password:
        return dsn
    parts = urllib.parse.urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql") or not parts.username or not parts.hostname:
        raise ConfigError("SARDIS_PG_PASSWORD needs SARDIS_PG_DSN as postgresql://user@host/db")
    if parts.password is not None:
        raise ConfigError("SARDIS_PG_DSN carries a password and SARDIS_PG_PASSWORD is set: keep "
                          "one (the variable or its _FILE, which never shows in a process list)")
    netloc = f"{parts.username}:{urllib.parse.quote(password, safe='')}@{parts.netloc.split('@', 1)[1]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def redact_url(url: str) -> str:
    """`url` fit for a message or a log line: no password, and for anything but a PostgreSQL DSN
    no path or query either (RPC providers put API keys there: .../v3/<key>, ?apikey=...)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    user = f"{parts.username}:***@" if parts.password is not None else (
        f"{parts.username}@" if parts.username else "")
    netloc = f"{user}[{host}]{port}" if ":" in host else f"{user}{host}{port}"
    if parts.scheme in ("postgres", "postgresql"):
        query = "&".join(p for p in parts.query.split("&") if not p.startswith("password="))
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    path = "/***" if parts.path.strip("/") else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, "***" if parts.query else "", ""))


_URL_IN_TEXT = re.compile(r"""\b(?:https?|wss?|postgres(?:ql)?)://[^\s'"<>)]+""")


def redact_urls_in(text: str) -> str:
    """`text` with every URL in it redacted (web3 and aiohttp errors quote the URL they called)."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


def _whole(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, str(default))
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from exc
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} must be {low}..{high}")
    return value


def _registry_settings(env: Mapping[str, str]) -> tuple[Framing, str, str, str]:
    """(wire format, registry URL, user, password), checked together: Confluent framing needs a
    registry, and credentials come in pairs, from the environment or files, never in the URL."""
    raw_format = env.get("SARDIS_WIRE_FORMAT", Framing.SINGLE_OBJECT.value)
    try:
        wire_format = Framing(raw_format)
    except ValueError as exc:
        choices = "|".join(f.value for f in Framing)
        raise ConfigError(f"SARDIS_WIRE_FORMAT={raw_format!r}: use {choices}") from exc
    url = schema_registry_url(env.get("SARDIS_SCHEMA_REGISTRY_URL", SCHEMA_REGISTRY_URL_DEFAULT))
    if wire_format is Framing.CONFLUENT and not url:
        raise ConfigError("SARDIS_WIRE_FORMAT=confluent needs a schema registry: set "
                          "SARDIS_SCHEMA_REGISTRY_URL")
    user = _secret(env, "SARDIS_SCHEMA_REGISTRY_USER")
    password = _secret(env, "SARDIS_SCHEMA_REGISTRY_PASSWORD")
    if bool(user) != bool(password):
        raise ConfigError("set both SARDIS_SCHEMA_REGISTRY_USER and SARDIS_SCHEMA_REGISTRY_PASSWORD "
                          "(or their *_FILE variants), or neither")
    return wire_format, url, user, password


def schema_registry_url(raw: str) -> str:
    """The registry's base URL without a trailing slash ('' for none); ConfigError if it is not
    a plain http(s) URL. Credentials in a URL end up in logs, so they are refused."""
    url = raw.strip().rstrip("/")
    if not url:
        return ""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"SARDIS_SCHEMA_REGISTRY_URL={url!r} is not an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("SARDIS_SCHEMA_REGISTRY_URL must not carry credentials: set "
                          "SARDIS_SCHEMA_REGISTRY_USER and SARDIS_SCHEMA_REGISTRY_PASSWORD "
                          "(or *_FILE) instead")
    if parts.query or parts.fragment:
        raise ConfigError(f"SARDIS_SCHEMA_REGISTRY_URL={url!r}: no query or fragment, only the "
                          "base URL (e.g. http://registry:8081 or .../apis/ccompat/v7)")
    return url


def _secret(env: Mapping[str, str], name: str) -> str:
    """`name` from the environment, or the content of the file `name`_FILE names (one of them)."""
    value = env.get(name, "")
    path = env.get(f"{name}_FILE", "")
    if value and path:
        raise ConfigError(f"set {name} or {name}_FILE, not both")
    if not path:
        return value
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(SECRET_FILE_BYTES_MAX + 1)
    except OSError as exc:
        raise ConfigError(f"{name}_FILE={path}: cannot read it ({exc.strerror})") from exc
    if len(data) > SECRET_FILE_BYTES_MAX:
        raise ConfigError(f"{name}_FILE={path}: longer than {SECRET_FILE_BYTES_MAX} bytes")
    try:
        # A trailing newline is how editors and `echo` end a file; it is never part of a secret.
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}_FILE={path}: not UTF-8 text") from exc


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


# Where each kind of process serves /metrics, /healthz and /readyz (streams/health.py) unless
# SARDIS_METRICS_PORT says otherwise; `run` gives each child its own. 0 turns the endpoint off.
METRICS_HOST_DEFAULT = "127.0.0.1"
METRICS_PORTS_DEFAULT: dict[str, int] = {
    "worker": 9464, "sink-postgres": 9465, "sink-immudb": 9466, "chain-watch": 9467, "run": 9460,
}
PORT_MAX = 65535


def metrics_endpoint(kind: str, env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(host, port) of a process's metrics and health endpoint: SARDIS_METRICS_HOST (loopback by
    default) and SARDIS_METRICS_PORT (the kind's default port; 0: no endpoint)."""
    env = os.environ if env is None else env
    host = env.get("SARDIS_METRICS_HOST", "").strip() or METRICS_HOST_DEFAULT
    return host, _whole(env, "SARDIS_METRICS_PORT", METRICS_PORTS_DEFAULT.get(kind, 0), 0, PORT_MAX)


def worker_id(env: Mapping[str, str], hostname: str, datadir: str) -> str:
    """SARDIS_WORKER_ID, or, unset, one derived from the host name and the worker's data
    directory (stable across restarts of one worker, distinct for workers with their own data
    directories). It names the worker's transaction: unique among running workers, stable
    across restarts (a restarted worker then aborts its predecessor's open transaction at once
    instead of after the transaction timeout)."""
    given = env.get("SARDIS_WORKER_ID")
    if given is not None:
        if len(given) > WORKER_ID_LENGTH_MAX or not _WORKER_ID_PATTERN.fullmatch(given):
            raise ConfigError(f"SARDIS_WORKER_ID must be 1-{WORKER_ID_LENGTH_MAX} letters, "
                              "digits, '.', '_' or '-'")
        return given
    host = "-".join(_WORKER_ID_PATTERN.findall(hostname)) or "host"
    digest = hashlib.sha256(os.path.abspath(datadir).encode()).hexdigest()[:8]
    return f"{host[:WORKER_ID_LENGTH_MAX - 9]}-{digest}"
