"""Valid ledger.entries traffic without a worker: entries sealed by the pure core, plus tree heads.

Sink tests and the sink benchmark need tens of thousands of committed entries quickly; the
worker produces ~1,200-1,400/s on the dev machine, so this produces what it would (same core decisions,
hashes and Merkle roots) straight onto ledger.entries and ledger.tree-heads.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.streams import core, merkle, records
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import InvariantViolation
from sardis_ledger.streams.money import Currency, currency_table, to_major
from sardis_ledger.streams.topics import LedgerTopic

TREE_HEAD_EVERY_ENTRIES = 250
AMOUNT_MINOR_MAX = 10**9
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: fixed, so runs are reproducible
STEP_MS = 3  # committed_at advances this much per entry (point-in-time queries need spread)
PRODUCE_LINGER_MS = 5


@dataclass
class Produced:
    entries: list[dict[str, Any]] = field(default_factory=list)
    tree_heads: list[dict[str, Any]] = field(default_factory=list)


class LedgerWorkload:
    """Entries over `accounts` accounts in USDC, decided and sealed by streams.core."""

    def __init__(self, partitions: int, accounts: int, seed: int, *, prefix: str = "sink",
                 currencies: Mapping[str, Currency] | None = None) -> None:
        self.partitions = partitions
        self.accounts = accounts
        self.rng = random.Random(seed)
        self.seed = seed
        self.prefix = prefix
        self.currencies = dict(currencies) if currencies is not None else currency_table()
        self.states: dict[str, core.AccountState] = {}
        self.frontiers = [merkle.MerkleFrontier() for _ in range(partitions)]
        self.headed = [0] * partitions
        self.count = 0
        self.now_ms = START_MS

    def _command(self) -> dict[str, Any]:
        account = f"{self.prefix}_{self.rng.randrange(self.accounts):05d}"
        state = self.states.get(core.account_key(account, "USDC"), core.AccountState())
        if state.balance_minor > 0 and self.rng.random() < 0.3:
            kind, amount = "debit", self.rng.randint(1, state.balance_minor)
        else:
            kind, amount = self.rng.choice(["credit", "credit", "refund", "adjustment"]), \
                self.rng.randint(1, AMOUNT_MINOR_MAX)
        return {"command_id": f"{self.prefix}-{self.seed}-{self.count}", "account_id": account,
                "currency": "USDC", "entry_type": kind,
                "amount": to_major(amount, self.currencies["USDC"].decimals),
                "reference": f"ref-{self.count}", "metadata": {"n": str(self.count)}}

    def next(self, count: int) -> Produced:
        """The next `count` entries, and a tree head per partition every TREE_HEAD_EVERY_ENTRIES."""
        out = Produced()
        for _ in range(count):
            command = core.parse_post_entry(self._command(), self.currencies)
            if not isinstance(command, core.PostEntry):
                raise InvariantViolation(f"workload made an invalid command: {command}")
            partition = core.partition_for(command.account_id, self.partitions)
            self.now_ms += STEP_MS
            decision = core.decide_post_entry(
                self.states.get(command.account_key, core.AccountState()),
                self.frontiers[partition], command, partition=partition, now_ms=self.now_ms)
            if decision.outcome.entry is None:
                raise InvariantViolation(f"workload command rejected: {decision.outcome}")
            self.states[command.account_key] = decision.state
            self.frontiers[partition] = decision.frontier
            self.count += 1
            entry = decision.outcome.entry
            out.entries.append(records.entry_to_wire(entry, self.currencies[entry.currency]))
            if decision.frontier.tree_size - self.headed[partition] >= TREE_HEAD_EVERY_ENTRIES:
                out.tree_heads.append(self._head(partition))
        return out

    def _head(self, partition: int) -> dict[str, Any]:
        self.headed[partition] = self.frontiers[partition].tree_size
        return records.tree_head_to_wire(partition, self.frontiers[partition], self.now_ms)

    def final_heads(self) -> list[dict[str, Any]]:
        """A tree head for every partition with entries not yet covered by one."""
        return [self._head(p) for p in range(self.partitions)
                if self.frontiers[p].tree_size > self.headed[p]]


class WorkloadProducer:
    """Produces workload records to the ledger topics at their owner partitions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = AvroCodec()
        self.producer = AIOKafkaProducer(**settings.kafka_connection(), acks="all",
                                         enable_idempotence=True, linger_ms=PRODUCE_LINGER_MS)

    async def __aenter__(self) -> WorkloadProducer:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def send(self, produced: Produced, *, duplicates: int = 0,
                   rng: random.Random | None = None) -> None:
        """Send entries then tree heads; `duplicates` entries are sent twice (worker re-emits)."""
        entries_topic = self.settings.topic(LedgerTopic.ENTRIES)
        heads_topic = self.settings.topic(LedgerTopic.TREE_HEADS)
        again = (rng or random.Random(0)).sample(produced.entries, min(duplicates, len(produced.entries)))
        for record in produced.entries + again:
            await self.producer.send(entries_topic, self.codec.encode("Entry", record),
                                     key=record["account_id"].encode(), partition=record["partition"])
        for head in produced.tree_heads:
            await self.producer.send(heads_topic, self.codec.encode("TreeHead", head),
                                     key=str(head["partition"]).encode(), partition=head["partition"])

    async def flush(self) -> None:
        await self.producer.flush()
