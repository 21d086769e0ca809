"""Transfer log decoding, exact amount scaling, the Avro contract and the progress record."""

from __future__ import annotations

import json
import zlib
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from sardis_ledger.schemas.codec import SCHEMA_DIR as CODEC_DIR
from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.streams.chain import state as st
from sardis_ledger.streams.chain import transfers as tr
from sardis_ledger.streams.chain.config import Token
from sardis_ledger.streams.chain.errors import LogDecodeError
from sardis_ledger.streams.money import to_minor
from tests.unit.chain_fakes import STRANGERS, TOKEN, WALLETS, config, transfer_log

CODEC = AvroCodec()
W1, W2, _ = list(WALLETS)
USDC = Token(TOKEN, "USDC", 6)


def mined(log: tr.RawLog, number: int = 7, index: int = 3) -> tr.RawLog:
    return tr.RawLog(log.address, log.topics, log.data, number, "0x" + "bb" * 32, log.tx_hash, index)


def test_the_transfer_topic_is_the_erc20_event_signature() -> None:
    from eth_utils import keccak

    assert "0x" + keccak(text="Transfer(address,address,uint256)").hex() == tr.TRANSFER_TOPIC


@pytest.mark.parametrize(("sender", "to", "expected"), [
    (STRANGERS[0], W1, [("acc_1", "in")]),
    (W1, STRANGERS[0], [("acc_1", "out")]),
    (W1, W2, [("acc_1", "out"), ("acc_2", "in")]),  # both sides watched: one record per side
    (W1, W1, [("acc_1", "out"), ("acc_1", "in")]),  # to itself
    (STRANGERS[0], STRANGERS[1], []),
    ("0x" + "00" * 20, W2, [("acc_2", "in")]),     # a mint
])
def test_decode_sides(sender: str, to: str, expected: list[tuple[str, str]]) -> None:
    log = mined(transfer_log(sender, to, 1_234_567))
    got = tr.decode_transfer(log, USDC, config().wallets, "anvil")
    assert [(t.account_id, t.direction) for t in got] == expected
    for t in got:
        assert (t.from_address, t.to_address, t.amount, t.currency, t.status, t.block_number,
                t.log_index, t.token) == (sender, to, Decimal("1.234567"), "USDC", "confirmed", 7,
                                          3, TOKEN)


@pytest.mark.parametrize(("value", "decimals", "amount"), [
    (0, 6, "0.000000"),
    (1, 6, "0.000001"),
    (1_500_000, 6, "1.500000"),
    (10**18, 18, "1.000000000000000000"),
    (1, 18, "0.000000000000000001"),
    (12345, 0, "12345"),
    (10**60 - 1, 18, "999999999999999999999999999999999999999999.999999999999999999"),
])
def test_amount_scaling_is_exact(value: int, decimals: int, amount: str) -> None:
    scaled = tr.scale_amount(value, decimals)
    assert scaled == Decimal(amount) and scaled.as_tuple().exponent == -decimals
    assert to_minor(scaled, decimals) == value


@pytest.mark.parametrize(("value", "decimals"), [(10**60, 18), (2**256 - 1, 6), (-1, 6), (1, 19)])
def test_amounts_the_wire_cannot_carry_are_refused(value: int, decimals: int) -> None:
    with pytest.raises(LogDecodeError):
        tr.scale_amount(value, decimals)


@given(value=hs.integers(0, 10**42 - 1), decimals=hs.integers(0, 18))
def test_amount_survives_scaling_and_the_avro_wire(value: int, decimals: int) -> None:
    value = value * 10**decimals // 10**decimals  # keep below the wire's 10**42 major units
    transfer = tr.ChainTransfer("anvil", 1, "0x" + "11" * 32, "0x" + "22" * 32, 0, TOKEN, W1, W2,
                                tr.scale_amount(value, decimals), "TOK", "acc_1", "out",
                                "confirmed")
    name, record = CODEC.decode(CODEC.encode("ChainTransfer", tr.to_wire(transfer)))
    assert name == "ChainTransfer"
    assert to_minor(record["amount"], decimals) == value  # no float, no rounding, anywhere
    assert tr.from_wire(record) == transfer  # Decimal equality ignores the wire's trailing zeros
    assert tr.from_json(json.loads(json.dumps(tr.to_json(transfer)))) == transfer


def test_avro_contract_fields_are_exactly_the_issue_list() -> None:
    schema = json.loads((CODEC_DIR / "ChainTransfer.avsc").read_text())
    assert [f["name"] for f in schema["fields"]] == [
        "chain", "block_number", "block_hash", "tx_hash", "log_index", "token", "from_address",
        "to_address", "amount", "currency", "account_id", "direction", "status"]
    anchor = json.loads((CODEC_DIR / "Anchor.avsc").read_text())
    assert [f["name"] for f in anchor["fields"]] == [
        "partition", "tree_size", "root_hash", "chain", "tx_hash", "block_number",
        "contract_address", "anchored_at"]
    assert all(f.get("doc") for f in schema["fields"] + anchor["fields"])


@pytest.mark.parametrize(("change", "message"), [
    ({"topics": 4}, "not an ERC-20 Transfer"),
    ({"data": b"\x00" * 31}, "not an ERC-20 Transfer"),
    ({"from_word": b"\x01" + b"\x00" * 31}, "not an address"),
])
def test_malformed_logs(change: dict[str, object], message: str) -> None:
    log = mined(transfer_log(W1, W2, 5))
    topics = list(log.topics)
    if "topics" in change:
        topics.append(b"\x00" * 32)
    if "from_word" in change:
        word = change["from_word"]
        assert isinstance(word, bytes)
        topics[1] = word
    data = change.get("data", log.data)
    assert isinstance(data, bytes)
    bad = tr.RawLog(log.address, tuple(topics), data, log.block_number, log.block_hash,
                    log.tx_hash, log.log_index)
    with pytest.raises(LogDecodeError, match=message):
        tr.decode_transfer(bad, USDC, config().wallets, "anvil")


def test_non_erc20_logs_are_counted_not_fatal_and_others_ignored() -> None:
    erc721 = mined(transfer_log(W1, W2, 5))
    erc721 = tr.RawLog(erc721.address, (*erc721.topics, b"\x00" * 32), b"", 7, erc721.block_hash,
                       erc721.tx_hash, 4)
    unknown_token = mined(transfer_log(W1, W2, 5, token="0x" + "cc" * 20))
    good = mined(transfer_log(W1, STRANGERS[0], 5), index=1)
    decoded, skipped = tr.decode_logs([erc721, unknown_token, good], config(), "anvil")
    assert skipped == 1
    assert [(t.log_index, t.direction) for t in decoded] == [(1, "out")]


# ------------------------------------------------------------------ progress record


def _transfer(block: int, index: int, direction: str = "in") -> tr.ChainTransfer:
    return tr.ChainTransfer("anvil", block, f"0x{block:064x}", f"0x{block * 1000 + index:064x}",
                            index, TOKEN, W1, W2, Decimal("1.5"), "USDC", "acc_1", direction,
                            "confirmed")


@given(blocks=hs.lists(hs.integers(1, 500), max_size=30, unique=True))
def test_state_round_trips_and_prunes_to_the_window(blocks: list[int]) -> None:
    state = st.WatchState.fresh(1, "abc")
    end = 0
    for number in sorted(blocks):
        end = max(end, number, state.next_block)
        state = state.advanced(end, {end: f"0x{end:064x}"}, [_transfer(number, 0)])
    assert st.WatchState.from_bytes(state.to_bytes()) == state
    floor = state.window_floor(state.next_block)
    assert all(t.block_number >= floor for t in state.published)
    assert state.tip is None or state.tip[0] == state.next_block - 1


def test_rewind_forgets_orphans_and_hashes_above_the_fork() -> None:
    state = st.WatchState.fresh(1, "abc").advanced(
        10, {n: f"0x{n:064x}" for n in range(1, 11)}, [_transfer(4, 0), _transfer(8, 1)])
    rewound = state.rewound(5, [_transfer(8, 1)])
    assert rewound.next_block == 6 and rewound.tip == (5, f"0x{5:064x}")
    assert [t.block_number for t in rewound.published] == [4]
    assert st.fresh_transfers(rewound, [_transfer(4, 0), _transfer(8, 1)]) == [_transfer(8, 1)]


@pytest.mark.parametrize("data", [b"Z" + zlib.compress(body) for body in
                                  (b"{", b'{"v": 2}', b'{"v": 1, "start_block": 1}', b"[]")]
                         + [b'{"v": 1}', b"Znot zlib", b""])
def test_corrupt_state_is_refused(data: bytes) -> None:
    from sardis_ledger.streams.chain.errors import WatchStateError

    with pytest.raises(WatchStateError):
        st.WatchState.from_bytes(data)


def test_a_full_window_of_busy_blocks_fits_one_kafka_message() -> None:
    from sardis_ledger.streams.topics import MESSAGE_BYTES_MAX

    state = st.WatchState.fresh(1, "abc")
    per_block = 100
    for block in range(1, st.REORG_WINDOW_BLOCKS + 1):
        state = state.advanced(block, {block: f"0x{block:064x}"},
                               [_transfer(block, i) for i in range(per_block)])
    assert len(state.published) == st.REORG_WINDOW_BLOCKS * per_block
    assert len(state.to_bytes()) < MESSAGE_BYTES_MAX // 2
