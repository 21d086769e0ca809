"""The account side: decisions on the accounts a partition owns (entries, holds, Merkle log)."""

# Tables, all co-partitioned with ledger.commands: accounts (account_id|currency -> AccountState),
# commands (command_id -> CommandRecord: idempotency), logs (partition -> LogHead: Merkle frontier,
# tree-head state, next undecided offset), holds (batch_id#leg_index -> Hold). The decisions are
# streams/core.py's and streams/batches.py's pure functions; this module reads the tables, writes
# what they decided through the commit protocol and emits every output to the deciding
# partition, so outputs, table changelogs and the offset commit in one transaction, and
# ledger.entries partition p is written by p's owner alone (its Merkle log).

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from sardis_ledger.streams import batches, core, metrics, records
from sardis_ledger.streams.topics import LedgerTopic
from sardis_ledger.streams.worker.commit import CommitProtocol
from sardis_ledger.streams.worker.compat import table_value
from sardis_ledger.streams.worker.entry_messages import EntryMessages
from sardis_ledger.streams.worker.ports import Command, WorkerPort


@dataclass(frozen=True, slots=True)
class AccountTables:
    """The account side's Faust tables (memory store, raw bytes)."""

    accounts: Any
    commands: Any
    logs: Any
    holds: Any


class AccountPartition:
    """Decides ledger.commands and ledger.internal.commands records of owned partitions."""

    def __init__(self, port: WorkerPort, commits: CommitProtocol, tables: AccountTables,
                 claim: Callable[[core.Entry, bytes, int], Awaitable[None]],
                 entry_messages: EntryMessages) -> None:
        self.port = port
        self.entry_messages = entry_messages  # kept for the batch Results that repeat them
        self.commits = commits
        self.settings = port.settings
        self.currencies = port.currencies
        self.accounts, self.commands = tables.accounts, tables.commands
        self.logs, self.holds = tables.logs, tables.holds
        self.claim = claim  # the reconciler's: an entry that names a chain transfer is claimed
        self.commands_topic = self.settings.topic(LedgerTopic.COMMANDS)
        self.internal_commands_topic = self.settings.topic(LedgerTopic.INTERNAL_COMMANDS)

    def _rejected(self, command: Command, rejection: core.Rejection | batches.BatchRejection,
                  command_id: str | None = None) -> None:
        """Dead-letter a record that must have no effect, with its reason."""
        self.port.dead_letter(command, rejection.reason, rejection.detail, command_id)

    async def record(self, command: Command, name: str, record: dict[str, Any]) -> bool:
        """ledger.commands (PostEntry) and ledger.internal.commands (also reserves, settles).
        True when the decision recorded the record's offset itself."""
        partition = command.partition
        internal = command.topic == self.internal_commands_topic
        if name == "PostEntry":
            parsed = core.parse_post_entry(record, self.currencies)
            if isinstance(parsed, core.Rejection):
                self._rejected(command, parsed, parsed.command_id)
                if parsed.command_id is not None:
                    await self.result(core.Outcome(parsed.command_id, core.Status.REJECTED,
                                                    parsed.reason, parsed.detail), partition)
            elif await self._owned(command, parsed.account_id, forward=not internal):
                return await self._decide(parsed, command)
            return False
        parser = batches.parse_reserve if name == "ReserveLeg" else batches.parse_settle
        message = parser(record, self.currencies, self.settings.partitions)
        if isinstance(message, batches.BatchRejection):
            self._rejected(command, message)
        elif not await self._owned(command, message.leg.account_id if isinstance(
                message, batches.Reserve) else message.account_id, forward=False):
            return False
        elif isinstance(message, batches.Reserve):
            await self._reserve(message, command)
        else:
            await self._settle(message, command)
        return False

    async def _owned(self, command: Command, account_id: str, *, forward: bool) -> bool:
        """Whether this partition owns the account. A client command on another partition (a
        producer with another partitioner put it there) is forwarded to its owner over
        ledger.internal.commands; an internal record there is dead-lettered (workers send
        internal records to the owner, so it was not sent by one)."""
        owner = core.partition_for(account_id, self.settings.partitions)
        if owner == command.partition:
            return True
        if forward:
            self.commits.produce(self.internal_commands_topic, account_id.encode(), command.value,
                                owner, transaction_of=command.partition)
        else:
            self.port.dead_letter(command, core.Reason.WRONG_PARTITION,
                                    f"account {core.shown(account_id)} is owned by partition "
                                    f"{owner}", None)
        return False

    # ------------------------------------------------------------------ batches: account side

    async def _reserve(self, message: batches.Reserve, command: Command) -> None:
        partition = command.partition
        account_key = core.account_key(message.leg.account_id, message.leg.currency).encode()
        hold_key = message.hold_key.encode()
        state = records.state_from_bytes(table_value(self.accounts, account_key))
        step = batches.reserve(state, records.hold_from_bytes(table_value(self.holds, hold_key)), message)
        if isinstance(step, batches.BatchRejection):
            self._rejected(command, step)
            return
        if step.changed:
            await self._write_hold(hold_key, step.hold, state, step.state, message.leg.account_id,
                                   message.leg.currency, partition)
        if step.report is not None:
            await self._report(step.report, message.coordinator_partition, partition)

    async def _write_hold(self, hold_key: bytes, hold: batches.Hold, before: core.AccountState,
                          after: core.AccountState, account_id: str, currency: str,
                          partition: int) -> None:
        """A reserve's or settle's new hold, and the account's state and balance if it moved."""
        self.commits.put(self.holds, hold_key, records.hold_to_bytes(hold), partition)
        if after != before:
            self.commits.put(self.accounts, core.account_key(account_id, currency).encode(),
                             records.state_to_bytes(after), partition)
            await self._balance_of(account_id, currency, after, partition)

    async def _settle(self, message: batches.Settle, command: Command) -> None:
        partition = command.partition
        account_key = core.account_key(message.account_id, message.currency).encode()
        hold_key = message.hold_key.encode()
        state = records.state_from_bytes(table_value(self.accounts, account_key))
        hold = records.hold_from_bytes(table_value(self.holds, hold_key))
        log_key = str(partition).encode()
        log_head = records.log_from_bytes(table_value(self.logs, log_key))
        if message.action is batches.SettleAction.VOID:
            step = batches.void(state, hold, message)
        else:
            step = batches.post(state, log_head.frontier, hold, message, partition=partition,
                                now_ms=command.timestamp_ms)
        if isinstance(step, batches.BatchRejection):
            self._rejected(command, step)
            return
        if step.changed:
            await self._write_hold(hold_key, step.hold, state, step.state, message.account_id,
                                   message.currency, partition)
        if step.changed and step.frontier is not None:
            log_head = replace(log_head, frontier=step.frontier)
            if core.tree_head_due(log_head, command.timestamp_ms):
                await self._tree_head(partition, log_head, command.timestamp_ms)
                log_head = replace(log_head, head_tree_size=log_head.frontier.tree_size,
                                   head_published_at_ms=command.timestamp_ms)
            self.commits.put(self.logs, log_key, records.log_to_bytes(log_head), partition)
        if step.entry is not None:
            # Re-emitted when the post is repeated, as for PostEntry: consumers dedupe by entry_id.
            await self._entry(step.entry, partition)
        if step.report is not None:
            await self._report(step.report, message.coordinator_partition, partition)

    async def _report(self, report: batches.LegReport, coordinator_partition: int,
                      partition: int) -> None:
        self.port.send(LedgerTopic.INTERNAL_COORDINATOR, report.batch_id.encode(), "LegReport",
                         records.report_to_wire(report, self.currencies), coordinator_partition,
                         transaction_of=partition)

    async def _decide(self, command: core.PostEntry, source: Command) -> bool:
        """Decide a PostEntry; True when its log-head write recorded the source offset too."""
        partition, now_ms = source.partition, source.timestamp_ms
        command_key = command.command_id.encode()
        seen = table_value(self.commands, command_key)
        if seen is not None:
            record = records.record_from_bytes(seen)
            outcome = core.replay(record, core.payload_digest(command))
            metrics.decided("replayed", outcome.reason or "", source.timestamp_ms)
            entry_message = None
            if outcome is record.outcome and outcome.entry is not None:
                # Re-emit: if a crash lost the first emission despite exactly-once, this restores
                # it; consumers dedupe by entry_id, so a second copy is harmless.
                entry_message = await self._entry(outcome.entry, partition)
            await self.result(outcome, partition, entry_message)
            return False
        account_key = command.account_key.encode()
        log_key = str(partition).encode()
        state = records.state_from_bytes(table_value(self.accounts, account_key))
        log_head = records.log_from_bytes(table_value(self.logs, log_key))
        decision = core.decide_post_entry(state, log_head.frontier, command,
                                          partition=partition, now_ms=now_ms)
        self.commits.put(self.commands, command_key, records.record_to_bytes(decision.record),
                        partition)
        entry = decision.outcome.entry
        next_offset = log_head.next_command_offset
        if source.topic == self.commands_topic:
            # One log-head write per command: Merkle frontier, tree-head state, next offset.
            next_offset = max(next_offset, source.offset + 1)
        if entry is not None:
            self.commits.put(self.accounts, account_key, records.state_to_bytes(decision.state),
                            partition)
            log_head = core.LogHead(decision.frontier, log_head.head_tree_size,
                                    log_head.head_published_at_ms, next_offset)
            if core.tree_head_due(log_head, now_ms):
                await self._tree_head(partition, log_head, now_ms)
                log_head = core.LogHead(log_head.frontier, log_head.frontier.tree_size, now_ms,
                                        next_offset)
            entry_message = await self._entry(entry, partition)
            await self._balance(command, decision.state, partition)
        else:
            entry_message = None
            log_head = core.LogHead(log_head.frontier, log_head.head_tree_size,
                                    log_head.head_published_at_ms, next_offset)
        if entry is not None or source.topic == self.commands_topic:
            self.commits.put(self.logs, log_key, records.log_to_bytes(log_head), partition)
        await self.result(decision.outcome, partition, entry_message)
        metrics.decided(decision.outcome.status, decision.outcome.reason or "", now_ms)
        return source.topic == self.commands_topic

    async def _entry(self, entry: core.Entry, partition: int) -> bytes:
        """Emit an entry; returns its encoded message (its Result copies it)."""
        value = self.entry_messages.encode(entry)
        self.commits.produce(self.settings.topic(LedgerTopic.ENTRIES), entry.account_id.encode(),
                            value, partition)
        await self.claim(entry, value, partition)
        return value

    async def result(self, outcome: core.Outcome, partition: int,
                     entry_message: bytes | None = None) -> None:
        """Emit a command's Result. With the outcome's entry already encoded (`entry_message`),
        the Result copies its bytes instead of encoding the entry again (same bytes)."""
        if entry_message is None or outcome.entry is None:
            self.port.send(LedgerTopic.RESULTS, outcome.command_id.encode(), "Result",
                           records.outcome_to_wire(outcome, self.currencies), partition)
            return
        record = records.outcome_to_wire(outcome, self.currencies, with_entry=False)
        self.commits.produce(self.settings.topic(LedgerTopic.RESULTS),
                             outcome.command_id.encode(),
                             self.port.encode_embedding("Result", record, "entry", entry_message),
                             partition)

    async def _balance(self, command: core.PostEntry, state: core.AccountState, partition: int) -> None:
        await self._balance_of(command.account_id, command.currency, state, partition)

    async def _balance_of(self, account_id: str, currency: str, state: core.AccountState,
                          partition: int) -> None:
        """Hold the account's balance; within one transaction only the last one is encoded and
        sent (ledger.balances is compacted, and read_committed readers see only the last)."""
        key = core.account_key(account_id, currency).encode()
        table = self.currencies[currency]

        def encode() -> bytes:
            return self.port.encode("Balance", records.balance_to_wire(account_id, table, state))

        self.commits.hold(partition, self.settings.topic(LedgerTopic.BALANCES), partition, key, encode,
                   latest=True)

    async def _tree_head(self, partition: int, log_head: core.LogHead, now_ms: int) -> None:
        metrics.TREE_SIZE.labels(str(partition)).set(log_head.frontier.tree_size)
        self.port.send(LedgerTopic.TREE_HEADS, str(partition).encode(), "TreeHead",
                         records.tree_head_to_wire(partition, log_head.frontier, now_ms), partition)
