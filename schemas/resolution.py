"""Avro schema resolution checked ahead of time: can the ledger's schema read what a writer wrote?"""

# A record framed for a schema registry names its WRITER schema by id; the ledger decodes it into
# its own current (reader) schema by Avro schema resolution (Avro 1.11 specification, "Schema
# Resolution"). This module decides once per writer schema, before any record of it is decoded,
# whether that resolution is safe, so that an unreadable writer is refused with a reason instead
# of failing (or worse, succeeding strangely) record by record.
#
# It is stricter than the specification where fastavro's reader would hand the ledger a value of
# another kind than the reader schema promises: fastavro converts logical types (decimal,
# timestamp-millis) by the WRITER's logical type, so both sides must agree on it; a decimal must
# keep the reader's scale (same digits, same amount) and fit its precision.
#
# Works on schemas as fastavro.parse_schema returns them: full names, named types defined once
# and referenced by full name elsewhere (table in "__named_schemas").

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

# Avro's promotions (writer type -> reader types that may read it); fastavro converts each value.
PROMOTIONS: Final[Mapping[str, frozenset[str]]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
_NAMED_KINDS: Final[frozenset[str]] = frozenset({"record", "error", "enum", "fixed"})

_Named = Mapping[str, Any]


def resolution_problem(writer: Mapping[str, Any], reader: Mapping[str, Any]) -> str | None:
    """None when `reader` can read every record `writer` can write, else where and why not.

    Both are parsed schemas (fastavro.parse_schema). A union on the writer's side must be
    readable in every branch, since any branch may be written.
    """
    return _check(writer, reader, _named(writer), _named(reader), "", set())


def _named(schema: Mapping[str, Any]) -> _Named:
    named = schema.get("__named_schemas")
    return named if isinstance(named, Mapping) else {}


def _deref(schema: Any, named: _Named) -> Any:
    return named.get(schema, schema) if isinstance(schema, str) else schema


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, str):
        return schema
    kind = schema.get("type")
    return kind if isinstance(kind, str) else "union"


def _logical(schema: Any) -> tuple[str, ...] | None:
    if not isinstance(schema, Mapping) or "logicalType" not in schema:
        return None
    if schema["logicalType"] == "decimal":
        return ("decimal", str(schema.get("scale", 0)))
    return (str(schema["logicalType"]),)


def _check(writer: Any, reader: Any, w_named: _Named, r_named: _Named, path: str,
           seen: set[tuple[str, str]]) -> str | None:
    writer, reader = _deref(writer, w_named), _deref(reader, r_named)
    where = path or "/"
    if isinstance(writer, list):
        for branch in writer:
            problem = _check(branch, reader, w_named, r_named, path, seen)
            if problem is not None:
                return problem
        return None
    if isinstance(reader, list):
        if any(_check(writer, branch, w_named, r_named, path, seen) is None for branch in reader):
            return None
        return f"{where}: no branch of the ledger's union reads the writer's {_kind(writer)}"
    w_kind, r_kind = _kind(writer), _kind(reader)
    if w_kind != r_kind and r_kind not in PROMOTIONS.get(w_kind, frozenset()):
        return f"{where}: the writer's {w_kind} cannot be read as {r_kind}"
    problem = _logical_problem(writer, reader, where)
    if problem is not None or w_kind != r_kind:
        return problem
    if r_kind in _NAMED_KINDS and writer.get("name") != reader.get("name"):
        return f"{where}: the writer's {writer.get('name')} is not the ledger's {reader.get('name')}"
    if r_kind in ("record", "error"):
        key = (str(writer["name"]), str(reader["name"]))
        if key in seen:  # a recursive type already being checked
            return None
        return _record_problem(writer, reader, w_named, r_named, path, seen | {key})
    if r_kind == "array":
        return _check(writer["items"], reader["items"], w_named, r_named, f"{path}/items", seen)
    if r_kind == "map":
        return _check(writer["values"], reader["values"], w_named, r_named, f"{path}/values", seen)
    if r_kind == "enum":
        missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
        if missing and "default" not in reader:
            return f"{where}: the ledger's enum has no symbol {missing[0]}"
    if r_kind == "fixed" and writer.get("size") != reader.get("size"):
        return f"{where}: fixed size {writer.get('size')}, the ledger's is {reader.get('size')}"
    return None


def _logical_problem(writer: Any, reader: Any, where: str) -> str | None:
    w_logical, r_logical = _logical(writer), _logical(reader)
    if w_logical != r_logical:
        return (f"{where}: logical type {w_logical[0] if w_logical else 'none'} where the ledger "
                f"reads {r_logical[0] if r_logical else 'none'}"
                + (" (another decimal scale)" if w_logical and r_logical else ""))
    if r_logical is not None and r_logical[0] == "decimal":
        w_precision, r_precision = int(writer.get("precision", 0)), int(reader.get("precision", 0))
        if w_precision > r_precision:
            return f"{where}: decimal precision {w_precision} exceeds the ledger's {r_precision}"
    return None


def _record_problem(writer: Mapping[str, Any], reader: Mapping[str, Any], w_named: _Named,
                    r_named: _Named, path: str, seen: set[tuple[str, str]]) -> str | None:
    written = {field["name"]: field for field in writer["fields"]}
    for field in reader["fields"]:
        name = field["name"]
        source = written.get(name)
        if source is None:
            if "default" not in field:
                return f"{path}/{name}: the writer has no such field and the ledger's has no default"
            continue
        problem = _check(source["type"], field["type"], w_named, r_named, f"{path}/{name}", seen)
        if problem is not None:
            return problem
    return None
