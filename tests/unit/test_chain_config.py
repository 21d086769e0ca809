"""Watch configuration: files, flags, and a clear error for each kind of bad value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sardis_ledger.streams.chain import config as wc
from sardis_ledger.streams.chain.errors import ChainConfigError
from sardis_ledger.streams.chain.eth import ANVIL_DEV_PRIVATE_KEY, PRIVATE_KEY_ENV, private_key

TOKEN = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"  # a checksummed address
WALLET = "0x1111111111111111111111111111111111111111"
GOOD: dict[str, Any] = {"tokens": {TOKEN: {"currency": "USDC", "decimals": 6}},
                        "wallets": {WALLET: "acc_1"}}


def test_good_config_is_normalized_to_lowercase_with_defaults() -> None:
    config = wc.from_mapping(GOOD)
    assert list(config.tokens) == [TOKEN.lower()]
    assert config.tokens[TOKEN.lower()] == wc.Token(TOKEN.lower(), "USDC", 6)
    assert config.wallets == {WALLET: "acc_1"}
    assert (config.confirmations, config.start_block, config.watch_id, config.chain) == \
        (wc.CONFIRMATIONS_DEFAULT, 0, "default", None)


@pytest.mark.parametrize(("change", "message"), [
    ({"tokens": {}}, "no tokens"),
    ({"wallets": {}}, "no wallets"),
    ({"tokens": {"0x12": {"currency": "USDC", "decimals": 6}}}, "not a 0x-prefixed 20-byte"),
    ({"tokens": {TOKEN[:-1] + "2": {"currency": "USDC", "decimals": 6}}}, "bad EIP-55 checksum"),
    ({"tokens": {TOKEN: {"currency": "usdc", "decimals": 6}}}, "upper-case"),
    ({"tokens": {TOKEN: {"currency": "USDC", "decimals": 19}}}, "decimals must be 0..18"),
    ({"tokens": {TOKEN: {"currency": "USDC", "decimals": True}}}, "decimals must be 0..18"),
    ({"tokens": {TOKEN: {"currency": "USDC", "decimals": 6, "symbol": "x"}}}, "unknown keys"),
    ({"tokens": {TOKEN: "USDC"}}, "CURRENCY:DECIMALS"),
    ({"tokens": {TOKEN: "USDC:six"}}, "not a whole number"),
    ({"tokens": {TOKEN: {"currency": "USDC", "decimals": 6},
                 TOKEN.lower(): {"currency": "USDC", "decimals": 6}}}, "listed twice"),
    ({"wallets": {WALLET: ""}}, "account id"),
    ({"wallets": {WALLET: "a" * 129}}, "account id"),
    ({"wallets": {"0x" + "ab" * 20: "a", "0x" + "AB" * 20: "b"}}, "listed twice"),
    ({"confirmations": -1}, "confirmations must be a whole number"),
    ({"confirmations": "12"}, "confirmations must be a whole number"),
    ({"start_block": 1.5}, "start_block"),
    ({"chunk_blocks": 0}, "chunk_blocks"),
    ({"poll_interval_s": 0}, "poll_interval_s"),
    ({"chain": "Base Mainnet"}, "chain 'Base Mainnet'"),
    ({"watch_id": ""}, "watch_id"),
    ({"confirmation": 3}, "unknown keys ['confirmation']"),
    ({"tokens": [TOKEN]}, "mappings keyed by address"),
])
def test_bad_config_is_refused_with_a_clear_message(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ChainConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        wc.from_mapping({**GOOD, **change})


def test_files_and_flags(tmp_path: Path) -> None:
    yaml_file = tmp_path / "watch.yaml"
    yaml_file.write_text(f"chain: base\nconfirmations: 3\ntokens:\n  '{TOKEN}': "
                         f"{{currency: USDC, decimals: 6}}\nwallets:\n  '{WALLET}': acc_1\n")
    config = wc.build(yaml_file, wallets=[f"{WALLET}=acc_9"],
                      tokens=["0x" + "22" * 20 + "=EURC:6"], confirmations=5)
    assert config.chain == "base" and config.confirmations == 5
    assert config.wallets == {WALLET: "acc_9"}  # the flag replaced the file's entry
    assert set(config.tokens) == {TOKEN.lower(), "0x" + "22" * 20}
    json_file = tmp_path / "watch.json"
    json_file.write_text(json.dumps(GOOD))
    assert wc.build(json_file).wallets == {WALLET: "acc_1"}


@pytest.mark.parametrize(("text", "suffix", "message"), [
    ("{not json", ".json", "not valid .json"),
    ("tokens: [unclosed", ".yaml", "not valid .yaml"),
    ("- a\n- b\n", ".yaml", "must be a mapping"),
])
def test_bad_files(tmp_path: Path, text: str, suffix: str, message: str) -> None:
    path = tmp_path / f"watch{suffix}"
    path.write_text(text)
    with pytest.raises(ChainConfigError, match=message):
        wc.build(path)


def test_missing_file_and_bad_flags(tmp_path: Path) -> None:
    with pytest.raises(ChainConfigError, match="No such file"):
        wc.build(tmp_path / "absent.yaml")
    with pytest.raises(ChainConfigError, match="--token"):
        wc.build(None, tokens=["0xabc"], wallets=[f"{WALLET}=a"])
    with pytest.raises(ChainConfigError, match="--wallet"):
        wc.build(None, tokens=[f"{TOKEN}=USDC:6"], wallets=[WALLET])


def test_digest_changes_with_what_is_watched_only() -> None:
    base = wc.from_mapping(GOOD)
    assert base.digest() == wc.from_mapping({**GOOD, "confirmations": 1}).digest()
    assert base.digest() != wc.from_mapping({**GOOD, "wallets": {WALLET: "acc_2"}}).digest()


@pytest.mark.parametrize(("chain_id", "name"), [(1, "ethereum"), (8453, "base"), (31337, "anvil"),
                                                (999, "evm-999")])
def test_chain_names(chain_id: int, name: str) -> None:
    assert wc.chain_name_for(chain_id) == name


def test_signing_key_defaults_only_on_a_local_dev_node() -> None:
    assert private_key("http://127.0.0.1:8545", 31337, env={}) == ANVIL_DEV_PRIVATE_KEY
    with pytest.raises(ChainConfigError, match=PRIVATE_KEY_ENV):
        private_key("https://mainnet.example", 1, env={})
    with pytest.raises(ChainConfigError, match=PRIVATE_KEY_ENV):
        private_key("http://10.0.0.5:8545", 31337, env={})  # chain 31337, but not loopback
    key = "11" * 32
    assert private_key("https://mainnet.example", 1, env={PRIVATE_KEY_ENV: key}) == "0x" + key
    with pytest.raises(ChainConfigError, match="32 bytes"):
        private_key("https://mainnet.example", 1, env={PRIVATE_KEY_ENV: "0x1234"})
