"""Local delivery: a batch whose partitions this worker all owns is decided whole in one event."""

# The two-phase batch protocol (streams/worker/coordinator.py, streams/batches.py) sends its
# messages over internal topics: the coordinator's reserves and settles to the legs' account
# partitions, their reports back. Each hop is visible only once its transaction commits, so a
# two-leg batch took five commits one after another (reserve, report, settle, report, result).
#
# When the worker deciding a SubmitBatch (or a RollbackBatch's compensation) owns the
# coordinator partition and every leg's account partition, the messages of that batch are not
# produced: they are queued here and decided at once, in order, inside the same event, by the
# same handlers that decide them when Kafka delivers them. A handler gets the record as the
# codec would decode it from the topic (AvroCodec.read_form: equal to decode(encode(record)),
# without the bytes: the Avro round trip was ~18% of a two-leg batch), and validates it as it
# validates what it reads from a topic. Every write of the chain lands in the worker's one
# transaction with the batch's input offset: all of the batch or none of it, as one event. The
# batch is settled when the event ends, so no message of it is ever in flight on Kafka.
#
# Why only whole batches, decided at their start: a message delivered locally overtakes the
# records queued on its partition. For a batch started here nothing of it is queued anywhere,
# so nothing is overtaken. A batch that started distributed stays distributed: its void could
# otherwise overtake its own reserve, still on the internal topic (the partition order the
# protocol relies on).
#
# Ownership is checked when the batch starts, with the consumer's flow active: Faust stops the
# flow before a rebalance's commit, and that commit waits for the event, so the whole chain
# commits before any of its partitions changes owner (or, if the commit fails, none of it).

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import InvariantViolation
from sardis_ledger.streams.topics import LedgerTopic
from sardis_ledger.streams.worker.ports import Command

# Larger batches use the distributed protocol: one event holds the event lock (and every other
# command waits) while it decides, and a 1,000-leg batch is 4,000 messages.
LOCAL_BATCH_LEGS_MAX: Final[int] = 64
# A leg's messages: its reserve, the reserve's report, its settle, the settle's report.
LOCAL_MESSAGES_PER_LEG_MAX: Final[int] = 4
# The offset a locally delivered message carries (it was never on a topic); dead letters show it.
LOCAL_OFFSET: Final[int] = -1
# The topics whose messages a batch started here sends itself.
LOCAL_TOPICS: Final[frozenset[LedgerTopic]] = frozenset(
    {LedgerTopic.INTERNAL_COMMANDS, LedgerTopic.INTERNAL_COORDINATOR})

# Decides one message: (command, record name, decoded record).
Handler = Callable[[Command, str, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class _Message:
    topic: LedgerTopic
    key: bytes
    record_name: str
    record: dict[str, Any]
    partition: int


class LocalDelivery:
    """Queues the internal messages of a batch started here and decides them in its event."""

    def __init__(self, settings: Settings, *, enabled: bool,
                 owned_partitions: Callable[[str], frozenset[int]],
                 flow_active: Callable[[], bool],
                 encode: Callable[[str, dict[str, Any]], bytes],
                 read_form: Callable[[str, dict[str, Any]], dict[str, Any]]) -> None:
        self.settings = settings
        self.enabled = enabled
        self._owned_partitions = owned_partitions
        self._flow_active = flow_active
        self._encode = encode
        self._read_form = read_form
        self._handlers: dict[LedgerTopic, Handler] = {}
        self._queue: list[_Message] | None = None  # set while a batch's chain is decided
        self._delivering: _Message | None = None  # the message its handler is deciding
        self.batches = 0  # batches decided whole here, since start (read by tests)

    def route(self, topic: LedgerTopic, handler: Handler) -> None:
        """Who decides the messages of an internal topic (the account side, the coordinator)."""
        self._handlers[topic] = handler

    def can_decide(self, coordinator_partition: int, leg_partitions: Collection[int],
                   legs: int) -> bool:
        """Whether a batch starting now may be decided whole in this event."""
        if not self.enabled or not 1 <= legs <= LOCAL_BATCH_LEGS_MAX or not self._flow_active():
            return False
        if coordinator_partition not in self._owned_partitions(
                self.settings.topic(LedgerTopic.INTERNAL_COORDINATOR)):
            return False
        owned = self._owned_partitions(self.settings.topic(LedgerTopic.INTERNAL_COMMANDS))
        return all(partition in owned for partition in leg_partitions)

    def takes(self, topic: str) -> bool:
        """Whether a message to `topic` (a ledger topic, no prefix) joins the chain being
        decided instead of going to Kafka."""
        return self._queue is not None and topic in LOCAL_TOPICS

    def hold(self, topic: str, key: bytes, record_name: str, record: dict[str, Any],
             partition: int) -> None:
        if self._queue is None:
            raise InvariantViolation("a local message outside a batch decided here")
        self._queue.append(_Message(LedgerTopic(topic), key, record_name, record, partition))

    async def decide(self, root: Command, legs: int, start: Callable[[], Awaitable[None]]) -> None:
        """Run `start` (the coordinator's first step), then every message it leads to, in the
        order they were sent, until the batch has nothing left to say."""
        if self._queue is not None:
            raise InvariantViolation("a batch started inside another local batch")
        queue: list[_Message] = []
        self._queue = queue
        try:
            await start()
            limit = legs * LOCAL_MESSAGES_PER_LEG_MAX
            for index, message in enumerate(queue):  # grows while it is read
                if index >= limit:
                    raise InvariantViolation(f"a {legs}-leg batch sent more than {limit} messages")
                await self._deliver(root, message)
        finally:
            self._queue = None
        self.batches += 1

    async def _deliver(self, root: Command, message: _Message) -> None:
        handler = self._handlers.get(message.topic)
        if handler is None:
            raise InvariantViolation(f"no local handler for {message.topic}")
        record = self._read_form(message.record_name, message.record)
        # The root's time: a replay of the batch decides its legs at the same time again. No
        # bytes: only a dead letter needs them (payload).
        command = Command(self.settings.topic(message.topic), message.partition, LOCAL_OFFSET,
                          message.key, b"", root.timestamp_ms)
        self._delivering = message
        try:
            await handler(command, message.record_name, record)
        finally:
            self._delivering = None

    def payload(self, command: Command) -> bytes:
        """The bytes of a locally delivered message, for its dead letter: encoded only then."""
        message = self._delivering
        if command.offset != LOCAL_OFFSET or message is None:
            raise InvariantViolation("a payload asked for outside a local delivery")
        return self._encode(message.record_name, message.record)
