"""`replay postgres`: rebuild the projection from ledger topics into a fresh schema, then swap."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from sardis_ledger.sinks import kafka
from sardis_ledger.sinks.errors import SinkError
from sardis_ledger.sinks.postgres import SINK_LOCK_TEMPLATE, PostgresSink
from sardis_ledger.sinks.schema import connect, quoted, schema_exists
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.progress import ProgressBar

SWAP_LOCK_TIMEOUT_S = 5.0


def _suffix() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S")


async def replay_postgres(settings: Settings, schema: str, *, from_offset: Mapping[int, int] | None = None,
                          from_time: datetime | None = None, drop_old: bool = False,
                          progress: ProgressBar | None = None) -> dict[str, Any]:
    """Consume the ledger topics into `<schema>_replay_<time>` up to their current ends, then swap
    it in as `schema` (the previous one is renamed `<schema>_old_<time>`, or dropped).

    The swap waits for the schema's sink lock: stop `sink postgres` first, start it after; it
    resumes from the new schema's stored offsets.
    """
    suffix = _suffix()
    fresh = f"{schema}_replay_{suffix}"
    old = f"{schema}_old_{suffix}"

    async def start(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        entries_topic = settings.topic("ledger.entries")
        entry_tps = [tp for tp in tps if tp.topic == entries_topic]
        starts = await kafka.start_offsets(consumer, entry_tps, from_offset=from_offset,
                                           from_time=from_time)
        # The other topics (tree heads, receipts, anchors) are small: always whole.
        beginnings = await consumer.beginning_offsets(tps)
        return {tp: starts.get(tp, beginnings[tp]) for tp in tps}

    bar = progress or ProgressBar(f"replay into {fresh}")
    sink = PostgresSink(settings, fresh, start=start, stop_at_end=True, progress=bar)
    written = await sink.run()
    bar(sink.records_done, sink.records_done, final=True)
    conn = await connect(settings.pg_dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{int(SWAP_LOCK_TIMEOUT_S * 1000)}ms'")
            got = await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
                                      SINK_LOCK_TEMPLATE.format(schema=schema))
            if not got:
                raise SinkError(f"a postgres sink is running on schema {schema}: stop it before the "
                                f"swap (the replayed projection is kept in {fresh})")
            had_old = await schema_exists(conn, schema)
            if had_old:
                await conn.execute(f"ALTER SCHEMA {quoted(schema)} RENAME TO {quoted(old)}")
            await conn.execute(f"ALTER SCHEMA {quoted(fresh)} RENAME TO {quoted(schema)}")
        if had_old and drop_old:
            await conn.execute(f"DROP SCHEMA {quoted(old)} CASCADE")
    finally:
        await conn.close()
    return {"schema": schema, "entries": written, "records": sink.records_done,
            "previous": (None if not had_old else ("dropped" if drop_old else old))}
