"""The pure reconciliation core: every discrepancy type, grace windows, idempotence, order."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from sardis_ledger.streams import reconcile as rc

TX = "0x" + "ab" * 32
TX2 = "0x" + "cd" * 32
BLOCK_A = "0x" + "a1" * 32
BLOCK_B = "0x" + "b2" * 32
T0_MS = 1_750_000_000_000
E18 = 10**18
GRACE = rc.Grace(window_ms=60_000, blocks=5)


def transfer(direction: str = "in", account: str = "acc_1", amount: str = "1.5",
             currency: str = "USDC", status: str = "confirmed", block: int = 100,
             block_hash: str = BLOCK_A, tx: str = TX, log_index: int = 3) -> rc.TransferEvent:
    return rc.transfer_from_wire({
        "chain": "anvil", "block_number": block, "block_hash": block_hash, "tx_hash": tx,
        "log_index": log_index, "amount": Decimal(amount), "currency": currency,
        "account_id": account, "direction": direction, "status": status})


def entry(entry_id: str = "ent_1", entry_type: str = "credit", account: str = "acc_1",
          amount: str = "1.5", currency: str = "USDC", tx: str | None = TX,
          log_index: int | None = 3, committed_ms: int = T0_MS) -> rc.EntryClaim:
    claim = rc.claim_from_entry({
        "entry_id": entry_id, "account_id": account, "currency": currency,
        "entry_type": entry_type, "amount": Decimal(amount),
        "committed_at": datetime.fromtimestamp(committed_ms / 1000, UTC), "chain": "anvil",
        "chain_tx_hash": tx, "chain_log_index": log_index})
    assert claim is not None
    return claim


Event = rc.EntryClaim | rc.TransferEvent


def feed(events: list[Event], grace: rc.Grace = rc.GRACE_OFF,
         now_ms: int = T0_MS) -> tuple[dict[str, rc.KeyJoin], list[rc.Output]]:
    joins: dict[str, rc.KeyJoin] = {}
    return joins, rc.run(joins, events, now_ms, grace)


def open_types(joins: dict[str, rc.KeyJoin]) -> Counter[str]:
    return Counter(d.type for d in rc.open_discrepancies(joins.values()).values())


def match_count(joins: dict[str, rc.KeyJoin]) -> int:
    return sum(len(j.matched) for j in joins.values())


# ------------------------------------------------------------------ one case per outcome

CASES: list[tuple[str, list[Event], dict[str, int], int]] = [
    ("match", [transfer(), entry()], {}, 1),
    ("match_entry_first", [entry(), transfer()], {}, 1),
    ("amount_mismatch", [transfer(), entry(amount="1.4")], {"amount_mismatch": 1}, 0),
    ("amount_one_wei_off", [transfer(amount="1.000000000000000001"), entry(amount="1")],
     {"amount_mismatch": 1}, 0),
    ("currency_mismatch", [transfer(), entry(currency="USDT")], {"currency_mismatch": 1}, 0),
    ("account_mismatch", [transfer(), entry(account="acc_9")], {"account_mismatch": 1}, 0),
    ("direction_mismatch", [transfer(direction="in"), entry(entry_type="debit")],
     {"account_mismatch": 1}, 0),
    ("account_and_amount", [transfer(), entry(account="acc_9", amount="2")],
     {"account_mismatch": 1, "amount_mismatch": 1}, 0),
    ("missing_on_chain", [entry()], {"missing_on_chain": 1}, 0),
    ("missing_on_chain_no_log_index", [transfer(), entry(log_index=None)],
     {"missing_on_chain": 1, "missing_in_ledger": 1}, 0),
    ("missing_in_ledger", [transfer()], {"missing_in_ledger": 1}, 0),
    ("duplicate_entry", [transfer(), entry("ent_1"), entry("ent_2", committed_ms=T0_MS + 1)],
     {"duplicate_entry": 1}, 1),
    ("duplicate_without_chain", [entry("ent_1"), entry("ent_2", committed_ms=T0_MS + 1)],
     {"duplicate_entry": 1, "missing_on_chain": 1}, 0),
    ("status_mismatch", [transfer(), entry(), transfer(status="removed")],
     {"status_mismatch": 1}, 0),
    ("removed_first", [transfer(status="removed"), transfer(), entry()],
     {"status_mismatch": 1}, 0),
    ("removed_unbooked_is_fine", [transfer(), transfer(status="removed")], {}, 0),
    ("reorg_reincluded", [transfer(), entry(), transfer(status="removed"),
                          transfer(block=101, block_hash=BLOCK_B)], {}, 1),
    ("both_sides_booked", [transfer("out", "acc_1"), transfer("in", "acc_2"),
                           entry("ent_d", "debit", "acc_1"), entry("ent_c", "credit", "acc_2")],
     {}, 2),
    ("both_sides_one_booked", [transfer("out", "acc_1"), transfer("in", "acc_2"),
                               entry("ent_c", "credit", "acc_2")], {"missing_in_ledger": 1}, 1),
    ("fee_books_out", [transfer("out"), entry(entry_type="fee")], {}, 1),
    ("refund_books_in", [transfer("in"), entry(entry_type="refund")], {}, 1),
    ("adjustment_matches_its_account", [transfer("out", "acc_1"), transfer("in", "acc_2"),
                                        entry(entry_type="adjustment", account="acc_2")],
     {"missing_in_ledger": 1}, 1),
    ("credit_of_a_side_not_watched", [transfer("out", "acc_1"), entry(account="acc_2")],
     {"missing_on_chain": 1, "missing_in_ledger": 1}, 0),
]


@pytest.mark.parametrize(("events", "expected", "matches"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_outcomes(events: list[Event], expected: dict[str, int], matches: int) -> None:
    joins, _ = feed(events)
    assert open_types(joins) == Counter(expected)
    assert match_count(joins) == matches


def test_discrepancy_fields() -> None:
    joins, out = feed([transfer(amount="1.5"), entry(amount="1.25")])
    [found] = rc.open_discrepancies(joins.values()).values()
    assert found in out
    assert found.to_wire() == {
        "discrepancy_id": rc.discrepancy_id("amount_mismatch", TX, 3, "in", "ent_1"),
        "type": "amount_mismatch", "status": "open", "severity": "high", "entry_id": "ent_1",
        "tx_hash": TX, "log_index": 3, "expected": "1.5", "actual": "1.25",
        "description": found.description, "detected_at": T0_MS}
    assert "1.25 USDC" in found.description and "1.5 USDC" in found.description
    # Deterministic: the same inputs in another order, at another time, give the same id.
    again, _ = feed([entry(amount="1.25"), transfer(amount="1.5")], now_ms=T0_MS + 9)
    assert set(rc.open_discrepancies(again.values())) == {found.discrepancy_id}


def test_match_fields() -> None:
    _, out = feed([entry(amount="2.000001"), transfer(amount="2.000001")], grace=GRACE)
    [match] = out
    assert isinstance(match, rc.Match)
    wire = match.to_wire()
    assert wire["amount"] == Decimal("2.000001") and wire["amount"].as_tuple().exponent == -18
    assert (wire["status"], wire["entry_id"], wire["direction"], wire["block_hash"]) == \
        ("matched", "ent_1", "in", BLOCK_A)
    assert wire["entry_committed_at"] == T0_MS and wire["reconciled_at"] == T0_MS


def test_severities_cover_every_type() -> None:
    assert set(rc.SEVERITY) == set(rc.DiscrepancyType)


# ------------------------------------------------------------------ grace windows and resolution


def test_missing_in_ledger_waits_for_both_windows_then_resolves_on_a_late_entry() -> None:
    join, out = rc.on_transfer(None, transfer(block=100), T0_MS, GRACE)
    assert out == []
    join, out = rc.on_tick(join, T0_MS + 60_000, 104, GRACE)
    assert out == []  # seconds passed, head only 4 blocks past the transfer
    join, out = rc.on_tick(join, T0_MS + 59_999, 200, GRACE)
    assert out == []  # blocks passed, seconds not (a tick's time is taken as given)
    join, out = rc.on_tick(join, T0_MS + 60_000, 105, GRACE)
    [missing] = out
    assert isinstance(missing, rc.Discrepancy)
    assert (missing.type, missing.status, missing.entry_id) == ("missing_in_ledger", "open", None)
    assert rc.on_tick(join, T0_MS + 90_000, 300, GRACE)[1] == []  # emitted once
    join, out = rc.on_entry(join, entry(), T0_MS + 100_000, GRACE)
    resolved, match = out
    assert isinstance(resolved, rc.Discrepancy) and isinstance(match, rc.Match)
    assert (resolved.discrepancy_id, resolved.status) == (missing.discrepancy_id, "resolved")
    assert resolved.detected_at_ms == T0_MS + 100_000
    assert join.open == {} and not join.waiting()


def test_missing_on_chain_counts_blocks_from_the_first_tick_after_the_entry() -> None:
    join, out = rc.on_entry(None, entry(), T0_MS, GRACE)
    assert out == [] and join.waiting()
    join, out = rc.on_tick(join, T0_MS + 1_000, 500, GRACE)  # learns head 500
    assert out == []
    join, out = rc.on_tick(join, T0_MS + 61_000, 504, GRACE)
    assert out == []
    join, out = rc.on_tick(join, T0_MS + 61_000, 505, GRACE)
    assert [(d.type, d.status) for d in out if isinstance(d, rc.Discrepancy)] == \
        [("missing_on_chain", "open")]
    join, out = rc.on_transfer(join, transfer(block=499), T0_MS + 70_000, GRACE)
    assert [(o.type, o.status) if isinstance(o, rc.Discrepancy) else "match" for o in out] == \
        [("missing_on_chain", "resolved"), "match"]


def test_seconds_only_and_blocks_only_windows() -> None:
    seconds = rc.Grace.of(seconds=30)
    join, _ = rc.on_transfer(None, transfer(), T0_MS, seconds)
    assert rc.on_tick(join, T0_MS + 29_999, 10**9, seconds)[1] == []
    assert len(rc.on_tick(join, T0_MS + 30_000, 0, seconds)[1]) == 1
    blocks = rc.Grace.of(blocks=3)
    join, _ = rc.on_transfer(None, transfer(block=10), T0_MS, blocks)
    assert rc.on_tick(join, T0_MS + 10**9, 12, blocks)[1] == []
    assert len(rc.on_tick(join, T0_MS, 13, blocks)[1]) == 1


@pytest.mark.parametrize("bad", [{"window_ms": -1}, {"blocks": -1}, {"window_ms": None, "blocks": None},
                                 {"blocks": True}, {"window_ms": 1.5}])
def test_bad_grace_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(rc.ReconcileError):
        rc.Grace(**bad)


def test_mismatches_are_not_delayed_by_the_grace_window() -> None:
    join, _ = rc.on_transfer(None, transfer(), T0_MS, GRACE)
    _, out = rc.on_entry(join, entry(amount="9"), T0_MS + 1, GRACE)
    assert [d.type for d in out if isinstance(d, rc.Discrepancy)] == ["amount_mismatch"]


# ------------------------------------------------------------------ reorgs, replays


def test_reorg_after_a_match_opens_status_mismatch_and_unmatches() -> None:
    join, _ = rc.on_transfer(None, transfer(), T0_MS)
    join, [match] = rc.on_entry(join, entry(), T0_MS)
    join, out = rc.on_transfer(join, transfer(status="removed"), T0_MS + 5)
    status, unmatched = out
    assert isinstance(status, rc.Discrepancy) and isinstance(unmatched, rc.Match)
    assert (status.type, status.severity, status.expected, status.actual) == \
        ("status_mismatch", "critical", "confirmed", "removed")
    assert isinstance(match, rc.Match)
    assert (unmatched.reconciliation_id, unmatched.status) == (match.reconciliation_id, "unmatched")
    # Replaying the orphaned block's confirmed record does not bring it back.
    assert rc.on_transfer(join, transfer(), T0_MS + 6)[1] == []
    # The transaction re-included in the replacing block: resolved, matched again.
    join, out = rc.on_transfer(join, transfer(block=101, block_hash=BLOCK_B), T0_MS + 7)
    assert [(o.type, o.status) if isinstance(o, rc.Discrepancy) else (o.status, o.block_hash)
            for o in out] == [("status_mismatch", "resolved"), ("matched", BLOCK_B)]


@pytest.mark.parametrize("events", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_replaying_every_event_again_emits_nothing(events: list[Event]) -> None:
    joins, _ = feed(events)
    before = dict(joins)
    assert rc.run(joins, events, T0_MS + 1_000) == []
    assert joins == before


def test_a_join_refuses_an_event_of_another_key() -> None:
    join, _ = rc.on_transfer(None, transfer(), T0_MS)
    with pytest.raises(rc.ReconcileError):
        rc.on_entry(join, entry(tx=TX2), T0_MS)
    with pytest.raises(rc.ReconcileError):
        rc.on_transfer(join, transfer(log_index=4), T0_MS)
    with pytest.raises(rc.ReconcileError):
        rc.on_transfer(None, transfer(status="pending"), T0_MS)


def test_inputs() -> None:
    assert rc.claim_from_entry({"entry_id": "e", "chain_tx_hash": None}) is None
    claim = entry(tx=TX.upper().replace("0X", "0x"))
    assert claim.tx_hash == TX  # hex case does not split a key
    assert claim.amount_e18 == 15 * E18 // 10 and claim.committed_at_ms == T0_MS
    with pytest.raises(rc.ReconcileError):
        entry(amount="0.0000000000000000001")


# ------------------------------------------------------------------ table values


@pytest.mark.parametrize("events", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_join_values_round_trip_as_json_with_integers(events: list[Event]) -> None:
    joins, _ = feed(events)
    for join in joins.values():
        data = rc.join_to_bytes(join)
        assert rc.join_from_bytes(data) == join
        assert "." not in json.dumps(json.loads(data)["sides"])  # amounts are ints, not decimals
    assert rc.join_from_bytes(None) is None
    with pytest.raises(rc.ReconcileError):
        rc.join_from_bytes(b'{"v": 99}')


def test_tick_state_round_trips() -> None:
    join, _ = rc.on_entry(None, entry(), T0_MS, GRACE)
    join, _ = rc.on_tick(join, T0_MS + 1, 77, GRACE)
    assert rc.join_from_bytes(rc.join_to_bytes(join)) == join


# ------------------------------------------------------------------ properties

ACCOUNTS = ["acc_1", "acc_2"]


@hs.composite
def scenario(draw: hs.DrawFn) -> list[Event]:
    """Transfers over a few keys (some two-sided, some reorged) and entries that mostly match."""
    events: list[Event] = []
    for log_index in range(draw(hs.integers(1, 3))):
        amount = draw(hs.sampled_from(["1", "2.5", "0.000001"]))
        directions = draw(hs.sampled_from([["in"], ["out"], ["out", "in"], []]))
        for direction in directions:
            account = ACCOUNTS[0] if direction == "out" else ACCOUNTS[1]
            events.append(transfer(direction, account, amount, log_index=log_index))
            if draw(hs.booleans()) and draw(hs.booleans()):
                events.append(transfer(direction, account, amount, status="removed",
                                       log_index=log_index))
        for n in range(draw(hs.integers(0, 3))):
            entry_type = draw(hs.sampled_from(["credit", "debit", "fee", "adjustment"]))
            events.append(entry(
                f"ent_{log_index}_{n}", entry_type, draw(hs.sampled_from(ACCOUNTS)),
                draw(hs.sampled_from([amount, amount, "3"])),
                draw(hs.sampled_from(["USDC", "USDC", "USDT"])), log_index=log_index,
                committed_ms=T0_MS + draw(hs.integers(0, 2))))
    return events


def final_open(events: list[Event]) -> dict[str, tuple[str, str | None]]:
    joins, out = feed(events)
    # The emitted stream folded back (open adds, resolved removes) is the state's open set.
    folded: dict[str, tuple[str, str | None]] = {}
    for item in out:
        if isinstance(item, rc.Discrepancy):
            if item.status == "open":
                assert item.discrepancy_id not in folded, "opened twice without a resolution"
                folded[item.discrepancy_id] = (item.type, item.entry_id)
            else:
                assert folded.pop(item.discrepancy_id)
    state = {ident: (d.type, d.entry_id) for ident, d in rc.open_discrepancies(joins.values()).items()}
    assert folded == state
    return state


@settings(max_examples=300, deadline=None)
@given(events=scenario(), data=hs.data())
def test_any_order_and_duplication_ends_with_the_same_open_discrepancies(
        events: list[Event], data: hs.DataObject) -> None:
    reference = final_open(events)
    shuffled = data.draw(hs.permutations(events))
    extra = data.draw(hs.lists(hs.sampled_from(events), max_size=6)) if events else []
    mixed = list(shuffled)
    for item in extra:
        mixed.insert(data.draw(hs.integers(0, len(mixed))), item)
    assert final_open(mixed) == reference


@settings(max_examples=200, deadline=None)
@given(events=scenario(), data=hs.data())
def test_nothing_is_flagged_when_everything_matches(events: list[Event],
                                                    data: hs.DataObject) -> None:
    transfers = {(t.log_index, t.direction): t for t in events
                 if isinstance(t, rc.TransferEvent) and t.status == "confirmed"}
    matching: list[Event] = list(transfers.values())
    for (log_index, direction), t in transfers.items():
        entry_type = "credit" if direction == "in" else data.draw(hs.sampled_from(["debit", "fee"]))
        matching.append(entry(f"ent_{log_index}_{direction}", entry_type, t.account_id,
                              str(rc.to_major(t.amount_e18, 18)), t.currency, log_index=log_index))
    order = data.draw(hs.permutations(matching))
    joins: dict[str, rc.KeyJoin] = {}
    now = T0_MS
    out: list[rc.Output] = []
    for event in order:  # arriving within the grace window of each other
        now += data.draw(hs.integers(0, 1_000))
        out += rc.run(joins, [event], now, GRACE)
    for key, join in list(joins.items()):
        joins[key], late = rc.on_tick(join, now + 10**9, 10**6, GRACE)
        out += late
    assert [o for o in out if isinstance(o, rc.Discrepancy)] == []
    assert sum(1 for o in out if isinstance(o, rc.Match)) == len(transfers)
    assert not any(j.waiting() for j in joins.values())


@settings(max_examples=200, deadline=None)
@given(events=scenario(), data=hs.data())
def test_no_tick_before_recheck_at_changes_a_join(events: list[Event], data: hs.DataObject) -> None:
    """The agent ticks a waiting join only from recheck_at_ms on; a tick before it (any head)
    must emit nothing, or skipping it would delay a missing_*."""
    joins: dict[str, rc.KeyJoin] = {}
    now = T0_MS
    for event in events:
        now += data.draw(hs.integers(0, 30_000))
        rc.run(joins, [event], now, GRACE)
    head = data.draw(hs.integers(100, 10**6))
    for key, join in joins.items():
        if not join.waiting():
            continue
        due = rc.recheck_at_ms(join, GRACE)
        if due == 0:  # an entry has not learned the head: the first tick must come at once
            assert any(c.seen_head_block is None for c in join.entries.values())
            joins[key], _ = rc.on_tick(join, now, head, GRACE)
            join = joins[key]
            due = rc.recheck_at_ms(join, GRACE)
            assert due > 0
        early = data.draw(hs.integers(now, max(now, due - 1)))
        if early < due:
            assert rc.on_tick(join, early, head + 10**6, GRACE)[1] == []


def test_replace_keeps_frozen_values_hashable() -> None:
    # Join values are shared between the table cache and outputs: they must never be mutated.
    join, _ = feed([transfer(), entry()])
    value = next(iter(join.values()))
    with pytest.raises(AttributeError):
        value.tx_hash = "x"  # type: ignore[misc]
    assert replace(value) == value


# ------------------------------------------------------------------ wire records and the range report


def test_outputs_encode_with_their_avro_schemas() -> None:
    from sardis_ledger.schemas.codec import AvroCodec

    codec = AvroCodec()
    _, out = feed([transfer(), entry(), transfer(status="removed"), entry("ent_2", amount="7"),
                       transfer("out", log_index=4)])
    assert {type(o) for o in out} == {rc.Discrepancy, rc.Match}
    for item in out:
        name = "Discrepancy" if isinstance(item, rc.Discrepancy) else "Reconciliation"
        decoded_name, decoded = codec.decode(codec.encode(name, item.to_wire()))
        assert decoded_name == name
        assert rc.epoch_ms(decoded["detected_at" if name == "Discrepancy" else "reconciled_at"]) \
            == T0_MS


def test_build_report_keeps_only_the_range() -> None:
    from sardis_ledger.sinks.reconcile_report import build_report

    def wire(event: rc.TransferEvent) -> dict[str, Any]:
        return {"chain": event.chain, "block_number": event.block_number,
                "block_hash": event.block_hash, "tx_hash": event.tx_hash,
                "log_index": event.log_index, "amount": rc.to_wire(event.amount_e18, 18),
                "currency": event.currency, "account_id": event.account_id,
                "direction": event.direction, "status": event.status}

    transfers = [wire(transfer(block=10)), wire(transfer(block=20, tx=TX2)),
                 # reorged out of block 30, re-included in block 12: the key is in 10..15
                 wire(transfer(block=30, log_index=5, block_hash=BLOCK_B)),
                 wire(transfer(block=30, log_index=5, block_hash=BLOCK_B, status="removed")),
                 wire(transfer(block=12, log_index=5))]

    def row(entry_id: str, amount: str, tx: str, log_index: int) -> dict[str, Any]:
        return {"entry_id": entry_id, "account_id": "acc_1", "currency": "USDC",
                "entry_type": "credit", "amount": Decimal(amount),
                "committed_at": datetime.fromtimestamp(T0_MS / 1000, UTC), "chain": "anvil",
                "chain_tx_hash": tx, "chain_log_index": log_index}

    from sardis_ledger.sinks.reconcile_report import join_transfers

    report = build_report(10, 15, join_transfers(transfers, T0_MS),
                          [row("e1", "1.5", TX, 3), row("e5", "2", TX, 5)], T0_MS)
    assert report.matched_count == 1 and report.transfers_count == 2
    assert [(d.type, d.entry_id) for d in report.discrepancies] == [("amount_mismatch", "e5")]
    assert report.as_json()["discrepancies"][0]["type"] == "amount_mismatch"


def test_cli_has_the_reconcile_command() -> None:
    from sardis_ledger.streams.cli import build_parser

    args = build_parser().parse_args(["reconcile", "--start-block", "3", "--end-block", "9",
                                      "--json"])
    assert (args.start_block, args.end_block, args.json, args.schema) == (3, 9, True, None)
