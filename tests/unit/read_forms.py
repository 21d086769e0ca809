"""Comparing a record's read form (AvroCodec.read_form) with what decode returns."""

from __future__ import annotations

from decimal import Decimal
from typing import Any


def same_read_values(form: Any, decoded: Any, *, decimal_digits: bool = True) -> bool:
    """Equal, with the same types and key order (a StrEnum may stand for a str). Decimals also
    have the same digits and exponent, unless `decimal_digits` is False: a Decimal given with
    fewer fractional digits than its schema's scale is equal, not identical, once decoded."""
    if isinstance(decoded, dict):
        return isinstance(form, dict) and list(form) == list(decoded) and all(
            same_read_values(form[k], decoded[k], decimal_digits=decimal_digits) for k in decoded)
    if isinstance(decoded, list):
        return isinstance(form, list) and len(form) == len(decoded) and all(
            same_read_values(a, b, decimal_digits=decimal_digits)
            for a, b in zip(form, decoded, strict=True))
    if isinstance(decoded, Decimal):
        return isinstance(form, Decimal) and (
            form.as_tuple() == decoded.as_tuple() if decimal_digits else form == decoded)
    if type(decoded) is str:
        return isinstance(form, str) and form == decoded
    return type(form) is type(decoded) and form == decoded
