"""`sardis-ledger chain watch`: confirmed ERC-20 transfers of watched wallets -> chain.transfers."""

# How it stays exact across crashes and reorgs:
#
# * Each block range is published in one Kafka transaction that also writes the watcher's progress
#   record (streams/chain/state.py) to a compacted topic of its own. A crash before the commit
#   leaves neither; a restart fences the old transactional producer, reads the last committed
#   progress and continues at its next block: no gap and, for read_committed consumers, no
#   duplicate.
# * Only blocks `confirmations` deep are read. Before each range the hash of the last processed
#   block is compared with the chain; a difference is a reorg: the fork point is bounded by the
#   highest kept hash that is still canonical, `removed` copies of the kept transfers whose block
#   hash changed are published, and the blocks above the fork are read again (transfers still in
#   the same block are not published twice).
# * A range is accepted only when the chain did not move while it was read: the hash of its last
#   block is the same before eth_getLogs and after, recent headers link parent to child, and logs
#   carry the header hashes. Otherwise the range is read again.
# * RPC failures are retried with capped exponential backoff; a range the node refuses as too
#   large is halved (down to one block); a range is never skipped.

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sardis_ledger.streams import metrics
from sardis_ledger.streams.chain import state as st
from sardis_ledger.streams.chain import transfers as tr
from sardis_ledger.streams.chain.config import WatchConfig, chain_name_for
from sardis_ledger.streams.chain.errors import (
    ChainError,
    ChainMovedError,
    ChainReorgTooDeepError,
    ChainRpcError,
    RangeTooLargeError,
    WatchStateError,
)
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.health import READY_BLOCKS_BEHIND_MAX, Health, lag_readiness
from sardis_ledger.streams.topic_policy import plan_replication
from sardis_ledger.streams.topics import broker_count

log = logging.getLogger("sardis.chain.watch")

READY_MARKER = "chain watch ready"  # logged once progress is loaded (tests wait for it)
STATE_TOPIC = "chain.watch-state"
STATE_TOPIC_PARTITIONS = 1
RPC_TIMEOUT_S = 30.0
RPC_ATTEMPTS_MAX = 8
RPC_BACKOFF_INITIAL_S = 0.25
RPC_BACKOFF_MAX_S = 10.0
RPC_BACKOFF_JITTER = 0.2  # +-20%, so restarted watchers do not retry in lockstep
HEADER_FETCH_CONCURRENCY = 16
CHAIN_MOVED_RETRIES_MAX = 20  # ranges read again in one sync while the chain keeps moving
# A watcher whose node stays unreachable this long exits (retriable), for its supervisor to see.
OUTAGE_LIMIT_S = 900.0
KAFKA_TIMEOUT_MS = 30_000
STATE_READ_TIMEOUT_S = 60.0
TOPIC_READY_POLL_S = 0.2

T = TypeVar("T")


# ------------------------------------------------------------------ interfaces


class ChainReader(Protocol):
    """What the watcher needs from a node."""

    async def head(self) -> int: ...

    async def block_hash(self, number: int) -> str | None:
        """Hash of the canonical block `number`, None when the chain is not that long."""
        ...

    async def headers(self, numbers: list[int]) -> dict[int, tuple[str, str] | None]:
        """(hash, parent hash) of each block; None for blocks the chain does not have."""
        ...

    async def transfer_logs(self, start: int, end: int, tokens: list[str],
                            wallets: list[str]) -> list[tr.RawLog]:
        """Transfer logs of `tokens` with a watched wallet on either side, blocks start..end."""
        ...


class TransferSink(Protocol):
    """Where transfers go, atomically with the progress that accounts for them."""

    async def load_state(self) -> st.WatchState | None: ...

    async def commit(self, transfers: list[tr.ChainTransfer], state: st.WatchState) -> None: ...


@dataclass(slots=True)
class SyncStats:
    confirmed: int = 0
    removed: int = 0
    ranges: int = 0
    reorgs: int = 0
    skipped_logs: int = 0  # logs of configured tokens that are not ERC-20 shaped
    chain_moved: int = 0


# ------------------------------------------------------------------ the watcher


class ChainWatcher:
    """Publishes confirmed transfers exactly once; repairs reorgs. One per (chain, watch_id)."""

    def __init__(self, config: WatchConfig, chain: str, reader: ChainReader,
                 sink: TransferSink) -> None:
        self.config = config
        self.chain = chain
        self.reader = reader
        self.sink = sink
        self.state: st.WatchState | None = None
        self.stats = SyncStats()
        self._tokens = sorted(config.tokens)
        self._wallets = sorted(config.wallets)
        self.blocks_behind: int | None = None  # confirmed blocks not yet published (readiness)

    async def load(self) -> st.WatchState:
        loaded = await self.sink.load_state()
        digest = self.config.digest()
        if loaded is None:
            self.state = st.WatchState.fresh(self.config.start_block, digest)
            log.info("%s: no progress stored, starting at block %d", READY_MARKER,
                     self.config.start_block)
        else:
            if loaded.config_digest != digest:
                # Progress stays valid, but wallets or tokens added now are not back-filled
                # below next_block: a new watch_id with a start block does that.
                log.warning("watched tokens/wallets changed since the stored progress; blocks "
                            "below %d are not read again for them", loaded.next_block)
            self.state = loaded
            log.info("%s: resuming at block %d", READY_MARKER, loaded.next_block)
        return self.state

    async def sync(self, until_block: int | None = None,
                   stop: asyncio.Event | None = None) -> SyncStats:
        """Publish everything confirmed up to the current safe head (or `until_block`); returns
        early, between two ranges, once `stop` is set."""
        state = self.state if self.state is not None else await self.load()
        moved = 0
        chunk = self.config.chunk_blocks
        while stop is None or not stop.is_set():
            head = await self.reader.head()
            safe = head - self.config.confirmations
            last = safe if until_block is None else min(safe, until_block)
            self.blocks_behind = max(0, last - state.next_block + 1)
            try:
                if await self._tip_changed(state):
                    state = await self._repair_reorg(state)
                if state.next_block > last:
                    return self.stats
                end = min(state.next_block + chunk - 1, last)
                state = await self._publish_range(state, state.next_block, end, safe)
            except RangeTooLargeError:
                if chunk == 1:
                    raise
                chunk = max(1, chunk // 2)
                log.info("node refused the block range; reading %d blocks at a time", chunk)
            except ChainMovedError as exc:
                moved += 1
                self.stats.chain_moved += 1
                if moved > CHAIN_MOVED_RETRIES_MAX:
                    raise ChainRpcError(f"the chain kept moving while blocks were read ({exc})",
                                        retriable=True) from exc
                log.info("chain moved while reading: %s; reading again", exc)
        return self.stats

    async def run(self, stop: asyncio.Event, until_block: int | None = None) -> SyncStats:
        """sync() every poll interval until `stop` is set (or `until_block` is published).
        Retriable failures are retried with capped backoff; an outage longer than
        OUTAGE_LIMIT_S or any other error ends the run (progress is durable either way)."""
        failing_since: float | None = None
        delay = RPC_BACKOFF_INITIAL_S
        while not stop.is_set():
            try:
                await self.sync(until_block, stop)
                failing_since, delay = None, RPC_BACKOFF_INITIAL_S
                if until_block is not None and self.state is not None \
                        and self.state.next_block > until_block:
                    return self.stats
                wait_s = self.config.poll_interval_s
            except ChainError as exc:
                if not exc.retriable:
                    raise
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > OUTAGE_LIMIT_S:
                    raise
                log.warning("retrying in %.1fs: %s", delay, exc)
                wait_s, delay = delay, min(delay * 2, RPC_BACKOFF_MAX_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait_s)
        return self.stats

    # -------------------------------------------------------------- steps

    async def _tip_changed(self, state: st.WatchState) -> bool:
        tip = state.tip
        if tip is None:
            return False
        return await self.reader.block_hash(tip[0]) != tip[1]

    async def _publish_range(self, state: st.WatchState, start: int, end: int,
                             safe: int) -> st.WatchState:
        end_hash_before = await self.reader.block_hash(end)
        logs = await self.reader.transfer_logs(start, end, self._tokens, self._wallets)
        # Headers of the blocks a reorg could still reach, and always the range's last block.
        dense_from = max(start, safe - st.REORG_WINDOW_BLOCKS + 1)
        numbers = list(range(dense_from, end + 1)) if dense_from <= end else [end]
        headers = await self.reader.headers(numbers)
        hashes: dict[int, str] = {}
        previous = state.hash_of(numbers[0] - 1)
        for number in numbers:
            header = headers.get(number)
            if header is None:
                raise ChainMovedError(f"block {number} is gone")
            block_hash, parent_hash = header
            if previous is not None and parent_hash != previous:
                raise ChainMovedError(f"block {number} does not link to block {number - 1}")
            hashes[number], previous = block_hash, block_hash
        if hashes[end] != end_hash_before:
            raise ChainMovedError(f"block {end} changed while its range was read")
        for raw in logs:
            known = hashes.get(raw.block_number)
            if known is not None and raw.block_hash != known:
                raise ChainMovedError(f"a log of block {raw.block_number} is from another fork")
        tip = state.tip
        if tip is not None and numbers[0] - 1 != tip[0] \
                and await self.reader.block_hash(tip[0]) != tip[1]:
            raise ChainMovedError(f"block {tip[0]} changed while blocks above it were read")
        decoded, skipped = tr.decode_logs(logs, self.config, self.chain)
        fresh = st.fresh_transfers(state, decoded)
        new_state = state.advanced(end, hashes, fresh)
        await self.sink.commit(fresh, new_state)
        self.state = new_state
        self.stats.confirmed += len(fresh)
        self.stats.skipped_logs += skipped
        self.stats.ranges += 1
        metrics.chain_published(len(fresh), new_state.next_block)
        if skipped:
            log.warning("blocks %d..%d: %d logs of configured tokens are not ERC-20 Transfers",
                        start, end, skipped)
        log.info("blocks %d..%d: %d transfers published", start, end, len(fresh))
        return new_state

    async def _repair_reorg(self, state: st.WatchState) -> st.WatchState:
        fork: int | None = None
        for number, kept_hash in st.fork_candidates(state):
            if await self.reader.block_hash(number) == kept_hash:
                fork = number
                break
        if fork is None:
            fork = st.fork_when_none_match(state)
            if fork is None:
                raise ChainReorgTooDeepError(
                    f"reorg below block {state.hashes[0][0] if state.hashes else '?'}: no kept "
                    f"block hash is canonical (window {st.REORG_WINDOW_BLOCKS} blocks); "
                    "restart with a new watch_id and start block after checking the chain")
        candidates = st.orphan_candidates(state, fork)
        current: dict[int, str | None] = {}
        for number in sorted({t.block_number for t in candidates}):
            current[number] = await self.reader.block_hash(number)
        orphaned = [t for t in candidates if current[t.block_number] != t.block_hash]
        removed = [t.removed() for t in orphaned]
        new_state = state.rewound(fork, orphaned)
        await self.sink.commit(removed, new_state)
        self.state = new_state
        self.stats.removed += len(removed)
        self.stats.reorgs += 1
        log.warning("reorg: blocks above %d replaced; %d transfers removed, reading from %d again",
                    fork, len(removed), fork + 1)
        return new_state


# ------------------------------------------------------------------ the node (web3, async HTTP)

_RANGE_REFUSED = re.compile(
    r"block range|range (is )?too (large|wide|big)|too many (results|logs|blocks)|more than \d+ "
    r"(results|logs)|response size|limit(ed)? (is|to|exceeded)|exceed|query timeout", re.I)
_RATE_LIMITED = re.compile(r"rate.?limit|too many requests|capacity|429|temporarily|try again|busy",
                           re.I)


def _retriable(exc: BaseException) -> bool:
    import aiohttp
    from web3 import exceptions as w3e

    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status == 429 or exc.status >= 500
    if isinstance(exc, aiohttp.ClientError | TimeoutError | ConnectionError | OSError):
        return True
    if isinstance(exc, w3e.TooManyRequests | w3e.RequestTimedOut | w3e.ProviderConnectionError
                  | w3e.BadResponseFormat):
        return True
    if isinstance(exc, w3e.Web3RPCError):
        return bool(_RATE_LIMITED.search(str(exc)))
    return False


class Web3Reader:
    """ChainReader over web3's AsyncWeb3 and AsyncHTTPProvider, with bounded retries."""

    def __init__(self, rpc_url: str, timeout_s: float = RPC_TIMEOUT_S) -> None:
        import aiohttp
        from web3 import AsyncHTTPProvider, AsyncWeb3

        # web3's own retry is off: retries here are bounded, logged and classified.
        provider = AsyncHTTPProvider(rpc_url, exception_retry_configuration=None,
                                     request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout_s)})
        self.url = rpc_url
        self.w3 = AsyncWeb3(provider)
        self._headers_gate = asyncio.Semaphore(HEADER_FETCH_CONCURRENCY)

    async def close(self) -> None:
        await self.w3.provider.disconnect()

    async def call(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        """Run one RPC call with capped exponential backoff on retriable failures."""
        delay = RPC_BACKOFF_INITIAL_S
        for attempt in range(1, RPC_ATTEMPTS_MAX + 1):
            try:
                return await make()
            except ChainError:
                raise
            except Exception as exc:  # classified below: every node failure becomes a ChainRpcError
                if not _retriable(exc):
                    raise ChainRpcError(f"{what} on {self.url}: {exc!r}", retriable=False) from exc
                if attempt == RPC_ATTEMPTS_MAX:
                    raise ChainRpcError(f"{what} on {self.url} failed {attempt} times: {exc!r}",
                                        retriable=True) from exc
                log.info("%s failed (%r); retry %d/%d in %.2fs", what, exc, attempt,
                         RPC_ATTEMPTS_MAX - 1, delay)
                await asyncio.sleep(delay * random.uniform(1 - RPC_BACKOFF_JITTER,
                                                           1 + RPC_BACKOFF_JITTER))
                delay = min(delay * 2, RPC_BACKOFF_MAX_S)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def chain_id(self) -> int:
        return await self.call("eth_chainId", lambda: self.w3.eth.chain_id)

    async def head(self) -> int:
        return int(await self.call("eth_blockNumber", lambda: self.w3.eth.block_number))

    async def _header(self, number: int) -> tuple[str, str] | None:
        from web3.exceptions import BlockNotFound

        async def get() -> tuple[str, str] | None:
            try:
                block = await self.w3.eth.get_block(number)
            except BlockNotFound:
                return None
            return tr.hex0x(bytes(block["hash"])), tr.hex0x(bytes(block["parentHash"]))

        async with self._headers_gate:
            return await self.call(f"eth_getBlockByNumber({number})", get)

    async def block_hash(self, number: int) -> str | None:
        header = await self._header(number)
        return None if header is None else header[0]

    async def headers(self, numbers: list[int]) -> dict[int, tuple[str, str] | None]:
        found = await asyncio.gather(*(self._header(number) for number in numbers))
        return dict(zip(numbers, found, strict=True))

    async def transfer_logs(self, start: int, end: int, tokens: list[str],
                            wallets: list[str]) -> list[tr.RawLog]:
        from web3 import AsyncWeb3
        from web3.exceptions import Web3RPCError

        addresses = [AsyncWeb3.to_checksum_address(token) for token in tokens]
        wallet_topics = [tr.address_to_topic(wallet) for wallet in wallets]
        found: dict[tuple[str, int], tr.RawLog] = {}
        # Two queries: topics are ANDed across positions, so "from OR to a watched wallet" is
        # one query per side.
        for topics in ([tr.TRANSFER_TOPIC, wallet_topics], [tr.TRANSFER_TOPIC, None, wallet_topics]):
            params: Any = {"fromBlock": start, "toBlock": end, "address": addresses,
                           "topics": topics}

            async def get(params: Any = params) -> list[Any]:
                try:
                    return list(await self.w3.eth.get_logs(params))
                except Web3RPCError as exc:
                    if _RANGE_REFUSED.search(str(exc)) and not _RATE_LIMITED.search(str(exc)):
                        raise RangeTooLargeError(f"eth_getLogs {start}..{end}: {exc}") from exc
                    raise

            for entry in await self.call(f"eth_getLogs({start}..{end})", get):
                raw = _raw_log(entry)
                found[(raw.tx_hash, raw.log_index)] = raw
        return sorted(found.values(), key=lambda item: (item.block_number, item.log_index))


def _raw_log(entry: Any) -> tr.RawLog:
    return tr.RawLog(
        address=str(entry["address"]).lower(),
        topics=tuple(bytes(topic) for topic in entry["topics"]),
        data=bytes(entry["data"]),
        block_number=int(entry["blockNumber"]),
        block_hash=tr.hex0x(bytes(entry["blockHash"])),
        tx_hash=tr.hex0x(bytes(entry["transactionHash"])),
        log_index=int(entry["logIndex"]),
    )


# ------------------------------------------------------------------ Kafka (transactions)


def state_topic(settings: Settings) -> str:
    return settings.topic(STATE_TOPIC)


def transactional_id(settings: Settings, chain: str, watch_id: str) -> str:
    return f"sardis-chain-watch.{settings.topic_prefix}{chain}.{watch_id}"


async def ensure_state_topic(settings: Settings) -> None:
    """The compacted progress topic (one partition: a handful of records, read in full at start)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**settings.kafka_connection(),
                                request_timeout_ms=KAFKA_TIMEOUT_MS)
    try:
        await admin.start()
        name = state_topic(settings)
        if name not in set(await admin.list_topics()):
            plan = plan_replication(settings.replication_factor, await broker_count(admin))
            response = await admin.create_topics(
                [NewTopic(name, STATE_TOPIC_PARTITIONS, plan.replication_factor,
                          topic_configs={"cleanup.policy": "compact", **plan.topic_config()})],
                timeout_ms=KAFKA_TIMEOUT_MS)
            for topic, code, *_ in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise WatchStateError(f"creating {topic}: Kafka error code {code}")
        # A fresh topic has no leader for a moment; reading it then only logs errors and waits.
        deadline = time.monotonic() + KAFKA_TIMEOUT_MS / 1000
        while True:
            described = await admin.describe_topics([name])
            if all(t.get("error_code", 0) == 0 and t["partitions"]
                   and all(p["leader"] >= 0 for p in t["partitions"]) for t in described):
                break
            if time.monotonic() > deadline:
                raise WatchStateError(f"{name} has no leader after {KAFKA_TIMEOUT_MS} ms",
                                      retriable=True)
            await asyncio.sleep(TOPIC_READY_POLL_S)
    except KafkaError as exc:
        raise WatchStateError(f"creating the watch progress topic: {exc!r}",
                              retriable=exc.retriable) from exc
    finally:
        await admin.close()


class KafkaSink:
    """Transfers to chain.transfers and progress to the state topic, in one transaction each."""

    def __init__(self, settings: Settings, chain: str, watch_id: str) -> None:
        from sardis_ledger.streams.topics import LedgerTopic
        from sardis_ledger.streams.wire import Wire

        self.settings = settings
        self.wire = Wire(settings)  # writes SARDIS_WIRE_FORMAT
        self.codec = self.wire.codec
        self.topic = settings.topic(LedgerTopic.CHAIN_TRANSFERS)
        self.state_topic = state_topic(settings)
        self.state_key = f"{chain}/{watch_id}".encode()
        self.transactional_id = transactional_id(settings, chain, watch_id)
        self.producer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        from sardis_ledger.streams.topics import LedgerTopic

        await self.wire.start((LedgerTopic.CHAIN_TRANSFERS,))

        # Starting a producer with the same transactional id fences a previous (crashed) watcher
        # and aborts its open transaction, so the progress read next is the last committed one.
        self.producer = AIOKafkaProducer(
            **self.settings.kafka_connection(), transactional_id=self.transactional_id,
            enable_idempotence=True, acks="all", linger_ms=5, request_timeout_ms=KAFKA_TIMEOUT_MS)
        try:
            await self.producer.start()
        except KafkaError as exc:
            await self.producer.stop()
            raise WatchStateError(f"starting the transactional producer: {exc!r}",
                                  retriable=exc.retriable) from exc

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()

    async def load_state(self) -> st.WatchState | None:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.errors import KafkaError

        consumer = AIOKafkaConsumer(**self.settings.kafka_connection(),
                                    isolation_level="read_committed", enable_auto_commit=False)
        found: bytes | None = None
        try:
            await consumer.start()
            partition = TopicPartition(self.state_topic, 0)
            consumer.assign([partition])
            await consumer.seek_to_beginning(partition)
            end = (await consumer.end_offsets([partition]))[partition]
            deadline = time.monotonic() + STATE_READ_TIMEOUT_S
            while await consumer.position(partition) < end:
                if time.monotonic() > deadline:
                    raise WatchStateError(f"reading {self.state_topic}: not at offset {end} after "
                                          f"{STATE_READ_TIMEOUT_S:.0f}s", retriable=True)
                batches = await consumer.getmany(partition, timeout_ms=500)
                for message in batches.get(partition, []):
                    if message.key == self.state_key and message.value is not None:
                        found = message.value
        except KafkaError as exc:
            raise WatchStateError(f"reading {self.state_topic}: {exc!r}",
                                  retriable=exc.retriable) from exc
        finally:
            await consumer.stop()
        return None if found is None else st.WatchState.from_bytes(found)

    async def commit(self, transfers: list[tr.ChainTransfer], state: st.WatchState) -> None:
        from aiokafka.errors import KafkaError

        from sardis_ledger.streams.topics import MESSAGE_BYTES_MAX

        values = [(t.tx_hash.encode(), self.codec.encode("ChainTransfer", tr.to_wire(t)))
                  for t in transfers]
        state_bytes = state.to_bytes()
        if len(state_bytes) > MESSAGE_BYTES_MAX:
            raise WatchStateError(f"watch progress is {len(state_bytes)} bytes, over Kafka's "
                                  f"{MESSAGE_BYTES_MAX}: too many transfers in "
                                  f"{st.REORG_WINDOW_BLOCKS} blocks")
        producer = self.producer
        try:
            # The context commits on success and aborts on any exception.
            async with producer.transaction():
                for key, value in values:
                    await producer.send(self.topic, value, key=key)
                await producer.send(self.state_topic, state_bytes, key=self.state_key,
                                    partition=0)
        except KafkaError as exc:
            raise WatchStateError(f"publishing {len(values)} transfers: {exc!r}",
                                  retriable=exc.retriable) from exc


# ------------------------------------------------------------------ entry point


async def run_watch(settings: Settings, config: WatchConfig, *, until_block: int | None = None,
                    once: bool = False, stop: asyncio.Event | None = None,
                    health: Health | None = None) -> SyncStats:
    """Run a watcher against the settings' node and Kafka: until `stop`, or once, or until
    everything up to `until_block` is published. `health` (the process's /readyz) is ready while
    the watcher is at most READY_BLOCKS_BEHIND_MAX confirmed blocks behind."""
    from sardis_ledger.streams.topics import create_topics

    # The watcher's principal may not read ledger.entries (README: Deploying securely); the
    # worker checks the entries' ownership at its own start.
    await create_topics(settings, check_entries=False)
    await ensure_state_topic(settings)
    reader = Web3Reader(settings.chain_rpc)
    chain = config.chain or chain_name_for(await reader.chain_id())
    sink = KafkaSink(settings, chain, config.watch_id)
    await sink.start()
    try:
        watcher = ChainWatcher(config, chain, reader, sink)
        if health is not None:
            health.ready_when(lag_readiness(lambda: watcher.state is not None,
                                            lambda: watcher.blocks_behind, "chain watch",
                                            unit="blocks", limit=READY_BLOCKS_BEHIND_MAX))
        await watcher.load()
        if once:
            return await watcher.sync(until_block)
        return await watcher.run(stop or asyncio.Event(), until_block)
    finally:
        await sink.stop()
        await reader.close()
