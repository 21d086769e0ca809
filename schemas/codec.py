"""Avro wire codec of sardis-ledger: single-object encoding of the records in schemas/*.avsc."""

# Wire layout of every Kafka value the ledger writes or reads (Avro 1.11 specification,
# "Single-object encoding"):
#
#   offset  size  content
#   0       2     marker C3 01 (format version 1 of single-object encoding)
#   2       8     CRC-64-AVRO fingerprint of the WRITER schema's Parsing Canonical Form,
#                 LITTLE-endian (least significant byte first), as the specification requires
#   10      n     Avro binary encoding of the record (no framing, no length prefix)
#
# Why this layout: the marker lets a reader reject bytes that are not Avro at all; the
# fingerprint names the exact writer schema inside every message, so a consumer picks the
# right schema without a schema registry and refuses bytes written with a schema it does not
# know instead of misreading them; the body has no length of its own, so the message must
# end exactly where the record ends (trailing bytes mean corruption).
#
# Older versions of a schema live in schemas/history/<Name>.v<N>.avsc: their fingerprints stay
# readable (records written with them decode into the current schema by Avro schema resolution),
# and nothing is written with them.
#
# Every check encode makes, decode makes too, before any caller sees the record: Avro int and
# long ranges (fastavro reads any varint into an int field), decimals, and string fields marked
# with a "sardis.hex" attribute (the exact number of lowercase hex digits, e.g. SHA-256 = 64).
# Readers of a topic anyone can write must never act on a value encode would have refused.
#
# Money is Avro decimal (bytes, precision 60, scale 18) in MAJOR units. fastavro silently
# ROUNDS on read when a body carries more digits than the precision, and writes values whose
# unscaled form exceeds the precision, so this module checks decimals itself on both sides.

from __future__ import annotations

import decimal
import io
import json
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final, cast

import fastavro
from fastavro.schema import SchemaParseException, parse_schema, to_parsing_canonical_form

from streams.errors import CodecError

SCHEMA_DIR: Final[Path] = Path(__file__).resolve().parent
SCHEMA_SUFFIX: Final[str] = ".avsc"
HISTORY_DIR: Final[Path] = SCHEMA_DIR / "history"
# Field attribute naming a string that holds exactly this many lowercase hex digits.
HEX_ATTRIBUTE: Final[str] = "sardis.hex"

SINGLE_OBJECT_MARKER: Final[bytes] = b"\xc3\x01"
FINGERPRINT_SIZE_BYTES: Final[int] = 8
HEADER_SIZE_BYTES: Final[int] = len(SINGLE_OBJECT_MARKER) + FINGERPRINT_SIZE_BYTES  # 10

# Largest message accepted in either direction: Kafka's default max.message.bytes is ~1 MiB,
# and a bound keeps a hostile payload from costing unbounded decode time.
MESSAGE_SIZE_MAX_BYTES: Final[int] = 1_048_576

# CRC-64-AVRO as given in the Avro specification ("Schema Fingerprints"): the Rabin
# fingerprint with this EMPTY value, computed by a 256-entry table driven loop.
CRC64_AVRO_EMPTY: Final[int] = 0xC15D213AA4D7A795

# Ranges of Avro int and long: fastavro writes any Python int as a varint, which Java and
# other readers then reject or truncate, so encode checks these ranges first.
AVRO_INT_MIN: Final[int] = -(2**31)
AVRO_INT_MAX: Final[int] = 2**31 - 1
AVRO_LONG_MIN: Final[int] = -(2**63)
AVRO_LONG_MAX: Final[int] = 2**63 - 1


def _crc64_avro_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            # Shift right one bit; XOR in EMPTY when the bit shifted out was 1.
            fp = (fp >> 1) ^ (CRC64_AVRO_EMPTY & -(fp & 1))
        table.append(fp)
    return tuple(table)


_CRC64_AVRO_TABLE: Final[tuple[int, ...]] = _crc64_avro_table()


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO of `data` as an unsigned 64-bit integer (the specification's algorithm)."""
    fp = CRC64_AVRO_EMPTY
    table = _CRC64_AVRO_TABLE
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def fingerprint_crc64_avro(parsed_schema: Any) -> bytes:
    """The 8 fingerprint bytes of a schema as they go on the wire (little-endian).

    The schema must be self-contained (named types defined inline at first use), as every
    schema returned by load_schemas is: Parsing Canonical Form defines each named type at its
    first occurrence, and a bare name reference would give a different fingerprint.
    """
    canonical = to_parsing_canonical_form(parsed_schema)
    return crc64_avro(canonical.encode("utf-8")).to_bytes(FINGERPRINT_SIZE_BYTES, "little")


# --- Loading: one record per file; references across files are inlined at first use. ---

_PRIMITIVES: Final[frozenset[str]] = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
_NAMED_TYPES: Final[frozenset[str]] = frozenset({"record", "error", "enum", "fixed"})


def _full_name(name: str, namespace: str | None) -> str:
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def _inline(
    schema: Any,
    namespace: str | None,
    raw: Mapping[str, dict[str, Any]],
    defined: set[str],
    origin: str,
) -> Any:
    """Copy of `schema` where each named type from another file is defined at its first use.

    Names are resolved per the Avro rules (enclosing namespace for unqualified names), and
    every named type defined inline gets its full name so the copy no longer depends on the
    namespace of the file it came from.
    """
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return schema
        full = _full_name(schema, namespace)
        if full in defined:
            return full
        if full not in raw:
            raise CodecError("invalid_schema", f"{origin}: unknown type {schema!r}")
        return _inline(raw[full], None, raw, defined, origin)
    if isinstance(schema, list):
        return [_inline(branch, namespace, raw, defined, origin) for branch in schema]
    if not isinstance(schema, dict):
        raise CodecError("invalid_schema", f"{origin}: not a schema: {schema!r}")
    kind = schema.get("type")
    copy = dict(schema)
    if kind in _NAMED_TYPES:
        full = _full_name(str(schema["name"]), schema.get("namespace", namespace))
        if full in defined:
            raise CodecError("invalid_schema", f"{origin}: {full} is defined twice")
        defined.add(full)
        copy["name"] = full
        copy.pop("namespace", None)
        inner_namespace = full.rpartition(".")[0] or None
        if kind in ("record", "error"):
            copy["fields"] = [
                {**field, "type": _inline(field["type"], inner_namespace, raw, defined, origin)}
                for field in schema["fields"]
            ]
        return copy
    if kind == "array":
        copy["items"] = _inline(schema["items"], namespace, raw, defined, origin)
    elif kind == "map":
        copy["values"] = _inline(schema["values"], namespace, raw, defined, origin)
    elif isinstance(kind, (dict, list)) or (isinstance(kind, str) and kind not in _PRIMITIVES):
        copy["type"] = _inline(kind, namespace, raw, defined, origin)
    return copy


def _read_raw(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CodecError("invalid_schema", f"{path.name}: cannot read: {exc}") from exc
    if not isinstance(schema, dict) or schema.get("type") not in _NAMED_TYPES:
        raise CodecError("invalid_schema", f"{path.name}: not a named type")
    return _full_name(str(schema["name"]), schema.get("namespace")), schema


def _load_raw(schema_dir: Path) -> dict[str, dict[str, Any]]:
    raw: dict[str, dict[str, Any]] = {}
    for path in sorted(schema_dir.glob(f"*{SCHEMA_SUFFIX}")):
        full, schema = _read_raw(path)
        if full in raw:
            raise CodecError("invalid_schema", f"{path.name}: {full} is defined twice")
        raw[full] = schema
    return raw


def _parse_standalone(full: str, schema: dict[str, Any],
                      raw: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    standalone = _inline(schema, None, raw, set(), full)
    try:
        # A fresh named-schema table per record: each parsed schema stands alone.
        return cast(dict[str, Any], parse_schema(standalone, named_schemas={}))
    except (ValueError, TypeError, KeyError, SchemaParseException) as exc:
        raise CodecError("invalid_schema", f"{full}: {exc}") from exc


def load_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[str, dict[str, Any]]:
    """Parse every .avsc in `schema_dir`: full record name -> parsed, self-contained schema.

    Each file holds one named type. References to types of other files are resolved
    whatever the file order, by inlining the referenced definition at its first use, so each
    returned schema stands alone (which its fingerprint requires).
    """
    raw = _load_raw(schema_dir)
    return {full: _parse_standalone(full, schema, raw) for full, schema in raw.items()}


def load_history(schema_dir: Path = SCHEMA_DIR,
                 history_dir: Path = HISTORY_DIR) -> list[tuple[str, dict[str, Any]]]:
    """(full name, parsed schema) of every older version in `history_dir`; references to other
    types resolve against the current schemas of `schema_dir`."""
    if not history_dir.is_dir():
        return []
    current = _load_raw(schema_dir)
    found = []
    for path in sorted(history_dir.glob(f"*{SCHEMA_SUFFIX}")):
        full, schema = _read_raw(path)
        if full not in current:
            raise CodecError("invalid_schema", f"{path.name}: {full} has no current version")
        found.append((full, _parse_standalone(full, schema, {**current, full: schema})))
    return found


# --- Checks fastavro does not make: compiled once per schema, run per message. ---

# A field check: (field name, check of a non-null value). Null values are left to fastavro,
# which knows which fields are nullable.
_FieldCheck = tuple[str, Callable[[Any], None]]


def _decimal_encode_check(precision: int, scale: int) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not isinstance(value, decimal.Decimal):
            raise TypeError(f"decimal field needs decimal.Decimal, got {type(value).__name__}")
        if not value.is_finite():
            raise ValueError(f"decimal field cannot hold {value}")
        _sign, digits, exponent = value.as_tuple()
        exponent = cast(int, exponent)  # an int once the value is finite
        if exponent < -scale:
            raise ValueError(f"{value} has more than {scale} fractional digits")
        if value and len(digits) + exponent + scale > precision:
            raise ValueError(f"{value} needs more than {precision} digits at scale {scale}")

    return check


def _decimal_decode_check(scale: int) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        # fastavro builds the value in a context of `precision` digits and then shifts it by
        # -scale: an exponent other than -scale means it rounded (the body held too many
        # digits for the schema), which must never pass silently.
        if not isinstance(value, decimal.Decimal) or value.as_tuple().exponent != -scale:
            raise ValueError("decimal exceeds the precision of its schema")

    return check


def _int_check(low: int, high: int) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if isinstance(value, int) and not low <= value <= high:
            raise ValueError(f"{value} is outside [{low}, {high}]")

    return check


def _hex_check(digits: int) -> Callable[[Any], None]:
    match = re.compile(f"[0-9a-f]{{{digits}}}").fullmatch  # faster than a set test per char

    def check(value: Any) -> None:
        if not (isinstance(value, str) and match(value)):
            raise ValueError(f"needs exactly {digits} lowercase hex digits")

    return check


def _timestamp_check(value: Any) -> None:
    # fastavro reads a naive datetime as LOCAL time, which would shift it by the host's offset.
    if isinstance(value, datetime) and value.utcoffset() is None:
        raise ValueError("timestamp needs a timezone-aware datetime (or int milliseconds)")


def _record_check(plan: list[_FieldCheck]) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if isinstance(value, Mapping):
            _run_plan(plan, value)

    return check


def _array_check(item_check: Callable[[Any], None]) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if isinstance(value, (list, tuple)):
            for item in value:
                if item is not None:
                    item_check(item)

    return check


def _run_plan(plan: list[_FieldCheck], record: Mapping[str, Any]) -> None:
    for name, check in plan:
        value = record.get(name)
        if value is not None:
            check(value)


def _value_check(
    schema: Any, named: Mapping[str, Any], plans: dict[str, list[_FieldCheck]], encode: bool
) -> Callable[[Any], None] | None:
    """The check of one value of `schema`, or None when fastavro's own checks suffice."""
    if isinstance(schema, list):
        # Only ["null", T] unions are checked; null itself needs no check.
        branches = [branch for branch in schema if branch != "null"]
        if len(branches) != 1:
            return None
        return _value_check(branches[0], named, plans, encode)
    if isinstance(schema, str):
        if schema == "int":
            return _int_check(AVRO_INT_MIN, AVRO_INT_MAX)
        if schema == "long":
            return _int_check(AVRO_LONG_MIN, AVRO_LONG_MAX)
        if schema in named:
            return _value_check(named[schema], named, plans, encode)
        return None
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    logical = schema.get("logicalType")
    if kind == "bytes" and logical == "decimal":
        scale = int(schema.get("scale", 0))
        if encode:
            return _decimal_encode_check(int(schema["precision"]), scale)
        return _decimal_decode_check(scale)
    if kind == "long" and logical == "timestamp-millis":
        return _timestamp_check if encode else None
    if kind == "record":
        return _record_check(_plan(schema, named, plans, encode))
    if kind == "array":
        item_check = _value_check(schema["items"], named, plans, encode)
        return None if item_check is None else _array_check(item_check)
    if isinstance(kind, str) and kind in _PRIMITIVES:
        return _value_check(kind, named, plans, encode)
    return None


def _plan(
    schema: Mapping[str, Any],
    named: Mapping[str, Any],
    plans: dict[str, list[_FieldCheck]],
    encode: bool,
) -> list[_FieldCheck]:
    name = str(schema["name"])
    if name in plans:
        return plans[name]
    plan: list[_FieldCheck] = []
    plans[name] = plan  # registered before filling, so recursive types terminate
    for field in schema["fields"]:
        check = _value_check(field["type"], named, plans, encode)
        if check is not None:
            plan.append((str(field["name"]), check))
        digits = field.get(HEX_ATTRIBUTE)
        if digits is not None:
            plan.append((str(field["name"]), _hex_check(int(digits))))
    return plan


def _compile_plan(parsed: dict[str, Any], encode: bool) -> list[_FieldCheck]:
    named = cast(Mapping[str, Any], parsed.get("__named_schemas", {}))
    return _plan(parsed, named, {}, encode)


def _record_union_fields(parsed: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(field name, record full name) of each top-level ["null", record] field.

    fastavro picks the branch of a union by validating the value against every branch, which
    for a record means a full validation pass (it doubled the cost of encoding a Result).
    Naming the branch with fastavro's tuple notation, (full name, value), skips that pass.
    """
    named = cast(Mapping[str, Any], parsed.get("__named_schemas", {}))
    found = []
    for field in parsed["fields"]:
        kind = field["type"]
        if not isinstance(kind, list):
            continue
        branches = [branch for branch in kind if branch != "null"]
        if len(branches) != 1:
            continue
        branch = branches[0]
        if isinstance(branch, str) and branch in named:
            branch = named[branch]
        if isinstance(branch, dict) and branch.get("type") == "record":
            found.append((str(field["name"]), str(branch["name"])))
    return tuple(found)


# --- The codec. ---

# What fastavro raises for a record that does not fit its schema.
_ENCODE_ERRORS: Final = (
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    ArithmeticError,
)


class _Writer:
    """Everything encode and decode need for one record type, computed once.

    A writer of an older version (schemas/history) only decodes: `reader_schema` is the current
    schema its records resolve into, and the decode checks are the current schema's.
    """

    __slots__ = (
        "decode_plan",
        "encode_plan",
        "fingerprint",
        "full_name",
        "header",
        "reader_schema",
        "record_unions",
        "schema",
        "short_name",
    )

    def __init__(self, full_name: str, schema: dict[str, Any],
                 current: dict[str, Any] | None = None) -> None:
        self.full_name = full_name
        self.short_name = full_name.rpartition(".")[2]
        self.schema = schema
        self.reader_schema = current
        self.fingerprint = fingerprint_crc64_avro(schema)
        self.header = SINGLE_OBJECT_MARKER + self.fingerprint
        self.encode_plan = _compile_plan(schema, encode=True)
        self.decode_plan = _compile_plan(current or schema, encode=False)
        self.record_unions = _record_union_fields(schema)


class AvroCodec:
    """Encodes and decodes ledger records as Avro single-object messages.

    Schemas are parsed and fingerprinted once, at construction; encode and decode only run
    fastavro's compiled reader and writer plus a few precompiled checks. Thread-safe: the
    codec holds no per-call state.
    """

    def __init__(self, schemas: dict[str, dict[str, Any]] | None = None,
                 history: list[tuple[str, dict[str, Any]]] | None = None) -> None:
        if schemas is None:
            schemas = load_schemas()
            history = load_history() if history is None else history
        self._by_name: dict[str, _Writer] = {}
        self._by_fingerprint: dict[bytes, _Writer] = {}
        short_names: dict[str, list[_Writer]] = {}
        for full_name, schema in schemas.items():
            writer = self._add(_Writer(full_name, schema))
            self._by_name[full_name] = writer
            short_names.setdefault(writer.short_name, []).append(writer)
        for full_name, schema in history or []:
            if full_name not in schemas:
                raise CodecError("invalid_schema", f"older {full_name} has no current version")
            self._add(_Writer(full_name, schema, schemas[full_name]))
        for short_name, writers in short_names.items():
            # A short name is usable only when exactly one namespace defines it.
            if len(writers) == 1 and short_name not in self._by_name:
                self._by_name[short_name] = writers[0]

    def _add(self, writer: _Writer) -> _Writer:
        clash = self._by_fingerprint.get(writer.fingerprint)
        if clash is not None:
            raise CodecError(
                "invalid_schema",
                f"{writer.full_name} and {clash.full_name} have the same fingerprint",
            )
        self._by_fingerprint[writer.fingerprint] = writer
        return writer

    def _writer(self, record_name: str) -> _Writer:
        writer = self._by_name.get(record_name)
        if writer is None:
            raise CodecError("unknown_schema", f"no schema named {record_name!r}")
        return writer

    def encode(self, record_name: str, record: dict[str, Any]) -> bytes:
        """Single-object encoding of `record` as `record_name` (short or full name).

        Decimal fields take decimal.Decimal with at most 18 fractional digits; timestamps take
        timezone-aware datetimes (truncated to the millisecond) or int epoch milliseconds.
        """
        writer = self._writer(record_name)
        if not isinstance(record, Mapping):
            raise CodecError(
                "invalid_record", f"{writer.short_name} needs a mapping, got {type(record)}"
            )
        buffer = io.BytesIO()
        buffer.write(writer.header)
        try:
            _run_plan(writer.encode_plan, record)
            if writer.record_unions:
                record = dict(record)  # never modify the caller's record
                for field, record_type in writer.record_unions:
                    value = record.get(field)
                    if isinstance(value, Mapping):
                        record[field] = (record_type, value)
            # strict_allow_default: unknown fields (typos) and missing fields without a schema
            # default are errors; fields with a default may be left out.
            fastavro.schemaless_writer(buffer, writer.schema, record, strict_allow_default=True)
        except _ENCODE_ERRORS as exc:
            raise CodecError("invalid_record", f"{writer.short_name}: {exc}") from exc
        data = buffer.getvalue()
        if len(data) > MESSAGE_SIZE_MAX_BYTES:
            # Consumers refuse these, so refuse to produce them.
            raise CodecError(
                "message_too_large",
                f"{writer.short_name} encodes to {len(data)} bytes, max {MESSAGE_SIZE_MAX_BYTES}",
            )
        return data

    def decode(self, data: bytes | bytearray | memoryview | None) -> tuple[str, dict[str, Any]]:
        """(short record name, record) of a single-object message; CodecError if it is not one.

        None (a Kafka tombstone) counts as an empty payload.
        """
        if not data:
            raise CodecError("empty_payload", "the message has no bytes")
        if not isinstance(data, bytes):
            data = bytes(data)  # bytearray or memoryview from a client library
        size = len(data)
        if size > MESSAGE_SIZE_MAX_BYTES:
            raise CodecError("message_too_large", f"{size} bytes, max {MESSAGE_SIZE_MAX_BYTES}")
        marker = data[: len(SINGLE_OBJECT_MARKER)]
        if not SINGLE_OBJECT_MARKER.startswith(marker):
            raise CodecError(
                "bad_marker", f"starts with {marker.hex()}, not {SINGLE_OBJECT_MARKER.hex()}"
            )
        if size < HEADER_SIZE_BYTES:
            raise CodecError(
                "truncated", f"{size} bytes, shorter than the {HEADER_SIZE_BYTES}-byte header"
            )
        fingerprint = data[len(SINGLE_OBJECT_MARKER) : HEADER_SIZE_BYTES]
        writer = self._by_fingerprint.get(fingerprint)
        if writer is None:
            raise CodecError(
                "unknown_fingerprint", f"no known schema has fingerprint {fingerprint.hex()}"
            )
        buffer = io.BytesIO(data)
        buffer.seek(HEADER_SIZE_BYTES)
        try:
            record = fastavro.schemaless_reader(buffer, writer.schema, writer.reader_schema)
        except EOFError as exc:
            raise CodecError("truncated", f"{writer.short_name} body ends early: {exc}") from exc
        except Exception as exc:  # untrusted bytes: any failure of the reader is malformed
            raise CodecError(
                "malformed_body", f"{writer.short_name} body: {type(exc).__name__}: {exc}"
            ) from exc
        if buffer.tell() != size:
            raise CodecError(
                "malformed_body",
                f"{writer.short_name} body has {size - buffer.tell()} trailing bytes",
            )
        if not isinstance(record, dict):
            raise CodecError("malformed_body", f"{writer.short_name} body is not a record")
        try:
            _run_plan(writer.decode_plan, record)
        except ValueError as exc:
            raise CodecError("malformed_body", f"{writer.short_name}: {exc}") from exc
        return writer.short_name, record

    def fingerprint_of(self, record_name: str) -> bytes:
        """The 8 fingerprint bytes (wire order) of the schema of `record_name`."""
        return self._writer(record_name).fingerprint

    def record_names(self) -> list[str]:
        """Full names of the records this codec knows, sorted."""
        return sorted({writer.full_name for writer in self._by_name.values()})
