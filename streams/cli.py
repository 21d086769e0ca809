"""The `sardis-ledger` command line: dev harness, topics, worker, produce/consume, balances."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence

from sardis_ledger.streams.cli_options import CHECKING_COMMANDS
from sardis_ledger.streams.config import METRICS_PORTS_DEFAULT, Settings
from sardis_ledger.streams.errors import LedgerError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
# `run` and `status` agree on where the worker's endpoint is; the others follow it.
METRICS_PORT_BASE = METRICS_PORTS_DEFAULT["worker"]


def _cmd_dev_secure(action: str) -> int:
    import time

    from infra import secure_stack

    if action == "up":
        started_at = time.monotonic()
        started = secure_stack.up()
        print(secure_stack.exports())
        print(f"# started now: {', '.join(started) or 'nothing (all were running)'}; ready in "
              f"{time.monotonic() - started_at:.1f}s", file=sys.stderr)
    elif action == "down":
        print(f"stopped: {', '.join(secure_stack.down()) or 'nothing was running'}")
    else:
        states = secure_stack.status()
        for name, state in states.items():
            print(f"secure {name:9s} {state}")
        return EXIT_OK if all("healthy" in s and "unhealthy" not in s for s in states.values()) \
            else EXIT_ERROR
    return EXIT_OK


def _cmd_dev(args: argparse.Namespace) -> int:
    from infra import harness, kafka_cluster

    if args.secure:
        return _cmd_dev_secure(args.action)
    if args.action == "up":
        started = []
        if args.brokers > 1:
            if "SARDIS_KAFKA_BOOTSTRAP" in os.environ:
                raise LedgerError("SARDIS_KAFKA_BOOTSTRAP is set: Kafka is external, so there is no "
                                  "dev cluster to start; unset it to use --brokers")
            started = kafka_cluster.up(args.brokers)
            # The rest of the stack treats the cluster as its (external) Kafka.
            os.environ["SARDIS_KAFKA_BOOTSTRAP"] = kafka_cluster.bootstrap(args.brokers)
        started += harness.up()
        print(harness.connection_settings())
        print(f"# started now: {', '.join(started) or 'nothing (all were running)'}",
              file=sys.stderr)
    elif args.action == "down":
        stopped = kafka_cluster.down() + harness.down()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    else:
        states = harness.status()
        cluster = kafka_cluster.status() if kafka_cluster.running() else {}
        for name, state in {**states, **cluster}.items():
            print(f"{name:16s} {state}")
        return EXIT_OK if _stack_healthy(states, cluster) else EXIT_ERROR
    return EXIT_OK


def _stack_healthy(states: dict[str, str], cluster: dict[str, str]) -> bool:
    """Every server healthy, Kafka being the single node or a cluster with all nodes in."""
    def healthy(state: str) -> bool:
        return "healthy" in state and "unhealthy" not in state

    cluster_ok = bool(cluster) and all("registered" in state and "not registered" not in state
                                       for name, state in cluster.items() if name != "quorum") \
        and cluster["quorum"].startswith("active controller")
    kafka_ok = healthy(states.get("kafka", "")) or cluster_ok
    return kafka_ok and all(healthy(state) for name, state in states.items() if name != "kafka")


def _settings() -> Settings:
    return Settings.from_env()


def _cmd_topics(args: argparse.Namespace) -> int:
    from sardis_ledger.streams.topic_policy import Severity
    from sardis_ledger.streams.topics import ensure_topics

    settings = _settings()
    report = asyncio.run(ensure_topics(settings, create=args.action == "create", check_entries=True))
    plan = report.plan
    print(f"cluster: {plan.brokers} broker(s); ledger topics need replication factor "
          f"{plan.replication_factor}, min.insync.replicas {plan.min_insync_replicas}, "
          "unclean.leader.election.enable=false")
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.action == "create":
        print(f"created: {', '.join(report.created) or 'nothing (all topics exist)'}")
    for difference in report.differences:
        print(difference)
    serious = [d for d in report.differences
               if d.severity in (Severity.OWNERSHIP, Severity.LOSES_DATA)]
    if args.action == "check":
        print(f"{len(report.differences)} difference(s), {len(serious)} that can lose data or "
              "move accounts" if report.differences else "every topic as expected")
        return EXIT_ERROR if report.differences else EXIT_OK
    return EXIT_ERROR if serious else EXIT_OK


def _cmd_quarantine(args: argparse.Namespace) -> int:
    from sardis_ledger.streams.quarantine import run_quarantine

    print(run_quarantine(_settings(), args.position, args.note))
    return EXIT_OK


def _cmd_worker(args: argparse.Namespace) -> int:
    from sardis_ledger.streams.topics import ensure_topics, worker_settings
    from sardis_ledger.streams.worker import run_worker

    settings = _settings()
    report = asyncio.run(ensure_topics(settings, check_entries=True))
    for warning in report.plan.warnings:
        print(f"sardis-ledger worker: warning: {warning}", file=sys.stderr)
    settings = worker_settings(settings, report, allow_unsafe=args.allow_unsafe_topics)
    if args.allow_unsafe_topics:
        for reason in report.unsafe():
            print(f"sardis-ledger worker: starting anyway (--allow-unsafe-topics): {reason}",
                  file=sys.stderr)
    # Faust's worker parses sys.argv itself; give it none of ours.
    sys.argv = [sys.argv[0]]
    run_worker(settings, loglevel=args.loglevel)
    return EXIT_OK


def _cmd_produce(args: argparse.Namespace) -> int:
    from sardis_ledger.streams import cli_io

    return asyncio.run(cli_io.produce(_settings(), sys.stdin, sys.stdout, wait=args.wait))


def _cmd_consume(args: argparse.Namespace) -> int:
    from sardis_ledger.streams import cli_io

    return asyncio.run(cli_io.consume(_settings(), args.topic, sys.stdout,
                                      from_beginning=args.from_beginning,
                                      from_offset=args.from_offset, from_time=args.from_time,
                                      max_records=args.max, timeout_s=args.timeout))


def _cmd_balance(args: argparse.Namespace) -> int:
    from sardis_ledger.streams import cli_io

    if args.at is not None:
        from sardis_ledger.sinks.cli import balance_at

        return balance_at(args)
    return asyncio.run(cli_io.balance(_settings(), args.account, args.currency, sys.stdout))


def _batch_legs(text: str) -> int:
    """--batch-legs: 2 up to the most legs a batch may have."""
    from sardis_ledger.streams.batches import BATCH_LEGS_MAX

    legs = int(text)
    if not 2 <= legs <= BATCH_LEGS_MAX:
        raise argparse.ArgumentTypeError(f"a batch has 2..{BATCH_LEGS_MAX} legs here")
    return legs


def _cmd_bench(args: argparse.Namespace) -> int:
    from sardis_ledger.streams.bench import BATCH_LEGS_DEFAULT, run_bench

    return run_bench(runs=args.runs, commands=args.commands, accounts=args.accounts,
                     hot_commands=args.hot_commands, batches=args.batches,
                     batch_legs=sorted(set(args.batch_legs or BATCH_LEGS_DEFAULT)), workers=args.workers,
                     scenarios=args.scenario or ["spread", "hot", "batches", "closed", "open"],
                     brokers=sorted(set(args.brokers or [1])),
                     clients=args.clients or [1, 16], rate_per_s=args.rate,
                     duration_s=args.duration_s)


def _cmd_demo(args: argparse.Namespace) -> int:
    from sardis_ledger.streams.demo import run_demo

    return run_demo()


def _cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sardis_ledger.streams.supervisor import run_supervised

    log_dir = Path(args.log_dir) if args.log_dir else \
        Path(os.environ.get("SARDIS_STATE_DIR", Path.home() / ".local/state/sardis-ledger")) / "run-logs"
    live = {"auto": None, "live": True, "plain": False}[args.view]
    return run_supervised(_settings(), args.watch_config, log_dir, args.metrics_port_base,
                          args.schema, live)


def _cmd_status(args: argparse.Namespace) -> int:
    from sardis_ledger.streams.status import as_json, format_table, ledger_status

    statuses = asyncio.run(ledger_status(_settings(), args.metrics_port_base, args.watcher,
                                         args.host))
    print(as_json(statuses) if args.json else format_table(statuses))
    problems = [p for s in statuses if (p := s.problem(args.max_lag)) is not None]
    for problem in problems:
        print(f"sardis-ledger status: {problem}", file=sys.stderr)
    return EXIT_ERROR if problems else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sardis-ledger",
        description="Stream-processing financial ledger on Apache Kafka. Settings come from "
        "flags, then SARDIS_* environment variables (SARDIS_KAFKA_BOOTSTRAP, SARDIS_TOPIC_PREFIX, "
        "SARDIS_PG_DSN, SARDIS_IMMUDB_ADDR, SARDIS_CHAIN_RPC, SARDIS_PARTITIONS, ...), then "
        "the --config file. Exit codes: 0 ok, 1 failed (verify, receipt, reconcile: found a "
        "problem), 2 usage, 3 verify/receipt/reconcile could not check, 70 a worker stopped "
        "on a bug or corrupt state. A command whose optional dependency is missing names the "
        "extra to install (pip install 'sardis-ledger[postgres]').",
    )
    from sardis_ledger.streams.cli_options import add_common_options
    from sardis_ledger.version import installed_version

    add_common_options(parser, installed_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser(
        "dev", help="local dev servers: Kafka (one node or a 3-node cluster), PostgreSQL, immudb, "
        "anvil, schema registry",
        description="Provision (once, cached in ~/.cache/sardis-ledger or $SARDIS_CACHE_DIR), "
        "start on 127.0.0.1 and health-check the five dev servers. A server whose SARDIS_* "
        "variable is set is treated as external and only health-checked. `up --brokers 3` "
        "starts a 3-node KRaft cluster instead of the single Kafka node (every node a broker "
        "and a controller, a quorum of 3, ports 19192-19197, data in the run directory's "
        "kafka-cluster/) and prints its bootstrap list.")
    dev.add_argument("action", choices=["up", "down", "status"],
                     help="up: start what is not running and wait for health; down: stop what the "
                     "harness started (the cluster's nodes too); status: show each server and "
                     "its health, and each cluster node and the controller quorum")
    dev.add_argument("--brokers", type=int, choices=[1, 3], default=1,
                     help="up only: 1 (default) for the single node on 9092, 3 for the cluster")
    dev.add_argument("--secure", action="store_true",
                     help="the secured stack instead, beside the plain one (own ports 29092-29094, "
                     "25432, 23322 and run directory): a throwaway CA, Kafka SASL_SSL/SCRAM and "
                     "mTLS with ACLs, PostgreSQL SCRAM over TLS only with owner/sink/reader "
                     "roles, immudb over TLS with a changed admin password and a sink user; "
                     "`up` prints each role's settings (README: Deploying securely)")
    dev.set_defaults(func=_cmd_dev)

    topics = sub.add_parser(
        "topics", help="create the ledger topics, or check existing ones",
        description="create: make every missing ledger topic with SARDIS_PARTITIONS partitions "
        "and the cluster's replication (SARDIS_REPLICATION_FACTOR, default 3 with 3 or more "
        "brokers, else the broker count; min.insync.replicas RF-1; unclean leader election off), "
        "then check the rest. check: compare the existing topics with those settings without "
        "creating anything. Both name each difference (partitions, replication factor, "
        "min.insync.replicas, compaction, retention) and say whether it can lose data; both "
        "read the newest entry of each partition to catch partitions added under the ledger. "
        "Exit 1: check found any difference; create left one that can lose data or move "
        "accounts between partitions.")
    topics.add_argument("action", choices=["create", "check"])
    topics.set_defaults(func=_cmd_topics)

    worker = sub.add_parser("worker", help="run the ledger worker (Faust, exactly-once)",
                            description="Run one ledger worker until SIGTERM/SIGINT: it decides "
                            "entry commands, coordinates batches and reconciles chain transfers "
                            "against entries (grace windows: SARDIS_RECONCILE_GRACE_S and "
                            "SARDIS_RECONCILE_GRACE_BLOCKS). Start more processes to share "
                            "partitions. Creates missing topics first and refuses to start on "
                            "topics that can lose data (see `topics check`). Bad input never stops it: "
                            "it goes to ledger.dlq with a reason. A decision that raises is a bug "
                            "or corrupt state: the worker exits 70 (its open transaction aborts) "
                            "and logs 'STOPPED on TOPIC:PARTITION:OFFSET'; after investigating, "
                            "`sardis-ledger quarantine TOPIC:PARTITION:OFFSET` sets that record "
                            "aside and a restarted worker goes on.")
    worker.add_argument("--allow-unsafe-topics", action="store_true",
                        help="start even on topics whose settings can lose data (replication "
                        "factor 1 on a multi-broker cluster, too few in-sync replicas, unclean "
                        "leader election, short retention). Never overrides a partition count "
                        "that moves accounts between partitions")
    worker.add_argument("--loglevel", default="warn",
                        choices=["crit", "error", "warn", "info", "debug"])
    worker.set_defaults(func=_cmd_worker)

    run = sub.add_parser(
        "run", help="run the whole ledger on one machine: worker, both sinks, chain watcher",
        description="Start the worker, `sink postgres`, `sink immudb` and (with --watch-config) "
        "`chain watch` as child processes, and keep them running: a child that exits is started "
        "again after a backoff (1 s doubling to 30 s; back to 1 s after it ran 60 s). Ctrl-C or "
        "SIGTERM stops every child with SIGTERM (each ends its open transactions and exits "
        "within 8 s; a straggler gets SIGKILL at 9 s). On a terminal it shows one live table "
        "(per process: state, pid, restarts, decided/s, lag, last log line); otherwise it "
        "prints plain log lines, each child's prefixed with its name. Each child serves "
        "/metrics, /healthz and /readyz on its own port: --metrics-port-base, +1, +2, +3 "
        "(worker, sink postgres, sink immudb, chain watch). Each component can still run alone "
        "(`worker`, `sink`, `chain watch`) to scale them separately.")
    run.add_argument("--watch-config", metavar="FILE",
                     help="chain watch config (see `chain watch --help`); without it no watcher")
    run.add_argument("--metrics-port-base", type=int, default=METRICS_PORT_BASE, metavar="PORT",
                     help="the worker's metrics port; the others take the next ones (default "
                     f"{METRICS_PORT_BASE})")
    run.add_argument("--schema", help="PostgreSQL schema of the projection (default: "
                     "$SARDIS_PG_SCHEMA or ledger)")
    run.add_argument("--log-dir", metavar="DIR", help="each child's full log, NAME.log (default: "
                     "$SARDIS_STATE_DIR/run-logs, else ~/.local/state/sardis-ledger/run-logs)")
    run.add_argument("--view", choices=["auto", "live", "plain"], default="auto",
                     help="live table or plain log lines (default: live on a terminal)")
    run.set_defaults(func=_cmd_run)

    status = sub.add_parser(
        "status", help="one table of every component's state, lag and last error",
        description="Ask each component's endpoint (/readyz and /metrics, ports as `run` gives "
        "them: --metrics-port-base, +1, +2, +3) for its state, input lag and last logged "
        "error, and Kafka for the committed-offset lag of the worker's and the immudb sink's "
        "consumer groups (the PostgreSQL sink keeps its offsets in PostgreSQL: its lag is from "
        "its endpoint). Exit 1 when a component is down or not ready, or more than --max-lag "
        "records behind.")
    status.add_argument("--metrics-port-base", type=int, default=METRICS_PORT_BASE, metavar="PORT",
                        help="the worker's port; sinks and watcher on the next ones (default "
                        f"{METRICS_PORT_BASE})")
    status.add_argument("--host", default="127.0.0.1", help="where the endpoints listen")
    status.add_argument("--watcher", action="store_true", help="a chain watcher is expected too")
    status.add_argument("--max-lag", type=int, default=1000, metavar="RECORDS",
                        help="behind by more than this counts as a problem (default 1000)")
    status.add_argument("--json", action="store_true", help="JSON instead of the table")
    status.set_defaults(func=_cmd_status)

    quarantine = sub.add_parser(
        "quarantine", help="set aside the record a worker stopped on (after investigating)",
        description="Move one input record aside so its partition can go on: writes a "
        "DeadLetter (reason quarantined) to ledger.dlq and marks the position on "
        "ledger.internal.quarantine, in one Kafka transaction. Workers skip a quarantined "
        "record (a client command gets a rejected result, reason quarantined). Idempotent: a "
        "second run changes nothing. Use the position a worker logged with 'STOPPED on'.")
    quarantine.add_argument("position", metavar="TOPIC:PARTITION:OFFSET",
                            help="full topic name (prefix included), partition and offset, "
                            "e.g. ledger.commands:3:1200")
    quarantine.add_argument("--note", default="", help="why it was set aside (kept in the "
                            "dead letter's detail, at most 256 characters)")
    quarantine.set_defaults(func=_cmd_quarantine)

    produce = sub.add_parser(
        "produce", help="JSON lines on stdin -> Avro commands",
        description='Read one JSON command per line, e.g. {"command_id": "c1", "account_id": '
        '"acc_1", "entry_type": "credit", "amount": "10.50", "currency": "USD"}. Amounts are '
        "strings or JSON numbers read as exact decimals. Prints one JSON line per command "
        "(its partition and offset, or with --wait its result). Bad lines are reported with "
        "their line number and skipped; the exit code is 1 if any line failed.")
    produce.add_argument("--wait", action="store_true",
                         help="wait for each command's result and print it")
    produce.set_defaults(func=_cmd_produce)

    consume = sub.add_parser(
        "consume", help="Avro topic -> JSON lines on stdout (replay from offsets)",
        description="Print the records of a ledger topic as JSON lines (read_committed). "
        "TOPIC is a name such as ledger.entries (SARDIS_TOPIC_PREFIX is added). Without a "
        "start option it reads from the current end (new records only).")
    consume.add_argument("topic")
    start = consume.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true", help="start at the first record")
    start.add_argument("--from-offset", metavar="P:O", action="append",
                       help="start partition P at offset O (repeatable; other partitions start "
                       "at the beginning)")
    start.add_argument("--from-time", metavar="ISO",
                       help="start at the first record at or after this time, e.g. 2026-01-31T12:00Z")
    consume.add_argument("--max", type=int, default=None, help="stop after N records")
    consume.add_argument("--timeout", type=float, default=None, metavar="S",
                         help="stop after S seconds without a new record (default: never)")
    consume.set_defaults(func=_cmd_consume)

    balance = sub.add_parser("balance", help="current balance of an account",
                             description="Print the latest balance (posted and available) of "
                             "an account in one currency, as JSON.")
    balance.add_argument("account")
    balance.add_argument("--currency", default="USDC")
    balance.add_argument("--at", metavar="ISO",
                         help="the posted balance at this time (ISO-8601, UTC without a zone), "
                         "from the PostgreSQL projection (ledger.balance_at)")
    balance.add_argument("--schema", help="PostgreSQL schema for --at (default: "
                         "$SARDIS_PG_SCHEMA or ledger)")
    balance.set_defaults(func=_cmd_balance)

    bench = sub.add_parser(
        "bench", help="end-to-end benchmark: commands/s and latency",
        description="Start the stack, then per scenario and run: fresh topics, a fresh worker, "
        "produce commands and time each until its result is consumed. Prints the median "
        "commands/s and p50/p99 latency over the runs, and a Kafka+Avro baseline (produce and "
        "consume the same records with no ledger) measured in the same invocation.")
    bench.add_argument("--runs", type=int, default=3, help="runs per scenario (median reported)")
    bench.add_argument("--commands", type=int, default=100_000, help="commands in scenario (a)")
    bench.add_argument("--accounts", type=int, default=10_000, help="accounts in scenario (a)")
    bench.add_argument("--hot-commands", type=int, default=20_000,
                       help="commands in scenario (b), all on one account")
    bench.add_argument("--batches", type=int, default=10_000,
                       help="batches in scenario (c)")
    bench.add_argument("--batch-legs", type=_batch_legs, action="append", metavar="N",
                       help="legs per batch in scenario (c): one debit and N-1 credits to "
                       "distinct accounts (repeatable, one report line each; default 2)")
    bench.add_argument("--scenario", action="append",
                       choices=["spread", "hot", "batches", "closed", "open", "recovery"],
                       help="run only this scenario (repeatable). spread, hot and batches are "
                       "bursts (everything produced at once); closed: --clients tasks each post "
                       "one command with LedgerClient.create_entry and await it, for "
                       "--duration-s; open: commands offered at --rate per second for "
                       "--duration-s, latency from send to result; recovery: one credit on each of "
                       "--accounts accounts, then the worker's memory, a kill -9 and how long a "
                       "new worker takes to replay its tables and answer (not in the default set)")
    bench.add_argument("--clients", type=int, action="append", metavar="C",
                       help="closed-loop clients (repeatable; default: 1 and 16)")
    bench.add_argument("--rate", type=int, default=1000, metavar="N",
                       help="open loop: commands offered per second (default 1000)")
    bench.add_argument("--duration-s", type=float, default=10.0, metavar="S",
                       help="closed and open loop: seconds per run (default 10)")
    bench.add_argument("--workers", type=int, default=1,
                       help="worker processes sharing the partitions (one consumer group)")
    bench.add_argument("--brokers", type=int, action="append", choices=[1, 3],
                       help="run on the single node (1) and/or the 3-node dev cluster (3, "
                       "started if not running); repeat for both: each run then measures both, "
                       "one after the other (default: 1)")
    bench.set_defaults(func=_cmd_bench)

    demo = sub.add_parser("demo", help="the whole ledger, step by step, each claim checked",
                          description="Start the dev servers and the ledger with `sardis-ledger "
                          "run` (worker, both sinks, chain watcher) on fresh topics and a fresh "
                          "PostgreSQL schema, then show and check: entries, an overdraft "
                          "refused, a duplicate answered from idempotency, an atomic batch and "
                          "its rollback, a batch refused naming its failing leg, the PostgreSQL "
                          "projection and a balance at a past time, a receipt with its Merkle "
                          "inclusion proof and immudb verified read, an edited row caught by "
                          "verify, token transfers on anvil reconciled with one planted "
                          "discrepancy of each kind, tree heads anchored and verified, the "
                          "metrics; then stop it all with SIGTERM. Exit 0 only when every step "
                          "is confirmed (about 40 s on a warm machine).")
    demo.set_defaults(func=_cmd_demo)

    from sardis_ledger.sinks.cli import add_sink_commands

    add_sink_commands(sub)

    from sardis_ledger.streams.chain.cli import add_chain_commands

    add_chain_commands(sub)

    from sardis_ledger.sinks.reconcile_report import add_reconcile_commands

    add_reconcile_commands(sub)

    from sardis_ledger.streams.acl_cli import add_acl_commands

    add_acl_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from sardis_ledger.streams.cli_options import (
        add_checkout_to_path,
        apply_settings,
        check_extras,
        failure_exit,
        missing_extra,
    )

    add_checkout_to_path()
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        apply_settings(args, os.environ)
        check_extras(args)
        return func(args)
    except LedgerError as exc:
        print(f"sardis-ledger: error: {exc}", file=sys.stderr)
        return failure_exit(args.command, EXIT_ERROR)
    except ModuleNotFoundError as exc:
        # An optional dependency missing at the boundary of the command that needs it.
        line = missing_extra(exc)
        if line is None:
            raise
        print(f"sardis-ledger {args.command}: {line}", file=sys.stderr)
        return failure_exit(args.command, EXIT_ERROR)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.command not in CHECKING_COMMANDS:
            raise
        # A check that crashed did not check: say so with its own exit code, not "found a problem".
        print(f"sardis-ledger {args.command}: could not check: {exc!r}", file=sys.stderr)
        return failure_exit(args.command, EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
