"""The batch coordinator: two-phase batches decided on the partition their id hashes to."""

# Each batch has one coordinator partition (batches.coordinator_partition); its state lives in the
# `batch_state` table (b:batch_id -> BatchHeader, l:batch_id#i -> LegRecord), co-partitioned with
# ledger.batches. The decisions are streams/batches.py's pure functions; this module reads the
# table, applies their steps and sends their messages through the worker's port, so every write
# and message commits with the event that caused it.

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final, Generic, TypeVar

from sardis_ledger.streams import batches, core, metrics, records
from sardis_ledger.streams.errors import InvariantViolation
from sardis_ledger.streams.topics import LedgerTopic
from sardis_ledger.streams.worker.compat import table_items, table_value
from sardis_ledger.streams.worker.entry_messages import EntryMessages
from sardis_ledger.streams.worker.local import LocalDelivery
from sardis_ledger.streams.worker.ports import Command, WorkerPort

log = logging.getLogger("sardis.worker")

BATCH_TICK_INTERVAL_S: Final[float] = 1.0
BATCH_TIMEOUTS_PER_TICK_MAX: Final[int] = 200  # voided per tick: one transaction stays bounded
BATCH_RESEND_AFTER_MS: Final[int] = 30_000  # an unsettled batch's unanswered messages go again
# Posting and voided batches wait for answers, not for a deadline.
BATCH_NO_DEADLINE_MS: Final[int] = 2**62


# Parsed batch headers and leg records kept, by their table bytes (oldest forgotten first): the
# coordinator reads a batch's header for every report and each leg record for each report and
# decision, and parsing their JSON was ~10% of a two-leg batch's CPU.
PARSED_VALUES_MAX: Final[int] = 4096

T = TypeVar("T")


class ParsedValues(Generic[T]):
    """Table values parsed once: keyed by their exact bytes, so a hit is what those bytes hold
    (the values are frozen dataclasses, shared by every reader)."""

    def __init__(self, parse: Callable[[bytes], T], limit: int = PARSED_VALUES_MAX) -> None:
        self._parse = parse
        self._limit = limit
        self._values: dict[bytes, T] = {}

    def get(self, data: bytes) -> T:
        value = self._values.get(data)
        if value is None:
            value = self._parse(data)
            self.put(data, value)
        return value

    def put(self, data: bytes, value: T) -> None:
        if len(self._values) >= self._limit:
            del self._values[next(iter(self._values))]
        self._values[data] = value


class Coordinator:
    """Decides ledger.batches and ledger.internal.coordinator records of owned partitions."""

    def __init__(self, port: WorkerPort, batch_state: Any, entry_messages: EntryMessages,
                 local: LocalDelivery | None = None) -> None:
        self.port = port
        self.entry_messages = entry_messages  # the legs' encoded entries, for batch Results
        self.local = local  # decides a batch whole when this worker owns all its partitions
        self.settings = port.settings
        self.currencies = port.currencies
        self.batch_state = batch_state
        self.parsed_headers = ParsedValues(records.header_from_bytes)
        self.parsed_legs = ParsedValues(records.leg_record_from_bytes)
        self.batches_topic = self.settings.topic(LedgerTopic.BATCHES)
        self.coordinator_topic = self.settings.topic(LedgerTopic.INTERNAL_COORDINATOR)
        # partition of ledger.batches -> {batch_id: deadline_ms} of batches still reserving
        self._open_batches: dict[int, dict[str, int]] = {}
        self._open_batches_for: frozenset[int] | None = None  # owned partitions it was built for
        self._last_tick_ms: dict[int, int] = {}
        self._resend_at_ms: dict[str, int] = {}  # batch_id -> when to send its messages again

    def _rejected(self, command: Command, rejection: batches.BatchRejection) -> None:
        """Dead-letter a record that must have no effect, with its reason."""
        self.port.dead_letter(command, rejection.reason, rejection.detail, None)

    async def record(self, command: Command, name: str,
                                  record: dict[str, Any]) -> None:
        """ledger.batches (SubmitBatch, RollbackBatch) and ledger.internal.coordinator (also
        leg reports and ticks)."""
        partition = command.partition
        if name == "SubmitBatch":
            await self._submit_batch(command, record, partition)
        elif name == "RollbackBatch":
            await self._rollback_batch(command, record, partition)
        elif name == "LegReport":
            await self._leg_report(command, record)
        else:
            now_ms = batches.parse_tick(record, partition)
            if isinstance(now_ms, batches.BatchRejection):
                self._rejected(command, now_ms)
            else:
                await self._batch_tick(partition, now_ms)

    async def _coordinates(self, command: Command, batch_id: str) -> bool:
        """Whether this partition coordinates the batch (batches.coordinator_partition); a
        client's batch on another partition is forwarded there over ledger.internal.coordinator,
        an internal record there is dead-lettered."""
        owner = batches.coordinator_partition(batch_id, self.settings.partitions)
        if owner == command.partition:
            return True
        if command.topic == self.batches_topic:
            self.port.produce(self.coordinator_topic, batch_id.encode(), command.value, owner,
                                transaction_of=command.partition)
        else:
            self.port.dead_letter(command, core.Reason.WRONG_PARTITION,
                                    f"batch {core.shown(batch_id)} is coordinated by partition "
                                    f"{owner}", None)
        return False

    def _header(self, batch_id: str) -> batches.BatchHeader | None:
        data = table_value(self.batch_state, f"b:{batch_id}".encode())
        return None if data is None else self.parsed_headers.get(data)

    def _legs(self, header: batches.BatchHeader) -> list[batches.LegRecord]:
        out: list[batches.LegRecord] = []
        for index in range(header.leg_count):
            data = table_value(self.batch_state, f"l:{batches.hold_key(header.batch_id, index)}".encode())
            if data is None:
                raise InvariantViolation(f"batch {header.batch_id} has no leg {index}")
            out.append(self.parsed_legs.get(data))
        return out

    async def _put_header(self, header: batches.BatchHeader, partition: int) -> None:
        data = records.header_to_bytes(header)
        self.parsed_headers.put(data, header)
        self.port.put(self.batch_state, f"b:{header.batch_id}".encode(), data, partition)
        self._track(header, partition)

    def _track(self, header: batches.BatchHeader, partition: int) -> None:
        """Keep the in-memory index of unsettled batches (for timeouts and resends) current."""
        open_batches = self._open_batches.setdefault(partition, {})
        if batches.settled(header):
            open_batches.pop(header.batch_id, None)
            self._resend_at_ms.pop(header.batch_id, None)
        else:
            deadline = header.deadline_ms if header.status is batches.BatchStatus.RESERVING \
                else BATCH_NO_DEADLINE_MS
            open_batches[header.batch_id] = deadline
            self._resend_at_ms.setdefault(header.batch_id,
                                          time.time_ns() // 1_000_000 + BATCH_RESEND_AFTER_MS)

    async def _put_leg(self, batch_id: str, index: int, leg: batches.LegRecord, partition: int) -> None:
        data = records.leg_record_to_bytes(leg)
        self.parsed_legs.put(data, leg)
        self.port.put(self.batch_state, f"l:{batches.hold_key(batch_id, index)}".encode(), data,
                      partition)

    async def _apply(self, step: batches.Step, partition: int) -> None:
        """Write a coordinator step's state, then send its messages and result."""
        for header in (step.header, *step.extra_headers):
            if header is not None:
                await self._put_header(header, partition)
        if step.header is not None:
            for index, leg in step.legs.items():
                await self._put_leg(step.header.batch_id, index, leg, partition)
        for reserve in step.reserves:
            self.port.send(LedgerTopic.INTERNAL_COMMANDS, reserve.leg.account_id.encode(),
                             "ReserveLeg",
                             records.reserve_to_wire(reserve),
                             core.partition_for(reserve.leg.account_id, self.settings.partitions),
                             transaction_of=partition)
        for settle in step.settles:
            self.port.send(LedgerTopic.INTERNAL_COMMANDS, settle.account_id.encode(),
                             "SettleLeg",
                             records.settle_to_wire(settle),
                             core.partition_for(settle.account_id, self.settings.partitions),
                             transaction_of=partition)
        if step.outcome is not None:
            await self.batch_result(step.outcome, partition)

    async def _start(self, command: Command, step: batches.Step, partition: int) -> None:
        """Apply the step that starts a batch (its reserves). When this worker owns every
        partition the batch touches, its whole protocol runs in this event
        (streams/worker/local.py); otherwise its messages go over the internal topics."""
        leg_partitions = {core.partition_for(reserve.leg.account_id, self.settings.partitions)
                          for reserve in step.reserves}
        if self.local is not None and step.reserves and \
                self.local.can_decide(partition, leg_partitions, len(step.reserves)):
            await self.local.decide(command, len(step.reserves), lambda: self._apply(step, partition))
            metrics.BATCHES_STARTED.labels("one_event").inc()
        else:
            await self._apply(step, partition)
            if step.reserves:
                metrics.BATCHES_STARTED.labels("protocol").inc()

    async def batch_result(self, outcome: batches.BatchOutcome, partition: int) -> None:
        """Emit a batch's Result, copying each leg's encoded entry (same bytes as encoding it)."""
        record = records.batch_outcome_to_wire(outcome)
        messages = [self.entry_messages.message(entry) for entry in outcome.entries]
        self.port.produce(self.settings.topic(LedgerTopic.RESULTS), outcome.result_key.encode(),
                          self.port.encode_embedding("Result", record, "entries", messages),
                          partition)

    async def _submit_batch(self, command: Command, record: dict[str, Any], partition: int) -> None:
        parsed = batches.parse_submit_batch(record, self.currencies)
        if isinstance(parsed, batches.BatchRejection):
            self.port.dead_letter(command, parsed.reason, parsed.detail, parsed.batch_id)
            if parsed.batch_id is not None:
                await self.batch_result(batches.BatchOutcome(
                    parsed.batch_id, parsed.batch_id, False, parsed.reason, parsed.detail,
                    parsed.leg_index), partition)
            return
        if not await self._coordinates(command, parsed.batch_id):
            return
        existing = self._header(parsed.batch_id)
        # The timeout runs from when the coordinator starts the batch, not from when it was
        # produced: a backlog (or a restart) must not void every queued batch at once. The
        # deadline is stored with the batch, so a replay does not move it.
        step = batches.submit(existing, parsed, coordinator_partition=partition,
                              now_ms=max(command.timestamp_ms, time.time_ns() // 1_000_000))
        if existing is not None and step.outcome is None:
            outcome = batches.decided_outcome(existing, self._legs(existing))
            if outcome is not None:
                await self.batch_result(outcome, partition)
            return
        await self._start(command, step, partition)

    async def _rollback_batch(self, command: Command, record: dict[str, Any], partition: int) -> None:
        parsed = batches.parse_rollback(record)
        if isinstance(parsed, batches.BatchRejection):
            self.port.dead_letter(command, parsed.reason, parsed.detail, parsed.batch_id)
            if parsed.batch_id is not None:
                await self.batch_result(batches.BatchOutcome(
                    parsed.batch_id, core.bounded(str(record.get("batch_id")),
                                                  core.ID_LENGTH_MAX), False, parsed.reason,
                    parsed.detail), partition)
            return
        if not await self._coordinates(command, parsed.batch_id):
            return
        original = self._header(parsed.batch_id)
        compensation = self._header(batches.compensation_batch_id(parsed.batch_id, parsed.command_id))
        if compensation is not None:
            outcome = batches.decided_outcome(compensation, self._legs(compensation))
            if outcome is not None:
                await self.batch_result(outcome, partition)
            return
        legs = self._legs(original) if original is not None \
            and original.status is batches.BatchStatus.COMMITTED else []
        await self._start(command, batches.rollback(original, legs, parsed, None,
                                                    coordinator_partition=partition,
                                                    now_ms=max(command.timestamp_ms,
                                                               time.time_ns() // 1_000_000)),
                          partition)

    async def _leg_report(self, command: Command, record: dict[str, Any]) -> None:
        """An account's answer for one leg: validated, matched with the leg this coordinator
        sent, then counted."""
        partition = command.partition
        entry: core.Entry | None = None
        if record.get("entry") is not None:
            parsed_entry = records.parse_entry(record["entry"], self.currencies)
            if isinstance(parsed_entry, str):
                self.port.dead_letter(command, core.Reason.INVALID_FIELD,
                                        f"entry: {parsed_entry}", None)
                return
            entry = parsed_entry
        report = batches.parse_report(record, entry, self.settings.partitions)
        if isinstance(report, batches.BatchRejection):
            self._rejected(command, report)
            return
        if not await self._coordinates(command, report.batch_id):
            return
        header = self._header(report.batch_id)
        leg_data = None if header is None or report.leg_index >= header.leg_count else \
            table_value(self.batch_state, f"l:{batches.hold_key(report.batch_id, report.leg_index)}".encode())
        if header is not None and report.leg_index < header.leg_count and leg_data is None:
            raise InvariantViolation(f"batch {report.batch_id} has no leg {report.leg_index}")
        leg = None if leg_data is None else self.parsed_legs.get(leg_data)
        mismatch = batches.check_report(header, leg, report)
        if mismatch is not None or header is None or leg is None:
            self._rejected(command, mismatch or batches.BatchRejection(
                core.Reason.UNKNOWN_BATCH, "no such leg"))
            return
        counted = batches.record_report(header, leg, report)
        if counted is None:
            return  # a duplicate, or an answer after the batch was decided
        header, leg = counted
        await self._put_leg(header.batch_id, report.leg_index, leg, partition)
        if batches.all_answered(header):
            await self._decide_batch(header, partition, timed_out=False)
        elif batches.all_posted(header):
            header = replace(header, status=batches.BatchStatus.COMMITTED)
            await self._put_header(header, partition)
            await self.batch_result(batches.committed_outcome(header, self._legs(header)), partition)
        else:
            await self._put_header(header, partition)

    async def _decide_batch(self, header: batches.BatchHeader, partition: int, *,
                            timed_out: bool) -> None:
        step = batches.decide(header, self._legs(header), coordinator_partition=partition,
                              timed_out=timed_out)
        await self._apply(step, partition)
        decided = step.header
        if decided is not None and decided.original_batch_id is not None:
            original = self._header(decided.original_batch_id)
            freed = None if original is None else batches.after_compensation(original, decided)
            if freed is not None:
                await self._put_header(freed, partition)

    def _due(self, partition: int, now_ms: int) -> list[str]:
        return sorted(batch_id for batch_id, deadline in self._open_batches.get(partition, {}).items()
                      if deadline <= now_ms or self._resend_at_ms.get(batch_id, 0) <= now_ms)

    async def _batch_tick(self, partition: int, now_ms: int) -> None:
        """Void the batches of this partition whose timeout is over and send again what unsettled
        batches have waited on for BATCH_RESEND_AFTER_MS (time from the tick)."""
        self._rebuild_open_batches()
        metrics.BATCHES_PENDING.set(sum(map(len, self._open_batches.values())))
        for batch_id in self._due(partition, now_ms)[:BATCH_TIMEOUTS_PER_TICK_MAX]:
            header = self._header(batch_id)
            if header is None or batches.settled(header):
                continue
            if batches.timed_out(header, now_ms):
                log.warning("batch %s timed out (%s of %s legs answered)", batch_id,
                            header.votes_yes + header.votes_no, header.leg_count)
                await self._decide_batch(header, partition, timed_out=True)
            elif self._resend_at_ms.get(batch_id, 0) <= now_ms:
                step = batches.resend(header, self._legs(header), coordinator_partition=partition)
                log.warning("batch %s (%s): sending %s unanswered message(s) again", batch_id,
                            header.status, len(step.reserves) + len(step.settles))
                await self._apply(step, partition)
                self._resend_at_ms[batch_id] = now_ms + BATCH_RESEND_AFTER_MS

    def _rebuild_open_batches(self) -> None:
        """After a (re)assignment, find the reserving batches of owned partitions in the table."""
        owned = self.port.owned_partitions(self.batches_topic)
        if owned == self._open_batches_for:
            return
        rebuilt: dict[int, dict[str, int]] = {p: {} for p in owned}
        for partition, _key, value in table_items(self.batch_state, b"b:", owned):
            header = records.header_from_bytes(value)
            if header is not None and not batches.settled(header):
                rebuilt[partition][header.batch_id] = \
                    header.deadline_ms if header.status is batches.BatchStatus.RESERVING \
                    else BATCH_NO_DEADLINE_MS
                # After a restart the backlog usually answers them: wait before resending.
                self._resend_at_ms.setdefault(
                    header.batch_id, time.time_ns() // 1_000_000 + BATCH_RESEND_AFTER_MS)
        self._open_batches = rebuilt
        self._open_batches_for = owned

    async def ticks(self) -> None:
        """Send a BatchTick to each owned partition of ledger.batches that has a batch past its
        deadline. The coordinator voids them when it reads the tick: timeouts are decided inside
        an event (its offset commits with them) and replay with the tick's own time."""
        try:
            self._rebuild_open_batches()
            now_ms = time.time_ns() // 1_000_000
            for partition in list(self._open_batches):
                if not self._due(partition, now_ms):
                    continue
                if now_ms - self._last_tick_ms.get(partition, 0) < BATCH_TICK_INTERVAL_S * 1000:
                    continue
                await self.port.send_tick(self.coordinator_topic, partition, "BatchTick",
                                      {"partition": partition, "now": now_ms})
                self._last_tick_ms[partition] = now_ms
        except asyncio.CancelledError:
            raise
        except Exception:  # a dead timer would leave holds pending forever
            log.exception("batch tick failed; retrying in %.0f s", BATCH_TICK_INTERVAL_S)
