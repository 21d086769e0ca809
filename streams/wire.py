"""A process's wire codec with the schema registry behind it: schema ids in, schema ids out."""

# The codec (schemas/codec.py) reads both framings and writes the configured one, but it does no
# I/O: a Confluent schema id means something only to the registry that issued it. This module is
# the edge that asks.
#
# * Writing (SARDIS_WIRE_FORMAT=confluent): `start` registers, or finds registered, the schema of
#   every record type on the topics a process writes, under the topic-name strategy
#   (`<topic>-value`; a topic that carries several record types, such as ledger.batches, gets one
#   subject per type, `<topic>-<full record name>`, as Confluent's TopicRecordNameStrategy). Each
#   subject is set to compatibility BACKWARD (a stricter level that includes it is kept) and read
#   back. A registry that refuses a schema stops the start with its reason.
# * Reading (any framing setting): an id the codec does not know is fetched once (GET
#   /schemas/ids/{id}) and handed to the codec, which decodes by it or remembers why it cannot.
#   On a topic anyone may write (`decode`), every failure is the record's reason to be dead-
#   lettered, never the worker's reason to stop: an id the registry does not have is
#   unknown_schema_id, an unreadable schema incompatible_schema, and a registry that gives no
#   answer schema_registry_unavailable (for REGISTRY_DOWN_PAUSE_S no further id is asked for, so
#   made-up ids cannot hold a partition up). Readers of topics only the ledger writes (`learn`)
#   get a RegistryError instead and retry: they never set a record aside for the registry's
#   sake.

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterable
from typing import Any, Final

from sardis_ledger.schemas.codec import AvroCodec, Framing
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import CodecError, RegistryError
from sardis_ledger.streams.schema_registry import (
    BACKWARD,
    BACKWARD_OR_STRICTER,
    HTTP_CONFLICT,
    HTTP_NOT_FOUND,
    SchemaRegistry,
)
from sardis_ledger.streams.topics import TOPIC_RECORDS, LedgerTopic

log = logging.getLogger("sardis.wire")

# After a registry gave no answer (its client retried already), decode dead-letters records with
# an unknown id at once for this long instead of asking again for each.
REGISTRY_DOWN_PAUSE_S: Final[float] = 10.0
# A reader of the ledger's own topics waits for the registry, retrying with this backoff.
LEARN_RETRY_BACKOFF_S: Final[float] = 1.0
LEARN_RETRY_BACKOFF_MAX_S: Final[float] = 30.0
SUBJECT_VALUE_SUFFIX: Final[str] = "-value"


def subject_name(topic: str, full_record_name: str, records_on_topic: int) -> str:
    """The subject of a record type on the (full) topic: `<topic>-value` when the topic carries
    one record type, else `<topic>-<full record name>`."""
    if records_on_topic == 1:
        return f"{topic}{SUBJECT_VALUE_SUFFIX}"
    return f"{topic}-{full_record_name}"


def subjects_of(settings: Settings, topics: Iterable[LedgerTopic],
                codec: AvroCodec) -> list[tuple[str, str]]:
    """(subject, record name) of every record type on `topics`, in order, each subject once."""
    found: dict[str, str] = {}
    for topic in topics:
        names = TOPIC_RECORDS[topic]
        for name in names:
            subject = subject_name(settings.topic(topic), codec.full_name(name), len(names))
            found.setdefault(subject, name)
    return list(found.items())


def _fields_named(message: str, schema_text: str) -> str:
    """' at field NAME' for each top-level '/fields/N' a registry's refusal points at (Apicurio
    names fields by position only), else ''."""
    fields = json.loads(schema_text).get("fields", [])
    names = [str(fields[int(n)]["name"]) for n in re.findall(r"/fields/(\d+)", message)
             if int(n) < len(fields)]
    return f" at field {', '.join(dict.fromkeys(names))}" if names else ""


class Wire:
    """The codec of one process, in the configured framing, and the registry that resolves ids.

    One per process (or per client object); not shared between event loops' threads while
    learning (decode itself is stateless).
    """

    def __init__(self, settings: Settings, codec: AvroCodec | None = None) -> None:
        self.settings = settings
        self.codec = codec if codec is not None else AvroCodec(framing=settings.wire_format)
        self.registry = SchemaRegistry.from_settings(settings)
        self.schema_ids: dict[str, int] = {}  # subject -> id of what this process registered
        self._down_until = 0.0  # monotonic time before which decode asks the registry nothing
        self._down_reason = ""

    # --- writing

    async def start(self, topics: Iterable[LedgerTopic]) -> dict[str, int]:
        """In Confluent framing: every record type of `topics` registered (or found) under its
        subject at BACKWARD compatibility, and its id bound for encode. Returns subject -> id.
        Single-object framing needs nothing. RegistryError if the registry refuses or is away."""
        if self.codec.framing is not Framing.CONFLUENT:
            return {}
        registry = self.registry
        if registry is None:  # Settings refuses this combination; a codec given by hand may not
            raise RegistryError("Confluent framing needs a schema registry (SARDIS_SCHEMA_REGISTRY_URL)")
        for subject, record_name in subjects_of(self.settings, topics, self.codec):
            schema_id = await asyncio.to_thread(self._register, registry, subject, record_name)
            self.codec.bind_schema_id(record_name, schema_id)
            self.schema_ids[subject] = schema_id
        log.info("schema registry %s: %d subjects at BACKWARD, ids %s", registry.url,
                 len(self.schema_ids), sorted(set(self.schema_ids.values())))
        return dict(self.schema_ids)

    def _register(self, registry: SchemaRegistry, subject: str, record_name: str) -> int:
        """Blocking (run in a thread): compatibility first, so the registration is checked."""
        level = registry.compatibility(subject)
        if level not in BACKWARD_OR_STRICTER:
            registry.set_compatibility(subject, BACKWARD)
            level = registry.compatibility(subject)
            if level not in BACKWARD_OR_STRICTER:
                raise RegistryError(f"subject {subject}: the registry keeps compatibility {level} "
                                    f"after it was set to {BACKWARD}")
        text = self.codec.schema_text(record_name)
        try:
            return registry.register(subject, text)
        except RegistryError as exc:
            if exc.status != HTTP_CONFLICT:
                raise
            raise RegistryError(
                f"the schema registry refuses this version's {record_name} under subject "
                f"{subject} (compatibility {level}){_fields_named(str(exc), text)}: {exc}. "
                "Records written with it could not be "
                "read by the consumers of the versions registered before; nothing was written. "
                "Make the change compatible (a new field needs a default) or use another topic "
                "prefix.", status=exc.status, error_code=exc.error_code) from exc

    # --- reading

    async def learn(self, values: Iterable[bytes | bytearray | memoryview | None]) -> None:
        """Fetch the writer schema of every Confluent-framed value whose id the codec does not
        know yet, so codec.decode reads them or names why not. For topics only the ledger
        writes: RegistryError (retriable) when the registry gives no answer."""
        for value in values:
            schema_id = self.codec.unresolved_schema_id(value)
            if schema_id is not None:
                await self._learn(schema_id)

    async def learn_retrying(self, values: Iterable[bytes | bytearray | memoryview | None],
                             stop: asyncio.Event | None = None) -> None:
        """learn, retried with backoff while the registry gives no answer (logged): a sink waits
        for the registry rather than set aside a record the ledger wrote. Gives up only when
        `stop` is set (raising the last RegistryError)."""
        pending = [value for value in values if self.codec.unresolved_schema_id(value) is not None]
        delay_s = LEARN_RETRY_BACKOFF_S
        while True:
            try:
                await self.learn(pending)
                return
            except RegistryError as exc:
                if not exc.retriable or (stop is not None and stop.is_set()):
                    raise
                log.warning("schema registry: %s; retrying in %.0f s", exc, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, LEARN_RETRY_BACKOFF_MAX_S)

    async def decode(self, value: bytes | bytearray | memoryview | None) -> tuple[str, dict[str, Any]]:
        """codec.decode for a topic anyone may write: every failure is a CodecError with a
        reason (a dead letter), including a registry that gives no answer."""
        schema_id = self.codec.unresolved_schema_id(value)
        if schema_id is not None:
            if time.monotonic() < self._down_until:
                raise CodecError("schema_registry_unavailable", f"schema id {schema_id}: not "
                                 f"looked up, the registry gave no answer ({self._down_reason})")
            try:
                await self._learn(schema_id)
            except RegistryError as exc:
                self._down_until = time.monotonic() + REGISTRY_DOWN_PAUSE_S
                self._down_reason = str(exc)
                log.warning("schema registry: no answer for schema id %s (%s); records with "
                            "unknown ids are dead-lettered for %.0f s", schema_id, exc,
                            REGISTRY_DOWN_PAUSE_S)
                raise CodecError("schema_registry_unavailable",
                                 f"schema id {schema_id}: {exc}") from exc
        return self.codec.decode(value)

    async def _learn(self, schema_id: int) -> None:
        registry = self.registry
        if registry is None:
            self.codec.refuse_schema_id(schema_id, "unknown_schema_id", f"schema id {schema_id}: "
                                        "no schema registry is configured (SARDIS_SCHEMA_REGISTRY_URL)")
            return
        try:
            text = await asyncio.to_thread(registry.schema, schema_id)
        except RegistryError as exc:
            if exc.status != HTTP_NOT_FOUND:
                raise
            self.codec.refuse_schema_id(schema_id, "unknown_schema_id",
                                        f"the schema registry has no schema id {schema_id}")
            return
        self.codec.learn_schema(schema_id, text)
