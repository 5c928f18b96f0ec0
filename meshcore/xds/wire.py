"""A strict protobuf codec driven by a schema of frozen dataclasses. Pure: bytes in, values out.

Each message is a frozen dataclass whose every field has a default (proto3: "", 0, False,
b"", () for repeated fields, None for an absent message) and a schema: `Field`s naming the
protobuf field number, the attribute and its kind. Encoding is protobuf's own, byte for byte
(tests check it against the `google.protobuf` runtime compiled from meshcore/xds/proto):

- proto3 implicit presence: zero values are not written; a message field is written when it
  is not None; repeated numbers are packed.
- Decoding follows protobuf's rules: unknown fields (every wire type, groups included) are
  skipped; a singular scalar keeps its last value; a singular message is merged; repeated
  numbers are accepted packed and unpacked; within a oneof the last member wins.
- Decoding is strict where a lenient parser would hide a bug: a known field with the wrong
  wire type, truncated varints or lengths, a varint over ten bytes, field number 0, invalid
  UTF-8, a uint32 over 32 bits, nesting deeper than `MAX_DEPTH` and an input over the size
  given are each one `WireError` that says what and where.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

MAX_DEPTH = 48

STRING, BYTES, UINT32, INT32, BOOL = "string", "bytes", "uint32", "int32", "bool"
_SCALARS = frozenset({STRING, BYTES, UINT32, INT32, BOOL})
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_NUMERIC = frozenset({UINT32, INT32, BOOL})


class WireError(ValueError):
    """Bytes that are not a valid encoding of the expected message; the text says why."""


@dataclass(frozen=True, slots=True)
class Field:
    number: int
    attr: str
    kind: Any  # one of the scalar kinds above, or a message class with a schema
    repeated: bool = False
    oneof: str | None = None  # the group's name; the members are separate attributes

    @property
    def wire_type(self) -> int:
        return _VARINT if self.kind in _NUMERIC else _LEN


_SCHEMA: dict[type, tuple[Field, ...]] = {}
_BY_NUMBER: dict[type, dict[int, Field]] = {}
_ONEOFS: dict[type, dict[str, tuple[str, ...]]] = {}

T = TypeVar("T")


def register(cls: type, *fields: Field) -> None:
    """Give message class `cls` its schema (once, at import)."""
    _SCHEMA[cls] = fields
    _BY_NUMBER[cls] = {f.number: f for f in fields}
    groups: dict[str, list[str]] = {}
    for f in fields:
        if f.oneof is not None:
            groups.setdefault(f.oneof, []).append(f.attr)
    _ONEOFS[cls] = {g: tuple(attrs) for g, attrs in groups.items()}


# ---- encoding ----------------------------------------------------------------------------


def _varint(value: int, out: bytearray) -> None:
    if value < 0:
        value &= (1 << 64) - 1  # negative int32: ten bytes, as protobuf writes them
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _check_number(cls: type, f: Field, value: Any) -> int:
    name = f"{cls.__name__}.{f.attr}"
    if f.kind == BOOL:
        if not isinstance(value, bool):
            raise WireError(f"{name} must be a bool, not {value!r}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"{name} must be an int, not {value!r}")
    if f.kind == UINT32 and not 0 <= value < 2**32:
        raise WireError(f"{name} must be a uint32, not {value}")
    if f.kind == INT32 and not -(2**31) <= value < 2**31:
        raise WireError(f"{name} must be an int32, not {value}")
    return value


def _len_bytes(cls: type, f: Field, value: Any) -> bytes:
    name = f"{cls.__name__}.{f.attr}"
    if f.kind == STRING:
        if not isinstance(value, str):
            raise WireError(f"{name} must be a string, not {value!r}")
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise WireError(f"{name} is not valid text: {e}") from None
    if f.kind == BYTES:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise WireError(f"{name} must be bytes, not {value!r}")
        return bytes(value)
    if type(value) is not f.kind:
        raise WireError(f"{name} must be a {f.kind.__name__}, not {value!r}")
    inner = bytearray()
    _encode_into(value, inner)
    return bytes(inner)


def _encode_into(msg: Any, out: bytearray) -> None:
    cls = type(msg)
    for f in _SCHEMA[cls]:
        value = getattr(msg, f.attr)
        if f.repeated:
            if not isinstance(value, tuple | list):
                raise WireError(f"{cls.__name__}.{f.attr} must be a tuple, not {value!r}")
            if not value:
                continue
            if f.kind in _NUMERIC:
                packed = bytearray()
                for v in value:
                    _varint(_check_number(cls, f, v), packed)
                _varint(f.number << 3 | _LEN, out)
                _varint(len(packed), out)
                out += packed
            else:
                for v in value:
                    raw = _len_bytes(cls, f, v)
                    _varint(f.number << 3 | _LEN, out)
                    _varint(len(raw), out)
                    out += raw
            continue
        if f.kind in _NUMERIC:
            number = _check_number(cls, f, value)
            if number or (f.oneof is not None and value is not None):
                _varint(f.number << 3 | _VARINT, out)
                _varint(number, out)
        elif f.kind in (STRING, BYTES):
            if value is None and f.oneof is not None:
                continue
            raw = _len_bytes(cls, f, value)
            if raw or f.oneof is not None:
                _varint(f.number << 3 | _LEN, out)
                _varint(len(raw), out)
                out += raw
        elif value is not None:
            raw = _len_bytes(cls, f, value)
            _varint(f.number << 3 | _LEN, out)
            _varint(len(raw), out)
            out += raw


def encode(msg: Any) -> bytes:
    """The protobuf encoding of `msg`; WireError if a field holds a value its schema forbids."""
    if type(msg) not in _SCHEMA:
        raise WireError(f"not a registered message: {type(msg).__name__}")
    out = bytearray()
    _encode_into(msg, out)
    return bytes(out)


# ---- decoding ----------------------------------------------------------------------------


class _Partial:
    """A message being decoded: the fields seen so far (merging needs them mutable)."""

    __slots__ = ("cls", "values")

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.values: dict[str, Any] = {}


def _read_varint(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    result = 0
    for i in range(10):
        if pos >= end:
            raise WireError(f"truncated varint ({what}) at byte {pos}")
        b = buf[pos]
        pos += 1
        if i == 9 and b > 1:
            raise WireError(f"varint ({what}) overflows 64 bits at byte {pos - 1}")
        result |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return result, pos
    raise WireError(f"varint ({what}) longer than 10 bytes")  # pragma: no cover


def _read_tag(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    start = pos
    tag, pos = _read_varint(buf, pos, end, "field tag")
    if tag > 0xFFFFFFFF:
        raise WireError(f"field tag at byte {start} is over 32 bits")
    number, wire_type = tag >> 3, tag & 7
    if number == 0:
        raise WireError(f"field number 0 at byte {start}")
    return number, wire_type, pos


def _read_length(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    length, pos = _read_varint(buf, pos, end, f"length of {what}")
    if length > end - pos:
        raise WireError(f"truncated {what}: {length} bytes declared, {end - pos} left")
    return length, pos


def _skip(buf: bytes, pos: int, end: int, number: int, wire_type: int, depth: int) -> int:
    what = f"unknown field {number}"
    if wire_type == _VARINT:
        return _read_varint(buf, pos, end, what)[1]
    if wire_type in (_I64, _I32):
        size = 8 if wire_type == _I64 else 4
        if end - pos < size:
            raise WireError(f"truncated {what}: {size} bytes needed, {end - pos} left")
        return pos + size
    if wire_type == _LEN:
        length, pos = _read_length(buf, pos, end, what)
        return pos + length
    if wire_type == _SGROUP:
        if depth >= MAX_DEPTH:
            raise WireError(f"groups nested deeper than {MAX_DEPTH}")
        while True:
            if pos >= end:
                raise WireError(f"group {number} is not closed")
            inner, inner_type, pos = _read_tag(buf, pos, end)
            if inner_type == _EGROUP:
                if inner != number:
                    raise WireError(f"group {number} closed as group {inner}")
                return pos
            pos = _skip(buf, pos, end, inner, inner_type, depth + 1)
    if wire_type == _EGROUP:
        raise WireError(f"end of group {number} without its start")
    raise WireError(f"invalid wire type {wire_type} for field {number}")


def _number(f: Field, raw: int, where: str) -> Any:
    if f.kind == BOOL:
        return raw != 0
    if f.kind == UINT32:
        if raw >= 1 << 32:
            raise WireError(f"{where}: {raw} does not fit a uint32")
        return raw
    raw &= 0xFFFFFFFF  # int32: the low 32 bits, sign included
    return raw - (1 << 32) if raw >= 1 << 31 else raw


def _set(part: _Partial, f: Field, value: Any) -> None:
    if f.oneof is not None:
        for other in _ONEOFS[part.cls][f.oneof]:
            if other != f.attr:
                part.values.pop(other, None)
    part.values[f.attr] = value


def _parse(part: _Partial, buf: bytes, pos: int, end: int, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise WireError(f"messages nested deeper than {MAX_DEPTH}")
    cls = part.cls
    table = _BY_NUMBER[cls]
    value: Any
    while pos < end:
        number, wire_type, pos = _read_tag(buf, pos, end)
        f = table.get(number)
        if f is None:
            pos = _skip(buf, pos, end, number, wire_type, depth)
            continue
        where = f"{cls.__name__}.{f.attr} (field {number})"
        if f.kind in _NUMERIC:
            if wire_type == _VARINT:
                raw, pos = _read_varint(buf, pos, end, where)
                number_value = _number(f, raw, where)
                if f.repeated:
                    part.values.setdefault(f.attr, []).append(number_value)
                else:
                    _set(part, f, number_value)
                continue
            if wire_type == _LEN and f.repeated:
                length, pos = _read_length(buf, pos, end, where)
                stop = pos + length
                items = part.values.setdefault(f.attr, [])
                while pos < stop:
                    raw, pos = _read_varint(buf, pos, stop, where)
                    items.append(_number(f, raw, where))
                continue
            raise WireError(f"{where} has wire type {wire_type}, expected {_VARINT}")
        if wire_type != _LEN:
            raise WireError(f"{where} has wire type {wire_type}, expected {_LEN}")
        length, pos = _read_length(buf, pos, end, where)
        stop = pos + length
        if f.kind == STRING:
            try:
                value = buf[pos:stop].decode("utf-8")
            except UnicodeDecodeError as e:
                raise WireError(f"{where} is not valid UTF-8: {e.reason}") from None
        elif f.kind == BYTES:
            value = buf[pos:stop]
        else:
            if f.repeated:
                value = _Partial(f.kind)
            else:
                value = part.values.get(f.attr)
                if not isinstance(value, _Partial):
                    value = _Partial(f.kind)
            _parse(value, buf, pos, stop, depth + 1)
        if f.repeated:
            part.values.setdefault(f.attr, []).append(value)
        else:
            _set(part, f, value)
        pos = stop


def _build(part: _Partial) -> Any:
    kwargs: dict[str, Any] = {}
    for f in _SCHEMA[part.cls]:
        if f.attr not in part.values:
            continue
        value = part.values[f.attr]
        if f.repeated:
            kwargs[f.attr] = tuple(_build(v) if isinstance(v, _Partial) else v for v in value)
        else:
            kwargs[f.attr] = _build(value) if isinstance(value, _Partial) else value
    return part.cls(**kwargs)


def decode(cls: type[T], data: bytes | bytearray | memoryview, max_size: int) -> T:
    """Parse `data` as a `cls`, or raise WireError saying what is wrong with it."""
    if cls not in _SCHEMA:
        raise WireError(f"not a registered message: {cls.__name__}")
    if len(data) > max_size:
        raise WireError(f"{cls.__name__} is {len(data)} bytes, over the limit of {max_size}")
    buf = bytes(data)
    part = _Partial(cls)
    _parse(part, buf, 0, len(buf), 0)
    msg: T = _build(part)
    return msg
