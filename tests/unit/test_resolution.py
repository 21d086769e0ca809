"""Avro schema resolution checked ahead of time (schemas/resolution.py)."""

from __future__ import annotations

from typing import Any

import pytest
from fastavro.schema import parse_schema

from sardis_ledger.schemas.resolution import resolution_problem

DECIMAL = {"type": "bytes", "logicalType": "decimal", "precision": 60, "scale": 18}


def record(*fields: dict[str, Any], name: str = "sardis.ledger.R") -> dict[str, Any]:
    parsed = parse_schema({"type": "record", "name": name, "fields": list(fields)}, named_schemas={})
    assert isinstance(parsed, dict)
    return parsed


def field(name: str, kind: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, **extra}


@pytest.mark.parametrize(("writer", "reader"), [
    ("int", "long"), ("long", "double"), ("string", "bytes"), ("bytes", "string"),
    ("string", ["null", "string"]), (["null", "string"], ["null", "string"]),
    ({"type": "array", "items": "int"}, {"type": "array", "items": "long"}),
    ({"type": "map", "values": "string"}, {"type": "map", "values": "string"}),
    (DECIMAL, DECIMAL), ({**DECIMAL, "precision": 20}, DECIMAL),
    ({"type": "long", "logicalType": "timestamp-millis"},
     {"type": "long", "logicalType": "timestamp-millis"}),
])
def test_readable(writer: Any, reader: Any) -> None:
    assert resolution_problem(record(field("f", writer)), record(field("f", reader))) is None


@pytest.mark.parametrize(("writer", "reader", "why"), [
    ("long", "int", "long cannot be read as int"),
    ("string", "long", "string cannot be read as long"),
    (["null", "string"], "string", "null cannot be read as string"),
    ({**DECIMAL, "scale": 2}, DECIMAL, "another decimal scale"),
    ({**DECIMAL, "precision": 70}, DECIMAL, "precision 70 exceeds"),
    ("bytes", DECIMAL, "logical type none"),
    ({"type": "long", "logicalType": "timestamp-micros"},
     {"type": "long", "logicalType": "timestamp-millis"}, "timestamp-micros"),
    ({"type": "long", "logicalType": "timestamp-millis"}, "long", "timestamp-millis"),
    ({"type": "array", "items": "string"}, {"type": "array", "items": "int"}, "/f/items"),
    ({"type": "enum", "name": "E", "symbols": ["A", "B"]},
     {"type": "enum", "name": "E", "symbols": ["A"]}, "no symbol B"),
])
def test_unreadable(writer: Any, reader: Any, why: str) -> None:
    problem = resolution_problem(record(field("f", writer)), record(field("f", reader)))
    assert problem is not None and why in problem


def test_a_reader_field_missing_from_the_writer_needs_a_default() -> None:
    writer = record(field("a", "string"))
    assert resolution_problem(writer, record(field("a", "string"),
                                             field("b", "string", default="x"))) is None
    problem = resolution_problem(writer, record(field("a", "string"), field("b", "string")))
    assert problem is not None and "/b" in problem


def test_a_writer_field_the_reader_lacks_is_skipped() -> None:
    assert resolution_problem(record(field("a", "string"), field("extra", "long")),
                              record(field("a", "string"))) is None


def test_record_names_must_match() -> None:
    problem = resolution_problem(record(field("a", "string"), name="com.acme.R"),
                                 record(field("a", "string")))
    assert problem is not None and "com.acme.R" in problem


def test_recursive_and_referenced_named_types_terminate() -> None:
    node = {"type": "record", "name": "sardis.ledger.Node",
            "fields": [{"name": "next", "type": ["null", "sardis.ledger.Node"]}]}
    writer = record(field("head", node), field("tail", "sardis.ledger.Node"))
    assert resolution_problem(writer, writer) is None
