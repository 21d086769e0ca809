"""The worker's decision path in-process: account side and coordinator over in-memory tables.

The edges are fakes (tables as plain dicts in Faust's memory-store shape, a port that records
what it is asked to produce and a commit protocol whose producers collect record batches); the
decision code, the codec and the commit protocol's event scope are the real ones. Records the
account side and the coordinator send each other are fed back in, as Kafka would deliver them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.streams import batches, core, records
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import CodecError, InvariantViolation
from sardis_ledger.streams.money import Currency, currency_table
from sardis_ledger.streams.topics import LedgerTopic
from sardis_ledger.streams.worker.accounts import AccountPartition, AccountTables
from sardis_ledger.streams.worker.commit import CommitProtocol
from sardis_ledger.streams.worker.compat import transactional_id_for
from sardis_ledger.streams.worker.coordinator import Coordinator, ParsedValues
from sardis_ledger.streams.worker.entry_messages import EntryMessages
from sardis_ledger.streams.worker.local import LOCAL_BATCH_LEGS_MAX, LOCAL_OFFSET, LocalDelivery
from sardis_ledger.streams.worker.ports import Command
from tests.unit.read_forms import same_read_values

PARTITIONS = 4
NOW_MS = 1_767_225_600_000
SETTINGS = Settings(partitions=PARTITIONS, topic_prefix="t.")
CODEC = AvroCodec()


def _on(partition: int, prefix: str, owner: Any = core.partition_for) -> str:
    return next(f"{prefix}{i}" for i in range(10_000)
                if owner(f"{prefix}{i}", PARTITIONS) == partition)


ALICE, BOB = _on(0, "alice_"), _on(0, "bob_")
MALLORY = _on(1, "mallory_")
BATCH = _on(0, "bat_", batches.coordinator_partition)


class FakeTable:
    """A Faust table as the worker touches it: memory store dict, key partitions, changelog."""

    def __init__(self, name: str) -> None:
        self.data = type("Store", (), {})()
        self.data.data = {}
        self.data._key_partition = {}
        self.changelog_topic = type("Topic", (), {"get_topic_name": lambda _self: name})()


class FakeBuilder:
    def __init__(self) -> None:
        self.items: list[tuple[bytes | None, bytes]] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: None) -> object:
        self.items.append((key, value))
        return object()

    def record_count(self) -> int:
        return len(self.items)


@dataclass
class FakeProducer:
    sent: list[tuple[str, int, bytes | None, bytes]] = field(default_factory=list)

    def create_batch(self) -> FakeBuilder:
        return FakeBuilder()

    async def send_batch(self, builder: FakeBuilder, topic: str, *, partition: int) -> None:
        self.sent.extend((topic, partition, key, value) for key, value in builder.items)


class FakeApp:
    def __init__(self) -> None:
        self.conf = type("Conf", (), {"id": "app"})()
        self.assignor = type("Assignor", (), {"group_for_topic": lambda _self, _topic: 0})()
        self.producer = type("Producer", (), {})()
        self.producer._transaction_producers = {
            transactional_id_for("app", 0, p): FakeProducer() for p in range(PARTITIONS)}


class Port:
    """The worker's side of WorkerPort, recording dead letters."""

    def __init__(self, commits: CommitProtocol, owned: frozenset[int]) -> None:
        self.settings = SETTINGS
        self.currencies: Mapping[str, Currency] = currency_table()
        self.commits = commits
        self.dead_letters: list[str] = []
        self.owned = owned
        self.local: LocalDelivery | None = None

    def owned_partitions(self, topic: str) -> frozenset[int]:
        return self.owned

    def put(self, table: Any, key: bytes, value: bytes, partition: int) -> None:
        self.commits.put(table, key, value, partition)

    def produce(self, topic: str, key: bytes | None, value: bytes, partition: int, *,
                transaction_of: int | None = None) -> None:
        self.commits.produce(topic, key, value, partition, transaction_of=transaction_of)

    def encode(self, record_name: str, record: dict[str, Any]) -> bytes:
        return CODEC.encode(record_name, record)

    def encode_embedding(self, record_name: str, record: dict[str, Any], field: str,
                         message: bytes | Sequence[bytes]) -> bytes:
        return CODEC.encode_embedding(record_name, record, field, message)

    def send(self, topic: str, key: bytes, record_name: str, record: dict[str, Any],
             partition: int, *, transaction_of: int | None = None) -> None:
        if self.local is not None and self.local.takes(topic):
            self.local.hold(topic, key, record_name, record, partition)
            return
        self.produce(SETTINGS.topic(topic), key, CODEC.encode(record_name, record), partition,
                     transaction_of=transaction_of)

    async def send_tick(self, topic: str, partition: int, record_name: str,
                        record: dict[str, Any]) -> None:
        raise AssertionError("no timer runs in these tests")

    def dead_letter(self, command: Command, reason: str, detail: str, command_id: Any) -> None:
        self.dead_letters.append(str(reason))


class Worker:
    """Account side and coordinator wired as streams.worker.app wires them."""

    def __init__(self, *, local: bool = False,
                 owned: frozenset[int] = frozenset(range(PARTITIONS))) -> None:
        self.app = FakeApp()
        self.commits = CommitProtocol(self.app, SETTINGS.topic(LedgerTopic.COMMANDS), "w")
        self.port = Port(self.commits, owned)
        self.tables = AccountTables(FakeTable("accounts"), FakeTable("commands"),
                                    FakeTable("logs"), FakeTable("holds"))
        self.claims: list[str] = []
        currencies = self.port.currencies
        entry_messages = EntryMessages(lambda entry: CODEC.encode("Entry", records.entry_to_wire(
            entry, currencies[entry.currency])))
        self.accounts = AccountPartition(self.port, self.commits, self.tables, self._claim,
                                         entry_messages)
        self.local = LocalDelivery(SETTINGS, enabled=local,
                                   owned_partitions=self.port.owned_partitions,
                                   flow_active=lambda: True, encode=CODEC.encode,
                                   read_form=self._read_form)
        self.port.local = self.local
        self.coordinator = Coordinator(self.port, FakeTable("batch_state"), entry_messages,
                                       self.local)
        self.local.route(LedgerTopic.INTERNAL_COMMANDS, self.accounts.record)
        self.local.route(LedgerTopic.INTERNAL_COORDINATOR, self.coordinator.record)
        self.offset = 0

    @staticmethod
    def _read_form(record_name: str, record: dict[str, Any]) -> dict[str, Any]:
        """The codec's read form, checked against the Avro round trip it replaces: every local
        message of every test here (the hostile batches too) is compared."""
        form = CODEC.read_form(record_name, record)
        name, decoded = CODEC.decode(CODEC.encode(record_name, record))
        if name != record_name or not same_read_values(form, decoded):
            raise AssertionError(f"read form of {record_name} {form!r} != decoded {decoded!r}")
        return form

    async def _claim(self, entry: core.Entry, value: bytes, partition: int) -> None:
        self.claims.append(entry.entry_id)

    async def deliver(self, topic: LedgerTopic, partition: int, name: str,
                      record: dict[str, Any]) -> list[tuple[str, int, str, dict[str, Any]]]:
        """Decide one record as one event, flush, and return what it produced (decoded)."""
        self.offset += 1
        command = Command(SETTINGS.topic(topic), partition, self.offset, b"k",
                          CODEC.encode(name, record), NOW_MS)
        scope = self.commits.open_event()
        if topic in (LedgerTopic.COMMANDS, LedgerTopic.INTERNAL_COMMANDS):
            await self.accounts.record(command, name, record)
        else:
            await self.coordinator.record(command, name, record)
        await self.commits.close_event(scope)
        return await self.flush()

    async def flush(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        producers = self.app.producer._transaction_producers
        worker_transaction = FakeProducer()
        await self.commits.outbox.flush(producers.get, worker_transaction)
        out = []
        for producer in [worker_transaction]:
            for topic, partition, _key, value in producer.sent:
                if topic.startswith("t.ledger.") and "changelog" not in topic:
                    name, decoded = CODEC.decode(value)
                    out.append((topic.removeprefix("t."), partition, name, decoded))
            producer.sent.clear()
        return out

    def balance_minor(self, account_id: str, currency: str = "USD") -> int:
        key = core.account_key(account_id, currency).encode()
        state = records.state_from_bytes(self.tables.accounts.data.data.get(key))
        return state.balance_minor


def post(command_id: str, account_id: str, entry_type: str, amount: str) -> dict[str, Any]:
    return {"command_id": command_id, "account_id": account_id, "currency": "USD",
            "entry_type": entry_type, "amount": Decimal(amount), "reference": None,
            "metadata": {}, "expected_sequence": None, "allow_overdraft": False,
            "occurred_at": NOW_MS, "chain": None, "chain_tx_hash": None, "chain_log_index": None}


def named(outputs: list[tuple[str, int, str, dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    return [record for _topic, _partition, found, record in outputs if found == name]


async def test_a_credit_books_an_entry_its_balance_and_a_result_once() -> None:
    worker = Worker()
    first = await worker.deliver(LedgerTopic.COMMANDS, 0, "PostEntry", post("c1", ALICE, "credit", "10.50"))
    assert [r["status"] for r in named(first, "Result")] == ["committed"]
    assert [r["sequence"] for r in named(first, "Entry")] == [1]
    assert named(first, "Balance")[0]["balance"] == Decimal("10.50")
    assert worker.balance_minor(ALICE) == 1050
    again = await worker.deliver(LedgerTopic.COMMANDS, 0, "PostEntry", post("c1", ALICE, "credit", "10.50"))
    # Answered from idempotency: the same entry again (consumers dedupe by id), no new booking.
    assert named(again, "Entry")[0]["entry_id"] == named(first, "Entry")[0]["entry_id"]
    assert named(again, "Balance") == [] and worker.balance_minor(ALICE) == 1050


async def test_an_overdraft_and_a_changed_replay_are_refused_without_effect() -> None:
    worker = Worker()
    refused = await worker.deliver(LedgerTopic.COMMANDS, 0, "PostEntry", post("d1", ALICE, "debit", "1"))
    assert [(r["status"], r["reason"]) for r in named(refused, "Result")] == \
        [("rejected", "insufficient_funds")]
    assert named(refused, "Entry") == [] and worker.balance_minor(ALICE) == 0
    await worker.deliver(LedgerTopic.COMMANDS, 0, "PostEntry", post("c1", ALICE, "credit", "5"))
    changed = await worker.deliver(LedgerTopic.COMMANDS, 0, "PostEntry", post("c1", ALICE, "credit", "6"))
    assert named(changed, "Result")[0]["reason"] == "idempotency_conflict"
    assert worker.balance_minor(ALICE) == 500


@pytest.mark.parametrize(("record", "reason"), [
    ({"batch_id": BATCH, "leg_index": 0, "account_id": ALICE, "currency": "USD",
      "action": "post", "coordinator_partition": 0}, "settle_mismatch"),
    ({"batch_id": BATCH, "leg_index": 0, "account_id": MALLORY, "currency": "USD",
      "action": "post", "coordinator_partition": 0}, "wrong_partition"),
])
async def test_a_forged_settle_mints_nothing(record: dict[str, Any], reason: str) -> None:
    worker = Worker()
    outputs = await worker.deliver(LedgerTopic.INTERNAL_COMMANDS, 0, "SettleLeg", record)
    assert worker.port.dead_letters == [reason]
    assert named(outputs, "Entry") == [] and worker.balance_minor(ALICE) == 0


async def test_a_client_command_on_the_wrong_partition_is_forwarded_to_its_owner() -> None:
    worker = Worker()
    outputs = await worker.deliver(LedgerTopic.COMMANDS, 0, "PostEntry", post("m1", MALLORY, "credit", "1"))
    forwarded = [(topic, partition, name) for topic, partition, name, _ in outputs]
    assert forwarded == [("ledger.internal.commands", core.partition_for(MALLORY, PARTITIONS),
                          "PostEntry")]
    assert worker.balance_minor(MALLORY) == 0


async def test_a_two_leg_batch_reserves_reports_and_posts_both_legs() -> None:
    worker = Worker()
    await worker.deliver(LedgerTopic.COMMANDS, 0, "PostEntry", post("c1", ALICE, "credit", "10"))
    leg = {"currency": "USD", "amount": Decimal("4"), "reference": None, "metadata": {},
           "allow_overdraft": False}
    submit = {"batch_id": BATCH, "require_balanced": True, "timeout_ms": 60_000,
              "legs": [{**leg, "account_id": ALICE, "entry_type": "debit"},
                       {**leg, "account_id": BOB, "entry_type": "credit"}]}
    pending = await worker.deliver(LedgerTopic.BATCHES, 0, "SubmitBatch", submit)
    results: list[dict[str, Any]] = []
    for _round in range(6):  # reserve -> report -> settle -> report, fed back as Kafka would
        following = []
        for topic, partition, name, record in pending:
            results += named([(topic, partition, name, record)], "Result")
            if topic in ("ledger.internal.commands", "ledger.internal.coordinator"):
                following += await worker.deliver(LedgerTopic(topic), partition, name, record)
        pending = following
    assert [(r["status"], r["batch_id"]) for r in results] == [("committed", BATCH)]
    assert worker.balance_minor(ALICE) == 600 and worker.balance_minor(BOB) == 400
    assert worker.port.dead_letters == []


# ------------------------------------------------------------------ batches decided in one event

CAROL = _on(1, "carol_")
LEG: dict[str, Any] = {"currency": "USD", "reference": None, "metadata": {}, "allow_overdraft": False}


def submit(batch_id: str, *legs: tuple[str, str, str]) -> dict[str, Any]:
    return {"batch_id": batch_id, "require_balanced": True, "timeout_ms": 60_000,
            "legs": [{**LEG, "account_id": account, "entry_type": entry_type,
                      "amount": Decimal(amount)} for account, entry_type, amount in legs]}


def on_coordinator(batch_id_prefix: str, partition: int) -> str:
    return _on(partition, batch_id_prefix, batches.coordinator_partition)


async def decide_fed_back(worker: Worker, topic: LedgerTopic, partition: int, name: str,
                          record: dict[str, Any]) -> list[tuple[str, int, str, dict[str, Any]]]:
    """Decide a record, then every internal record it leads to, as Kafka would deliver them;
    returns every output that is not an internal record."""
    pending = await worker.deliver(topic, partition, name, record)
    outputs: list[tuple[str, int, str, dict[str, Any]]] = []
    for _round in range(8):
        following = []
        for out in pending:
            if out[0] in ("ledger.internal.commands", "ledger.internal.coordinator"):
                following += await worker.deliver(LedgerTopic(out[0]), out[1], out[2], out[3])
            else:
                outputs.append(out)
        pending = following
    if pending:
        raise AssertionError(f"the protocol did not end: {pending}")
    return outputs


async def funded(alice: str = "10", **options: Any) -> Worker:
    """A worker (local batches unless told otherwise) whose ALICE holds `alice` USD."""
    worker = Worker(**{"local": True, **options})
    await worker.deliver(LedgerTopic.COMMANDS, 0, "PostEntry", post("c1", ALICE, "credit", alice))
    return worker


def internal(outputs: list[tuple[str, int, str, dict[str, Any]]]) -> list[str]:
    return [name for topic, _p, name, _r in outputs if topic.startswith("ledger.internal.")]


async def test_a_batch_this_worker_owns_is_decided_whole_in_the_event_that_submits_it() -> None:
    worker = await funded()
    batch_id = on_coordinator("bat_local_", 0)
    outputs = await worker.deliver(LedgerTopic.BATCHES, 0, "SubmitBatch", submit(
        batch_id, (ALICE, "debit", "4"), (BOB, "credit", "3"), (CAROL, "credit", "1")))
    assert internal(outputs) == []  # nothing went over Kafka
    assert [(r["status"], r["batch_id"]) for r in named(outputs, "Result")] == \
        [("committed", batch_id)]
    assert sorted((e["account_id"], e["leg_index"]) for e in named(outputs, "Entry")) == \
        sorted([(ALICE, 0), (BOB, 1), (CAROL, 2)])
    assert (worker.balance_minor(ALICE), worker.balance_minor(BOB),
            worker.balance_minor(CAROL)) == (600, 300, 100)
    assert worker.local.batches == 1 and worker.port.dead_letters == []


async def test_a_refused_leg_voids_a_local_batch_and_releases_every_hold() -> None:
    worker = await funded()
    batch_id = on_coordinator("bat_void_", 1)
    outputs = await worker.deliver(LedgerTopic.BATCHES, 1, "SubmitBatch", submit(
        batch_id, (ALICE, "debit", "4"), (CAROL, "debit", "1"), (BOB, "credit", "5")))
    assert internal(outputs) == [] and named(outputs, "Entry") == []
    assert [(r["status"], r["reason"], r["failed_leg_index"])
            for r in named(outputs, "Result")] == [("rejected", "insufficient_funds", 1)]
    state = records.state_from_bytes(worker.tables.accounts.data.data.get(
        core.account_key(ALICE, "USD").encode()))
    assert state.balance_minor == state.available_minor == 1000  # the hold is released


async def test_a_message_decided_in_its_event_has_bytes_only_when_its_dead_letter_asks() -> None:
    delivery = LocalDelivery(SETTINGS, enabled=True,
                             owned_partitions=lambda topic: frozenset(range(PARTITIONS)),
                             flow_active=lambda: True, encode=CODEC.encode,
                             read_form=CODEC.read_form)
    seen: list[tuple[int, bytes, tuple[str, dict[str, Any]]]] = []

    async def dead_letters(command: Command, name: str, record: dict[str, Any]) -> None:
        seen.append((command.offset, command.value, CODEC.decode(delivery.payload(command))))

    delivery.route(LedgerTopic.INTERNAL_COORDINATOR, dead_letters)
    report = {"batch_id": "bat_1", "leg_index": 0, "kind": "posted", "reason": None,
              "detail": None, "entry": None}
    root = Command(SETTINGS.topic(LedgerTopic.BATCHES), 0, 7, b"k", b"x", NOW_MS)

    async def start() -> None:
        delivery.hold(LedgerTopic.INTERNAL_COORDINATOR, b"bat_1", "LegReport", report, 0)

    await delivery.decide(root, 1, start)
    assert seen == [(LOCAL_OFFSET, b"", ("LegReport", report))]
    with pytest.raises(InvariantViolation):
        delivery.payload(root)  # not a local message, and none is being delivered


async def test_a_batch_with_a_partition_owned_elsewhere_runs_the_distributed_protocol() -> None:
    worker = await funded(owned=frozenset({0}))  # CAROL's partition 1 is another worker's
    batch_id = on_coordinator("bat_far_", 0)
    outputs = await worker.deliver(LedgerTopic.BATCHES, 0, "SubmitBatch", submit(
        batch_id, (ALICE, "debit", "4"), (CAROL, "credit", "4")))
    assert internal(outputs) == ["ReserveLeg", "ReserveLeg"] and named(outputs, "Result") == []
    assert worker.local.batches == 0


async def test_a_batch_over_the_local_leg_limit_runs_the_distributed_protocol() -> None:
    worker = await funded("100")
    legs = [(ALICE, "debit", str(LOCAL_BATCH_LEGS_MAX))] + \
        [(BOB, "credit", "1")] * LOCAL_BATCH_LEGS_MAX
    batch_id = on_coordinator("bat_big_", 0)
    outputs = await worker.deliver(LedgerTopic.BATCHES, 0, "SubmitBatch", submit(batch_id, *legs))
    assert internal(outputs).count("ReserveLeg") == LOCAL_BATCH_LEGS_MAX + 1
    assert worker.local.batches == 0


ACCOUNTS = (ALICE, BOB, CAROL, MALLORY)
LEG_PLAN = st.tuples(st.sampled_from(ACCOUNTS), st.sampled_from(("debit", "credit")),
                     st.integers(min_value=1, max_value=900))
OPERATION = st.one_of(
    st.tuples(st.just("fund"), st.sampled_from(ACCOUNTS), st.integers(1, 2_000)),
    st.tuples(st.just("batch"), st.lists(LEG_PLAN, min_size=1, max_size=4)),
    st.tuples(st.just("rollback"), st.integers(0, 7)),
)


async def run_plan(plan: list[tuple[Any, ...]], *, local: bool) -> dict[str, Any]:
    """Decide a plan of fundings, batches and rollbacks; everything a client could see."""
    worker = Worker(local=local)
    seen: dict[str, Any] = {"results": [], "entries": {}, "balances": {}}
    submitted: list[str] = []
    for index, operation in enumerate(plan):
        if operation[0] == "fund":
            _kind, account, amount = operation
            topic, partition, name = LedgerTopic.COMMANDS, core.partition_for(account, PARTITIONS), \
                "PostEntry"
            record = post(f"f{index}", account, "credit", f"{amount}.25")
        elif operation[0] == "batch":
            batch_id = f"bat_{index}"
            submitted.append(batch_id)
            topic, name = LedgerTopic.BATCHES, "SubmitBatch"
            partition = batches.coordinator_partition(batch_id, PARTITIONS)
            # Balanced per currency: the last leg takes what the others leave over.
            legs = [(a, t, f"{m}.5") for a, t, m in operation[1]]
            net = sum(Decimal(m) * (1 if t == "credit" else -1) for _a, t, m in legs)
            legs.append((BOB, "debit" if net > 0 else "credit", str(abs(net) or 1)))
            if net == 0:
                legs.append((BOB, "debit", "1"))
            record = submit(batch_id, *legs)
        else:
            if not submitted:
                continue
            batch_id = submitted[operation[1] % len(submitted)]
            topic, name = LedgerTopic.BATCHES, "RollbackBatch"
            partition = batches.coordinator_partition(batch_id, PARTITIONS)
            record = {"command_id": f"rb{index}", "batch_id": batch_id, "reason": "test",
                      "force": False}
        for _out_topic, out_partition, out_name, out in await decide_fed_back(
                worker, topic, partition, name, record):
            if out_name == "Result":
                seen["results"].append(out)
            elif out_name == "Entry":
                seen["entries"][out["entry_id"]] = out
            elif out_name == "Balance":
                seen["balances"][(out_partition, out["account_id"], out["currency"])] = out
    seen["dead_letters"] = worker.port.dead_letters
    seen["local_batches"] = worker.local.batches
    return seen


@settings(max_examples=40, deadline=None)
@given(st.lists(OPERATION, min_size=1, max_size=10))
def test_local_and_distributed_batches_decide_the_same(plan: list[tuple[Any, ...]]) -> None:
    """Deciding a batch whole in one event is only a faster transport: every result, entry
    (ids, amounts, sequences, Merkle leaves) and final balance is what the distributed protocol
    gives when Kafka delivers its messages."""
    distributed = asyncio.run(run_plan(plan, local=False))
    local = asyncio.run(run_plan(plan, local=True))
    assert distributed["local_batches"] == 0
    # Every submitted batch starts (and settles) in its own event.
    assert local["local_batches"] >= sum(1 for operation in plan if operation[0] == "batch")
    for key in ("results", "entries", "balances", "dead_letters"):
        assert local[key] == distributed[key], key


def test_parsed_values_hold_what_their_bytes_hold_and_stay_bounded() -> None:
    parsed = ParsedValues(lambda data: data.decode(), limit=2)
    assert parsed.get(b"a") == "a"
    parsed.put(b"b", "b")
    parsed.put(b"c", "c")  # the oldest (b"a") is forgotten, then parsed again
    assert (parsed.get(b"b"), parsed.get(b"c"), parsed.get(b"a")) == ("b", "c", "a")


async def test_every_cached_batch_value_is_what_parsing_its_bytes_gives() -> None:
    """The coordinator keeps the header and leg records it writes, by their bytes; reading the
    bytes back must give an equal value, or a cache hit would decide from another state."""
    worker = await funded()
    committed, refused = on_coordinator("bat_cache_", 0), on_coordinator("bat_cache_no_", 1)
    await worker.deliver(LedgerTopic.BATCHES, 0, "SubmitBatch", submit(
        committed, (ALICE, "debit", "4"), (BOB, "credit", "3"), (CAROL, "credit", "1")))
    await worker.deliver(LedgerTopic.BATCHES, 1, "SubmitBatch", submit(
        refused, (CAROL, "debit", "9"), (BOB, "credit", "9")))
    await worker.deliver(LedgerTopic.BATCHES, 0, "RollbackBatch", {
        "command_id": "rb1", "batch_id": committed, "reason": "test", "force": False})
    stored = worker.coordinator.batch_state.data.data
    headers = [data for key, data in stored.items() if key.startswith(b"b:")]
    legs = [data for key, data in stored.items() if key.startswith(b"l:")]
    assert len(headers) == 3 and len(legs) == 8  # 3 + 2 legs, and the compensation's 3
    for data in headers:
        assert worker.coordinator.parsed_headers.get(data) == records.header_from_bytes(data)
    for data in legs:
        assert worker.coordinator.parsed_legs.get(data) == records.leg_record_from_bytes(data)


# A leg a worker accepts, and one of any shape the schema allows (often refused).
VALID_LEG = st.fixed_dictionaries({
    "account_id": st.sampled_from((ALICE, BOB, CAROL, MALLORY)),
    "currency": st.just("USD"),
    "entry_type": st.sampled_from(("debit", "credit", "fee", "refund", "adjustment")),
    "amount": st.decimals(min_value=Decimal("0.01"), max_value=2_000, places=2),
    "reference": st.none() | st.text(max_size=5),
    "metadata": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
    "allow_overdraft": st.booleans(),
})
HOSTILE_LEG = st.fixed_dictionaries({
    "account_id": st.sampled_from((ALICE, CAROL, "", "x" * 200, "a\tb")),
    "currency": st.sampled_from(("USD", "USDC", "XXX", "")),
    "entry_type": st.sampled_from(("debit", "credit", "x")),
    "amount": st.decimals(min_value=-1, max_value=10**12, places=2, allow_nan=False,
                          allow_infinity=False) | st.decimals(min_value=0, max_value=1, places=5),
    "reference": st.none() | st.text(max_size=5),
    "metadata": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
    "allow_overdraft": st.booleans(),
})
SIGNS = {"debit": -1, "fee": -1, "credit": 1, "refund": 1, "adjustment": 1}


def balancing_leg(legs: list[dict[str, Any]]) -> dict[str, Any]:
    """A BOB USD leg that balances the USD legs (an unbalanced batch is refused before it starts)."""
    net = sum(SIGNS.get(leg["entry_type"], 0) * leg["amount"] for leg in legs
              if leg["currency"] == "USD")
    return {"account_id": BOB, "currency": "USD", "entry_type": "debit" if net > 0 else "credit",
            "amount": abs(net) or Decimal("1"), "reference": None, "metadata": {},
            "allow_overdraft": True}


def usd_sums(worker: Worker) -> dict[str, int]:
    return {a: worker.balance_minor(a) for a in (ALICE, BOB, CAROL, MALLORY)}


@settings(max_examples=300, deadline=None)
@given(legs=st.lists(VALID_LEG, min_size=1, max_size=6), hostile=st.none() | HOSTILE_LEG,
       balance=st.booleans(), require_balanced=st.booleans(),
       timeout_ms=st.sampled_from((60_000,) * 4 + (-1, 50, 4_000_000)))
def test_hostile_batches_decided_in_one_event_never_reach_the_bug_path(
        legs: list[dict[str, Any]], hostile: dict[str, Any] | None, balance: bool,
        require_balanced: bool, timeout_ms: int) -> None:
    """A client writes ledger.batches: whatever legs it sends, a batch decided whole in one
    event ends with its result and no hold left pending; a refused batch moves no money, a
    balanced committed one moves none in total, and its rollback puts every balance back. No
    record reaches an InvariantViolation (which stops a worker)."""
    async def run() -> None:
        worker = await funded("1000")
        batch_id = on_coordinator("bat_hostile_", 0)
        legs_sent = legs if hostile is None else [*legs, hostile]
        record = {"batch_id": batch_id, "require_balanced": require_balanced,
                  "timeout_ms": timeout_ms,
                  "legs": [*legs_sent, balancing_leg(legs_sent)] if balance else legs_sent}
        try:
            CODEC.encode("SubmitBatch", record)
        except CodecError:
            event("not encodable")
            return  # no consumer could decode it: test_input_fuzz covers such bytes
        before = usd_sums(worker)
        outputs = await worker.deliver(LedgerTopic.BATCHES, 0, "SubmitBatch", record)
        if worker.local.batches == 0:
            event(f"refused before it started: {worker.port.dead_letters}")
            return
        assert internal(outputs) == []
        result = next(r for r in named(outputs, "Result") if r["command_id"] == batch_id)
        event(f"decided in one event: {result['status']}")
        holds = [records.hold_from_bytes(v) for v in worker.tables.holds.data.data.values()]
        assert holds and all(h is not None and h.status is not batches.HoldStatus.PENDING
                             for h in holds)
        after = usd_sums(worker)
        if result["status"] != "committed":
            assert after == before
            return
        if require_balanced:
            assert sum(after.values()) == sum(before.values())
        reversal = await worker.deliver(LedgerTopic.BATCHES, 0, "RollbackBatch", {
            "command_id": "rb1", "batch_id": batch_id, "reason": "test", "force": True})
        rolled = next(r for r in named(reversal, "Result") if r["command_id"] == "rb1")
        assert rolled["status"] == "committed" and usd_sums(worker) == before
        assert worker.port.dead_letters == []

    asyncio.run(run())
