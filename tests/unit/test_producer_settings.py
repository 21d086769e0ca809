"""Every Kafka producer of the ledger writes with acks=all and idempotence (a transactional
producer implies both): a record acknowledged by one broker alone can be lost with it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("streams", "sinks", "infra") for p in (ROOT / d).rglob("*.py"))


def _producers() -> list[tuple[str, ast.Call]]:
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "AIOKafkaProducer":
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node))
    return found


def test_the_scan_finds_the_producers() -> None:
    assert len(_producers()) >= 8  # worker ticks, client, sinks, quarantine, chain, benches


@pytest.mark.parametrize(("where", "call"), _producers(), ids=[w for w, _ in _producers()])
def test_every_producer_is_idempotent_with_acks_all(where: str, call: ast.Call) -> None:
    keywords = {k.arg: k.value for k in call.keywords}
    transactional = "transactional_id" in keywords
    idempotent = isinstance(keywords.get("enable_idempotence"), ast.Constant) and \
        keywords["enable_idempotence"].value is True  # type: ignore[attr-defined]
    assert transactional or idempotent, f"{where}: neither transactional nor idempotent"
    acks = keywords.get("acks")
    assert acks is None or (isinstance(acks, ast.Constant) and acks.value in ("all", -1)), \
        f"{where}: acks must be all"
