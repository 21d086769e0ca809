"""`sardis-ledger acl plan|apply`: the Kafka ACLs of a deployment, printed or applied."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from sardis_ledger.streams import acl
from sardis_ledger.streams.config import Settings

EXIT_OK = 0


def _cmd_acl(args: argparse.Namespace) -> int:
    principals = dict(acl.parse_principal(raw) for raw in args.principal or [])
    prefix = Settings.from_env().topic_prefix if args.prefix is None else args.prefix
    roles = [acl.Role(r) for r in args.role] if args.role else None
    bindings = acl.plan(prefix, principals, roles)
    if args.action == "plan":
        print(acl.table(bindings))
        print(f"# {len(bindings)} ALLOW rules for topic prefix {prefix!r}; everything else is "
              "denied (allow.everyone.if.no.acl.found=false)")
        return EXIT_OK
    from sardis_ledger.streams.kafka_acls import apply

    settings = Settings.from_env()
    report = asyncio.run(apply(settings, bindings, prefix))
    for binding in report.created:
        print(f"created  {binding.row()}")
    for binding in report.unplanned:
        print(f"unplanned (left in place, review it) {binding.row()}")
    print(f"{len(report.created)} created, {len(report.present)} already present, "
          f"{len(report.unplanned)} unplanned rules of these principals on {settings.kafka_bootstrap}")
    return EXIT_OK


def add_acl_commands(sub: Any) -> None:
    parser = sub.add_parser(
        "acl", help="print or apply the Kafka ACLs of the ledger's principals",
        description="The least-privilege ACL set for one topic prefix: clients write only "
        "ledger.commands and ledger.batches and read results and balances; only the worker "
        "writes entries, internal topics and its changelogs; sinks read entries and write only "
        "receipts and their dead letters; the watcher writes only chain topics; the operator "
        "anchors and quarantines. plan prints it (review it like code); apply creates what the "
        "broker lacks (idempotent), connecting with SARDIS_KAFKA_* as a principal allowed to "
        "alter the cluster's ACLs, and names rules of these principals that the plan lacks.")
    parser.add_argument("action", choices=["plan", "apply"])
    parser.add_argument("--prefix", default=None,
                        help="topic prefix (default: SARDIS_TOPIC_PREFIX, else none)")
    parser.add_argument("--principal", action="append", metavar="ROLE=User:NAME",
                        help="the principal of a role (repeatable; default User:sardis-ROLE); "
                        f"roles: {', '.join(r.value for r in acl.Role)}")
    parser.add_argument("--role", action="append", choices=[r.value for r in acl.Role],
                        help="only these roles (repeatable; default all)")
    parser.set_defaults(func=_cmd_acl)
