"""Avro wire codec of sardis-ledger: records of schemas/*.avsc, single-object or Confluent framing."""

# Wire layout of every Kafka value the ledger writes or reads. The first byte tells the two
# framings apart; decode reads both, encode writes the one the codec was made for.
#
# Avro single-object encoding (Avro 1.11 specification, "Single-object encoding"), the default:
#
#   offset  size  content
#   0       2     marker C3 01 (format version 1 of single-object encoding)
#   2       8     CRC-64-AVRO fingerprint of the WRITER schema's Parsing Canonical Form,
#                 LITTLE-endian (least significant byte first), as the specification requires
#   10      n     Avro binary encoding of the record (no framing, no length prefix)
#
# Confluent wire format (schema registries, SARDIS_WIRE_FORMAT=confluent):
#
#   offset  size  content
#   0       1     magic byte 00
#   1       4     schema id the registry gave the WRITER schema, BIG-endian unsigned
#   5       n     Avro binary encoding of the record (no framing, no length prefix)
#
# Why these layouts: the marker lets a reader reject bytes that are not Avro at all; the
# fingerprint names the exact writer schema inside every message, so a consumer picks the
# right schema without a schema registry and refuses bytes written with a schema it does not
# know instead of misreading them; the body has no length of its own, so the message must
# end exactly where the record ends (trailing bytes mean corruption). The Confluent layout is
# what Kafka Connect, ksqlDB and confluent-kafka's AvroSerializer speak: its schema id means
# nothing without the registry that issued it, so ids are resolved at the edge (streams/wire.py)
# and handed to this codec (bind_schema_id, learn_schema), which stays free of I/O. A writer
# schema learnt by id that is not one of ours decodes into our current schema by Avro schema
# resolution, once schemas/resolution.py has found that safe.
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
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, cast

import fastavro
from fastavro.schema import SchemaParseException, parse_schema, to_parsing_canonical_form

from sardis_ledger.schemas.errors import CodecError
from sardis_ledger.schemas.resolution import resolution_problem

SCHEMA_DIR: Final[Path] = Path(__file__).resolve().parent
SCHEMA_SUFFIX: Final[str] = ".avsc"
HISTORY_DIR: Final[Path] = SCHEMA_DIR / "history"
# Field attribute naming a string that holds exactly this many lowercase hex digits.
HEX_ATTRIBUTE: Final[str] = "sardis.hex"

SINGLE_OBJECT_MARKER: Final[bytes] = b"\xc3\x01"
FINGERPRINT_SIZE_BYTES: Final[int] = 8
HEADER_SIZE_BYTES: Final[int] = len(SINGLE_OBJECT_MARKER) + FINGERPRINT_SIZE_BYTES  # 10

CONFLUENT_MAGIC: Final[bytes] = b"\x00"
SCHEMA_ID_SIZE_BYTES: Final[int] = 4
CONFLUENT_HEADER_SIZE_BYTES: Final[int] = len(CONFLUENT_MAGIC) + SCHEMA_ID_SIZE_BYTES  # 5
SCHEMA_ID_MAX: Final[int] = 2**32 - 1
# Writer schemas learnt by id, and ids refused (unknown to the registry, or unreadable), kept per
# codec. Anyone who may write a client topic can make up ids, so both are bounded: past the bound
# the oldest is forgotten (and looked up again if it comes back).
LEARNT_SCHEMA_IDS_MAX: Final[int] = 1024
REFUSED_SCHEMA_IDS_MAX: Final[int] = 4096
REFUSAL_DETAIL_CHARS_MAX: Final[int] = 512  # of why an id was refused (dead letters cut it too)


class Framing(StrEnum):
    """What encode writes (SARDIS_WIRE_FORMAT); decode reads both."""

    SINGLE_OBJECT = "single-object"
    CONFLUENT = "confluent"

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


# --- The read form: what decode returns for a record this codec encodes, without the bytes. ---

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Field defaults the read form fills in as decode does (immutable ones shared, the rest copied).
_READ_DEFAULT_TYPES: Final = (type(None), bool, int, str)
_ReadConvert = Callable[[Any], Any]


def _timestamp_read(value: Any) -> datetime:
    """A timestamp-millis value as decode returns it: an aware UTC datetime, truncated to the
    millisecond as fastavro writes it."""
    if isinstance(value, datetime):
        delta = value - _EPOCH  # a naive datetime raises TypeError here, as encode refuses it
        value = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    return _EPOCH + timedelta(milliseconds=value)


def _read_default(default: Any) -> Callable[[], Any]:
    if isinstance(default, _READ_DEFAULT_TYPES):
        return lambda: default
    if default == [] or default == {}:
        return lambda: type(default)()
    raise CodecError("invalid_schema", f"the read form has no default {default!r}")


def _read_converter(schema: Any, named: Mapping[str, Any],
                    records: dict[str, _ReadConvert]) -> _ReadConvert | None:
    """How decode's value of `schema` differs from the value encode was given: a conversion,
    or None when decode returns an equal value (a StrEnum as str, a Decimal at the schema's
    scale, an int for a double: equal under ==)."""
    if isinstance(schema, list):
        converts = [c for b in schema if b != "null"
                    if (c := _read_converter(b, named, records)) is not None]
        if not converts:
            return None
        if len(converts) > 1 or len(schema) > 2:
            raise CodecError("invalid_schema", f"the read form takes [null, T] unions: {schema}")
        inner = converts[0]
        return lambda value: None if value is None else inner(value)
    if isinstance(schema, str):
        return _read_converter(named[schema], named, records) if schema in named else None
    if not isinstance(schema, dict):
        return None
    kind, logical = schema.get("type"), schema.get("logicalType")
    if kind == "long" and logical == "timestamp-millis":
        return _timestamp_read
    if kind == "record":
        return _record_read(schema, named, records)
    if kind in ("array", "map"):
        each = _read_converter(schema["items" if kind == "array" else "values"], named, records)
        if kind == "array":
            return list if each is None else (lambda value: [each(item) for item in value])
        return dict if each is None else (lambda value: {k: each(v) for k, v in value.items()})
    return None


def _record_read(schema: Mapping[str, Any], named: Mapping[str, Any],
                 records: dict[str, _ReadConvert]) -> _ReadConvert:
    """A record as decode returns it: a new dict of every field in schema order, defaults
    filled in, each value converted."""
    name = str(schema["name"])
    if name in records:
        return records[name]
    fields: list[tuple[str, Callable[[], Any] | None, _ReadConvert | None]] = []

    def convert(record: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field, default, field_convert in fields:
            if field in record:
                value = record[field]
            elif default is not None:
                value = default()
            else:
                raise CodecError("invalid_record", f"{name} needs field {field!r}")
            out[field] = value if field_convert is None or value is None else field_convert(value)
        return out

    records[name] = convert  # registered before filling, so recursive types terminate
    for field in schema["fields"]:
        default = _read_default(field["default"]) if "default" in field else None
        fields.append((str(field["name"]), default,
                       _read_converter(field["type"], named, records)))
    return convert


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

    A writer of an older version (schemas/history), or one learnt from a schema registry, only
    decodes: `reader_schema` is the current schema its records resolve into, and the decode
    checks are the current schema's.
    """

    __slots__ = (
        "confluent_header",
        "decode_plan",
        "encode_plan",
        "fingerprint",
        "full_name",
        "header",
        "read_form",
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
        self.confluent_header: bytes | None = None  # set once a registry gave this schema an id
        self.encode_plan = _compile_plan(schema, encode=True)
        self.decode_plan = _compile_plan(current or schema, encode=False)
        self.record_unions = _record_union_fields(schema)
        self.read_form: _ReadConvert | None = None  # compiled on first use (AvroCodec.read_form)


class _Fields:
    """Writes some of a record's fields, in schema order, as fastavro writes a record of them."""

    __slots__ = ("names", "record_unions", "schema")

    def __init__(self, name: str, fields: list[Any], named: Mapping[str, Any]) -> None:
        try:
            self.schema = cast(dict[str, Any], parse_schema(
                {"type": "record", "name": name, "fields": fields}, named_schemas=dict(named)))
        except SchemaParseException as exc:
            raise CodecError("invalid_schema", f"{name}: {exc}") from exc
        self.names = tuple(str(field["name"]) for field in fields)
        self.record_unions = _record_union_fields(self.schema)

    def write(self, buffer: io.BytesIO, record: Mapping[str, Any]) -> None:
        part = {name: record[name] for name in self.names if name in record}
        for field, record_type in self.record_unions:
            value = part.get(field)
            if isinstance(value, Mapping):
                part[field] = (record_type, value)
        fastavro.schemaless_writer(buffer, self.schema, part, strict_allow_default=True)


class _Split:
    """A record type cut around one ["null", R] or array<R> field, for encode_embedding: the
    fields before it, the field's R writer, the fields after; for a union, the branch index of R
    (a zigzag varint)."""

    __slots__ = ("after", "before", "branch", "embedded")

    def __init__(self, writer: _Writer, field: str,
                 writer_of: Callable[[str], _Writer]) -> None:
        fields = list(writer.schema["fields"])
        names = [str(f["name"]) for f in fields]
        if field not in names:
            raise CodecError("invalid_record", f"{writer.short_name} has no field {field!r}")
        index = names.index(field)
        kind = fields[index]["type"]
        if isinstance(kind, dict) and kind.get("type") == "array":
            branch = kind["items"]
            self.branch: bytes | None = None  # an array: no branch index
        else:
            branches = kind if isinstance(kind, list) else []
            if len(branches) != 2 or "null" not in branches:
                raise CodecError("invalid_record",
                                 f"{writer.short_name}.{field} is neither [null, record] nor array")
            position = 1 - branches.index("null")
            branch = branches[position]
            self.branch = bytes([position * 2])  # zigzag varint of 0 or 1
        self.embedded = writer_of(str(branch["name"] if isinstance(branch, dict) else branch))
        named = cast(Mapping[str, Any], writer.schema.get("__named_schemas", {}))
        self.before = _Fields(f"{writer.full_name}_before_{field}", fields[:index], named)
        self.after = _Fields(f"{writer.full_name}_after_{field}", fields[index + 1:], named)


def _zigzag_varint(value: int) -> bytes:
    """An Avro long: zigzag, then 7 bits a byte, least significant first."""
    encoded = (value << 1) ^ (value >> 63)
    out = bytearray()
    while encoded > 0x7F:
        out.append((encoded & 0x7F) | 0x80)
        encoded >>= 7
    out.append(encoded)
    return bytes(out)


def schema_text(parsed_schema: Mapping[str, Any]) -> str:
    """The one JSON text of a parsed schema that the ledger registers with a schema registry.

    Registries key a schema by its exact text (other whitespace: a new version and id), so it
    is always this text: fastavro's bookkeeping keys dropped, object keys sorted, no spaces.
    Docs, defaults, logical types and "sardis.hex" stay: a registry checks compatibility with
    the defaults, and readers that fetch the schema by id see the documented contract.
    """

    def strip(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {key: strip(value) for key, value in node.items() if not key.startswith("__")}
        if isinstance(node, list):
            return [strip(item) for item in node]
        return node

    return json.dumps(strip(parsed_schema), sort_keys=True, separators=(",", ":"))


def confluent_schema_id(data: bytes | bytearray | memoryview | None) -> int | None:
    """The schema id of a Confluent-framed message, or None for anything else."""
    if not data or len(data) < CONFLUENT_HEADER_SIZE_BYTES or data[0] != CONFLUENT_MAGIC[0]:
        return None
    return int.from_bytes(data[1:CONFLUENT_HEADER_SIZE_BYTES], "big")


def confluent_header(schema_id: int) -> bytes:
    """Magic byte and big-endian schema id: the 5 bytes in front of a Confluent-framed body."""
    if not 0 <= schema_id <= SCHEMA_ID_MAX:
        raise CodecError("invalid_schema", f"schema id {schema_id} does not fit 4 bytes")
    return CONFLUENT_MAGIC + schema_id.to_bytes(SCHEMA_ID_SIZE_BYTES, "big")


class AvroCodec:
    """Encodes and decodes ledger records as Avro messages (layouts at the top of this module).

    Schemas are parsed and fingerprinted once, at construction; encode and decode only run
    fastavro's compiled reader and writer plus a few precompiled checks. Confluent framing
    needs schema ids, which only a registry can give: bind_schema_id (our schemas, for encode)
    and learn_schema (any writer schema, for decode) take them from streams/wire.py. Safe to
    share between threads as long as ids are bound or learnt on one (decode holds no state).
    """

    def __init__(self, schemas: dict[str, dict[str, Any]] | None = None,
                 history: list[tuple[str, dict[str, Any]]] | None = None,
                 framing: Framing = Framing.SINGLE_OBJECT) -> None:
        if schemas is None:
            schemas = load_schemas()
            history = load_history() if history is None else history
        self.framing = framing
        self._by_name: dict[str, _Writer] = {}
        self._by_fingerprint: dict[bytes, _Writer] = {}
        self._current: dict[str, dict[str, Any]] = dict(schemas)
        # schema id -> writer: ids bound to our schemas, then ids learnt (bounded, oldest first)
        self._by_id: dict[int, _Writer] = {}
        self._bound_ids: set[int] = set()
        self._refused_ids: dict[int, tuple[str, str]] = {}  # id -> (reason, detail)
        self._splits: dict[tuple[str, str], _Split] = {}  # (record, field) -> encode_embedding's
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

    def _header(self, writer: _Writer) -> bytes:
        if self.framing is Framing.CONFLUENT:
            if writer.confluent_header is None:
                raise CodecError("unregistered_schema", f"{writer.short_name} has no schema id: "
                                 "this process did not register it (streams/wire.py)")
            return writer.confluent_header
        return writer.header

    def encode_embedding(self, record_name: str, record: dict[str, Any], field: str,
                         message: bytes | Sequence[bytes]) -> bytes:
        """encode(record_name, record) with `field`, which `record` leaves out, holding what
        `message` holds: for a ["null", R] union, one message this codec encoded as R; for an
        array<R>, a sequence of them. Their bodies are copied instead of encoded again. The
        bytes are the same as encode's: Avro binary is a record's fields in order, a union value
        is its branch index and then the value, and an array is written as fastavro writes it,
        one block (its count, its items) and the end block 0. A Result repeats its entry: 16 us
        to encode, 4-5 us this way; a batch's Result repeats every leg's entry."""
        writer = self._writer(record_name)
        split = self._split(writer, field)
        embedded_header = self._header(split.embedded)
        messages = [message] if isinstance(message, (bytes, bytearray)) else list(message)
        if (split.branch is None) == isinstance(message, (bytes, bytearray)):
            raise CodecError("invalid_record", f"{writer.short_name}.{field} takes "
                             + ("a sequence of messages" if split.branch is None else "one"))
        if not all(m.startswith(embedded_header) for m in messages):
            raise CodecError("invalid_record", f"{field} of {writer.short_name} must be an "
                             f"encoded {split.embedded.short_name}")
        if record.get(field):
            raise CodecError("invalid_record", f"{field} comes from the message, not the record")
        buffer = io.BytesIO()
        buffer.write(self._header(writer))
        try:
            _run_plan(writer.encode_plan, record)
            split.before.write(buffer, record)
            if split.branch is not None:
                buffer.write(split.branch)
            elif messages:
                buffer.write(_zigzag_varint(len(messages)))
            for embedded in messages:
                buffer.write(memoryview(embedded)[len(embedded_header):])
            if split.branch is None:
                buffer.write(b"\x00")  # the end of the array
            split.after.write(buffer, record)
        except _ENCODE_ERRORS as exc:
            raise CodecError("invalid_record", f"{writer.short_name}: {exc}") from exc
        return self._bounded(writer, buffer.getvalue())

    def _split(self, writer: _Writer, field: str) -> _Split:
        split = self._splits.get((writer.full_name, field))
        if split is None:
            split = self._splits[(writer.full_name, field)] = _Split(writer, field, self._writer)
        return split

    @staticmethod
    def _bounded(writer: _Writer, data: bytes) -> bytes:
        if len(data) > MESSAGE_SIZE_MAX_BYTES:
            # Consumers refuse these, so refuse to produce them.
            raise CodecError(
                "message_too_large",
                f"{writer.short_name} encodes to {len(data)} bytes, max {MESSAGE_SIZE_MAX_BYTES}",
            )
        return data

    def encode(self, record_name: str, record: dict[str, Any]) -> bytes:
        """`record` as `record_name` (short or full name), in the codec's framing.

        Decimal fields take decimal.Decimal with at most 18 fractional digits; timestamps take
        timezone-aware datetimes (truncated to the millisecond) or int epoch milliseconds.
        """
        writer = self._writer(record_name)
        if not isinstance(record, Mapping):
            raise CodecError(
                "invalid_record", f"{writer.short_name} needs a mapping, got {type(record)}"
            )
        header = self._header(writer)
        buffer = io.BytesIO()
        buffer.write(header)
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
        return self._bounded(writer, buffer.getvalue())

    def read_form(self, record_name: str, record: Mapping[str, Any]) -> dict[str, Any]:
        """What decode(encode(record_name, record)) returns, equal under ==, computed from the
        record without encoding it: for records this process built and hands to its own
        handlers (streams/worker/local.py). Runs none of encode's checks: a record read this
        way must be one its reader validates, as it validates what it reads from a topic."""
        writer = self._writer(record_name)
        convert = writer.read_form
        if convert is None:
            named = cast(Mapping[str, Any], writer.schema.get("__named_schemas", {}))
            convert = writer.read_form = _record_read(writer.schema, named, {})
        try:
            return cast(dict[str, Any], convert(record))
        except _ENCODE_ERRORS as exc:
            raise CodecError("invalid_record", f"{writer.short_name}: {exc}") from exc

    def decode(self, data: bytes | bytearray | memoryview | None) -> tuple[str, dict[str, Any]]:
        """(short record name, record) of a message in either framing; CodecError if it is not
        one this codec can read.

        None (a Kafka tombstone) counts as an empty payload. A Confluent-framed message decodes
        only once its schema id is bound or learnt (unresolved_schema_id tells which to fetch).
        """
        if not data:
            raise CodecError("empty_payload", "the message has no bytes")
        if not isinstance(data, bytes):
            data = bytes(data)  # bytearray or memoryview from a client library
        size = len(data)
        if size > MESSAGE_SIZE_MAX_BYTES:
            raise CodecError("message_too_large", f"{size} bytes, max {MESSAGE_SIZE_MAX_BYTES}")
        if data[0] == CONFLUENT_MAGIC[0]:
            writer, header_size = self._confluent_writer(data)
        else:
            writer, header_size = self._single_object_writer(data)
        buffer = io.BytesIO(data)
        buffer.seek(header_size)
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

    def _single_object_writer(self, data: bytes) -> tuple[_Writer, int]:
        marker = data[: len(SINGLE_OBJECT_MARKER)]
        if not SINGLE_OBJECT_MARKER.startswith(marker):
            raise CodecError(
                "bad_marker", f"starts with {marker.hex()}: neither single-object "
                f"({SINGLE_OBJECT_MARKER.hex()}) nor Confluent ({CONFLUENT_MAGIC.hex()}) framing"
            )
        if len(data) < HEADER_SIZE_BYTES:
            raise CodecError(
                "truncated", f"{len(data)} bytes, shorter than the {HEADER_SIZE_BYTES}-byte header"
            )
        fingerprint = data[len(SINGLE_OBJECT_MARKER) : HEADER_SIZE_BYTES]
        writer = self._by_fingerprint.get(fingerprint)
        if writer is None:
            raise CodecError(
                "unknown_fingerprint", f"no known schema has fingerprint {fingerprint.hex()}"
            )
        return writer, HEADER_SIZE_BYTES

    def _confluent_writer(self, data: bytes) -> tuple[_Writer, int]:
        schema_id = confluent_schema_id(data)
        if schema_id is None:
            raise CodecError("truncated", f"{len(data)} bytes, shorter than the "
                             f"{CONFLUENT_HEADER_SIZE_BYTES}-byte Confluent header")
        writer = self._by_id.get(schema_id)
        if writer is not None:
            return writer, CONFLUENT_HEADER_SIZE_BYTES
        refused = self._refused_ids.get(schema_id)
        if refused is not None:
            raise CodecError(*refused)
        raise CodecError("unknown_schema_id", f"schema id {schema_id} was never looked up in a "
                         "schema registry by this process")

    # --- Schema ids (Confluent framing): given by streams/wire.py, which talks to the registry.

    def full_name(self, record_name: str) -> str:
        """The full name (with namespace) of a record known by its short or full name."""
        return self._writer(record_name).full_name

    def schema_text(self, record_name: str) -> str:
        """The JSON text of `record_name`'s current schema as the ledger registers it."""
        return schema_text(self._writer(record_name).schema)

    def bind_schema_id(self, record_name: str, schema_id: int) -> None:
        """Encode `record_name` with this id (the registry's id of schema_text(record_name))."""
        writer = self._writer(record_name)
        header = confluent_header(schema_id)
        known = self._by_id.get(schema_id)
        if schema_id in self._bound_ids and known is not writer:
            raise CodecError("invalid_schema", f"schema id {schema_id} is already "
                             f"{known.full_name if known else 'taken'}, not {writer.full_name}")
        if writer.confluent_header is None:
            writer.confluent_header = header
        self._by_id[schema_id] = writer
        self._bound_ids.add(schema_id)
        self._refused_ids.pop(schema_id, None)

    def learn_schema(self, schema_id: int, text: str) -> None:
        """Decode messages framed with `schema_id` by this writer schema (JSON text, as the
        registry returned it). A schema the ledger cannot read safely is remembered as refused
        (reason incompatible_schema), so its messages fail with that reason."""
        if schema_id in self._by_id or schema_id in self._refused_ids:
            return
        try:
            writer = self._learnt_writer(schema_id, text)
        except CodecError as exc:
            self.refuse_schema_id(schema_id, exc.reason, str(exc))
            return
        except Exception as exc:  # a registry's schema is input too (e.g. nested past recursion)
            detail = f"schema id {schema_id} cannot be used: {type(exc).__name__}: {exc}"
            self.refuse_schema_id(schema_id, "incompatible_schema", detail[:REFUSAL_DETAIL_CHARS_MAX])
            return
        while len(self._by_id) - len(self._bound_ids) >= LEARNT_SCHEMA_IDS_MAX:
            oldest = next(i for i in self._by_id if i not in self._bound_ids)
            del self._by_id[oldest]
        self._by_id[schema_id] = writer

    def _learnt_writer(self, schema_id: int, text: str) -> _Writer:
        what = f"schema id {schema_id}"
        try:
            parsed = parse_schema(json.loads(text), named_schemas={})
        except (ValueError, TypeError, KeyError, SchemaParseException) as exc:
            raise CodecError("incompatible_schema", f"{what} is not an Avro schema the ledger "
                             f"can parse (references are not supported): {exc}") from exc
        if not isinstance(parsed, dict) or parsed.get("type") != "record":
            raise CodecError("incompatible_schema", f"{what} is not a record")
        known = self._by_fingerprint.get(fingerprint_crc64_avro(parsed))
        if known is not None and resolution_problem(parsed, known.schema) is None:
            # One of our schemas, current or older: decoded exactly as single-object. (The
            # fingerprint alone would not do: Parsing Canonical Form drops logical types, so a
            # decimal of another scale has the same fingerprint.)
            return known
        full_name = str(parsed["name"])
        current = self._current.get(full_name)
        if current is None:
            raise CodecError("incompatible_schema",
                             f"{what} is a {full_name}: not a record this ledger reads")
        problem = resolution_problem(parsed, current)
        if problem is not None:
            raise CodecError("incompatible_schema",
                             f"{what} ({full_name}) cannot be read as the ledger's: {problem}")
        return _Writer(full_name, parsed, current)

    def refuse_schema_id(self, schema_id: int, reason: str, detail: str) -> None:
        """Fail messages framed with `schema_id` with this reason (bounded, oldest forgotten)."""
        if schema_id in self._bound_ids:
            return
        while len(self._refused_ids) >= REFUSED_SCHEMA_IDS_MAX:
            del self._refused_ids[next(iter(self._refused_ids))]
        self._refused_ids[schema_id] = (reason, detail)

    def unresolved_schema_id(self, data: bytes | bytearray | memoryview | None) -> int | None:
        """The schema id of a Confluent-framed message this codec has neither learnt nor refused
        (what the edge should look up before decoding), else None."""
        schema_id = confluent_schema_id(data)
        if schema_id is None or schema_id in self._by_id or schema_id in self._refused_ids:
            return None
        return schema_id

    def fingerprint_of(self, record_name: str) -> bytes:
        """The 8 fingerprint bytes (wire order) of the schema of `record_name`."""
        return self._writer(record_name).fingerprint

    def record_names(self) -> list[str]:
        """Full names of the records this codec knows, sorted."""
        return sorted({writer.full_name for writer in self._by_name.values()})
