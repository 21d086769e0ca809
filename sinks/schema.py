"""The PostgreSQL schema of the projection: its name, versioned migrations and connections."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sardis_ledger.sinks.errors import SinkError, SinkUnavailable
from sardis_ledger.streams.config import redact_url

PG_SCHEMA_DEFAULT = "ledger"
PG_SCHEMA_ENV = "SARDIS_PG_SCHEMA"
SCHEMA_NAME_LENGTH_MAX = 40  # leaves room for replay's `_replay_<time>` suffixes
PG_IDENTIFIER_LENGTH_MAX = 63
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATION_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
CONNECT_TIMEOUT_S = 10.0
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def pg_schema(env: Mapping[str, str] | None = None) -> str:
    """The projection's schema: SARDIS_PG_SCHEMA or `ledger`, checked to be a plain identifier."""
    env = os.environ if env is None else env
    return check_schema_name(env.get(PG_SCHEMA_ENV, PG_SCHEMA_DEFAULT))


def check_schema_name(name: str) -> str:
    if not _SCHEMA_NAME.match(name) or len(name) > SCHEMA_NAME_LENGTH_MAX:
        raise SinkError(f"schema name {name!r}: use 1..{SCHEMA_NAME_LENGTH_MAX} characters "
                        "from [a-z0-9_], not starting with a digit")
    return name


def quoted(name: str) -> str:
    """A schema name as a SQL identifier; only plain names pass, so quoting is enough."""
    if not _SCHEMA_NAME.match(name) or len(name) > PG_IDENTIFIER_LENGTH_MAX:
        raise SinkError(f"{name!r} is not a plain schema name of at most {PG_IDENTIFIER_LENGTH_MAX} "
                        "characters")
    return f'"{name}"'


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The versioned SQL files, in order; versions must be 1, 2, 3, ... without gaps."""
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = MIGRATION_FILE.match(path.name)
        if match is None:
            raise SinkError(f"migration file {path.name} is not named NNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise SinkError(f"migration versions {versions} are not 1..{len(found)} without gaps")
    return found


async def connect(dsn: str) -> Any:
    """An asyncpg connection; unreachable servers become SinkUnavailable."""
    import asyncpg

    try:
        return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.CannotConnectNowError,
            asyncpg.TooManyConnectionsError) as exc:
        raise SinkUnavailable(f"PostgreSQL at {_safe_dsn(dsn)}: {exc!r}") from exc
    except asyncpg.PostgresError as exc:
        raise SinkError(f"PostgreSQL at {_safe_dsn(dsn)}: {exc!r}") from exc


def _safe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages."""
    return redact_url(dsn)


async def migrate(conn: Any, schema: str) -> list[int]:
    """Create the schema and apply pending migrations; returns the versions applied now.

    Safe with several sinks starting at once: a transaction-scoped advisory lock per schema
    serialises them, and each migration commits with its schema_migrations row.
    """
    q = quoted(schema)
    applied_now: list[int] = []
    if await _up_to_date(conn, schema):
        # Nothing to do, and nothing tried: a sink role without CREATE (README: Deploying
        # securely) starts on a schema its owner migrated.
        return applied_now
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                           f"sardis-ledger:migrate:{schema}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q}")
        await conn.execute(f"SET LOCAL search_path TO {q}")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
            "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in migrations():
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                               migration.version, migration.name)
            applied_now.append(migration.version)
    return applied_now


async def _up_to_date(conn: Any, schema: str) -> bool:
    table = await conn.fetchval("SELECT to_regclass($1)", f"{quoted(schema)}.schema_migrations")
    if table is None:
        return False
    done = {row["version"] for row in await conn.fetch(
        f"SELECT version FROM {quoted(schema)}.schema_migrations")}
    return {m.version for m in migrations()} <= done


async def grant(conn: Any, schema: str, *, sink_role: str, reader_role: str) -> None:
    """Run by the schema's owner after `migrate`: the sink may read and insert (and move its
    offsets), the reader may only read. Neither owns a table, so neither can alter one, drop or
    disable its append-only triggers, or set session_replication_role."""
    q = quoted(schema)
    sink, reader = quoted(sink_role), quoted(reader_role)
    async with conn.transaction():
        await conn.execute(f"REVOKE ALL ON SCHEMA {q} FROM PUBLIC")
        await conn.execute(f"GRANT USAGE ON SCHEMA {q} TO {sink}, {reader}")
        await conn.execute(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA {q} TO {sink}")
        await conn.execute(f"GRANT UPDATE ON {q}.sink_offsets TO {sink}")
        await conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {q} TO {reader}")


async def schema_exists(conn: Any, schema: str) -> bool:
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema))
