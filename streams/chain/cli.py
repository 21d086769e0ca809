"""The `chain watch` and `anchor` subcommands of sardis-ledger (added by streams/cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_MISMATCH = 1
LOGLEVELS = ("error", "warning", "info", "debug")
# Client libraries log every retry and metadata refresh at INFO; the watcher's own lines suffice.
QUIET_LOGGERS = ("aiokafka", "web3", "urllib3", "asyncio")


def _settings() -> Any:
    from sardis_ledger.streams.config import Settings

    return Settings.from_env()


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def _cmd_chain_watch(args: argparse.Namespace) -> int:
    from sardis_ledger.streams.chain import config as watch_config
    from sardis_ledger.streams.chain.watch import run_watch

    _logging(args.loglevel)
    config = watch_config.build(
        args.config, tokens=args.token, wallets=args.wallet, chain=args.chain,
        watch_id=args.watch_id, confirmations=args.confirmations, start_block=args.start_block,
        chunk_blocks=args.chunk_blocks, poll_interval_s=args.poll_interval)
    settings = _settings()

    async def main() -> int:
        from sardis_ledger.streams.health import serve
        from sardis_ledger.streams.shutdown import stop_on_signals

        # The range in flight finishes its transaction; then the watcher exits.
        stop = stop_on_signals("chain watch")
        health = serve("chain-watch")
        stats = await run_watch(settings, config, until_block=args.until_block, once=args.once,
                                stop=stop, health=health)
        print(json.dumps(asdict(stats)))
        return EXIT_OK

    return asyncio.run(main())


def _cmd_anchor(args: argparse.Namespace) -> int:
    from sardis_ledger.streams.chain import anchor

    _logging(args.loglevel)
    settings = _settings()
    if args.action == "verify":
        report = asyncio.run(anchor.verify_anchors(settings, entries_topic=args.entries_topic))
        for check in report.checks:
            print(json.dumps(check.as_json()))
        bad = report.mismatches
        print(f"{len(report.checks)} anchors checked, {len(bad)} mismatched"
              + "".join(f"\n  partition {c.partition} size {c.tree_size}: {'; '.join(c.problems)}"
                        for c in bad), file=sys.stderr)
        return EXIT_MISMATCH if bad else EXIT_OK
    contract = args.contract or os.environ.get(anchor.ANCHOR_CONTRACT_ENV) or None
    run = asyncio.run(anchor.publish_anchors(settings, contract_address=contract, chain=args.chain))
    if run.deployed:
        print(f"deployed {anchor.CONTRACT_NAME} at {run.contract_address} (pass --contract "
              f"{run.contract_address} or set {anchor.ANCHOR_CONTRACT_ENV} to reuse it)",
              file=sys.stderr)
    for record in run.recovered + run.anchored:
        print(json.dumps(record))
    print(f"contract {run.contract_address}: {len(run.anchored)} tree heads anchored, "
          f"{len(run.recovered)} records recovered, {len(run.unchanged)} partitions unchanged",
          file=sys.stderr)
    return EXIT_OK


def _cmd_backfill_claims(args: argparse.Namespace) -> int:
    from sardis_ledger.streams.progress import ProgressBar
    from sardis_ledger.streams.worker.reconciler import backfill_claims

    _logging(args.loglevel)
    read, produced = asyncio.run(backfill_claims(_settings(), ProgressBar("backfill claims")))
    print(f"{read} entries read, {produced} chain claims produced on ledger.internal.chain-claims",
          file=sys.stderr)
    return EXIT_OK


def add_chain_commands(sub: Any) -> None:
    """Add `chain watch`, `chain backfill-claims` and `anchor` to the sardis-ledger subcommands."""
    from sardis_ledger.streams.chain import config as watch_config
    from sardis_ledger.streams.chain.eth import DEV_CHAIN_ID, PRIVATE_KEY_ENV

    chain = sub.add_parser("chain", help="on-chain ERC-20 transfers (chain watch)",
                           description="Commands that read the chain (SARDIS_CHAIN_RPC).")
    chain_sub = chain.add_subparsers(dest="chain_command", required=True, metavar="ACTION")
    watch = chain_sub.add_parser(
        "watch", help="publish confirmed ERC-20 transfers of watched wallets on chain.transfers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read Transfer logs of the configured tokens to or from the watched wallets "
        "with eth_getLogs, only from blocks CONFIRMATIONS deep, and publish each on "
        "chain.transfers (Avro ChainTransfer, key tx hash) exactly once. Progress is stored in "
        "Kafka in the same transaction as the transfers, so a restart resumes with no gap and "
        "no duplicate; a reorg publishes `removed` records for orphaned transfers and the "
        "replacing ones. RPC failures are retried with backoff; no block range is skipped. "
        "Runs until SIGTERM/SIGINT unless --once or --until-block.",
        epilog="config file (YAML, or JSON when it ends in .json):\n"
        "  chain: base                # name on every record (default: from the chain id)\n"
        "  watch_id: default          # names the stored progress; a new id starts over\n"
        f"  confirmations: {watch_config.CONFIRMATIONS_DEFAULT}\n"
        "  start_block: 0             # first block of a watcher with no stored progress\n"
        f"  chunk_blocks: {watch_config.CHUNK_BLOCKS_DEFAULT}         # eth_getLogs span\n"
        f"  poll_interval_s: {watch_config.POLL_INTERVAL_S_DEFAULT}\n"
        "  tokens:\n"
        "    '0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913': {currency: USDC, decimals: 6}\n"
        "  wallets:\n"
        "    '0x1111111111111111111111111111111111111111': acc_123\n"
        "Flags override the file; --token and --wallet add to (or replace) its entries.")
    watch.add_argument("--config", type=Path, metavar="FILE", help="watch config (YAML or JSON)")
    watch.add_argument("--token", action="append", metavar="ADDR=CURRENCY:DECIMALS",
                       help="watch this ERC-20 contract (repeatable)")
    watch.add_argument("--wallet", action="append", metavar="ADDR=ACCOUNT_ID",
                       help="watch this address as this ledger account (repeatable)")
    watch.add_argument("--chain", help="chain name on the records (default: from the chain id)")
    watch.add_argument("--watch-id", help="name of the stored progress (default: default)")
    watch.add_argument("--confirmations", type=int,
                       help=f"blocks a transfer must be buried under (default "
                       f"{watch_config.CONFIRMATIONS_DEFAULT})")
    watch.add_argument("--start-block", type=int,
                       help="first block when no progress is stored (default 0)")
    watch.add_argument("--chunk-blocks", type=int,
                       help=f"blocks per eth_getLogs (default {watch_config.CHUNK_BLOCKS_DEFAULT}; "
                       "halved automatically when the node refuses a range)")
    watch.add_argument("--poll-interval", type=float, metavar="S",
                       help=f"seconds between polls (default {watch_config.POLL_INTERVAL_S_DEFAULT})")
    watch.add_argument("--until-block", type=int, metavar="N",
                       help="exit once every block up to N is published (backfills)")
    watch.add_argument("--once", action="store_true",
                       help="publish what is confirmed now, then exit")
    watch.add_argument("--loglevel", default="info", choices=LOGLEVELS)
    watch.set_defaults(func=_cmd_chain_watch)

    backfill = chain_sub.add_parser(
        "backfill-claims", help="send entries booked before the streaming reconciler to it",
        description="Read ledger.entries from the beginning and produce every entry that names "
        "a chain transfer (chain_tx_hash) to ledger.internal.chain-claims, keyed by its tx hash, as the "
        "worker does for new entries. Run it once after upgrading a ledger that ran without the "
        "streaming reconciler, so old bookings meet their transfers instead of showing as "
        "missing_in_ledger. Running it again is harmless: the reconciler ignores an entry it "
        "has seen. Progress bar on stderr.")
    backfill.add_argument("--loglevel", default="warning", choices=LOGLEVELS)
    backfill.set_defaults(func=_cmd_backfill_claims)

    anchor = sub.add_parser(
        "anchor", help="anchor the ledger's Merkle tree heads on chain, or verify the anchors",
        description="Without ACTION: read the latest tree head of every partition from "
        "ledger.tree-heads, anchor the new ones in one anchorBatch transaction of the "
        "LedgerAnchor contract (deployed first when no --contract is given; its address is "
        "printed) and record each on ledger.anchors. Heads already anchored are skipped, so it "
        "is safe to run again (e.g. from cron). `anchor verify`: check every anchor on "
        "ledger.anchors against the root the contract holds and the root recomputed from "
        "ledger.entries; exit code 1 and the partition and first bad entry on a mismatch. "
        f"Transactions are signed with the key in ${PRIVATE_KEY_ENV}; only a local dev node "
        f"(chain id {DEV_CHAIN_ID} on a loopback address, e.g. the harness's anvil) falls back "
        "to anvil's well-known dev key 0. There is no default key for any other chain.")
    anchor.add_argument("action", nargs="?", choices=["verify"],
                        help="verify: check the recorded anchors instead of anchoring")
    anchor.add_argument("--contract", metavar="ADDR",
                        help="LedgerAnchor contract to use (default: $SARDIS_ANCHOR_CONTRACT, "
                        "else deploy a new one)")
    anchor.add_argument("--chain", help="chain name on the records (default: from the chain id)")
    anchor.add_argument("--entries-topic", default="ledger.entries", metavar="TOPIC",
                        help="verify: the entries topic to recompute roots from (default "
                        "ledger.entries; SARDIS_TOPIC_PREFIX is added)")
    anchor.add_argument("--loglevel", default="warning", choices=LOGLEVELS)
    anchor.set_defaults(func=_cmd_anchor)
