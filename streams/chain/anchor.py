"""`sardis-ledger anchor`: tree heads anchored on chain (LedgerAnchor), recorded and verified."""

# anchor: the latest TreeHead of every partition (ledger.tree-heads) goes into one anchorBatch
# transaction of the LedgerAnchor contract; each anchored head is recorded on ledger.anchors. A
# head the contract already holds is not sent again, and one whose ledger.anchors record is
# missing (a crash between the transaction and the record) gets its record rebuilt from the
# contract's Anchored event, so running anchor again always converges.
#
# verify: for every record on ledger.anchors, the root the contract holds for (partition,
# tree_size) must equal the record's, and the root recomputed from the first tree_size entries
# of the partition (leaf = SHA-256(0x00 || canonical entry bytes), RFC 6962) must equal the
# chain's. The first entry whose own entry_hash or merkle_root disagrees with the recomputation
# is named; when a tamperer rewrote those too, the anchors bound where the change is.

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sardis_ledger.streams import canonical, merkle
from sardis_ledger.streams.chain import eth
from sardis_ledger.streams.chain.config import chain_name_for, normalize_address
from sardis_ledger.streams.chain.errors import AnchorError, ChainConfigError
from sardis_ledger.streams.chain.solc import CompiledContract, compile_contract
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import CodecError, LedgerError
from sardis_ledger.streams.money import Currency, currency_table
from sardis_ledger.streams.topics import LedgerTopic
from sardis_ledger.streams.wire import Wire

log = logging.getLogger("sardis.chain.anchor")

ANCHOR_CONTRACT_ENV = "SARDIS_ANCHOR_CONTRACT"
CONTRACT_NAME = "LedgerAnchor"
ZERO_ROOT = bytes(32)
KAFKA_TIMEOUT_MS = 30_000
READ_TIMEOUT_S = 300.0
FETCH_MAX_RECORDS = 10_000
FETCH_TIMEOUT_MS = 500
# anchorBatch costs ~45k gas per new partition; 12 partitions fit any block gas limit easily, and
# 128 keep one transaction under ~6M gas.
BATCH_PARTITIONS_MAX = 128


@dataclass(frozen=True, slots=True)
class Head:
    partition: int
    tree_size: int
    root_hash: str  # 64 lowercase hex


@dataclass(slots=True)
class AnchorRun:
    contract_address: str
    deployed: bool
    chain: str
    anchored: list[dict[str, Any]] = field(default_factory=list)  # new Anchor records
    recovered: list[dict[str, Any]] = field(default_factory=list)  # rebuilt from events
    unchanged: list[int] = field(default_factory=list)  # partitions already anchored


@dataclass(slots=True)
class AnchorCheck:
    partition: int
    tree_size: int
    root_hash: str
    contract_address: str
    tx_hash: str
    problems: list[str] = field(default_factory=list)
    first_bad_leaf: int | None = None
    first_bad_entry_id: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"partition": self.partition, "tree_size": self.tree_size,
                "root_hash": self.root_hash, "contract_address": self.contract_address,
                "tx_hash": self.tx_hash, "ok": self.ok, "problems": self.problems,
                "first_bad_leaf": self.first_bad_leaf, "first_bad_entry_id": self.first_bad_entry_id}


@dataclass(slots=True)
class VerifyReport:
    checks: list[AnchorCheck]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def mismatches(self) -> list[AnchorCheck]:
        return [check for check in self.checks if not check.ok]


# ------------------------------------------------------------------ Kafka reading


async def read_records(settings: Settings, topic_name: str) -> list[tuple[int, dict[str, Any]]]:
    """Every committed record of a ledger topic as (kafka partition, decoded record), in offset
    order per partition; stops at the end offsets taken when it starts."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    wire = Wire(settings)
    codec = wire.codec
    topic = settings.topic(topic_name)
    consumer = AIOKafkaConsumer(**settings.kafka_connection(),
                                isolation_level="read_committed", enable_auto_commit=False,
                                request_timeout_ms=KAFKA_TIMEOUT_MS)
    out: list[tuple[int, dict[str, Any]]] = []
    try:
        await consumer.start()
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + READ_TIMEOUT_S
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            if time.monotonic() > deadline:
                raise AnchorError(f"reading {topic}: not at the end after {READ_TIMEOUT_S:.0f}s",
                                  retriable=True)
            batches = await consumer.getmany(*pending, timeout_ms=FETCH_TIMEOUT_MS,
                                             max_records=FETCH_MAX_RECORDS)
            for tp, messages in batches.items():
                for message in messages:
                    if message.offset >= ends[tp]:
                        continue
                    try:
                        await wire.learn([message.value])  # a Confluent schema id, once
                        out.append((tp.partition, codec.decode(message.value)[1]))
                    except CodecError as exc:
                        raise AnchorError(f"{topic} partition {tp.partition} offset "
                                          f"{message.offset}: {exc}") from exc
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    except KafkaError as exc:
        raise AnchorError(f"reading {topic}: {exc!r}", retriable=exc.retriable) from exc
    finally:
        await consumer.stop()
    return out


async def latest_tree_heads(settings: Settings) -> dict[int, Head]:
    """The largest tree head published for each partition."""
    heads: dict[int, Head] = {}
    for _, record in await read_records(settings, LedgerTopic.TREE_HEADS):
        head = Head(record["partition"], record["tree_size"], record["root_hash"])
        known = heads.get(head.partition)
        if known is None or head.tree_size > known.tree_size:
            heads[head.partition] = head
    return heads


async def _produce(settings: Settings, records: list[dict[str, Any]]) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    wire = Wire(settings)
    await wire.start((LedgerTopic.ANCHORS,))
    codec = wire.codec
    producer = AIOKafkaProducer(**settings.kafka_connection(),
                                enable_idempotence=True, acks="all",
                                request_timeout_ms=KAFKA_TIMEOUT_MS)
    try:
        await producer.start()
        for record in records:
            # Co-partitioned with the ledger: the anchor of partition p lands on partition p.
            await producer.send_and_wait(settings.topic(LedgerTopic.ANCHORS),
                                         codec.encode("Anchor", record),
                                         key=str(record["partition"]).encode(),
                                         partition=record["partition"] % settings.partitions)
    except KafkaError as exc:
        raise AnchorError(f"recording anchors on {LedgerTopic.ANCHORS}: {exc!r}",
                          retriable=exc.retriable) from exc
    finally:
        await producer.stop()


# ------------------------------------------------------------------ anchoring


def _root_bytes(root_hash: str) -> bytes:
    raw = bytes.fromhex(root_hash)
    if len(raw) != merkle.HASH_SIZE_BYTES:
        raise AnchorError(f"root {root_hash!r} is not {merkle.HASH_SIZE_BYTES} bytes")
    return raw


async def _anchor_record(sender: eth.Sender, contract: Any, chain: str, partition: int,
                         tree_size: int, root_hash: str, tx_hash: str,
                         block_number: int) -> dict[str, Any]:
    block = await sender.w3.eth.get_block(block_number)
    return {"partition": partition, "tree_size": tree_size, "root_hash": root_hash,
            "chain": chain, "tx_hash": tx_hash, "block_number": block_number,
            "contract_address": str(contract.address).lower(),
            "anchored_at": int(block["timestamp"]) * 1000}


async def _recover_record(sender: eth.Sender, contract: Any, chain: str,
                          head: Head) -> dict[str, Any]:
    """The Anchor record of a head the contract holds, from its Anchored event."""
    events = await contract.events.Anchored.get_logs(
        from_block=0, argument_filters={"partition": head.partition, "treeSize": head.tree_size})
    if not events:
        raise AnchorError(f"partition {head.partition} size {head.tree_size} is anchored but its "
                          "Anchored event is not found")
    event = events[0]
    return await _anchor_record(sender, contract, chain, head.partition, head.tree_size,
                                head.root_hash, "0x" + bytes(event["transactionHash"]).hex(),
                                int(event["blockNumber"]))


async def _contract_at(sender: eth.Sender, compiled: CompiledContract, address: str) -> Any:
    address = normalize_address(address, "anchor contract")
    code = await sender.w3.eth.get_code(sender.w3.to_checksum_address(address))
    if not code:
        raise ChainConfigError(f"no contract at {address} on chain {sender.chain_id}")
    return sender.contract(compiled, address)


async def publish_anchors(settings: Settings, *, contract_address: str | None = None,
                          chain: str | None = None,
                          env: Mapping[str, str] | None = None) -> AnchorRun:
    """Anchor the latest tree head of every partition; deploy LedgerAnchor when no address."""
    from sardis_ledger.streams.topics import create_topics

    await create_topics(settings)
    heads = await latest_tree_heads(settings)
    recorded = {(r["partition"], r["tree_size"], r["contract_address"])
                for _, r in await read_records(settings, LedgerTopic.ANCHORS)}
    compiled = compile_contract(CONTRACT_NAME)
    sender = await eth.Sender.create(settings.chain_rpc, env)
    try:
        chain = chain or chain_name_for(sender.chain_id)
        deployed = contract_address is None
        if contract_address is None:
            contract_address, _ = await sender.deploy(compiled)
            log.info("deployed %s at %s", CONTRACT_NAME, contract_address)
        contract = await _contract_at(sender, compiled, contract_address)
        run = AnchorRun(str(contract.address).lower(), deployed, chain)
        todo: list[Head] = []
        for partition, head in sorted(heads.items()):
            latest_size, latest_root, _ = await contract.functions.latest(partition).call()
            if bytes(latest_root) == ZERO_ROOT or int(latest_size) < head.tree_size:
                todo.append(head)
                continue
            held = bytes(await contract.functions.rootAt(partition, head.tree_size).call())
            if held == ZERO_ROOT:
                raise AnchorError(f"partition {partition}: the contract holds size {latest_size}, "
                                  f"beyond the ledger's {head.tree_size} (another ledger's "
                                  "contract, or another topic prefix?)")
            if held != _root_bytes(head.root_hash):
                raise AnchorError(f"partition {partition} size {head.tree_size}: the contract "
                                  f"holds root {held.hex()}, the ledger's head is {head.root_hash}")
            run.unchanged.append(partition)
            if (partition, head.tree_size, run.contract_address) not in recorded:
                run.recovered.append(await _recover_record(sender, contract, chain, head))
        for start in range(0, len(todo), BATCH_PARTITIONS_MAX):
            batch = todo[start:start + BATCH_PARTITIONS_MAX]
            call = contract.functions.anchorBatch([h.partition for h in batch],
                                                  [h.tree_size for h in batch],
                                                  [_root_bytes(h.root_hash) for h in batch])
            receipt = await sender.send(call, f"anchoring {len(batch)} tree heads")
            tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
            for head in batch:
                run.anchored.append(await _anchor_record(
                    sender, contract, chain, head.partition, head.tree_size, head.root_hash,
                    tx_hash, int(receipt["blockNumber"])))
        await _produce(settings, run.recovered + run.anchored)
        return run
    except LedgerError:
        raise
    except Exception as exc:  # web3 failures outside Sender.send (calls, logs, blocks)
        raise eth.rpc_error("anchoring", exc) from exc
    finally:
        await sender.close()


# ------------------------------------------------------------------ verification


@dataclass(slots=True)
class _Leaf:
    entry_id: str
    leaf_hash: bytes
    entry_hash: str
    stated_entry_hash: str
    stated_merkle_root: str
    problem: str | None = None


def _leaves_by_partition(entries: list[tuple[int, dict[str, Any]]],
                         currencies: Mapping[str, Currency]
                         ) -> tuple[dict[int, dict[int, _Leaf]], dict[int, list[str]]]:
    """Leaf per (partition, leaf_index); conflicting duplicates are reported per partition."""
    from sardis_ledger.streams import records

    leaves: dict[int, dict[int, _Leaf]] = defaultdict(dict)
    conflicts: dict[int, list[str]] = defaultdict(list)
    for _, record in entries:
        partition, index = record["partition"], record["leaf_index"]
        try:
            entry = records.entry_from_wire(record, currencies)
            entry_bytes = canonical.entry_bytes(entry)
            leaf = _Leaf(entry.entry_id, merkle.leaf_hash(entry_bytes),
                         canonical.entry_hash(entry_bytes).hex(), record["entry_hash"],
                         record["merkle_root"])
        except (LedgerError, KeyError, ValueError) as exc:
            leaf = _Leaf(record.get("entry_id", "?"), b"", "", record.get("entry_hash", ""),
                         record.get("merkle_root", ""), problem=f"cannot be decoded: {exc!r}")
        known = leaves[partition].get(index)
        if known is None:
            leaves[partition][index] = leaf
        elif known.leaf_hash != leaf.leaf_hash or known.entry_id != leaf.entry_id:
            # The ledger re-emits an entry after a crash (same bytes); different bytes for one
            # leaf index are two histories.
            conflicts[partition].append(f"leaf {index} appears as {known.entry_id} and as "
                                        f"{leaf.entry_id} with different contents")
    return leaves, conflicts


def _first_inconsistent(leaves: dict[int, _Leaf], size: int) -> tuple[int, _Leaf, str] | None:
    """First leaf below `size` whose stated entry_hash or merkle_root disagrees with the bytes."""
    frontier = merkle.MerkleFrontier()
    for index in range(size):
        leaf = leaves.get(index)
        if leaf is None:
            return None
        if leaf.problem is not None:
            return index, leaf, leaf.problem
        frontier = frontier.append(leaf.leaf_hash)
        if leaf.entry_hash != leaf.stated_entry_hash:
            return index, leaf, (f"its fields hash to {leaf.entry_hash}, its recorded entry_hash "
                                 f"is {leaf.stated_entry_hash}")
        if leaf.stated_merkle_root != frontier.root().hex():
            return index, leaf, (f"the log up to it hashes to root {frontier.root().hex()}, its "
                                 f"recorded merkle_root is {leaf.stated_merkle_root}")
    return None


AnchorKey = tuple[str, int, int]  # contract address, partition, tree size


async def anchored_roots(settings: Settings, keys: list[AnchorKey]) -> dict[AnchorKey, bytes]:
    """The root each anchor contract holds for (address, partition, tree size); ZERO_ROOT where
    it holds none. An unreachable node or contract raises (retriable where retrying helps)."""
    compiled = compile_contract(CONTRACT_NAME)
    w3 = eth.connect(settings.chain_rpc)
    contracts: dict[str, Any] = {}
    roots: dict[AnchorKey, bytes] = {}
    try:
        for address, partition, size in keys:
            if (address, partition, size) in roots:
                continue
            if address not in contracts:
                contracts[address] = w3.eth.contract(address=w3.to_checksum_address(address),
                                                     abi=compiled.abi)
            try:
                roots[(address, partition, size)] = bytes(
                    await contracts[address].functions.rootAt(partition, size).call())
            except Exception as exc:  # translated: the caller reports which anchor failed
                raise eth.rpc_error(f"reading rootAt({partition}, {size}) at {address}", exc) \
                    from exc
    finally:
        await w3.provider.disconnect()
    return roots


async def verify_anchors(settings: Settings, *, entries_topic: str = LedgerTopic.ENTRIES,
                         anchors_topic: str = LedgerTopic.ANCHORS,
                         currencies: Mapping[str, Currency] | None = None) -> VerifyReport:
    """Check every anchor on `anchors_topic` against the chain and the recomputed Merkle logs of
    `entries_topic` (a name under the settings' prefix, so a copy of the entries can be checked)."""
    currencies = currencies if currencies is not None else currency_table()
    anchors = sorted((record for _, record in await read_records(settings, anchors_topic)),
                     key=lambda r: (r["partition"], r["tree_size"]))
    leaves, conflicts = _leaves_by_partition(await read_records(settings, entries_topic),
                                             currencies)
    roots = await anchored_roots(settings, [(r["contract_address"], r["partition"], r["tree_size"])
                                            for r in anchors])
    checks: list[AnchorCheck] = []
    last_good: dict[int, int] = {}
    for record in anchors:
        partition, size = record["partition"], record["tree_size"]
        check = AnchorCheck(partition, size, record["root_hash"], record["contract_address"],
                            record["tx_hash"])
        checks.append(check)
        address = record["contract_address"]
        chain_root = roots[(address, partition, size)]
        if chain_root == ZERO_ROOT:
            check.problems.append(f"the contract at {address} holds no root for partition "
                                  f"{partition} size {size}")
        elif chain_root.hex() != record["root_hash"]:
            check.problems.append(f"the anchor record's root {record['root_hash']} differs "
                                  f"from the chain's {chain_root.hex()}")
        trusted = chain_root if chain_root != ZERO_ROOT else _root_bytes(record["root_hash"])
        partition_leaves = leaves.get(partition, {})
        missing = [i for i in range(size) if i not in partition_leaves]
        if missing:
            check.problems.append(f"partition {partition} lacks {len(missing)} of the first "
                                  f"{size} entries (first missing leaf {missing[0]})")
            continue
        check.problems.extend(conflicts.get(partition, []))
        bad = [partition_leaves[i] for i in range(size) if partition_leaves[i].problem]
        if bad:
            check.problems.append(f"entry {bad[0].entry_id}: {bad[0].problem}")
            continue
        recomputed = merkle.root_from_leaf_hashes([partition_leaves[i].leaf_hash
                                                   for i in range(size)])
        if recomputed != trusted:
            where = f"partition {partition}: the first {size} entries hash to root " \
                    f"{recomputed.hex()}, anchored is {trusted.hex()}"
            first = _first_inconsistent(partition_leaves, size)
            if first is not None:
                index, leaf, why = first
                check.first_bad_leaf, check.first_bad_entry_id = index, leaf.entry_id
                where += f"; first bad entry {leaf.entry_id} (leaf {index}): {why}"
            else:
                low = last_good.get(partition, 0)
                where += (f"; every entry matches its own recorded hashes, so the change is "
                          f"in leaves {low}..{size - 1} (the last verified anchor covers "
                          f"{low})")
            check.problems.append(where)
        elif not check.problems:
            last_good[partition] = size
    return VerifyReport(checks)
