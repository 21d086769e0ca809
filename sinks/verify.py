"""`verify` and `receipt`: recompute the Merkle logs and account chains from PostgreSQL, check immudb."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sardis_ledger.sinks import rows
from sardis_ledger.sinks.errors import SinkError, VerificationError
from sardis_ledger.sinks.schema import connect, quoted
from sardis_ledger.streams import canonical, core, merkle
from sardis_ledger.streams.config import Settings, redact_url, redact_urls_in
from sardis_ledger.streams.errors import LedgerError
from sardis_ledger.streams.money import Currency, currency_table

INCLUSION_SAMPLES_PER_HEAD = 4  # random entries whose inclusion proof is checked per tree head
PROBLEMS_MAX = 100  # stop collecting after this many (the first one is what matters)
SAMPLE_SEED = 5


@dataclass(frozen=True, slots=True)
class Problem:
    """One mismatch, naming the entry it concerns when there is one."""

    detail: str
    entry_id: str | None = None
    partition: int | None = None
    leaf_index: int | None = None

    def __str__(self) -> str:
        where = f"entry {self.entry_id}" if self.entry_id else "ledger"
        if self.partition is not None:
            where += f" (partition {self.partition}" + (
                f", leaf {self.leaf_index})" if self.leaf_index is not None else ")")
        return f"{where}: {self.detail}"


@dataclass
class Report:
    entries: int = 0
    partitions: int = 0
    tree_heads: int = 0
    accounts: int = 0
    immudb_checked: int = 0
    anchors: int = 0
    problems: list[Problem] = field(default_factory=list)

    def add(self, problem: Problem) -> None:
        if len(self.problems) < PROBLEMS_MAX:
            self.problems.append(problem)

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------ pure checks


def check_partition(partition: int, entries: Sequence[core.Entry],
                    heads: Sequence[tuple[int, str]], report: Report,
                    rng: random.Random | None = None) -> list[bytes]:
    """Recompute one partition's RFC 6962 log from its entries (sorted by leaf index) and check
    hashes, roots, every tree head (root, consistency with the previous head, sampled inclusion
    proofs). Returns the leaf hashes (for proofs)."""
    rng = rng or random.Random(SAMPLE_SEED)
    leaf_hashes: list[bytes] = []
    roots: list[bytes] = []
    frontier = merkle.MerkleFrontier()
    for entry in entries:
        expected = len(leaf_hashes)
        if entry.leaf_index != expected:
            report.add(Problem(f"has leaf index {entry.leaf_index} where {expected} was expected: "
                               f"the entry at leaf {expected} is missing (deleted?)",
                               entry.entry_id, partition, entry.leaf_index))
            return leaf_hashes  # every later root depends on the missing leaf
        if entry.partition != partition:
            report.add(Problem(f"claims partition {entry.partition}", entry.entry_id, partition,
                               entry.leaf_index))
        data = canonical.entry_bytes(entry)
        if canonical.entry_hash(data) != entry.entry_hash:
            report.add(Problem("entry_hash does not match the entry's fields (edited?)",
                               entry.entry_id, partition, entry.leaf_index))
        leaf = merkle.leaf_hash(data)
        frontier = frontier.append(leaf)
        leaf_hashes.append(leaf)
        roots.append(frontier.root())
        if frontier.root() != entry.merkle_root:
            report.add(Problem("merkle_root differs from the root recomputed from the log",
                               entry.entry_id, partition, entry.leaf_index))
    previous: tuple[int, bytes] | None = None
    for size, root_hex in sorted(heads):
        report.tree_heads += 1
        root = bytes.fromhex(root_hex)
        if size > len(leaf_hashes):
            report.add(Problem(f"tree head of size {size} covers entries that are not stored (only "
                               f"{len(leaf_hashes)}): entries at leaf {len(leaf_hashes)} and after "
                               "are missing", None, partition, len(leaf_hashes)))
            break
        if size == 0:
            continue
        if roots[size - 1] != root:
            first = previous[0] if previous else 0
            report.add(Problem(f"published tree head of size {size} has root {root_hex}, the stored "
                               f"entries give {roots[size - 1].hex()}: an entry at leaf "
                               f"{first}..{size - 1} was changed", entries[first].entry_id,
                               partition, first))
            continue
        if previous is not None:
            old_size, old_root = previous
            proof = merkle.consistency_proof(leaf_hashes, old_size, size)
            if not merkle.verify_consistency(old_size, size, old_root, root, proof):
                report.add(Problem(f"tree heads {old_size} and {size} are not consistent", None,
                                   partition))
        for index in rng.sample(range(size), min(INCLUSION_SAMPLES_PER_HEAD, size)):
            proof = merkle.inclusion_proof(leaf_hashes, index, size)
            if not merkle.verify_inclusion(leaf_hashes[index], index, size, proof, root):
                report.add(Problem(f"inclusion proof in tree head {size} failed",
                                   entries[index].entry_id, partition, index))
        previous = (size, root)
    return leaf_hashes


@dataclass(frozen=True, slots=True)
class AnchorRow:
    """One row of the anchors table and the root its contract holds (None: not read)."""

    partition: int
    tree_size: int
    root_hash: str
    tx_hash: str
    contract_address: str | None
    chain_root: bytes | None


def check_anchor(anchor: AnchorRow, leaf_hashes: Sequence[bytes], report: Report) -> None:
    """An anchored root against the chain and against the log recomputed from stored entries."""
    report.anchors += 1
    where = f"anchor of tree size {anchor.tree_size} (tx {anchor.tx_hash})"
    trusted = anchor.chain_root
    if trusted is None or trusted == bytes(merkle.HASH_SIZE_BYTES):
        report.add(Problem(f"{where}: the anchor contract {anchor.contract_address} holds no root "
                           "for it", None, anchor.partition))
        trusted = bytes.fromhex(anchor.root_hash)
    elif trusted.hex() != anchor.root_hash:
        report.add(Problem(f"{where}: the anchors table says root {anchor.root_hash}, the chain "
                           f"holds {trusted.hex()}", None, anchor.partition))
    if anchor.tree_size > len(leaf_hashes):
        report.add(Problem(f"{where} covers {anchor.tree_size} entries, only {len(leaf_hashes)} "
                           "are stored in order (missing or deleted)", None, anchor.partition,
                           len(leaf_hashes)))
        return
    recomputed = merkle.root_from_leaf_hashes(leaf_hashes[:anchor.tree_size])
    if recomputed != trusted:
        report.add(Problem(f"{where}: the stored entries give root {recomputed.hex()}, the chain "
                           f"holds {trusted.hex()}: an entry below leaf {anchor.tree_size} was "
                           "changed", None, anchor.partition))


def check_accounts(entries: Iterable[core.Entry], report: Report) -> None:
    """Per (account, currency): sequences 1, 2, 3, ... and running balances that add up."""
    chains: dict[tuple[str, str], list[core.Entry]] = defaultdict(list)
    for entry in entries:
        chains[(entry.account_id, entry.currency)].append(entry)
    for (account, currency), chain in sorted(chains.items()):
        report.accounts += 1
        chain.sort(key=lambda e: e.sequence)
        balance = 0
        for expected, entry in enumerate(chain, start=1):
            if entry.sequence != expected:
                report.add(Problem(f"{account}/{currency} sequence {entry.sequence} follows "
                                   f"{expected - 1}: entry with sequence {expected} is missing",
                                   entry.entry_id, entry.partition, entry.leaf_index))
                break
            sign = core.BALANCE_SIGN.get(entry.entry_type)
            if sign is None:
                report.add(Problem(f"unknown entry_type {entry.entry_type!r}", entry.entry_id,
                                   entry.partition, entry.leaf_index))
                break
            balance += sign * entry.amount_minor
            if entry.running_balance_minor != balance:
                report.add(Problem(f"running balance {entry.running_balance_minor} minor units, "
                                   f"the entries add up to {balance}", entry.entry_id,
                                   entry.partition, entry.leaf_index))
                break


# ------------------------------------------------------------------ loading


async def load_entries(conn: Any, schema: str, currencies: Mapping[str, Currency], report: Report, *,
                       partition: int | None = None) -> dict[int, list[core.Entry]]:
    """Entries per partition in leaf order; rows that cannot be read back are problems."""
    q = quoted(schema)
    where, args = ("WHERE partition = $1", [partition]) if partition is not None else ("", [])
    result: dict[int, list[core.Entry]] = defaultdict(list)
    records = await conn.fetch(f"SELECT * FROM {q}.entries {where} ORDER BY partition, leaf_index", *args)
    for row in records:
        try:
            entry = rows.entry_from_row(row, currencies)
        except LedgerError as exc:
            report.add(Problem(f"row cannot be read back: {exc}", row["entry_id"], row["partition"],
                               row["leaf_index"]))
            continue
        result[entry.partition].append(entry)
    return result


async def verify(settings: Settings, schema: str, *, partition: int | None = None,
                 account: str | None = None, check_immudb: bool = True, check_anchors: bool = True,
                 state_directory: Path | None = None,
                 currencies: Mapping[str, Currency] | None = None) -> Report:
    """Check the projection in `schema` (and the immudb copy); the report lists the problems."""
    currencies = dict(currencies) if currencies is not None else currency_table()
    report = Report()
    q = quoted(schema)
    conn = await connect(settings.pg_dsn)
    try:
        partitions: list[int] | None = None
        if account is not None:
            partitions = [r["partition"] for r in await conn.fetch(
                f"SELECT DISTINCT partition FROM {q}.entries WHERE account_id = $1", account)]
            if not partitions:
                report.add(Problem(f"no entries for account {account}"))
                return report
        if partition is not None:
            partitions = [partition] if partitions is None else [p for p in partitions if p == partition]
        per_partition: dict[int, list[core.Entry]] = {}
        for p in partitions if partitions is not None else [None]:
            per_partition.update(await load_entries(conn, schema, currencies, report, partition=p))
        heads: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for row in await conn.fetch(f"SELECT partition, tree_size, root_hash FROM {q}.tree_heads"):
            heads[row["partition"]].append((row["tree_size"], row["root_hash"]))
        receipts = {r["entry_id"]: r for r in await conn.fetch(
            f"SELECT entry_id, immudb_tx, immudb_database, verified FROM {q}.receipts")}
        anchor_rows = await conn.fetch(
            f"SELECT partition, tree_size, root_hash, tx_hash, contract_address FROM {q}.anchors "
            "ORDER BY partition, tree_size") if check_anchors else []
        set_aside = await conn.fetch(
            f"SELECT source_topic, source_partition, source_offset, reason, detail "
            f"FROM {q}.sink_dead_letters ORDER BY source_topic, source_partition, source_offset")
    finally:
        await conn.close()
    for row in set_aside:
        if partitions is None or row["source_partition"] in partitions:
            report.add(Problem(
                f"the sink set aside {row['source_topic']}:{row['source_partition']}:"
                f"{row['source_offset']} ({row['reason']}: {row['detail']}); whatever it held is "
                "missing from the projection", None, row["source_partition"]))

    wanted_partitions = set(per_partition) | (set(heads) if partitions is None else set(partitions))
    leaf_hashes: dict[int, list[bytes]] = {}
    for p in sorted(wanted_partitions):
        leaf_hashes[p] = check_partition(p, per_partition.get(p, []), heads.get(p, []), report)
    for anchor in await _anchors(settings, [r for r in anchor_rows
                                            if r["partition"] in wanted_partitions], report):
        check_anchor(anchor, leaf_hashes.get(anchor.partition, []), report)
    report.partitions = len(wanted_partitions)
    all_entries = [e for p in sorted(per_partition) for e in per_partition[p]]
    selected = [e for e in all_entries if account is None or e.account_id == account]
    report.entries = len(selected)
    check_accounts(selected, report)
    stored_ids = {e.entry_id for e in all_entries}
    if partition is None and account is None:
        for entry_id in sorted(set(receipts) - stored_ids):
            report.add(Problem("has an immudb receipt but no row in entries (deleted?)", entry_id))
    if check_immudb:
        await asyncio.to_thread(_check_immudb, settings, selected, receipts, report, state_directory)
    return report


async def _anchors(settings: Settings, anchor_rows: Sequence[Any], report: Report) -> list[AnchorRow]:
    """The anchors with the roots their contracts hold (read from the chain node)."""
    if not anchor_rows:
        return []
    from sardis_ledger.streams.chain.anchor import anchored_roots

    keys = [(r["contract_address"], r["partition"], r["tree_size"]) for r in anchor_rows
            if r["contract_address"]]
    roots: dict[tuple[str, int, int], bytes] = {}
    try:
        roots = await anchored_roots(settings, keys)
    except LedgerError as exc:
        report.add(Problem(f"anchored roots cannot be read from {redact_url(settings.chain_rpc)}: "
                           f"{redact_urls_in(str(exc))} "
                           "(--no-anchors skips the anchor check)"))
        return []
    return [AnchorRow(r["partition"], r["tree_size"], r["root_hash"], r["tx_hash"],
                      r["contract_address"],
                      roots.get((r["contract_address"], r["partition"], r["tree_size"])))
            for r in anchor_rows]


def _check_immudb(settings: Settings, entries: Sequence[core.Entry], receipts: Mapping[str, Any],
                  report: Report, state_directory: Path | None) -> None:
    """Each entry's canonical bytes against immudb: one verified transaction read per receipt's
    transaction, a verified key read for entries without a receipt."""
    from sardis_ledger.sinks.immudb import ImmudbStore, entry_key

    store = ImmudbStore(settings, state_directory)
    store.open()
    try:
        by_tx: dict[int, dict[bytes, core.Entry]] = defaultdict(dict)
        unreceipted: list[core.Entry] = []
        for entry in entries:
            receipt = receipts.get(entry.entry_id)
            if receipt is None:
                unreceipted.append(entry)
            else:
                by_tx[receipt["immudb_tx"]][entry_key(settings, entry.entry_id)] = entry
        for tx_id, keyed in sorted(by_tx.items()):
            items = {key: canonical.entry_bytes(entry) for key, entry in keyed.items()}
            try:
                store.verify_tx(tx_id, items)
            except VerificationError as exc:
                key = (exc.entry_id or "").encode()
                bad = keyed.get(key)
                report.add(Problem(f"differs from its immudb copy: {exc}",
                                   bad.entry_id if bad else None,
                                   bad.partition if bad else None, bad.leaf_index if bad else None))
            report.immudb_checked += len(items)
        for entry in unreceipted:
            try:
                value, _stored = store.read_verified(entry_key(settings, entry.entry_id))
            except SinkError as exc:
                report.add(Problem(f"immudb: {exc}", entry.entry_id, entry.partition, entry.leaf_index))
                continue
            if value != canonical.entry_bytes(entry):
                report.add(Problem("differs from its immudb copy (verified read)", entry.entry_id,
                                   entry.partition, entry.leaf_index))
            report.immudb_checked += 1
    finally:
        store.close()


# ------------------------------------------------------------------ receipt


async def receipt(settings: Settings, schema: str, entry_id: str, *,
                  state_directory: Path | None = None,
                  currencies: Mapping[str, Currency] | None = None) -> dict[str, Any]:
    """The hybrid receipt of one entry: its row, its Merkle inclusion proof up to a published
    tree head, and its immudb transaction with the verification result."""
    currencies = dict(currencies) if currencies is not None else currency_table()
    q = quoted(schema)
    conn = await connect(settings.pg_dsn)
    try:
        row = await conn.fetchrow(f"SELECT * FROM {q}.entries WHERE entry_id = $1", entry_id)
        if row is None:
            raise SinkError(f"entry {entry_id} is not in {schema}.entries")
        entry = rows.entry_from_row(row, currencies)
        head = await conn.fetchrow(
            f"SELECT tree_size, root_hash, published_at FROM {q}.tree_heads "
            "WHERE partition = $1 AND tree_size > $2 ORDER BY tree_size DESC LIMIT 1",
            entry.partition, entry.leaf_index)
        log_rows = await conn.fetch(
            f"SELECT * FROM {q}.entries WHERE partition = $1 AND leaf_index < $2 ORDER BY leaf_index",
            entry.partition, head["tree_size"] if head else entry.leaf_index + 1)
        stored_receipt = await conn.fetchrow(f"SELECT * FROM {q}.receipts WHERE entry_id = $1", entry_id)
    finally:
        await conn.close()
    data = canonical.entry_bytes(entry)
    out: dict[str, Any] = {"entry": rows.entry_wire_from_row(row),
                           "entry_hash_ok": canonical.entry_hash(data) == entry.entry_hash}
    leaf_hashes = [merkle.leaf_hash(canonical.entry_bytes(rows.entry_from_row(r, currencies)))
                   for r in log_rows]
    if head is None:
        out["merkle"] = {"verified": False, "detail": "no tree head covers this entry yet"}
    elif len(leaf_hashes) != head["tree_size"] or leaf_hashes[entry.leaf_index] != merkle.leaf_hash(data):
        out["merkle"] = {"verified": False, "tree_size": head["tree_size"],
                         "detail": f"only {len(leaf_hashes)} of {head['tree_size']} leaves are stored"}
    else:
        proof = merkle.inclusion_proof(leaf_hashes, entry.leaf_index, head["tree_size"])
        out["merkle"] = {
            "partition": entry.partition, "leaf_index": entry.leaf_index,
            "leaf_hash": merkle.leaf_hash(data).hex(), "tree_size": head["tree_size"],
            "root_hash": head["root_hash"], "published_at": head["published_at"],
            "proof": [p.hex() for p in proof],
            "verified": merkle.verify_inclusion(merkle.leaf_hash(data), entry.leaf_index,
                                                head["tree_size"], proof,
                                                bytes.fromhex(head["root_hash"])),
        }
    out["immudb"] = await asyncio.to_thread(_immudb_receipt, settings, entry_id, data,
                                            dict(stored_receipt) if stored_receipt else None,
                                            state_directory)
    out["verified"] = bool(out["entry_hash_ok"] and out["merkle"]["verified"]
                           and out["immudb"]["verified"])
    return out


def _immudb_receipt(settings: Settings, entry_id: str, data: bytes, stored: dict[str, Any] | None,
                    state_directory: Path | None) -> dict[str, Any]:
    from sardis_ledger.sinks.immudb import ImmudbStore, entry_key

    key = entry_key(settings, entry_id)
    result: dict[str, Any] = {"key": key.decode(), "database": settings.immudb_database,
                              "receipt": stored}
    store = ImmudbStore(settings, state_directory)
    try:
        store.open()
        value, where = store.read_verified(key)
        result["tx"] = where.tx_id
        result["trusted_tx"] = store.trusted.tx_id
        matches = value == data
        result["value_matches_row"] = matches
        result["receipt_tx_matches"] = stored is None or stored["immudb_tx"] == where.tx_id
        result["verified"] = where.verified and matches and result["receipt_tx_matches"]
    except SinkError as exc:
        result["verified"] = False
        result["detail"] = str(exc)
    finally:
        store.close()
    return result
