"""streams/packing: every field kind round-trips exactly, and damage is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sardis_ledger.streams.errors import InvariantViolation
from sardis_ledger.streams.packing import Packer, Unpacker

TEXT = st.text(max_size=300)


@given(uint=st.integers(0, 2**300), sint=st.integers(-(2**300), 2**300),
       opt_int=st.none() | st.integers(-(2**70), 2**70), opt_str=st.none() | TEXT,
       blob=st.binary(max_size=300), str_map=st.dictionaries(TEXT, TEXT, max_size=5))
def test_every_field_kind_round_trips(uint: int, sint: int, opt_int: int | None,
                                      opt_str: str | None, blob: bytes,
                                      str_map: dict[str, str]) -> None:
    out = Packer(b"\x02")
    out.uint(uint)
    out.sint(sint)
    out.opt_int(opt_int)
    out.opt_str(opt_str)
    out.blob(blob)
    out.str_map(str_map)
    reader = Unpacker(out.done(), 1)
    assert (reader.uint(), reader.sint(), reader.opt_int(), reader.opt_str(), reader.blob(),
            reader.str_map()) == (uint, sint, opt_int, opt_str, blob, str_map)
    reader.end()


@pytest.mark.parametrize(("value", "layout"), [
    (0, b"\x00"), (1, b"\x02"), (-1, b"\x01"), (63, b"\x7e"), (64, b"\x80\x01"), (-65, b"\x81\x01"),
])
def test_zigzag_varint_layout(value: int, layout: bytes) -> None:
    out = Packer()
    out.sint(value)
    assert out.done() == layout


@pytest.mark.parametrize("data", [b"\x80", b"\x05ab", b"\xff" * 80])
def test_truncated_or_endless_values_are_refused(data: bytes) -> None:
    with pytest.raises(InvariantViolation):
        Unpacker(data).blob()


def test_none_and_empty_string_differ_and_negative_uints_are_refused() -> None:
    out = Packer()
    out.opt_str(None)
    out.opt_str("")
    assert out.done() == b"\x00\x01"
    with pytest.raises(InvariantViolation):
        Packer().uint(-1)
