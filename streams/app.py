"""The Faust stream app: decodes commands, calls the pure core, writes tables and produces results."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import faust
from faust.types import EventT, StreamT

from schemas.codec import AvroCodec
from streams import core, records
from streams.config import Settings
from streams.errors import CodecError
from streams.money import Currency, currency_table
from streams.topics import TOPICS, LedgerTopic

log = logging.getLogger("sardis.worker")

COMMIT_INTERVAL_S = 0.1  # offsets + transactions; results become visible to readers at commit
PRODUCER_LINGER_MS = 5
STREAM_BUFFER_MAX = 4096
MAX_POLL_RECORDS = 2000


class LedgerWorker:
    """Owns the Faust app, its tables and its one agent (one per process, any number of processes)."""

    def __init__(self, settings: Settings, currencies: Mapping[str, Currency] | None = None) -> None:
        self.settings = settings
        self.currencies = dict(currencies) if currencies is not None else currency_table()
        self.codec = AvroCodec()
        self.app = faust.App(
            settings.topic("sardis-ledger"),
            broker=f"kafka://{settings.kafka_bootstrap}",
            store="memory://",
            processing_guarantee="exactly_once",
            topic_partitions=settings.partitions,
            topic_replication_factor=1,
            topic_allow_declare=True,
            broker_commit_interval=COMMIT_INTERVAL_S,
            producer_linger_ms=PRODUCER_LINGER_MS,
            stream_buffer_maxsize=STREAM_BUFFER_MAX,
            broker_max_poll_records=MAX_POLL_RECORDS,
            consumer_auto_offset_reset="earliest",
            web_enabled=False,
        )
        raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes,
                               "key_serializer": "raw", "value_serializer": "raw"}
        self.topics = {
            t.name: self.app.topic(settings.topic(t.name), partitions=settings.partitions,
                                   internal=False, **raw)
            for t in TOPICS
        }
        table_options: dict[str, Any] = {"partitions": settings.partitions, "default": None,
                                         "schema": faust.Schema(**raw)}
        # account_id|currency -> AccountState; command_id -> CommandRecord; partition -> LogHead.
        # All three are written in the context of a command event, so each changelog record lands
        # in that command's partition: the tables are co-partitioned with ledger.commands.
        self.accounts = self.app.Table("accounts", **table_options)
        self.commands = self.app.Table("commands", **table_options)
        self.logs = self.app.Table("merkle-logs", **table_options)
        self.app.agent(self.topics[LedgerTopic.COMMANDS], name="ledger")(self._agent)

    async def _agent(self, stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            await self.handle(event)

    # ------------------------------------------------------------------ per command

    async def handle(self, event: EventT) -> None:
        message = event.message
        partition: int = message.partition
        payload: bytes = message.value if message.value is not None else b""
        # Kafka gives integer ms; Faust hands them over as float seconds. round() restores the
        # exact integer (the float error is far below half a millisecond).
        now_ms = round(message.timestamp * 1000)
        try:
            name, record = self.codec.decode(payload)
        except CodecError as exc:
            await self._dead_letter(event, exc.reason, str(exc), None, now_ms)
            return
        if name != "PostEntry":
            await self._dead_letter(event, core.Reason.UNKNOWN_COMMAND,
                                    f"{name} is not a command of ledger.commands",
                                    record.get("command_id"), now_ms)
            return
        parsed = core.parse_post_entry(record, self.currencies)
        if isinstance(parsed, core.Rejection):
            await self._dead_letter(event, parsed.reason, parsed.detail, parsed.command_id, now_ms)
            if parsed.command_id is not None:
                await self._result(core.Outcome(parsed.command_id, core.Status.REJECTED,
                                                parsed.reason, parsed.detail), partition)
            return
        owner = core.partition_for(parsed.account_id, self.settings.partitions)
        if owner != partition:
            # A producer with another partitioner put it here; only the owner may decide it.
            await self.topics[LedgerTopic.COMMANDS].send(
                key=parsed.account_id.encode(), value=payload, partition=owner)
            return
        await self._decide(parsed, partition, now_ms)

    async def _decide(self, command: core.PostEntry, partition: int, now_ms: int) -> None:
        command_key = command.command_id.encode()
        seen = self.commands.get(command_key)
        if seen is not None:
            record = records.record_from_bytes(seen)
            outcome = core.replay(record, core.payload_digest(command))
            if outcome is record.outcome and outcome.entry is not None:
                # Re-emit: if a crash lost the first emission despite exactly-once, this restores
                # it; consumers dedupe by entry_id, so a second copy is harmless.
                await self._entry(outcome.entry, partition)
            await self._result(outcome, partition)
            return
        account_key = command.account_key.encode()
        log_key = str(partition).encode()
        state = records.state_from_bytes(self.accounts.get(account_key))
        log_head = records.log_from_bytes(self.logs.get(log_key))
        decision = core.decide_post_entry(state, log_head.frontier, command,
                                          partition=partition, now_ms=now_ms)
        self.commands[command_key] = records.record_to_bytes(decision.record)
        entry = decision.outcome.entry
        if entry is not None:
            self.accounts[account_key] = records.state_to_bytes(decision.state)
            log_head = replace(log_head, frontier=decision.frontier)
            if core.tree_head_due(log_head, now_ms):
                await self._tree_head(partition, log_head, now_ms)
                log_head = replace(log_head, head_tree_size=log_head.frontier.tree_size,
                                   head_published_at_ms=now_ms)
            self.logs[log_key] = records.log_to_bytes(log_head)
            await self._entry(entry, partition)
            await self._balance(command, decision.state, partition)
        await self._result(decision.outcome, partition)

    # ------------------------------------------------------------------ outputs (all to `partition`)
    # Every output goes to the partition of the command that caused it: Faust's exactly-once
    # producer for that partition then carries outputs, table changelogs and the source offset in
    # one transaction, and ledger.entries partition p is written by p's owner alone (its Merkle log).

    async def _send(self, topic: str, key: bytes, record_name: str, record: dict[str, Any],
                    partition: int) -> None:
        value = self.codec.encode(record_name, record)
        await self.topics[topic].send(key=key, value=value, partition=partition)

    async def _entry(self, entry: core.Entry, partition: int) -> None:
        await self._send(LedgerTopic.ENTRIES, entry.account_id.encode(), "Entry",
                         records.entry_to_wire(entry, self.currencies[entry.currency]), partition)

    async def _result(self, outcome: core.Outcome, partition: int) -> None:
        await self._send(LedgerTopic.RESULTS, outcome.command_id.encode(), "Result",
                         records.outcome_to_wire(outcome, self.currencies), partition)

    async def _balance(self, command: core.PostEntry, state: core.AccountState, partition: int) -> None:
        await self._send(LedgerTopic.BALANCES, command.account_key.encode(), "Balance",
                         records.balance_to_wire(command.account_id,
                                                 self.currencies[command.currency], state),
                         partition)

    async def _tree_head(self, partition: int, log_head: core.LogHead, now_ms: int) -> None:
        await self._send(LedgerTopic.TREE_HEADS, str(partition).encode(), "TreeHead",
                         records.tree_head_to_wire(partition, log_head.frontier, now_ms), partition)

    async def _dead_letter(self, event: EventT, reason: str, detail: str,
                           command_id: str | None, now_ms: int) -> None:
        message = event.message
        log.warning("dead letter %s:%s@%s: %s (%s)", message.topic, message.partition,
                    message.offset, reason, detail)
        await self._send(LedgerTopic.DLQ, message.key or b"", "DeadLetter",
                         records.dead_letter(reason=str(reason), detail=detail, topic=message.topic,
                                             partition=message.partition, offset=message.offset,
                                             key=message.key, payload=message.value or b"",
                                             command_id=command_id, failed_at_ms=now_ms),
                         message.partition)


def run_worker(settings: Settings, loglevel: str = "warn") -> None:
    """Run one worker process until it is stopped (SIGTERM/SIGINT); blocks."""
    worker = LedgerWorker(settings)
    faust.Worker(worker.app, loglevel=loglevel, quiet=True).execute_from_commandline()
