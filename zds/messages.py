"""ZDS messages (zds/zds.proto) and their protobuf wire codec, written out by hand.

The protocol has nine tiny messages, so a strict codec of ~200 lines is cheaper than a
runtime dependency, and lets every malformation become one `ZdsError` with a message that
says what was wrong, instead of whatever a generated parser raises. The encoding is
protobuf's own, byte for byte (tests check it against the `google.protobuf` runtime):

- proto3 implicit presence: empty strings and zero enums are not written; a message field
  is written whenever it is set (`None` means absent), so `SnapshotSent()` inside a request
  is the two bytes `1a 00`.
- Decoding follows protobuf's rules: unknown fields (every wire type, groups included) are
  skipped; a repeated scalar field keeps its last value; a repeated message field is
  merged; within a oneof the last member wins (merged if it is the same member).
- Decoding is strict where a lenient parser would hide a bug: a known field with the wrong
  wire type is an error (as in prost, the upstream tunnel's parser), so are truncated
  varints and lengths, a varint longer than ten bytes, field number 0, invalid UTF-8, an
  input over `MAX_MESSAGE_SIZE`, and a request or response without its payload.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, TypeVar

# Packets larger than this are refused in both directions. Real messages are a few
# hundred bytes (a uid and three Kubernetes names), so this only bounds hostile input.
MAX_MESSAGE_SIZE = 64 * 1024
_MAX_DEPTH = 64  # nested unknown groups; protobuf runtimes stop around 100


class ZdsError(Exception):
    """A ZDS packet or message is malformed or breaks the protocol; the text says how."""


class Version(IntEnum):
    NOT_USED = 0
    V1 = 1


@dataclass(frozen=True, slots=True)
class ZdsHello:
    # An int, not a Version: proto3 enums are open, a newer peer may send a value we lack.
    version: int = Version.V1


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class AddWorkload:
    uid: str
    workload_info: WorkloadInfo | None = None


@dataclass(frozen=True, slots=True)
class KeepWorkload:
    uid: str


@dataclass(frozen=True, slots=True)
class DelWorkload:
    uid: str


@dataclass(frozen=True, slots=True)
class SnapshotSent:
    pass


@dataclass(frozen=True, slots=True)
class Ack:
    error: str = ""  # empty: ACK; otherwise why the request failed


Payload = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    payload: Payload


@dataclass(frozen=True, slots=True)
class WorkloadResponse:
    payload: Ack


Message = (
    ZdsHello
    | WorkloadInfo
    | AddWorkload
    | KeepWorkload
    | DelWorkload
    | SnapshotSent
    | Ack
    | WorkloadRequest
    | WorkloadResponse
)
M = TypeVar("M", bound=Message)

# ---- schema ------------------------------------------------------------------------------

_STRING = "string"
_ENUM = "enum"
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True, slots=True)
class _Field:
    number: int
    name: str  # the proto field name (for error messages)
    attr: str  # the dataclass attribute it fills
    kind: Any  # _STRING, _ENUM or a message class
    oneof: bool = False

    @property
    def wire_type(self) -> int:
        return _VARINT if self.kind == _ENUM else _LEN


_SCHEMA: dict[type, tuple[_Field, ...]] = {
    ZdsHello: (_Field(1, "version", "version", _ENUM),),
    WorkloadInfo: (
        _Field(1, "name", "name", _STRING),
        _Field(2, "namespace", "namespace", _STRING),
        _Field(3, "service_account", "service_account", _STRING),
    ),
    AddWorkload: (
        _Field(1, "uid", "uid", _STRING),
        _Field(2, "workload_info", "workload_info", WorkloadInfo),
    ),
    KeepWorkload: (_Field(1, "uid", "uid", _STRING),),
    DelWorkload: (_Field(2, "uid", "uid", _STRING),),
    SnapshotSent: (),
    Ack: (_Field(1, "error", "error", _STRING),),
    WorkloadRequest: (
        _Field(1, "add", "payload", AddWorkload, oneof=True),
        _Field(2, "del", "payload", DelWorkload, oneof=True),
        _Field(3, "snapshot_sent", "payload", SnapshotSent, oneof=True),
        _Field(5, "keep", "payload", KeepWorkload, oneof=True),
    ),
    WorkloadResponse: (_Field(1, "ack", "payload", Ack, oneof=True),),
}
_BY_NUMBER = {cls: {f.number: f for f in fs} for cls, fs in _SCHEMA.items()}
# A oneof with no member set has no default: decoding without one is an error.
_REQUIRED_ONEOF = {WorkloadRequest: "payload", WorkloadResponse: "payload"}

# ---- encoding ----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value &= (1 << 64) - 1  # negative int32 enums: ten bytes, as protobuf writes them
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_into(msg: Message, out: bytearray) -> None:
    for f in _SCHEMA[type(msg)]:
        value = getattr(msg, f.attr)
        if f.oneof and type(value) is not f.kind:
            continue
        if f.kind == _STRING:
            if not isinstance(value, str):
                raise ZdsError(f"{type(msg).__name__}.{f.name} must be a string, not {value!r}")
            if value:
                try:
                    raw = value.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ZdsError(
                        f"{type(msg).__name__}.{f.name} is not valid text: {e}"
                    ) from None
                out += _varint(f.number << 3 | _LEN) + _varint(len(raw)) + raw
        elif f.kind == _ENUM:
            if not isinstance(value, int) or not -(2**31) <= value < 2**31:
                raise ZdsError(f"{type(msg).__name__}.{f.name} must be an int32, not {value!r}")
            if value:
                out += _varint(f.number << 3 | _VARINT) + _varint(int(value))
        elif value is not None:
            if type(value) is not f.kind:
                raise ZdsError(
                    f"{type(msg).__name__}.{f.name} must be {f.kind.__name__}, not {value!r}"
                )
            inner = bytearray()
            _encode_into(value, inner)
            out += _varint(f.number << 3 | _LEN) + _varint(len(inner)) + inner
    if type(msg) in _REQUIRED_ONEOF and not any(
        type(getattr(msg, f.attr)) is f.kind for f in _SCHEMA[type(msg)]
    ):
        raise ZdsError(f"{type(msg).__name__} needs a payload, not {msg!r}")


def encode(msg: Message) -> bytes:
    """The protobuf encoding of `msg`; ZdsError if a field holds a value the schema forbids."""
    if type(msg) not in _SCHEMA:
        raise ZdsError(f"not a ZDS message: {msg!r}")
    out = bytearray()
    _encode_into(msg, out)
    if len(out) > MAX_MESSAGE_SIZE:
        raise ZdsError(f"{type(msg).__name__} is {len(out)} bytes, over {MAX_MESSAGE_SIZE}")
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
            raise ZdsError(f"truncated varint ({what}) at byte {pos}")
        b = buf[pos]
        pos += 1
        if i == 9 and b > 1:
            raise ZdsError(f"varint ({what}) overflows 64 bits at byte {pos - 1}")
        result |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return result, pos
    raise ZdsError(f"varint ({what}) longer than 10 bytes at byte {pos - 10}")


def _read_tag(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    start = pos
    tag, pos = _read_varint(buf, pos, end, "field tag")
    if tag > 0xFFFFFFFF:
        raise ZdsError(f"field tag at byte {start} is over 32 bits")
    number, wire_type = tag >> 3, tag & 7
    if number == 0:
        raise ZdsError(f"field number 0 at byte {start}")
    return number, wire_type, pos


def _read_length(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    length, pos = _read_varint(buf, pos, end, f"length of {what}")
    if length > end - pos:
        raise ZdsError(f"truncated {what}: {length} bytes declared, {end - pos} left")
    return length, pos


def _skip(buf: bytes, pos: int, end: int, number: int, wire_type: int, depth: int) -> int:
    """Skip one unknown field's value; returns the position after it."""
    what = f"unknown field {number}"
    if wire_type == _VARINT:
        return _read_varint(buf, pos, end, what)[1]
    if wire_type in (_I64, _I32):
        size = 8 if wire_type == _I64 else 4
        if end - pos < size:
            raise ZdsError(f"truncated {what}: {size} bytes needed, {end - pos} left")
        return pos + size
    if wire_type == _LEN:
        length, pos = _read_length(buf, pos, end, what)
        return pos + length
    if wire_type == _SGROUP:
        if depth >= _MAX_DEPTH:
            raise ZdsError(f"groups nested deeper than {_MAX_DEPTH}")
        while True:
            if pos >= end:
                raise ZdsError(f"group {number} is not closed")
            inner, inner_type, pos = _read_tag(buf, pos, end)
            if inner_type == _EGROUP:
                if inner != number:
                    raise ZdsError(f"group {number} closed as group {inner}")
                return pos
            pos = _skip(buf, pos, end, inner, inner_type, depth + 1)
    if wire_type == _EGROUP:
        raise ZdsError(f"end of group {number} without its start")
    raise ZdsError(f"invalid wire type {wire_type} for field {number}")


def _parse(part: _Partial, buf: bytes, pos: int, end: int, depth: int) -> None:
    cls = part.cls
    table = _BY_NUMBER[cls]
    while pos < end:
        number, wire_type, pos = _read_tag(buf, pos, end)
        f = table.get(number)
        if f is None:
            pos = _skip(buf, pos, end, number, wire_type, depth)
            continue
        where = f"{cls.__name__}.{f.name} (field {number})"
        if wire_type != f.wire_type:
            raise ZdsError(f"{where} has wire type {wire_type}, expected {f.wire_type}")
        if f.kind == _ENUM:
            value, pos = _read_varint(buf, pos, end, where)
            value &= 0xFFFFFFFF  # int32: the low 32 bits, sign included
            part.values[f.attr] = value - (1 << 32) if value >= 1 << 31 else value
            continue
        length, pos = _read_length(buf, pos, end, where)
        chunk_end = pos + length
        if f.kind == _STRING:
            try:
                part.values[f.attr] = buf[pos:chunk_end].decode("utf-8")
            except UnicodeDecodeError as e:
                raise ZdsError(f"{where} is not valid UTF-8: {e.reason}") from None
        else:
            sub = part.values.get(f.attr)
            if not isinstance(sub, _Partial) or sub.cls is not f.kind:
                sub = _Partial(f.kind)  # first occurrence, or another oneof member: replace
                part.values[f.attr] = sub
            _parse(sub, buf, pos, chunk_end, depth + 1)
        pos = chunk_end


def _build(part: _Partial) -> Any:
    kwargs: dict[str, Any] = {}
    for f in _SCHEMA[part.cls]:
        if f.attr in part.values:
            value = part.values[f.attr]
            kwargs[f.attr] = _build(value) if isinstance(value, _Partial) else value
        elif f.kind == _STRING:
            kwargs[f.attr] = ""
        elif f.kind == _ENUM:
            kwargs[f.attr] = 0
        elif not f.oneof:
            kwargs[f.attr] = None
    required = _REQUIRED_ONEOF.get(part.cls)
    if required is not None and required not in kwargs:
        raise ZdsError(f"{part.cls.__name__} has no payload")
    return part.cls(**kwargs)


def decode(cls: type[M], data: bytes) -> M:
    """Parse `data` as a `cls`, or raise ZdsError saying what is wrong with it."""
    if cls not in _SCHEMA:
        raise ZdsError(f"not a ZDS message type: {cls!r}")
    if len(data) > MAX_MESSAGE_SIZE:
        raise ZdsError(f"{cls.__name__} is {len(data)} bytes, over {MAX_MESSAGE_SIZE}")
    buf = bytes(data)
    part = _Partial(cls)
    _parse(part, buf, 0, len(buf), 0)
    msg: M = _build(part)
    return msg


def decode_hello(data: bytes) -> ZdsHello:
    return decode(ZdsHello, data)


def decode_request(data: bytes) -> WorkloadRequest:
    return decode(WorkloadRequest, data)


def decode_response(data: bytes) -> WorkloadResponse:
    return decode(WorkloadResponse, data)


def describe(msg: Message) -> str:
    """A one-line summary for logs (the message name and its fields)."""
    inner = msg.payload if isinstance(msg, WorkloadRequest | WorkloadResponse) else msg
    parts = [f"{f.name}={getattr(inner, f.name)!r}" for f in fields(inner)]
    return f"{type(inner).__name__}({', '.join(parts)})"
