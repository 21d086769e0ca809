"""The `sardis-ledger` command line: dev harness, topics, worker, produce/consume, balances."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from streams.errors import LedgerError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _cmd_dev(args: argparse.Namespace) -> int:
    from infra import harness

    if args.action == "up":
        started = harness.up()
        print(harness.connection_settings())
        print(f"# started now: {', '.join(started) or 'nothing (all were running)'}",
              file=sys.stderr)
    elif args.action == "down":
        stopped = harness.down()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    else:
        states = harness.status()
        for name, state in states.items():
            print(f"{name:10s} {state}")
        return EXIT_OK if all("healthy" in s and "unhealthy" not in s for s in states.values()) \
            else EXIT_ERROR
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from infra import harness

    harness.up()
    for name, state in harness.status().items():
        print(f"{name:10s} {state}")
    print(harness.connection_settings())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sardis-ledger",
        description="Stream-processing financial ledger on Apache Kafka. Settings come from "
        "SARDIS_* environment variables (SARDIS_KAFKA_BOOTSTRAP, SARDIS_TOPIC_PREFIX, "
        "SARDIS_PG_DSN, SARDIS_IMMUDB_ADDR, SARDIS_CHAIN_RPC, SARDIS_PARTITIONS, ...).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser(
        "dev", help="local dev servers: Kafka, PostgreSQL, immudb, anvil",
        description="Provision (once, cached in ~/.cache/sardis-ledger or $SARDIS_CACHE_DIR), "
        "start on 127.0.0.1 and health-check the four dev servers. A server whose SARDIS_* "
        "variable is set is treated as external and only health-checked.")
    dev.add_argument("action", choices=["up", "down", "status"],
                     help="up: start what is not running and wait for health; down: stop what the "
                     "harness started; status: show each server and its health")
    dev.set_defaults(func=_cmd_dev)

    demo = sub.add_parser("demo", help="bring the stack up and show it working",
                          description="Start the dev servers and run the demo workload.")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LedgerError as exc:
        print(f"sardis-ledger: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
