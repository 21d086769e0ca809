"""`dev up --secure`: Kafka (SASL_SSL + mTLS, ACLs), PostgreSQL (SCRAM, TLS only, roles) and immudb
(TLS, changed admin password, a sink user) on their own loopback ports and run directory."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra import harness
from sardis_ledger.streams.acl import DEFAULT_PRINCIPALS, Role
from sardis_ledger.streams.errors import InfraError
from sardis_ledger.streams.kafka_security import KafkaSecurity, Protocol

KAFKA_SASL_PORT = 29092  # SASL_SSL, SCRAM-SHA-512: every ledger process
KAFKA_CONTROLLER_PORT = 29093  # SSL, client certificate required (the node itself)
KAFKA_MTLS_PORT = 29094  # SSL, client certificate required: admin, and mTLS clients
PG_PORT = 25432
IMMUDB_PORT = 23322
KAFKA_HEAP_MB = 512
HOST = "127.0.0.1"
CERT_DAYS = 825
CA_DAYS = 3650
NODE_CN = "sardis-kafka-node"
ADMIN_CN = "sardis-admin"  # Kafka super user over mTLS: creates topics and ACLs
CLIENT_CN = DEFAULT_PRINCIPALS[Role.CLIENT].removeprefix("User:")  # mTLS maps CN -> principal
# The admin has a SCRAM password too, for tools that speak SASL_SSL only (e.g. `bench` against
# this stack); it is a super user, so it never runs the ledger's processes.
KAFKA_USERS = (*(p.removeprefix("User:") for p in DEFAULT_PRINCIPALS.values()), ADMIN_CN)
PG_SUPERUSER = "sardis_admin"
PG_OWNER, PG_SINK, PG_READER = "ledger_owner", "ledger_sink", "ledger_reader"
PG_DATABASE = "sardis"
PG_SCHEMA = "ledger"
PG_ROLE_CONNECTIONS_MAX = 50
PG_SCRAM_ITERATIONS = 4096
IMMUDB_ADMIN = "immudb"
IMMUDB_SINK_USER = "sardis_sink"
IMMUDB_DATABASE = "ledgerdb"
IMMUDB_RW = 2  # immudb's PERMISSION_RW
HEALTH_TOPIC = "__sardis_health"
OPENSSL_TIMEOUT_S = 30.0
SECRET_BYTES = 18
SCRAM_LOGIN_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def secure_dir() -> Path:
    """The secured stack's own data, keys, passwords, logs and pid files (never the plain one's)."""
    return Path(os.environ.get("SARDIS_SECURE_RUN_DIR", harness.cache_dir() / "run-secure"))


def pki_dir() -> Path:
    return secure_dir() / "pki"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


# ---------------------------------------------------------------- secrets and PKI

def secret(name: str) -> Path:
    """The file holding one generated password (0600), created on first use."""
    path = _private_dir(secure_dir() / "secrets") / f"{name}.pw"
    if not path.exists():
        # Upper, lower, digit and symbol: immudb refuses passwords without all four.
        value = f"Sx7!{secrets.token_hex(SECRET_BYTES)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(value)
    return path


def _read_secret(name: str) -> str:
    return secret(name).read_text().strip()


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True,
                          timeout=OPENSSL_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise InfraError(f"openssl {args[0]} failed: {proc.stderr.strip()[-500:]}")


def _issue(out: Path, name: str, cn: str, ca: str, usage: str, san: str = "") -> None:
    extensions = out / f"{name}.ext"
    extensions.write_text("basicConstraints=critical,CA:FALSE\n"
                          "keyUsage=critical,digitalSignature,keyEncipherment\n"
                          f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else ""))
    _openssl("req", "-new", *EC, "-keyout", str(out / f"{name}.key"), "-out",
             str(out / f"{name}.csr"), "-subj", f"/CN={cn}")
    _openssl("x509", "-req", "-in", str(out / f"{name}.csr"), "-CA", str(out / f"{ca}.crt"),
             "-CAkey", str(out / f"{ca}.key"), "-CAcreateserial", "-out", str(out / f"{name}.crt"),
             "-days", str(CERT_DAYS), "-sha256", "-extfile", str(extensions))
    (out / f"{name}.csr").unlink()
    extensions.unlink()


def make_pki() -> Path:
    """A throwaway CA and certificates (EC P-256): the servers' (localhost, 127.0.0.1, ::1), the
    Kafka admin's and the mTLS client's; plus a rogue CA and a client certificate it signed, for
    the refusal tests. Made once; keys 0600 in a 0700 directory."""
    out = pki_dir()
    if (out / "ready").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    _private_dir(out)
    old_umask = os.umask(0o077)
    try:
        for ca in ("ca", "rogue-ca"):
            _openssl("req", "-x509", "-new", *EC, "-keyout", str(out / f"{ca}.key"), "-out",
                     str(out / f"{ca}.crt"), "-days", str(CA_DAYS), "-subj", f"/CN=sardis-dev-{ca}",
                     "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        _issue(out, "server", NODE_CN, "ca", "serverAuth,clientAuth",
               "DNS:localhost,IP:127.0.0.1,IP:::1")
        _issue(out, "admin", ADMIN_CN, "ca", "clientAuth")
        _issue(out, "client", CLIENT_CN, "ca", "clientAuth")
        _issue(out, "rogue-client", ADMIN_CN, "rogue-ca", "clientAuth")  # claims to be the admin
        # Kafka's PEM keystore: the private key and the chain in one file.
        (out / "kafka-node.pem").write_text("".join(
            (out / f).read_text() for f in ("server.key", "server.crt", "ca.crt")))
    finally:
        os.umask(old_umask)
    for cert in out.glob("*.crt"):
        cert.chmod(0o644)
    (out / "ready").touch()
    return out


# ---------------------------------------------------------------- identities (env per role)

@dataclass(frozen=True, slots=True)
class Endpoints:
    kafka_sasl: str = f"{HOST}:{KAFKA_SASL_PORT}"
    kafka_mtls: str = f"{HOST}:{KAFKA_MTLS_PORT}"
    pg_port: int = PG_PORT
    immudb: str = f"{HOST}:{IMMUDB_PORT}"


ENDPOINTS = Endpoints()


def admin_kafka() -> KafkaSecurity:
    """The Kafka super user: mTLS with the admin certificate (topics, ACLs, health checks)."""
    pki = pki_dir()
    return KafkaSecurity(protocol=Protocol.SSL, ca_file=str(pki / "ca.crt"),
                         cert_file=str(pki / "admin.crt"), key_file=str(pki / "admin.key"))


def pg_dsn(role: str, database: str = PG_DATABASE) -> str:
    """A verify-full DSN without password (it comes from SARDIS_PG_PASSWORD_FILE)."""
    return (f"postgresql://{role}@{HOST}:{PG_PORT}/{database}?sslmode=verify-full"
            f"&sslrootcert={pki_dir() / 'ca.crt'}")


def role_env(role: Role | str) -> dict[str, str]:
    """SARDIS_* variables for one process of the secured stack: its Kafka user (SCRAM), its
    PostgreSQL role, immudb over TLS; every password as a *_FILE path. `admin` is the Kafka
    super user (mTLS) with the database owner, for provisioning."""
    ca = str(pki_dir() / "ca.crt")
    env = {
        "SARDIS_KAFKA_BOOTSTRAP": ENDPOINTS.kafka_sasl, "SARDIS_KAFKA_CA_FILE": ca,
        "SARDIS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SARDIS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "SARDIS_IMMUDB_ADDR": ENDPOINTS.immudb, "SARDIS_IMMUDB_CA_FILE": ca,
        "SARDIS_IMMUDB_USER": IMMUDB_SINK_USER, "SARDIS_IMMUDB_DATABASE": IMMUDB_DATABASE,
        "SARDIS_IMMUDB_PASSWORD_FILE": str(secret(f"immudb-{IMMUDB_SINK_USER}")),
        "SARDIS_SCHEMA_REGISTRY_URL": "", "SARDIS_WIRE_FORMAT": "single-object",
    }
    pg_role = {Role.SINK.value: PG_SINK, "admin": PG_OWNER}.get(str(role), PG_READER)
    env.update(SARDIS_PG_DSN=pg_dsn(pg_role), SARDIS_PG_PASSWORD_FILE=str(secret(f"pg-{pg_role}")))
    if str(role) == "admin":
        admin = admin_kafka()
        env.update(SARDIS_KAFKA_BOOTSTRAP=ENDPOINTS.kafka_mtls, SARDIS_KAFKA_SECURITY_PROTOCOL="SSL",
                   SARDIS_KAFKA_CERT_FILE=admin.cert_file, SARDIS_KAFKA_KEY_FILE=admin.key_file)
        return env
    user = DEFAULT_PRINCIPALS[Role(role)].removeprefix("User:")
    env.update(SARDIS_KAFKA_USER=user, SARDIS_KAFKA_PASSWORD_FILE=str(secret(f"kafka-{user}")))
    return env


def exports() -> str:
    lines = [f"# secured dev stack: {secure_dir()} (passwords only as *_FILE paths)"]
    for role in (*(r.value for r in Role), "admin"):
        lines.append(f"# as {role}:")
        lines.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in role_env(role).items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- servers

class SecureServer(harness.Server):
    """A harness Server whose pid and log files live in the secured stack's directory."""

    @property
    def pid_file(self) -> Path:
        return secure_dir() / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return secure_dir() / f"{self.name}.log"


def _kafka_properties() -> Path:
    pki, data = pki_dir(), secure_dir() / "kafka" / "data"
    text = f"""# sardis-ledger secured dev broker (infra/secure_stack.py); loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers={HOST}:{KAFKA_CONTROLLER_PORT}
listeners=SASL://{HOST}:{KAFKA_SASL_PORT},CONTROLLER://{HOST}:{KAFKA_CONTROLLER_PORT},MTLS://{HOST}:{KAFKA_MTLS_PORT}
advertised.listeners=SASL://{HOST}:{KAFKA_SASL_PORT},MTLS://{HOST}:{KAFKA_MTLS_PORT}
listener.security.protocol.map=SASL:SASL_SSL,CONTROLLER:SSL,MTLS:SSL
controller.listener.names=CONTROLLER
inter.broker.listener.name=MTLS
log.dirs={data}
ssl.keystore.type=PEM
ssl.keystore.location={pki / 'kafka-node.pem'}
ssl.truststore.type=PEM
ssl.truststore.location={pki / 'ca.crt'}
ssl.endpoint.identification.algorithm=https
ssl.enabled.protocols=TLSv1.3,TLSv1.2
listener.name.controller.ssl.client.auth=required
listener.name.mtls.ssl.client.auth=required
ssl.principal.mapping.rules=RULE:^CN=([^,]+)$/$1/,DEFAULT
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl.scram-sha-512.sasl.jaas.config={SCRAM_LOGIN_MODULE} required;
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:{NODE_CN};User:{ADMIN_CN}
allow.everyone.if.no.acl.found=false
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=12
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=12
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
"""
    path = _private_dir(secure_dir() / "kafka") / "server.properties"
    path.write_text(text)
    return path


def _kafka_prepare() -> None:
    props = _kafka_properties()
    data = secure_dir() / "kafka" / "data"
    if (data / "meta.properties").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    scram = [arg for user in KAFKA_USERS for arg in (
        "--add-scram", f"SCRAM-SHA-512=[name={user},password={_read_secret(f'kafka-{user}')}]")]
    # StorageTool takes SCRAM credentials only as arguments, so this command line is not logged
    # (harness._run would write it to the log); it lives for the few seconds of the format.
    with (secure_dir() / "kafka.log").open("ab") as log:
        proc = subprocess.run([harness._java(), "-cp", f"{harness._kafka_home() / 'libs'}/*",
                               "kafka.tools.StorageTool", "format", "--standalone", "-t",
                               harness._kafka_cluster_id(), "-c", str(props), *scram],
                              stdout=log, stderr=subprocess.STDOUT, check=False,
                              timeout=harness.PROVISION_TIMEOUT_S)
    if proc.returncode != 0:
        raise InfraError(f"secure kafka: formatting storage failed; see {secure_dir() / 'kafka.log'}")


def _kafka_command() -> list[str]:
    return [harness._java(), f"-Xms{KAFKA_HEAP_MB // 2}m", f"-Xmx{KAFKA_HEAP_MB}m", "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={harness.INFRA_DIR / 'kafka' / 'log4j2.properties'}",
            "-cp", f"{harness._kafka_home() / 'libs'}/*", "kafka.Kafka",
            str(secure_dir() / "kafka" / "server.properties")]


def _kafka_health() -> None:
    if not harness._port_open(HOST, KAFKA_MTLS_PORT):
        raise InfraError("secure kafka: nothing listens yet", retriable=True)
    asyncio.run(_ensure_health_topic())
    harness.health_kafka(ENDPOINTS.kafka_mtls, admin_kafka())


async def _ensure_health_topic() -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=ENDPOINTS.kafka_mtls,
                                **admin_kafka().aiokafka_kwargs(), request_timeout_ms=10_000)
    try:
        await admin.start()
        if HEALTH_TOPIC not in await admin.list_topics():
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(HEALTH_TOPIC, 1, 1)])
    except KafkaError as exc:
        raise InfraError(f"secure kafka: {exc!r}", retriable=True) from exc
    finally:
        await admin.close()


def _pg_data() -> Path:
    # As root PostgreSQL runs as `postgres`, which cannot enter /root (see harness._pg_data).
    if os.geteuid() == 0:
        return Path(os.environ.get("SARDIS_SECURE_PG_DATA", "/var/lib/sardis-ledger/pg-secure"))
    return secure_dir() / "pg"


def _as_postgres(path: Path, mode: int) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")
    path.chmod(mode)


def _pg_prepare() -> None:
    data = _pg_data()
    if (data / "PG_VERSION").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    _as_postgres(data, 0o700)
    # initdb reads the superuser's password from a file only the server's user can read.
    holder = Path(tempfile.mkdtemp(prefix="sardis-pg-"))
    try:
        _as_postgres(holder, 0o700)
        pwfile = holder / "pw"
        shutil.copyfile(secret(f"pg-{PG_SUPERUSER}"), pwfile)
        _as_postgres(pwfile, 0o600)
        cmd = [str(harness._pg_bin() / "initdb"), "-D", str(data), "-U", PG_SUPERUSER,
               "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-instructions"]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        harness._run(cmd, what="secure postgres: initdb", log=secure_dir() / "postgres.log")
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    for name in ("server.crt", "server.key"):
        shutil.copyfile(pki_dir() / name, data / name)
        _as_postgres(data / name, 0o600)
    # TLS only, SCRAM only; a connection without TLS is refused whoever it is.
    (data / "pg_hba.conf").write_text(
        "local      all  all                scram-sha-256\n"
        "hostssl    all  all  127.0.0.1/32  scram-sha-256\n"
        "hostssl    all  all  ::1/128       scram-sha-256\n"
        "hostnossl  all  all  0.0.0.0/0     reject\n"
        "hostnossl  all  all  ::/0          reject\n")
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(f"\n# sardis-ledger secured dev stack\nlisten_addresses = '{HOST}'\n"
                   "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                   "ssl_min_protocol_version = 'TLSv1.2'\npassword_encryption = scram-sha-256\n"
                   "max_connections = 100\nshared_buffers = 128MB\n")


def _pg_command() -> list[str]:
    return [str(harness._pg_bin() / "postgres"), "-D", str(_pg_data()), "-p", str(PG_PORT),
            "-k", str(_pg_data())]


async def _pg_connect(role: str, database: str = PG_DATABASE) -> Any:
    import asyncpg

    name = PG_SUPERUSER if role == PG_SUPERUSER else role
    return await asyncpg.connect(pg_dsn(role, database), password=_read_secret(f"pg-{name}"),
                                 timeout=5)


def _pg_health() -> None:
    import asyncpg

    async def check() -> None:
        conn: asyncpg.Connection = await _pg_connect(PG_SUPERUSER, "postgres")
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    try:
        asyncio.run(check())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise InfraError(f"secure postgres: {exc!r}", retriable=True) from exc


def scram_verifier(password: str, salt: bytes | None = None,
                   iterations: int = PG_SCRAM_ITERATIONS) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of `password`, computed here (RFC 5802/7677) so the
    password itself never reaches the server, its logs or pg_stat_activity."""
    salt = salt or os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return (f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}$"
            f"{b64(hashlib.sha256(client_key).digest()).decode()}:{b64(server_key).decode()}")


async def _pg_provision() -> None:
    """Roles, database and grants (as the superuser), then migrations and grants (as the owner)."""
    from sardis_ledger.sinks.schema import grant, migrate

    su = await _pg_connect(PG_SUPERUSER, "postgres")
    try:
        for role in (PG_OWNER, PG_SINK, PG_READER):
            if not await su.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await su.execute(
                    f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                    f"NOBYPASSRLS CONNECTION LIMIT {PG_ROLE_CONNECTIONS_MAX} "
                    f"PASSWORD '{scram_verifier(_read_secret(f'pg-{role}'))}'")
        if not await su.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", PG_DATABASE):
            await su.execute(f"CREATE DATABASE {PG_DATABASE} OWNER {PG_OWNER}")
        await su.execute(
            f"REVOKE ALL ON DATABASE {PG_DATABASE} FROM PUBLIC; "
            f"GRANT CONNECT ON DATABASE {PG_DATABASE} TO {PG_SINK}, {PG_READER}; "
            f"GRANT TEMPORARY ON DATABASE {PG_DATABASE} TO {PG_SINK}; "
            f"ALTER ROLE {PG_READER} SET default_transaction_read_only = on")
    finally:
        await su.close()
    su = await _pg_connect(PG_SUPERUSER)
    try:
        await su.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
    finally:
        await su.close()
    owner = await _pg_connect(PG_OWNER)
    try:
        await migrate(owner, PG_SCHEMA)
        await grant(owner, PG_SCHEMA, sink_role=PG_SINK, reader_role=PG_READER)
    finally:
        await owner.close()


def immudb_client(user: str, password_name: str, database: str = "defaultdb") -> Any:
    """An immudb-py client over TLS (trusting the stack's CA), logged in."""
    from immudb import ImmudbClient

    from sardis_ledger.sinks.immudb_compat import use_tls

    client = ImmudbClient(ENDPOINTS.immudb, timeout=5)
    use_tls(client, ENDPOINTS.immudb, str(pki_dir() / "ca.crt"))
    client.login(user, _read_secret(password_name), database=database.encode())
    return client


def _immudb_command() -> list[str]:
    data = secure_dir() / "immudb"
    return [str(harness._immudb_binary()), "--dir", str(data / "data"), "--address", HOST,
            "--port", str(IMMUDB_PORT), "--pgsql-server=false", "--web-server=false",
            "--metrics-server=false", "--logdir", str(data / "log"),
            "--certificate", str(pki_dir() / "server.crt"), "--pkey", str(pki_dir() / "server.key")]


def _immudb_health() -> None:
    if not harness._port_open(HOST, IMMUDB_PORT):
        raise InfraError("secure immudb: nothing listens yet", retriable=True)
    try:
        client = immudb_client(IMMUDB_ADMIN, f"immudb-{IMMUDB_ADMIN}")
        client.logout()
    except Exception as exc:  # grpc raises many unrelated types; translate them all
        raise InfraError(f"secure immudb: {exc!r}", retriable=True) from exc


def _immudb_provision() -> None:
    from immudb.datatypesv2 import DatabaseSettingsV2

    admin = immudb_client(IMMUDB_ADMIN, f"immudb-{IMMUDB_ADMIN}")
    try:
        admin.createDatabaseV2(IMMUDB_DATABASE, DatabaseSettingsV2(), ifNotExists=True)
        users = [u.user for u in admin.listUsers().userlist.users]
        if IMMUDB_SINK_USER.encode() not in users:
            admin.createUser(IMMUDB_SINK_USER, _read_secret(f"immudb-{IMMUDB_SINK_USER}"),
                             IMMUDB_RW, IMMUDB_DATABASE)
    finally:
        admin.logout()


def servers() -> list[SecureServer]:
    return [
        SecureServer("kafka", (KAFKA_SASL_PORT, KAFKA_CONTROLLER_PORT, KAFKA_MTLS_PORT),
                     _kafka_health, harness.provision_kafka, _kafka_command, prepare=_kafka_prepare,
                     health_timeout_s=harness.KAFKA_HEALTH_TIMEOUT_S,
                     stop_timeout_s=harness.KAFKA_STOP_TIMEOUT_S),
        SecureServer("postgres", (PG_PORT,), _pg_health, harness.provision_postgres, _pg_command,
                     prepare=_pg_prepare, user="postgres" if os.geteuid() == 0 else None,
                     stop_signal=signal.SIGINT),
        # immudb takes the first-start admin password from its environment, not from argv.
        SecureServer("immudb", (IMMUDB_PORT,), _immudb_health, harness.provision_immudb,
                     _immudb_command,
                     env={"IMMUDB_ADMIN_PASSWORD": _read_secret(f"immudb-{IMMUDB_ADMIN}")}),
    ]


def _wait(server: SecureServer) -> None:
    """Wait for one server with a limit of its own, failing at once if its process exits."""
    import time

    started = time.monotonic()
    while True:
        if server.pid() is None:
            raise server.failure("the process exited")
        try:
            server.health()
            return
        except InfraError as exc:
            if time.monotonic() - started >= server.health_timeout_s:
                raise server.failure(f"not healthy after {server.health_timeout_s:.0f}s ({exc})") \
                    from exc
        time.sleep(0.3)


def up() -> list[str]:
    """Provision, start and health-check the secured stack, then its users, roles and ACLs
    (idempotent). Returns the names of the servers this call started."""
    from sardis_ledger.streams import acl
    from sardis_ledger.streams.config import Settings
    from sardis_ledger.streams.kafka_acls import apply

    _private_dir(secure_dir())
    make_pki()
    stack = servers()
    for server in stack:
        server.provision()
    started = []
    for server in stack:
        if server.pid() is not None:
            continue
        busy = [p for p in server.ports if harness._port_open(HOST, p)]
        if busy:
            raise server.failure(f"port(s) {busy} on {HOST} are taken by another process")
        harness._say(f"starting secure {server.name}")
        server.start()
        started.append(server.name)
    for server in stack:
        _wait(server)
        harness._say(f"secure {server.name}: healthy")
    asyncio.run(_pg_provision())
    _immudb_provision()
    # The unprefixed deployment's ACLs; tests apply their own prefix's (acl apply --prefix).
    asyncio.run(apply(Settings.from_env(role_env("admin")), acl.plan(""), ""))
    return started


def down(names: list[str] | None = None) -> list[str]:
    """Stop the secured stack's servers (all, or only `names`)."""
    return [server.name for server in servers()
            if (names is None or server.name in names) and server.stop()]


def status() -> dict[str, str]:
    result = {}
    for server in servers():
        pid = server.pid()
        if pid is None:
            result[server.name] = "stopped"
            continue
        try:
            server.health()
            result[server.name] = f"running (pid {pid}), healthy"
        except InfraError as exc:
            result[server.name] = f"running (pid {pid}), unhealthy: {exc}"
    return result


def log_files() -> list[Path]:
    """Every log the secured stack writes (the no-secrets test reads them all)."""
    logs = [server.log_file for server in servers()]
    logs += sorted((secure_dir() / "immudb" / "log").glob("*"))
    logs += sorted((_pg_data() / "log").glob("*")) if (_pg_data() / "log").is_dir() else []
    return [p for p in logs if p.is_file()]


__all__ = ["down", "exports", "role_env", "status", "up"]
