"""Secrets at rest and in messages: the chain key file's permissions, RPC URLs in errors, the
immudb trusted-state file's modes, PostgreSQL SCRAM verifiers, printed dev settings."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

import aiohttp
import pytest

from infra import harness
from infra.secure_stack import scram_verifier
from sardis_ledger.sinks.immudb import StateFile, TrustedState
from sardis_ledger.streams.chain.errors import ChainConfigError
from sardis_ledger.streams.chain.eth import PRIVATE_KEY_ENV, PRIVATE_KEY_FILE_ENV, private_key, rpc_error
from sardis_ledger.streams.config import Settings, redact_urls_in

KEY = "ab" * 32
MAINNET = "https://mainnet.example/v3/SECRETAPIKEY"


def _key_file(tmp_path: Path, mode: int, text: str = KEY + "\n") -> Path:
    path = tmp_path / "chain.key"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_signing_key_comes_from_a_0600_file(tmp_path: Path) -> None:
    path = _key_file(tmp_path, 0o600)
    assert private_key(MAINNET, 1, env={PRIVATE_KEY_FILE_ENV: str(path)}) == "0x" + KEY


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660])
def test_a_key_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path, mode)
    with pytest.raises(ChainConfigError, match="0600 or stricter"):
        private_key(MAINNET, 1, env={PRIVATE_KEY_FILE_ENV: str(path)})


def test_a_key_file_and_a_key_variable_together_are_refused(tmp_path: Path) -> None:
    path = _key_file(tmp_path, 0o600)
    with pytest.raises(ChainConfigError, match="not both"):
        private_key(MAINNET, 1, env={PRIVATE_KEY_FILE_ENV: str(path), PRIVATE_KEY_ENV: KEY})


def test_a_symlinked_or_missing_key_file_is_refused(tmp_path: Path) -> None:
    target = _key_file(tmp_path, 0o600)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    for path in (link, tmp_path / "missing.key"):
        with pytest.raises(ChainConfigError, match="cannot open"):
            private_key(MAINNET, 1, env={PRIVATE_KEY_FILE_ENV: str(path)})


def test_rpc_urls_are_redacted_in_errors() -> None:
    exc = aiohttp.ClientResponseError(None, (), status=401,  # type: ignore[arg-type]
                                      message=f"Unauthorized for url: {MAINNET}?token=t0k")
    message = str(rpc_error(f"eth_call on {MAINNET}", exc))
    assert "SECRETAPIKEY" not in message and "t0k" not in message
    assert "https://mainnet.example/***" in message
    with pytest.raises(ChainConfigError) as missing:
        private_key(MAINNET, 1, env={})
    assert "SECRETAPIKEY" not in str(missing.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("GET https://a.example/v2/k1 failed", "GET https://a.example/*** failed"),
    ("'wss://u:p@b.example:8546/ws' closed", "'wss://u:***@b.example:8546/***' closed"),
    ("no url here", "no url here"),
])
def test_urls_inside_text_are_redacted(text: str, expected: str) -> None:
    assert redact_urls_in(text) == expected


def test_the_trusted_state_file_and_its_directory_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        state = StateFile(tmp_path / "state" / "immudb.json")
        state.save(TrustedState("ledgerdb", 7, b"\x01" * 32))
    finally:
        os.umask(old)
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert state.path.stat().st_mode & 0o777 == 0o600
    assert state.path.with_suffix(".lock").stat().st_mode & 0o777 == 0o600
    assert state.load() == TrustedState("ledgerdb", 7, b"\x01" * 32)


def test_scram_verifier_matches_rfc_7677() -> None:
    salt = bytes(range(16))
    verifier = scram_verifier("pencil", salt, 4096)
    method, rest = verifier.split("$", 1)
    params, keys = rest.split("$")
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    assert method == "SCRAM-SHA-256" and params == f"4096:{base64.b64encode(salt).decode()}"
    assert stored_key == hashlib.sha256(client_key).digest()
    assert server_key == hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    assert scram_verifier("pencil") != scram_verifier("pencil")  # a fresh salt each time


def test_printed_dev_settings_carry_no_secret() -> None:
    settings = Settings.from_env({"SARDIS_PG_DSN": "postgresql://sink@127.0.0.1:5432/sardis",
                                  "SARDIS_PG_PASSWORD": "pg-secret",
                                  "SARDIS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                                  "SARDIS_KAFKA_USER": "u", "SARDIS_KAFKA_PASSWORD": "kafka-secret",
                                  "SARDIS_SCHEMA_REGISTRY_USER": "r",
                                  "SARDIS_SCHEMA_REGISTRY_PASSWORD": "registry-secret"})
    printed = harness.connection_settings(settings)
    for secret in ("pg-secret", "kafka-secret", "registry-secret", "SARDIS_IMMUDB_PASSWORD="):
        assert secret not in printed
    assert "postgresql://sink@127.0.0.1:5432/sardis" in printed
