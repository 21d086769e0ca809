"""A compact binary layout for table values: varints, optional strings, byte strings, maps.

Byte layout of each kind of field (a value is a sequence of fields, in an order its reader knows):
- uint:      unsigned LEB128 varint (7 bits a byte, low group first, high bit = more follows);
- sint:      zigzag-mapped (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...) then a uint: any size, exact;
- opt int:   uint 0 for None, else the sint's zigzag value + 1 as a uint;
- opt str:   uint 0 for None, else (UTF-8 length + 1) as a uint, then the UTF-8 bytes;
- blob:      uint length, then the bytes;
- str map:   uint count, then key and value as opt str each (never None), in the map's order.
A reader that finds the value shorter than its fields say, or bytes left over, raises
InvariantViolation: table values are written by this process's own code, never by clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from sardis_ledger.streams.errors import InvariantViolation

VARINT_BYTES_MAX: Final[int] = 64  # 448 bits: far above any amount the codec accepts


class Packer:
    """Appends fields to a bytearray."""

    __slots__ = ("out",)

    def __init__(self, prefix: bytes = b"") -> None:
        self.out = bytearray(prefix)

    def uint(self, value: int) -> None:
        if value < 0:
            raise InvariantViolation(f"uint field with negative value {value}")
        out = self.out
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)

    def sint(self, value: int) -> None:
        self.uint(value * 2 if value >= 0 else -value * 2 - 1)

    def opt_int(self, value: int | None) -> None:
        if value is None:
            self.uint(0)
        else:
            self.uint((value * 2 if value >= 0 else -value * 2 - 1) + 1)

    def opt_str(self, value: str | None) -> None:
        if value is None:
            self.uint(0)
            return
        data = value.encode()
        self.uint(len(data) + 1)
        self.out += data

    def blob(self, value: bytes) -> None:
        self.uint(len(value))
        self.out += value

    def str_map(self, value: Mapping[str, str]) -> None:
        self.uint(len(value))
        for key, item in value.items():
            self.opt_str(key)
            self.opt_str(item)

    def done(self) -> bytes:
        return bytes(self.out)


class Unpacker:
    """Reads fields back in the order they were packed."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def uint(self) -> int:
        data, pos, shift, value = self.data, self.pos, 0, 0
        end = min(len(data), pos + VARINT_BYTES_MAX)
        while pos < end:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = pos
                return value
            shift += 7
        raise InvariantViolation(f"a table value ends inside a varint at byte {self.pos}")

    def sint(self) -> int:
        value = self.uint()
        return value >> 1 if not value & 1 else -((value + 1) >> 1)

    def opt_int(self) -> int | None:
        value = self.uint()
        if value == 0:
            return None
        value -= 1
        return value >> 1 if not value & 1 else -((value + 1) >> 1)

    def opt_str(self) -> str | None:
        size = self.uint()
        if size == 0:
            return None
        return self._take(size - 1).decode()

    def text(self) -> str:
        value = self.opt_str()
        if value is None:
            raise InvariantViolation(f"a table value has no string at byte {self.pos}")
        return value

    def blob(self) -> bytes:
        return self._take(self.uint())

    def str_map(self) -> dict[str, str]:
        return {self.text(): self.text() for _ in range(self.uint())}

    def end(self) -> None:
        if self.pos != len(self.data):
            raise InvariantViolation(f"a table value has {len(self.data) - self.pos} bytes left "
                                     "over")

    def _take(self, size: int) -> bytes:
        start, end = self.pos, self.pos + size
        if end > len(self.data):
            raise InvariantViolation(f"a table value ends inside a field at byte {start}")
        self.pos = end
        return self.data[start:end]
