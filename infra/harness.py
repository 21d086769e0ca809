"""Local dev harness: provisions Kafka, PostgreSQL, immudb, anvil and a schema registry once, runs
them on loopback."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sardis_ledger.streams.config import (
    CHAIN_RPC_DEFAULT,
    IMMUDB_ADDR_DEFAULT,
    KAFKA_BOOTSTRAP_DEFAULT,
    PG_DSN_DEFAULT,
    PG_PORT_DEFAULT,
    SCHEMA_REGISTRY_PORT_DEFAULT,
    SCHEMA_REGISTRY_URL_DEFAULT,
    SECRET_ENV_NAMES,
    Settings,
    host_port,
    redact_url,
)
from sardis_ledger.streams.errors import InfraError
from sardis_ledger.streams.kafka_security import KafkaSecurity

INFRA_DIR = Path(__file__).resolve().parent
KAFKA_VERSION = "4.1.1"
IMMUDB_VERSION = "v1.11.1"
# The newest Apicurio Registry whose artifacts Maven Central serves here in full (README: Schema
# registry); the version is also in infra/registry/pom.xml, whose digest keys the cache.
APICURIO_VERSION = "2.4.2.Final"
REGISTRY_PORT = SCHEMA_REGISTRY_PORT_DEFAULT
REGISTRY_HEAP_MB = 256
REGISTRY_JAR = "schema-registry-runner.jar"  # infra/registry/pom.xml's finalName + Quarkus' suffix
KAFKA_PORT = 9092
KAFKA_CONTROLLER_PORT = 9093
IMMUDB_PORT = 3322
ANVIL_PORT = 8545
ANVIL_CHAIN_ID = 31337
KAFKA_HEAP_MB = 768
PG_USER = "sardis"
PG_DATABASE = "sardis"
HEALTH_TIMEOUT_S = 60.0
# Kafka replays every partition's log after an unclean stop (a kill, a machine suspended with the
# servers up); with a few thousand partitions that alone took 49 s here, so it gets its own limit.
KAFKA_HEALTH_TIMEOUT_S = 300.0
HEALTH_PROGRESS_S = 15.0
STOP_TIMEOUT_S = 20.0
# A controlled Kafka shutdown moves every partition's leadership and flushes its logs: minutes'
# worth of partitions need more than 20 s, and a SIGKILL then costs a log recovery at next start.
KAFKA_STOP_TIMEOUT_S = 120.0
PROVISION_TIMEOUT_S = 1800.0
LOG_TAIL_LINES = 25


def cache_dir() -> Path:
    """Where provisioned binaries live (reused by every clone and by CI on the same machine)."""
    return Path(os.environ.get("SARDIS_CACHE_DIR", Path.home() / ".cache" / "sardis-ledger"))


def run_dir() -> Path:
    """Where the dev servers keep data, logs and pid files."""
    return Path(os.environ.get("SARDIS_RUN_DIR", cache_dir() / "run"))


def _inputs_digest(paths: Iterable[Path]) -> str:
    """Short hash of provisioning inputs, so a changed pom/go.sum/lockfile provisions anew."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _say(message: str) -> None:
    print(f"[dev] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], *, what: str, cwd: Path | None = None, env: dict[str, str] | None = None,
         log: Path | None = None) -> None:
    """Run a provisioning command; on failure raise InfraError with the tail of its output."""
    log = log or (cache_dir() / "provision.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=PROVISION_TIMEOUT_S, check=False)
        except FileNotFoundError as exc:
            raise InfraError(f"{what}: command {cmd[0]!r} not found ({exc})") from exc
        except subprocess.TimeoutExpired as exc:
            raise InfraError(f"{what}: timed out after {PROVISION_TIMEOUT_S:.0f}s; see {log}") from exc
    if proc.returncode != 0:
        raise InfraError(f"{what} failed (exit {proc.returncode}); log {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join("    " + line for line in text[-lines:])


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise InfraError(f"missing {', '.join(packages)}: install them (apt-get install "
                         f"{' '.join(packages)}) or run as root so the harness can")
    _say(f"installing Debian packages: {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-q"], what="apt-get update", env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
         what=f"apt-get install {' '.join(packages)}", env=env)


@dataclass
class Server:
    """One dev server: how to provision it, start it, and tell that it is healthy."""

    name: str
    ports: tuple[int, ...]
    health: Callable[[], None]
    provision: Callable[[], None]
    command: Callable[[], list[str]]
    prepare: Callable[[], None] = lambda: None
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # run as this user (PostgreSQL refuses to run as root)
    health_timeout_s: float = HEALTH_TIMEOUT_S
    stop_timeout_s: float = STOP_TIMEOUT_S
    stop_signal: int = signal.SIGTERM

    @property
    def pid_file(self) -> Path:
        return run_dir() / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return run_dir() / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def start(self) -> None:
        run_dir().mkdir(parents=True, exist_ok=True)
        self.prepare()
        cmd = self.command()
        if self.user and os.geteuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        with self.log_file.open("ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} $ {' '.join(cmd)}\n".encode())
            log.flush()
            # A session of its own: the server outlives `make up` and is not hit by its Ctrl-C.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, **self.env})
        self.pid_file.write_text(str(proc.pid))

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, self.stop_signal)
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            _reap(pid)
            time.sleep(0.1)
        if self.pid() is not None:
            os.killpg(pid, signal.SIGKILL)
            _reap(pid)
        self.pid_file.unlink(missing_ok=True)
        return True

    def failure(self, why: str) -> InfraError:
        return InfraError(f"{self.name} did not start: {why}\n  log: {self.log_file}\n"
                          f"  last lines:\n{_tail(self.log_file)}")


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# ---------------------------------------------------------------- Kafka (KRaft, Maven Central jars)

def _kafka_home() -> Path:
    pom = INFRA_DIR / "kafka" / "pom.xml"
    return cache_dir() / f"kafka-{KAFKA_VERSION}-{_inputs_digest([pom])}"


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        _apt_install("openjdk-17-jre-headless")
        java = shutil.which("java")
    if java is None:
        raise InfraError("kafka: no `java` on PATH after installing openjdk-17-jre-headless")
    return java


def provision_kafka() -> None:
    libs = _kafka_home() / "libs"
    if libs.is_dir():
        return
    _java()
    if shutil.which("mvn") is None:
        _apt_install("maven")
    _say(f"provisioning Apache Kafka {KAFKA_VERSION} jars with Maven (one time)")
    staging = libs.with_name("libs.partial")
    shutil.rmtree(staging, ignore_errors=True)
    _run(["mvn", "-q", "-B", "-f", str(INFRA_DIR / "kafka" / "pom.xml"),
          "dependency:copy-dependencies", f"-DoutputDirectory={staging}"],
         what="kafka: collecting jars with Maven")
    staging.rename(libs)


def _kafka_properties() -> Path:
    data = run_dir() / "kafka" / "data"
    template = (INFRA_DIR / "kafka" / "server.properties").read_text()
    text = (template.replace("${LOG_DIRS}", str(data)).replace("${PORT}", str(KAFKA_PORT))
            .replace("${CONTROLLER_PORT}", str(KAFKA_CONTROLLER_PORT)))
    path = run_dir() / "kafka" / "server.properties"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _kafka_cluster_id() -> str:
    # Kafka's Uuid.randomUuid(): 16 random bytes, URL-safe base64 without padding, never "-"-led.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _kafka_prepare() -> None:
    props = _kafka_properties()
    data = run_dir() / "kafka" / "data"
    if (data / "meta.properties").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    _run([_java(), "-cp", f"{_kafka_home() / 'libs'}/*", "kafka.tools.StorageTool", "format",
          "--standalone", "-t", _kafka_cluster_id(), "-c", str(props)],
         what="kafka: formatting KRaft storage", log=run_dir() / "kafka.log")


def _kafka_command() -> list[str]:
    return [_java(), f"-Xms{KAFKA_HEAP_MB // 2}m", f"-Xmx{KAFKA_HEAP_MB}m", "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={INFRA_DIR / 'kafka' / 'log4j2.properties'}",
            "-cp", f"{_kafka_home() / 'libs'}/*", "kafka.Kafka", str(_kafka_properties())]


def health_kafka(bootstrap: str = KAFKA_BOOTSTRAP_DEFAULT,
                 security: KafkaSecurity | None = None) -> None:
    """A transactional produce and a read_committed consume: proves transactions work."""
    import asyncio

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.errors import KafkaError

    identity = security or KafkaSecurity()
    host, port = host_port(bootstrap)
    if not _port_open(host, port):
        # Not listening yet: say so without letting aiokafka log a connection error per retry.
        raise InfraError(f"kafka: nothing listens on {host}:{port} yet", retriable=True)

    async def check() -> None:
        topic = "__sardis_health"
        marker = uuid.uuid4().hex.encode()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **identity.aiokafka_kwargs(),
                                    transactional_id=f"sardis-health-{uuid.uuid4().hex[:8]}",
                                    request_timeout_ms=10_000)
        try:
            await producer.start()
            async with producer.transaction():
                meta = await producer.send_and_wait(topic, marker, partition=0)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **identity.aiokafka_kwargs(),
                                    isolation_level="read_committed",
                                    enable_auto_commit=False, request_timeout_ms=10_000)
        try:
            await consumer.start()
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek(tp, meta.offset)
            msg = await asyncio.wait_for(consumer.getone(), 15)
            if msg.value != marker:
                raise InfraError("kafka: read_committed consume returned another record")
        finally:
            await consumer.stop()

    try:
        asyncio.run(check())
    except (KafkaError, OSError, TimeoutError) as exc:
        raise InfraError(f"kafka health check: {exc!r}", retriable=True) from exc


# ---------------------------------------------------------------- PostgreSQL (Debian packages)

def _pg_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not candidates:
        _apt_install("postgresql")
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not candidates:
        raise InfraError("postgres: no /usr/lib/postgresql/*/bin/pg_ctl after installing postgresql")
    return candidates[-1].parent


def _pg_data() -> Path:
    # PostgreSQL refuses to run as root; as root it runs as `postgres`, which cannot enter /root.
    if os.geteuid() == 0:
        return Path(os.environ.get("SARDIS_PG_DATA", "/var/lib/sardis-ledger/pg"))
    return run_dir() / "pg"


def provision_postgres() -> None:
    _pg_bin()


def _pg_prepare() -> None:
    data = _pg_data()
    if (data / "PG_VERSION").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    cmd = [str(_pg_bin() / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust",
           "--encoding=UTF8", "--no-instructions"]
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
        data.chmod(0o700)
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    _run(cmd, what="postgres: initdb", log=run_dir() / "postgres.log")
    # Dev only: trust on loopback, nothing else listens. Production DSNs carry real credentials.
    with (data / "postgresql.conf").open("a") as conf:
        conf.write("\n# sardis-ledger dev harness\nlisten_addresses = '127.0.0.1'\n"
                   "fsync = on\nmax_connections = 200\nshared_buffers = 256MB\n")


def _pg_command() -> list[str]:
    socket_dir = _pg_data()
    return [str(_pg_bin() / "postgres"), "-D", str(_pg_data()), "-p", str(PG_PORT_DEFAULT),
            "-k", str(socket_dir)]


def health_postgres(dsn: str = PG_DSN_DEFAULT, create_database: bool = True) -> None:
    import asyncio

    import asyncpg

    async def check() -> None:
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except asyncpg.InvalidCatalogNameError:
            if not create_database:
                raise
            admin = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres", timeout=5)
            try:
                await admin.execute(f'CREATE DATABASE "{PG_DATABASE}"')
            finally:
                await admin.close()
            conn = await asyncpg.connect(dsn, timeout=5)
        try:
            if await conn.fetchval("SELECT 1") != 1:
                raise InfraError("postgres: SELECT 1 did not return 1")
        finally:
            await conn.close()

    try:
        asyncio.run(check())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise InfraError(f"postgres health check: {exc!r}", retriable=True) from exc


# ---------------------------------------------------------------- immudb (built from its Go module)

def _immudb_binary() -> Path:
    src = INFRA_DIR / "immudb"
    digest = _inputs_digest([src / "go.mod", src / "go.sum"])
    return cache_dir() / f"immudb-{IMMUDB_VERSION}-{digest}" / "immudb"


def provision_immudb() -> None:
    binary = _immudb_binary()
    if binary.exists():
        return
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists()
                                 else None)
    if go is None:
        _apt_install("golang-go")
        go = shutil.which("go")
    if go is None:
        raise InfraError("immudb: no Go toolchain to build it with")
    _say(f"building immudb {IMMUDB_VERSION} from its Go module (one time, a few minutes)")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name("immudb.partial")
    env = dict(os.environ, GOFLAGS="-mod=mod", CGO_ENABLED="0")
    _run([go, "build", "-trimpath", "-o", str(partial), "github.com/codenotary/immudb/cmd/immudb"],
         what="immudb: go build", cwd=INFRA_DIR / "immudb", env=env)
    partial.rename(binary)


def _immudb_command() -> list[str]:
    data = run_dir() / "immudb"
    return [str(_immudb_binary()), "--dir", str(data / "data"), "--address", "127.0.0.1",
            "--port", str(IMMUDB_PORT), "--pgsql-server=false", "--web-server=false",
            "--metrics-server=false", "--logdir", str(data / "log")]


def health_immudb(settings: Settings | None = None) -> None:
    """Login, then a verified set and a verified get (checks the server's proofs end to end)."""
    settings = settings or Settings()
    host, port = host_port(settings.immudb_addr)
    if not _port_open(host, port):
        raise InfraError(f"immudb: nothing listens on {host}:{port} yet", retriable=True)
    try:
        from immudb import ImmudbClient

        host, port = host_port(settings.immudb_addr)
        state_dir = run_dir() / "immudb-client-state"
        state_dir.mkdir(parents=True, exist_ok=True)
        client = ImmudbClient(f"{host}:{port}", timeout=5,
                              rs=_immudb_state_service(state_dir / f"{host}_{port}.state"))
        client.login(settings.immudb_user, settings.immudb_password,
                     database=settings.immudb_database.encode())
        key = f"sardis-health:{uuid.uuid4().hex}".encode()
        client.verifiedSet(key, b"ok")
        got = client.verifiedGet(key)
        if got.value != b"ok" or not got.verified:
            raise InfraError("immudb: verified get did not return the verified value")
        client.logout()
    except InfraError:
        raise
    except Exception as exc:  # grpc and immudb-py raise many unrelated types; translate them all
        raise InfraError(f"immudb health check: {exc!r}", retriable=True) from exc


def _immudb_state_service(path: Path) -> object:
    import contextlib
    import io

    from immudb.rootService import PersistentRootService

    # immudb-py prints a warning to stdout when the state file does not exist yet (first run).
    with contextlib.redirect_stdout(io.StringIO()):
        return PersistentRootService(str(path))


# ---------------------------------------------------------------- anvil and solc-js (npm)

def _chain_tools_home() -> Path:
    src = INFRA_DIR / "anvil"
    return cache_dir() / f"chain-tools-{_inputs_digest([src / 'package.json', src / 'package-lock.json'])}"


def anvil_binary() -> Path:
    return _chain_tools_home() / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"


def solcjs_path() -> Path:
    """The solc-js compiler module (offline: its soljson.js ships inside the npm package)."""
    return _chain_tools_home() / "node_modules" / "solc"


def provision_anvil() -> None:
    home = _chain_tools_home()
    if anvil_binary().exists() and (solcjs_path() / "soljson.js").exists():
        return
    if shutil.which("npm") is None:
        _apt_install("nodejs", "npm")
    _say("installing anvil and solc-js from npm (one time)")
    home.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy(INFRA_DIR / "anvil" / name, home / name)
    _run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], what="anvil: npm ci", cwd=home)


def _anvil_command() -> list[str]:
    return [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(ANVIL_PORT),
            "--chain-id", str(ANVIL_CHAIN_ID)]


def json_rpc(url: str, method: str, params: list[object] | None = None,
             timeout_s: float = 5.0) -> object:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []})
    request = urllib.request.Request(url, data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        reply = json.loads(response.read())
    if "error" in reply:
        raise InfraError(f"{method}: {reply['error']}")
    return reply["result"]


def health_anvil(url: str = CHAIN_RPC_DEFAULT) -> None:
    try:
        chain_id = json_rpc(url, "eth_chainId")
    except OSError as exc:
        raise InfraError(f"anvil health check: {exc!r}", retriable=True) from exc
    if not isinstance(chain_id, str) or not chain_id.startswith("0x"):
        raise InfraError(f"anvil: eth_chainId returned {chain_id!r}")


# ---------------------------------------------------------------- schema registry (Apicurio, Maven)

def _registry_home() -> Path:
    return cache_dir() / f"schema-registry-{APICURIO_VERSION}-{_inputs_digest(_registry_inputs())}"


def _registry_inputs() -> list[Path]:
    """The Maven project that builds the registry: its pom and our one Java class."""
    src = INFRA_DIR / "registry"
    return [src / "pom.xml", *sorted((src / "src").rglob("*.java"))]


def provision_registry() -> None:
    """Build a runnable Apicurio Registry from its released jars (one time, cached like Kafka).

    Maven builds in a scratch copy of infra/registry (never in the source tree) and the runner
    jar and its lib/ move into the cache only once complete, so an interrupted build is redone.
    """
    home = _registry_home()
    if (home / REGISTRY_JAR).exists():
        return
    _java()
    if shutil.which("mvn") is None:
        _apt_install("maven")
    _say(f"schema-registry: building Apicurio Registry {APICURIO_VERSION} with Maven (one time: "
         "about 2 minutes and 230 MB of downloads on a fresh machine; log "
         f"{cache_dir() / 'provision.log'})")
    started = time.monotonic()
    build = home.with_name(f"{home.name}.build-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    try:
        src = INFRA_DIR / "registry"
        shutil.copytree(src, build, ignore=shutil.ignore_patterns("target"))
        # skipDefault: Apicurio's parent POM adds two repositories besides Maven Central unless
        # this property is set; everything the build needs is on Central.
        _run(["mvn", "-B", "-q", "-f", str(build / "pom.xml"), "package", "-DskipDefault=true"],
             what="schema-registry: Maven build")
        staged = home.with_name(f"{home.name}.partial-{os.getpid()}")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        (build / "target" / REGISTRY_JAR).rename(staged / REGISTRY_JAR)
        (build / "target" / "lib").rename(staged / "lib")
        try:
            staged.rename(home)
        except OSError:  # another harness finished the same build first: use that one
            shutil.rmtree(staged, ignore_errors=True)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    if not (home / REGISTRY_JAR).exists():
        raise InfraError(f"schema-registry: the Maven build left no {REGISTRY_JAR}; see "
                         f"{cache_dir() / 'provision.log'}")
    _say(f"schema-registry: built in {time.monotonic() - started:.0f} s")


def _registry_data() -> Path:
    return run_dir() / "schema-registry"


def _registry_env() -> dict[str, str]:
    # Apicurio's own variable (its application.properties reads it): a file-backed H2 database in
    # the run directory instead of its in-memory default, so schema ids outlive a restart. Kafka
    # keeps the records that carry the ids; an id must never come back meaning another schema.
    return {"REGISTRY_DATASOURCE_URL": f"jdbc:h2:file:{_registry_data() / 'registry'}"}


def _registry_prepare() -> None:
    _registry_data().mkdir(parents=True, exist_ok=True)


def _registry_command() -> list[str]:
    return [_java(), f"-Xmx{REGISTRY_HEAP_MB}m", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
            "-Dquarkus.http.host=127.0.0.1", f"-Dquarkus.http.port={REGISTRY_PORT}",
            "-jar", str(_registry_home() / REGISTRY_JAR)]


def health_registry(settings: Settings | None = None) -> None:
    """GET /subjects on the Confluent-compatible API answers with a list."""
    from sardis_ledger.streams.errors import RegistryError
    from sardis_ledger.streams.schema_registry import SchemaRegistry

    settings = settings or Settings()
    url = settings.schema_registry_url or SCHEMA_REGISTRY_URL_DEFAULT
    # One attempt: the health wait loop is the retry.
    registry = SchemaRegistry(url, settings.schema_registry_user,
                              settings.schema_registry_password, attempts=1)
    try:
        registry.subjects()
    except RegistryError as exc:
        raise InfraError(f"schema-registry health check: {exc}", retriable=True) from exc


# ---------------------------------------------------------------- the stack

SERVER_ENV = {
    "kafka": "SARDIS_KAFKA_BOOTSTRAP",
    "postgres": "SARDIS_PG_DSN",
    "immudb": "SARDIS_IMMUDB_ADDR",
    "anvil": "SARDIS_CHAIN_RPC",
    "schema-registry": "SARDIS_SCHEMA_REGISTRY_URL",
}


def servers(settings: Settings) -> list[Server]:
    stack = [
        Server("kafka", (KAFKA_PORT, KAFKA_CONTROLLER_PORT),
               lambda: health_kafka(settings.kafka_bootstrap, settings.kafka_security),
               provision_kafka, _kafka_command,
               prepare=_kafka_prepare, health_timeout_s=KAFKA_HEALTH_TIMEOUT_S,
               stop_timeout_s=KAFKA_STOP_TIMEOUT_S),
        # SIGINT is PostgreSQL's "fast" shutdown: it disconnects clients and checkpoints. SIGTERM
        # ("smart") waits for every client to leave, so one lingering connection meant a SIGKILL.
        Server("postgres", (PG_PORT_DEFAULT,), lambda: health_postgres(settings.pg_dsn),
               provision_postgres, _pg_command, prepare=_pg_prepare,
               user="postgres" if os.geteuid() == 0 else None, stop_signal=signal.SIGINT),
        Server("immudb", (IMMUDB_PORT,), lambda: health_immudb(settings), provision_immudb,
               _immudb_command),
        Server("anvil", (ANVIL_PORT,), lambda: health_anvil(settings.chain_rpc), provision_anvil,
               _anvil_command),
    ]
    if settings.schema_registry_url:  # SARDIS_SCHEMA_REGISTRY_URL='' runs without a registry
        stack.append(Server("schema-registry", (REGISTRY_PORT,), lambda: health_registry(settings),
                            provision_registry, _registry_command, prepare=_registry_prepare,
                            env=_registry_env()))
    return stack


def external(server: Server) -> bool:
    """A server is external when its SARDIS_* variable is set: then the harness starts nothing."""
    return SERVER_ENV[server.name] in os.environ


def _wait_healthy(server: Server) -> None:
    """Wait for one server, with a limit of its own counted from now (not shared with the others).

    The first check always runs, so a server that is already healthy never fails on time.
    """
    started = time.monotonic()
    next_progress = started + HEALTH_PROGRESS_S
    last_error: Exception | None = None
    while True:
        if not external(server) and server.pid() is None:
            raise server.failure("the process exited")
        try:
            server.health()
            return
        except InfraError as exc:
            last_error = exc
        now = time.monotonic()
        if now - started >= server.health_timeout_s:
            raise server.failure(f"not healthy after {server.health_timeout_s:.0f}s "
                                 f"(last check: {last_error})")
        if now >= next_progress:
            _say(f"{server.name}: not healthy yet after {now - started:.0f}s of "
                 f"{server.health_timeout_s:.0f}s (last check: {last_error}); log: {server.log_file}")
            next_progress = now + HEALTH_PROGRESS_S
        time.sleep(0.3)


def up(settings: Settings | None = None) -> list[str]:
    """Provision what is missing, start what is not running, wait until all are healthy.

    Returns the names of the servers this call started (so a caller can stop exactly those).
    """
    settings = settings or Settings.from_env()
    stack = servers(settings)
    started: list[str] = []
    for server in stack:
        if external(server):
            continue
        server.provision()
    for server in stack:
        if external(server) or server.pid() is not None:
            continue
        busy = [p for p in server.ports if _port_open("127.0.0.1", p)]
        if busy:
            raise server.failure(f"port(s) {busy} on 127.0.0.1 are taken by another process")
        _say(f"starting {server.name}")
        server.start()
        started.append(server.name)
    for server in stack:
        _wait_healthy(server)
        _say(f"{server.name}: healthy{' (external)' if external(server) else ''}")
    return started


def down(names: Iterable[str] | None = None) -> list[str]:
    """Stop the servers this harness started (all of them, or only `names`)."""
    wanted = set(names) if names is not None else None
    stopped = []
    for server in servers(Settings()):
        if wanted is not None and server.name not in wanted:
            continue
        if server.stop():
            stopped.append(server.name)
    return stopped


def status() -> dict[str, str]:
    settings = Settings.from_env()
    result: dict[str, str] = {}
    for server in servers(settings):
        if external(server):
            state = "external"
        elif server.pid() is None:
            result[server.name] = "stopped"
            continue
        else:
            state = f"running (pid {server.pid()})"
        try:
            server.health()
            result[server.name] = f"{state}, healthy"
        except InfraError as exc:
            result[server.name] = f"{state}, unhealthy: {exc}"
    return result


def connection_settings(settings: Settings | None = None) -> str:
    settings = settings or Settings.from_env()
    env = settings.as_env()
    # Secrets are never printed: the password variables are left out, the DSN loses its password.
    for name in SECRET_ENV_NAMES:
        env.pop(name, None)
        env.pop(f"{name}_FILE", None)
    env["SARDIS_PG_DSN"] = redact_url(settings.pg_dsn).replace(":***@", "@", 1)
    lines = [f"export {name}={value}" for name, value in env.items()]
    lines.append(f"# logs and data: {run_dir()}   immudb password: SARDIS_IMMUDB_PASSWORD")
    return "\n".join(lines)


__all__ = ["IMMUDB_ADDR_DEFAULT", "down", "status", "up"]
