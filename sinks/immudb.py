"""immudb sink: each entry's canonical bytes under `entry:{entry_id}`, verified, with receipts.

Writes are batched (one immudb transaction per batch) with a KeyMustNotExist precondition per
key, so an entry is stored at most once even across crashes and concurrent sinks; every write
and read is checked with immudb's inclusion proof (the entry is in its transaction) and dual
proof (the transaction extends the trusted state). The trusted state is persisted in a file, so
a server that rolls back or forks is caught after restarts too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.sinks import kafka
from sardis_ledger.sinks.errors import SinkError, SinkUnavailable, VerificationError
from sardis_ledger.sinks.immudb_compat import use_tls
from sardis_ledger.sinks.intake import SinkReject, intake
from sardis_ledger.sinks.kafka import ALL_PARTITIONS, Shard
from sardis_ledger.streams import canonical, metrics, records
from sardis_ledger.streams.config import Settings, host_port
from sardis_ledger.streams.core import EPOCH, ONE_MS, murmur2
from sardis_ledger.streams.money import Currency, currency_table
from sardis_ledger.streams.produce import send_batches
from sardis_ledger.streams.topics import LedgerTopic
from sardis_ledger.streams.wire import Wire

WRITE_BATCH_MAX = 1000  # immudb's default limit is 1024 entries per transaction
# Records per Kafka transaction (receipts + offsets): several verified immudb transactions of
# WRITE_BATCH_MAX each, so the Kafka commit's round trips are paid once per 5000 entries.
KAFKA_BATCH_RECORDS_MAX = 5000
# Room for one Kafka transaction's receipts of a partition in one record batch (~110 bytes each).
RECEIPT_BATCH_MAX_BYTES = 1024 * 1024
GRPC_TIMEOUT_S = 30
POLL_TIMEOUT_MS = 100
RETRY_BACKOFF_INITIAL_S = 0.5
RETRY_BACKOFF_MAX_S = 10.0
KAFKA_RETRIES_MAX = 5
REPORT_EVERY_S = 10.0
STATE_DIR_ENV = "SARDIS_STATE_DIR"
STATE_FILE_VERSION = 1
KEY_TEMPLATE = "{prefix}entry:{entry_id}"
DIGEST_BYTES = 32  # SHA-256
READY_MESSAGE = "sink immudb: ready"
REQUEST_TIMEOUT_MS = 30_000
TRANSACTION_TIMEOUT_MS = 60_000

log = logging.getLogger("sardis.sinks.immudb")
STATE_DIR_MODE = 0o700
STATE_FILE_MODE = 0o600


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where trusted immudb states live: SARDIS_STATE_DIR or ~/.local/state/sardis-ledger."""
    env = os.environ if env is None else env
    configured = env.get(STATE_DIR_ENV)
    if configured:
        return Path(configured)
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sardis-ledger"


def entry_key(settings: Settings, entry_id: str) -> bytes:
    """The immudb key of an entry; the topic prefix keeps deployments sharing a database apart."""
    return KEY_TEMPLATE.format(prefix=settings.topic_prefix, entry_id=entry_id).encode()


# ------------------------------------------------------------------ trusted state


@dataclass(frozen=True, slots=True)
class TrustedState:
    """The last immudb state this client verified: transaction id and its accumulated hash."""

    db: str
    tx_id: int
    tx_hash: bytes


class StateFile:
    """A trusted state on disk, written atomically and never moved backwards.

    Several processes (sinks, `verify`, `receipt`) may share one file: each write happens under
    an exclusive lock and keeps whichever state is newer, so the file only moves forward.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> TrustedState | None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SinkError(f"trusted immudb state {self.path} is unreadable: {exc}") from exc
        if raw.get("version") != STATE_FILE_VERSION:
            raise SinkError(f"trusted immudb state {self.path} has version {raw.get('version')}")
        return TrustedState(raw["db"], int(raw["tx_id"]), bytes.fromhex(raw["tx_hash"]))

    def save(self, state: TrustedState) -> None:
        # Owner-only: whoever can rewrite the trusted state can make a rolled-back immudb pass.
        self.path.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        lock_fd = os.open(self.path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                          STATE_FILE_MODE)
        with os.fdopen(lock_fd, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.load()
            if current is not None and current.tx_id >= state.tx_id:
                return
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, STATE_FILE_MODE)
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps({"version": STATE_FILE_VERSION, "db": state.db,
                                      "tx_id": state.tx_id, "tx_hash": state.tx_hash.hex()}))
            os.replace(tmp, self.path)


def _root_service(state_file: StateFile) -> Any:
    """An immudb-py RootService backed by our StateFile (trust on first use, then proofs)."""
    from google.protobuf import empty_pb2
    from immudb.rootService import RootService, State

    class _Root(RootService):
        def __init__(self) -> None:
            self.state: Any = None

        def init(self, dbname: str, service: Any) -> None:
            saved = state_file.load()
            if saved is not None:
                self.state = State(db=saved.db, txId=saved.tx_id, txHash=saved.tx_hash,
                                   publicKey=b"", signature=b"")
            else:
                self.state = State.FromGrpc(service.CurrentState(empty_pb2.Empty()))
                log.info("trusting immudb state at tx %d (first use of %s)", self.state.txId,
                         state_file.path)
                self.set(self.state)

        def get(self) -> Any:
            return self.state

        def set(self, root: Any) -> None:
            self.state = root
            state_file.save(TrustedState(str(root.db), int(root.txId), bytes(root.txHash)))

    return _Root()


# ------------------------------------------------------------------ the immudb store (sync)


@dataclass(frozen=True, slots=True)
class Stored:
    """Where an entry is in immudb, and whether its proofs checked."""

    tx_id: int
    verified: bool


def _grpc_code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        with contextlib.suppress(Exception):
            return str(code().name)
    return ""


RETRIABLE_GRPC_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED",
                        "ABORTED", "CANCELLED", "UNKNOWN", "INTERNAL"}


def translate(exc: Exception, what: str) -> SinkError:
    """A grpc / immudb-py error as a SinkError (SinkUnavailable when a retry can help)."""
    from immudb import exceptions as immudb_exceptions

    if isinstance(exc, SinkError):
        return exc
    if isinstance(exc, immudb_exceptions.ErrCorruptedData):
        return VerificationError(f"{what}: immudb's proof did not check ({type(exc).__name__})")
    code = _grpc_code(exc)
    if code in RETRIABLE_GRPC_CODES or isinstance(exc, (OSError, ConnectionError)):
        return SinkUnavailable(f"{what}: immudb unavailable ({code or type(exc).__name__})")
    details = getattr(exc, "details", None)
    message = details() if callable(details) else str(exc)
    return SinkError(f"{what}: immudb error {code or type(exc).__name__}: {message}")


class ImmudbStore:
    """Verified batch writes and reads of entries in immudb (blocking; run it in a thread)."""

    def __init__(self, settings: Settings, directory: Path | None = None) -> None:
        self.settings = settings
        host, port = host_port(settings.immudb_addr)
        self.address = f"{host}:{port}"
        directory = directory or state_dir()
        self.state_file = StateFile(directory / f"immudb-{host}_{port}-{settings.immudb_database}.json")
        self.client: Any = None

    def open(self) -> None:
        from immudb import ImmudbClient

        self.close()
        try:
            # immudb-py prints a warning to stdout for unreadable state files; ours never are.
            with contextlib.redirect_stdout(io.StringIO()):
                client = ImmudbClient(self.address, rs=_root_service(self.state_file),
                                      timeout=GRPC_TIMEOUT_S)
                if self.settings.immudb_ca_file:
                    use_tls(client, self.address, self.settings.immudb_ca_file)
                client.login(self.settings.immudb_user, self.settings.immudb_password,
                             database=self.settings.immudb_database.encode())
        except Exception as exc:
            raise translate(exc, f"connecting to immudb at {self.address}") from exc
        self.client = client

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.shutdown()
            self.client = None

    @property
    def trusted(self) -> TrustedState:
        state = self.client._rs.get()
        return TrustedState(str(state.db), int(state.txId), bytes(state.txHash))

    # -------------------------------------------------------------- writes

    def write(self, items: Mapping[bytes, bytes]) -> dict[bytes, Stored]:
        """Store every key once: new keys in one verified transaction, existing ones checked.

        An existing key must hold exactly the same value (else VerificationError); its receipt
        names the transaction that stored it first, found by a verified read.
        """
        if self.client is None:
            self.open()
        result: dict[bytes, Stored] = {}
        keys = list(items)
        for start in range(0, len(keys), WRITE_BATCH_MAX):
            chunk = {key: items[key] for key in keys[start:start + WRITE_BATCH_MAX]}
            result.update(self._write_chunk(chunk))
        return result

    def _write_chunk(self, items: Mapping[bytes, bytes]) -> dict[bytes, Stored]:
        """write() for at most WRITE_BATCH_MAX items: one immudb transaction for the new ones."""
        result: dict[bytes, Stored] = {}
        pending = dict(items)
        while pending:
            try:
                tx_id = self._verified_set_all(pending)
            except Exception as exc:
                if _grpc_code(exc) != "FAILED_PRECONDITION":
                    raise translate(exc, "writing entries") from exc
                # Some keys exist already (a restart after a write whose receipt was not yet
                # published, or a concurrent sink): find them, check them, write the rest.
                existing = self._get_all(list(pending))
                for key, value in existing.items():
                    if value != pending[key]:
                        raise VerificationError(f"immudb holds a different value under "
                                                f"{key.decode()}", entry_id=key.decode()) from exc
                    result[key] = self.read_verified(key)[1]
                    del pending[key]
                continue
            for key in pending:
                result[key] = Stored(tx_id, True)
            pending = {}
        return result

    def _get_all(self, keys: list[bytes]) -> dict[bytes, bytes]:
        try:
            return dict(self.client.getAll(keys))
        except Exception as exc:
            raise translate(exc, "reading existing entries") from exc

    def _verified_set_all(self, items: Mapping[bytes, bytes]) -> int:
        """VerifiableSet of all items in one transaction; checks every inclusion and the dual proof."""
        from immudb import schema as immudb_schema
        from immudb.embedded import store
        from immudb.grpc import schema_pb2
        from immudb.rootService import State

        state = self.client._rs.get()
        kvs = [schema_pb2.KeyValue(key=key, value=value) for key, value in items.items()]
        preconditions = [schema_pb2.Precondition(
            keyMustNotExist=schema_pb2.Precondition.KeyMustNotExistPrecondition(key=key))
            for key in items]
        vtx = self.client._stub.VerifiableSet(schema_pb2.VerifiableSetRequest(
            setRequest=schema_pb2.SetRequest(KVs=kvs, preconditions=preconditions),
            proveSinceTx=state.txId))
        if vtx.tx.header.nentries != len(kvs) or len(vtx.tx.entries) != len(kvs):
            raise VerificationError(f"immudb transaction {vtx.tx.header.id} has "
                                    f"{vtx.tx.header.nentries} entries, {len(kvs)} were written")
        header = immudb_schema.TxHeaderFromProto(vtx.tx.header)
        if header.iD <= state.txId:
            raise VerificationError(f"immudb returned transaction {header.iD}, not after the "
                                    f"trusted {state.txId}: the server rolled back or forked")
        if header.eh != immudb_schema.DigestFromProto(vtx.dualProof.targetTxHeader.eH):
            raise VerificationError(f"immudb transaction {header.iD}: entries hash differs "
                                    "from the proven header")
        if self._entries_root(header.version, vtx.tx.entries, items) != header.eh:
            # Name the entry that differs: one inclusion proof per entry, as verify does.
            self._check_entries(immudb_schema.TxFromProto(vtx.tx), items)
            raise VerificationError(f"immudb transaction {header.iD} does not hold exactly the "
                                    "entries written")
        if state.txId > 0 and not store.VerifyDualProof(
                immudb_schema.DualProofFromProto(vtx.dualProof), state.txId, header.iD,
                immudb_schema.DigestFromProto(state.txHash), header.Alh()):
            raise VerificationError(f"immudb transaction {header.iD} does not extend the "
                                    f"trusted state at {state.txId} (dual proof failed)")
        self.client._rs.set(State(db=state.db, txId=header.iD, txHash=header.Alh(),
                                  publicKey=vtx.signature.publicKey,
                                  signature=vtx.signature.signature))
        return int(header.iD)

    @staticmethod
    def _entries_root(version: int, tx_entries: Iterable[Any],
                      items: Mapping[bytes, bytes]) -> bytes | None:
        """The root of the transaction's entry hash tree rebuilt from OUR values, or None when
        the transaction's keys are not exactly the items' keys (or one is marked deleted).

        Each leaf is the digest of an item's key, metadata and value as written, in the order
        the transaction lists its keys, so a root equal to the proven entries hash is every
        item's inclusion proof at once (an inclusion proof recomputes that same root from one
        leaf and its siblings): 2n hashes for the batch instead of n proofs of log n each, and
        nothing else can be in the transaction.
        """
        from immudb import database
        from immudb import schema as immudb_schema
        from immudb.embedded import htree, store

        spec_digest = store.EntrySpecDigestFor(version)
        by_encoded_key = {database.EncodeKey(key): (key, value) for key, value in items.items()}
        digests = []
        for entry in tx_entries:
            item = by_encoded_key.pop(entry.key, None)
            if item is None:
                return None
            md = immudb_schema.KVMetadataFromProto(entry.metadata)
            if md is not None and md.Deleted():
                return None
            digests.append(spec_digest(database.EncodeEntrySpec(item[0], md, item[1])))
        if by_encoded_key or not digests:
            return None
        tree = htree.HTree(len(digests))
        tree.BuildWith(digests)
        return bytes(tree.root)

    @staticmethod
    def _check_entries(tx: Any, items: Mapping[bytes, bytes]) -> None:
        """Each item is in the transaction's entry hash tree with exactly this value."""
        from immudb import database
        from immudb.embedded import store

        spec_digest = store.EntrySpecDigestFor(tx.header.version)
        index = {entry.key(): i for i, entry in enumerate(tx.entries)}
        for key, value in items.items():
            position = index.get(database.EncodeKey(key))
            if position is None:
                raise VerificationError(f"{key.decode()} is not in immudb transaction "
                                        f"{tx.header.iD}", entry_id=key.decode())
            md = tx.entries[position].metadata()
            if md is not None and md.Deleted():
                raise VerificationError(f"{key.decode()} is marked deleted in immudb")
            spec = database.EncodeEntrySpec(key, md, value)
            proof = tx.htree.InclusionProof(position)
            # immudb-py's HTree returns the proof's terms as one concatenated bytes object, which
            # its own VerifyInclusion cannot iterate (it only ever proves 1-entry transactions).
            terms = bytes(proof.terms)
            proof.terms = [terms[i:i + DIGEST_BYTES] for i in range(0, len(terms), DIGEST_BYTES)]
            if not store.VerifyInclusion(proof, spec_digest(spec), tx.header.eh):
                raise VerificationError(f"{key.decode()}: value differs from immudb transaction "
                                        f"{tx.header.iD} (inclusion proof failed)",
                                        entry_id=key.decode())

    # -------------------------------------------------------------- reads and checks

    def read_verified(self, key: bytes) -> tuple[bytes, Stored]:
        """A verified read: the value and the transaction it was written in."""
        from immudb import exceptions as immudb_exceptions

        if self.client is None:
            self.open()
        try:
            got = self.client.verifiedGet(key)
        except immudb_exceptions.ErrCorruptedData as exc:
            raise VerificationError(f"{key.decode()}: immudb's proof did not check",
                                    entry_id=key.decode()) from exc
        except Exception as exc:
            if _grpc_code(exc) == "NOT_FOUND" or "key not found" in str(exc):
                raise SinkError(f"{key.decode()} is not in immudb") from exc
            raise translate(exc, f"reading {key.decode()}") from exc
        return bytes(got.value), Stored(int(got.id), bool(got.verified))

    def verify_tx(self, tx_id: int, items: Mapping[bytes, bytes]) -> None:
        """Check that transaction tx_id holds exactly these values and is consistent with the
        trusted state (dual proof in whichever direction applies)."""
        from immudb import schema as immudb_schema
        from immudb.embedded import store
        from immudb.grpc import schema_pb2
        from immudb.rootService import State

        if self.client is None:
            self.open()
        state = self.client._rs.get()
        try:
            vtx = self.client._stub.VerifiableTxById(schema_pb2.VerifiableTxRequest(
                tx=tx_id, proveSinceTx=state.txId))
        except Exception as exc:
            raise translate(exc, f"reading immudb transaction {tx_id}") from exc
        tx = immudb_schema.TxFromProto(vtx.tx)
        self._check_entries(tx, items)
        dual = immudb_schema.DualProofFromProto(vtx.dualProof)
        if state.txId <= tx_id:
            proven_eh = immudb_schema.DigestFromProto(vtx.dualProof.targetTxHeader.eH)
            source = (state.txId, immudb_schema.DigestFromProto(state.txHash))
            target = (tx_id, tx.header.Alh())
        else:
            proven_eh = immudb_schema.DigestFromProto(vtx.dualProof.sourceTxHeader.eH)
            source = (tx_id, tx.header.Alh())
            target = (state.txId, immudb_schema.DigestFromProto(state.txHash))
        if tx.header.eh != proven_eh:
            raise VerificationError(f"immudb transaction {tx_id}: entries differ from the "
                                    "proven header")
        if state.txId > 0 and not store.VerifyDualProof(dual, source[0], target[0], source[1],
                                                        target[1]):
            raise VerificationError(f"immudb transaction {tx_id} is not consistent with the "
                                    f"trusted state at {state.txId} (dual proof failed)")
        if target[0] > state.txId:
            self.client._rs.set(State(db=state.db, txId=target[0], txHash=target[1],
                                      publicKey=vtx.signature.publicKey,
                                      signature=vtx.signature.signature))


# ------------------------------------------------------------------ the sink (asyncio)


def receipt_record(entry_id: str, stored: Stored, database: str, now: datetime) -> dict[str, Any]:
    return {"entry_id": entry_id, "immudb_tx": stored.tx_id, "immudb_database": database,
            "verified": stored.verified, "receipted_at": now}


def entries_to_store(settings: Settings, messages: Iterable[Any], codec: AvroCodec,
                     currencies: Mapping[str, Currency],
                     rejects: list[SinkReject] | None = None) -> dict[str, tuple[bytes, bytes]]:
    """entry_id -> (immudb key, canonical bytes) of the Entry records among `messages`; the
    records that cannot be stored go to `rejects` (sinks/intake)."""
    out: dict[str, tuple[bytes, bytes]] = {}
    topic = settings.topic(LedgerTopic.ENTRIES)
    for message in messages:
        taken = intake(LedgerTopic.ENTRIES, topic, message, codec, currencies)
        if isinstance(taken, SinkReject):
            if rejects is not None:
                rejects.append(taken)
            continue
        entry = records.entry_from_wire(taken[1], currencies)
        data = canonical.entry_bytes(entry)
        if canonical.entry_hash(data) != entry.entry_hash:
            # Stored anyway: immudb keeps what the ledger published; `verify` flags the entry.
            log.error("entry %s: entry_hash does not match its canonical bytes", entry.entry_id)
        out.setdefault(entry.entry_id, (entry_key(settings, entry.entry_id), data))
    return out


def group_id_for(settings: Settings) -> str:
    """The consumer group of the immudb sinks: its committed offsets say what they stored."""
    return f"{settings.topic_prefix}sardis-immudb-sink"


class ImmudbSink:
    """ledger.entries -> immudb, receipts -> ledger.receipts, exactly once.

    Receipts and the consumer offsets commit in one Kafka transaction; the immudb write before
    it is idempotent (KeyMustNotExist), so a crash between the two re-issues the same receipt.
    With a `shard` it takes only that shard's partitions of ledger.entries. The shards share
    the consumer group (offsets are per partition) and each has its own transactional id, so a
    restarted shard fences its own predecessor only.
    """

    def __init__(self, settings: Settings, *, directory: Path | None = None,
                 currencies: Mapping[str, Currency] | None = None,
                 shard: Shard = ALL_PARTITIONS) -> None:
        self.settings = settings
        self.shard = shard
        self.store = ImmudbStore(settings, directory)
        # Reads both framings, writes SARDIS_WIRE_FORMAT (streams/wire.py).
        self.wire = Wire(settings)
        self.codec = self.wire.codec
        self.currencies = dict(currencies) if currencies is not None else currency_table()
        self.group_id = group_id_for(settings)
        self.transactional_id = f"{self.group_id}{shard.suffix}"
        self.entries_written = 0
        self.rejected = 0  # records set aside (sinks/intake), since start
        self.lag = metrics.LagTracker("sink-immudb")  # per partition, for /metrics and /readyz
        self.ready = False

    async def run(self, stop: asyncio.Event | None = None) -> int:
        stop = stop or asyncio.Event()
        await self.wire.start((LedgerTopic.RECEIPTS, LedgerTopic.SINK_DLQ))
        producer = AIOKafkaProducer(**self.settings.kafka_connection(),
                                    transactional_id=self.transactional_id,
                                    enable_idempotence=True, acks="all", linger_ms=5,
                                    request_timeout_ms=REQUEST_TIMEOUT_MS,
                                    transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
                                    max_batch_size=RECEIPT_BATCH_MAX_BYTES)
        consumer = kafka.consumer(self.settings, group_id=self.group_id)
        try:
            # The producer first: init_transactions aborts a crashed predecessor's transaction,
            # so the committed offsets read next are stable.
            await producer.start()
            await consumer.start()
            tps = self.shard.select(
                await kafka.partitions_of(consumer, self.settings.topic(LedgerTopic.ENTRIES)))
            if not tps:
                raise SinkError(f"shard {self.shard} owns no partition of "
                                f"{self.settings.topic(LedgerTopic.ENTRIES)}", retriable=False)
            consumer.assign(tps)
            await self._seek_to_committed(consumer, tps)
            await self._open_store(stop)
            print(READY_MESSAGE, flush=True)
            self.ready = True
            log.info("%s: %d partitions (shard %s) -> immudb %s/%s", READY_MESSAGE, len(tps),
                     self.shard, self.store.address, self.settings.immudb_database)
            last_report = time.monotonic()
            while not stop.is_set():
                try:
                    batches = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS,
                                                     max_records=KAFKA_BATCH_RECORDS_MAX)
                except KafkaError as exc:
                    log.warning("Kafka fetch failed (%r); retrying", exc)
                    await asyncio.sleep(RETRY_BACKOFF_INITIAL_S)
                    continue
                if batches:
                    await self._handle(consumer, producer, tps, batches, stop)
                await self.lag.refresh(consumer, tps)
                if time.monotonic() - last_report >= REPORT_EVERY_S:
                    positions = {tp: await consumer.position(tp) for tp in tps}
                    log.info("sink immudb: %d entries stored, lag %d records, %d set aside",
                             self.entries_written, kafka.lag(consumer, positions), self.rejected)
                    last_report = time.monotonic()
        except ProducerFenced as exc:
            raise SinkError("another immudb sink with the same transactional id took over") from exc
        except KafkaError as exc:
            raise kafka.kafka_error("immudb sink", exc) from exc
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()
            await asyncio.to_thread(self.store.close)
        return self.entries_written

    async def _seek_to_committed(self, consumer: Any, tps: list[TopicPartition]) -> None:
        beginnings = await consumer.beginning_offsets(tps)
        for tp in tps:
            committed = await consumer.committed(tp)
            consumer.seek(tp, committed if committed is not None else beginnings[tp])

    async def _open_store(self, stop: asyncio.Event) -> None:
        delay = RETRY_BACKOFF_INITIAL_S
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.store.open)
                return
            except SinkError as exc:
                if not exc.retriable:
                    raise
                log.warning("%s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX_S)

    async def _store_with_retry(self, items: Mapping[bytes, bytes], behind: int,
                                stop: asyncio.Event) -> dict[bytes, Stored] | None:
        """Write until it works; immudb being down only delays (the sink reports it is behind)."""
        delay = RETRY_BACKOFF_INITIAL_S
        down_since: float | None = None
        while not stop.is_set():
            try:
                stored = await asyncio.to_thread(self.store.write, items)
                if down_since is not None:
                    log.warning("immudb is back after %.0fs; catching up", time.monotonic() - down_since)
                return stored
            except SinkError as exc:
                if not exc.retriable:
                    raise
                down_since = down_since or time.monotonic()
                log.warning("%s; sink is behind by %d+ entries (down %.0fs), retrying in %.1fs",
                            exc, behind, time.monotonic() - down_since, delay)
                await asyncio.to_thread(self.store.close)  # a restarted server needs a new login
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX_S)
        return None

    async def _handle(self, consumer: Any, producer: AIOKafkaProducer, tps: list[TopicPartition],
                      batches: Mapping[TopicPartition, list[Any]], stop: asyncio.Event) -> None:
        messages = [m for tp in sorted(batches, key=lambda t: t.partition) for m in batches[tp]]
        offsets = {tp: msgs[-1].offset + 1 for tp, msgs in batches.items() if msgs}
        rejects: list[SinkReject] = []
        await self.wire.learn_retrying([m.value for m in messages], stop)  # Confluent schema ids
        wanted = entries_to_store(self.settings, messages, self.codec, self.currencies, rejects)
        items = dict(wanted.values())
        behind = kafka.lag(consumer, {tp: offsets.get(tp, 0) for tp in offsets}) + len(items)
        try:
            stored = await self._store_with_retry(items, behind, stop) if items else {}
        except VerificationError:
            metrics.IMMUDB_PROOF_FAILURES.inc()
            raise
        if stored is None:  # stopping: nothing committed, the next start redoes this batch
            return
        now = datetime.now(UTC)
        topic = self.settings.topic(LedgerTopic.RECEIPTS)
        for attempt in range(1, KAFKA_RETRIES_MAX + 1):
            try:
                async with producer.transaction():
                    await self._send_receipts(producer, topic, wanted, stored, now)
                    await self._send_rejects(producer, rejects, now)
                    await producer.send_offsets_to_transaction(offsets, self.group_id)
                break
            except ProducerFenced:
                raise
            except KafkaError as exc:
                if attempt == KAFKA_RETRIES_MAX or not getattr(exc, "retriable", False):
                    raise
                log.warning("publishing receipts failed (%r); retrying", exc)
                await asyncio.sleep(RETRY_BACKOFF_INITIAL_S * attempt)
        self.entries_written += len(wanted)
        self.rejected += len(rejects)
        metrics.sink_wrote("immudb", len(wanted), rejects)

    async def _send_rejects(self, producer: AIOKafkaProducer, rejects: list[SinkReject],
                            now: datetime) -> None:
        """Set-aside records onto ledger.sink-dlq, in the transaction of the offsets past them."""
        now_ms = (now - EPOCH) // ONE_MS
        for reject in rejects:
            await producer.send(self.settings.topic(LedgerTopic.SINK_DLQ),
                                self.codec.encode("DeadLetter", reject.dead_letter("immudb", now_ms)),
                                key=f"{reject.topic}:{reject.partition}:{reject.offset}".encode())

    async def _send_receipts(self, producer: AIOKafkaProducer, topic: str,
                             wanted: Mapping[str, tuple[bytes, bytes]],
                             stored: Mapping[bytes, Stored], now: datetime) -> None:
        """Receipts into the open transaction, one record batch per partition.

        Keyed by entry_id and partitioned as the producer's default partitioner would (Kafka's
        murmur2 of the key), but appended to record batches directly: send() costs a future
        and a partitioner call per receipt, more than encoding it.
        """
        partitions = sorted(await producer.partitions_for(topic))
        by_partition: dict[int, list[tuple[bytes | None, bytes]]] = {}
        for entry_id, (key, _value) in wanted.items():
            value = self.codec.encode("Receipt", receipt_record(
                entry_id, stored[key], self.settings.immudb_database, now))
            key_bytes = entry_id.encode()
            partition = partitions[(murmur2(key_bytes) & 0x7FFFFFFF) % len(partitions)]
            by_partition.setdefault(partition, []).append((key_bytes, value))
        for partition, items in by_partition.items():
            await send_batches(producer, topic, partition, items)


async def run_immudb_sink(settings: Settings, directory: Path | None = None,
                          shard: Shard = ALL_PARTITIONS) -> int:
    """`sardis-ledger sink immudb`: run until SIGTERM/SIGINT."""
    from sardis_ledger.streams.health import lag_readiness, serve
    from sardis_ledger.streams.shutdown import stop_on_signals

    stop = stop_on_signals("sink immudb")
    sink = ImmudbSink(settings, directory=directory, shard=shard)
    serve("sink-immudb").ready_when(
        lag_readiness(lambda: sink.ready, lambda: sink.lag.behind, "sink immudb"))
    return await sink.run(stop)
