"""The sink subcommands of `sardis-ledger`: sink, history, replay, receipt, verify, balance --at."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from sardis_ledger.sinks.errors import SinkError
from sardis_ledger.streams.config import Settings

EXIT_OK = 0
EXIT_FAILED = 1
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = {"crit": logging.CRITICAL, "error": logging.ERROR, "warn": logging.WARNING,
              "info": logging.INFO, "debug": logging.DEBUG}
SCHEMA_HELP = "PostgreSQL schema of the projection (default: $SARDIS_PG_SCHEMA or ledger)"
STATE_DIR_HELP = ("directory of the persisted trusted immudb state (default: $SARDIS_STATE_DIR or "
                  "~/.local/state/sardis-ledger)")


def _schema(args: argparse.Namespace) -> str:
    from sardis_ledger.sinks.schema import check_schema_name, pg_schema

    return check_schema_name(args.schema) if args.schema else pg_schema()


def _state_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.state_dir) if getattr(args, "state_dir", None) else None


def _cmd_migrate(args: argparse.Namespace) -> int:
    from sardis_ledger.sinks.schema import connect, grant, migrate

    async def run() -> list[int]:
        conn = await connect(Settings.from_env().pg_dsn)
        try:
            applied = await migrate(conn, _schema(args))
            if args.grant_sink:
                await grant(conn, _schema(args), sink_role=args.grant_sink,
                            reader_role=args.grant_reader)
            return applied
        finally:
            await conn.close()

    if bool(args.grant_sink) != bool(args.grant_reader):
        raise SinkError("give --grant-sink and --grant-reader together (or neither)")
    applied = asyncio.run(run())
    print(f"schema {_schema(args)}: applied {applied or 'nothing (up to date)'}"
          + (f"; granted to sink {args.grant_sink}, reader {args.grant_reader}"
             if args.grant_sink else ""))
    return EXIT_OK


def _cmd_sink(args: argparse.Namespace) -> int:
    from sardis_ledger.sinks.kafka import Shard
    from sardis_ledger.streams.topics import create_topics

    shard = Shard.parse(args.shard)
    logging.basicConfig(level=LOG_LEVELS[args.loglevel], format=LOG_FORMAT, stream=sys.stderr)
    settings = Settings.from_env()
    asyncio.run(create_topics(settings))
    if args.kind == "postgres":
        from sardis_ledger.sinks.postgres import run_postgres_sink

        asyncio.run(run_postgres_sink(settings, _schema(args), shard))
    else:
        from sardis_ledger.sinks.immudb import run_immudb_sink

        asyncio.run(run_immudb_sink(settings, _state_dir(args), shard))
    return EXIT_OK


def balance_at(args: argparse.Namespace) -> int:
    """`balance ACCOUNT --at ISO`: the posted balance at a time, from PostgreSQL."""
    from sardis_ledger.sinks.kafka import parse_time
    from sardis_ledger.sinks.queries import balance_at as query
    from sardis_ledger.streams.cli_io import dumps

    result = asyncio.run(query(Settings.from_env().pg_dsn, _schema(args), args.account,
                               args.currency, parse_time(args.at)))
    print(dumps({"account_id": result.account_id, "currency": result.currency, "at": result.at,
                 "balance": result.balance, "sequence": result.sequence,
                 "committed_at": result.committed_at}))
    return EXIT_OK


def _cmd_history(args: argparse.Namespace) -> int:
    from sardis_ledger.sinks.kafka import parse_time
    from sardis_ledger.sinks.queries import history
    from sardis_ledger.streams.cli_io import dumps

    found = asyncio.run(history(
        Settings.from_env().pg_dsn, _schema(args), args.account, currency=args.currency,
        from_time=parse_time(args.from_time) if args.from_time else None,
        to_time=parse_time(args.to_time) if args.to_time else None, limit=args.limit))
    for entry in found:
        print(dumps(entry))
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace) -> int:
    from sardis_ledger.sinks.kafka import parse_from_offsets, parse_time
    from sardis_ledger.sinks.replay import replay_postgres
    from sardis_ledger.streams.cli_io import dumps

    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    result = asyncio.run(replay_postgres(
        Settings.from_env(), _schema(args),
        from_offset=parse_from_offsets(args.from_offset) if args.from_offset else None,
        from_time=parse_time(args.from_time) if args.from_time else None,
        drop_old=args.drop_old))
    print(dumps(result))
    return EXIT_OK


def _cmd_receipt(args: argparse.Namespace) -> int:
    from sardis_ledger.sinks.verify import receipt
    from sardis_ledger.streams.cli_io import dumps

    result = asyncio.run(receipt(Settings.from_env(), _schema(args), args.entry_id,
                                 state_directory=_state_dir(args)))
    print(dumps(result))
    if not result["verified"]:
        print(f"sardis-ledger: receipt of {args.entry_id} does NOT verify", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from sardis_ledger.sinks.verify import verify

    report = asyncio.run(verify(Settings.from_env(), _schema(args), partition=args.partition,
                                account=args.account, check_immudb=not args.no_immudb,
                                check_anchors=not args.no_anchors,
                                state_directory=_state_dir(args)))
    print(f"checked {report.entries} entries in {report.partitions} partitions, "
          f"{report.tree_heads} tree heads, {report.accounts} accounts, "
          f"{report.immudb_checked} immudb copies, {report.anchors} anchors")
    if report.ok:
        print("verify: OK")
        return EXIT_OK
    print(f"verify: FAILED, first bad: {report.problems[0]}", file=sys.stderr)
    for problem in report.problems[1:]:
        print(f"  also: {problem}", file=sys.stderr)
    return EXIT_FAILED


def add_sink_commands(sub: argparse._SubParsersAction) -> None:
    """Register the sink subcommands on `sardis-ledger`'s subparsers."""
    sink = sub.add_parser(
        "sink", help="run a sink: ledger topics -> PostgreSQL or immudb",
        description="postgres: copy ledger.entries, ledger.tree-heads, ledger.receipts and "
        "ledger.anchors into the PostgreSQL schema (migrated at start), each batch and its Kafka "
        "offsets in one transaction: exactly once across crashes and restarts. One sink per "
        "schema writes; another waits as standby. immudb: store each entry's canonical bytes "
        "under entry:{entry_id}, verify every write against a persisted trusted state, and "
        "publish a receipt per entry to ledger.receipts (Kafka transaction with the offsets). "
        "Runs until SIGTERM/SIGINT; waits and retries while a server is down. For throughput, "
        "run N processes of a kind with --shard 0/N ... --shard N-1/N: they split the "
        "partitions, and each partition is still written exactly once and in order.")
    sink.add_argument("kind", choices=["postgres", "immudb"])
    sink.add_argument("--shard", default="0/1", metavar="I/N",
                      help="this process takes partitions p with p %% N == I of the source "
                      "topics (default 0/1: all). postgres: two sinks never write the same "
                      "partition of a schema (the later one waits as standby); immudb: shards "
                      "share the consumer group and trusted state, each has its own "
                      "transactional id")
    sink.add_argument("--schema", help=SCHEMA_HELP)
    sink.add_argument("--state-dir", help=STATE_DIR_HELP)
    sink.add_argument("--loglevel", default="info", choices=list(LOG_LEVELS))
    sink.set_defaults(func=_cmd_sink)

    migrate = sub.add_parser(
        "migrate", help="create or update the PostgreSQL schema, as its owner, and grant it",
        description="Apply the pending migrations (sinks/migrations) to the schema, connecting "
        "with SARDIS_PG_DSN as the role that owns it. With --grant-sink and --grant-reader, "
        "give the sink's role SELECT and INSERT (UPDATE on sink_offsets only) and the reader's "
        "SELECT: neither owns a table, so neither can alter one or disable its append-only "
        "triggers (README: Deploying securely). A sink starting on an up-to-date schema needs "
        "no more than that.")
    migrate.add_argument("--schema", help=SCHEMA_HELP)
    migrate.add_argument("--grant-sink", metavar="ROLE", help="the sink's role")
    migrate.add_argument("--grant-reader", metavar="ROLE", help="the read-only role")
    migrate.set_defaults(func=_cmd_migrate)

    history = sub.add_parser(
        "history", help="entries of an account from PostgreSQL, as JSON lines",
        description="Print an account's entries (sequence order) from the PostgreSQL projection, "
        "optionally within a time window. Times are ISO-8601; without a zone they are UTC.")
    history.add_argument("account")
    history.add_argument("--currency", help="only this currency (default: all)")
    history.add_argument("--from", dest="from_time", metavar="ISO",
                         help="entries committed at or after this time")
    history.add_argument("--to", dest="to_time", metavar="ISO",
                         help="entries committed at or before this time")
    history.add_argument("--limit", type=int, default=1000, help="at most N entries (default 1000)")
    history.add_argument("--schema", help=SCHEMA_HELP)
    history.set_defaults(func=_cmd_history)

    replay = sub.add_parser(
        "replay", help="rebuild the PostgreSQL projection from the ledger topics",
        description="Consume the ledger topics into a fresh schema up to their current ends "
        "(progress bar on stderr), then swap it in: the old schema is renamed "
        "<schema>_old_<time> (or dropped with --drop-old). Stop `sink postgres` before the swap "
        "(replay refuses to swap while it runs) and start it afterwards: it resumes from the new "
        "schema's offsets. The start options apply to ledger.entries; tree heads, receipts and "
        "anchors are always read whole.")
    replay.add_argument("target", choices=["postgres"])
    start = replay.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true",
                       help="start every partition at its first record (the default)")
    start.add_argument("--from-offset", metavar="P:O", action="append",
                       help="start partition P at offset O (repeatable; others from the beginning)")
    start.add_argument("--from-time", metavar="ISO",
                       help="start at the first entry at or after this time")
    replay.add_argument("--drop-old", action="store_true", help="drop the replaced schema")
    replay.add_argument("--schema", help=SCHEMA_HELP)
    replay.set_defaults(func=_cmd_replay)

    receipt = sub.add_parser(
        "receipt", help="the hybrid receipt of an entry, verified",
        description="Print, as JSON, an entry's PostgreSQL row, its Merkle inclusion proof in its "
        "partition's log up to the latest published tree head, and its immudb transaction with "
        "a verified read. Exits 1 if any part does not verify.")
    receipt.add_argument("entry_id")
    receipt.add_argument("--schema", help=SCHEMA_HELP)
    receipt.add_argument("--state-dir", help=STATE_DIR_HELP)
    receipt.set_defaults(func=_cmd_receipt)

    verify = sub.add_parser(
        "verify", help="prove the stored ledger was not changed",
        description="Recompute each partition's Merkle log from the entries in PostgreSQL and "
        "check it against every published tree head (roots, consistency between heads, "
        "sampled inclusion proofs); check per-account sequences are gapless and running "
        "balances add up; check each entry against its immudb copy with verified reads; check "
        "every anchor recorded by `sardis-ledger anchor` against the root its contract holds on "
        "chain (SARDIS_CHAIN_RPC) and against the recomputed log. Exits 1 and names the first "
        "bad entry on any mismatch.")
    verify.add_argument("--partition", type=int, help="only this partition")
    verify.add_argument("--account", help="only the entries of this account (and their partitions)")
    verify.add_argument("--no-immudb", action="store_true", help="skip the immudb comparison")
    verify.add_argument("--no-anchors", action="store_true",
                        help="skip checking anchored roots on chain (SARDIS_CHAIN_RPC)")
    verify.add_argument("--schema", help=SCHEMA_HELP)
    verify.add_argument("--state-dir", help=STATE_DIR_HELP)
    verify.set_defaults(func=_cmd_verify)
