"""The messages between a tunnel's owner process and its workers, and their wire form. Pure.

One message is one or more SEQPACKET datagrams (frames). A frame is a 4-byte header
(version, kind, flags, reserved) and up to MAX_CHUNK bytes of the message's body; the flag
MORE says another frame of the same message follows. A body is a field count (u16) and
each field as a u32 length and its bytes; each kind has a fixed list of typed fields.

Strict and bounded, so a bug on either side is a clear `CodecError` and never a hang or
an unbounded buffer: an unknown version or kind, a frame of another kind in the middle of
a message, a message over MAX_MESSAGE, a field count or a field length that does not
match, bytes left over, a string that is not UTF-8, a JSON field of the wrong shape, or an
fd on a message that carries none are all refused. Only `Enrol` carries an fd (the pod's
netns), on its only frame.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any, ClassVar

VERSION = 1
HEADER = struct.Struct("!BBBx")
MORE = 0x01
# A frame's body: well under the default socket buffer (about 200 KB), so one frame always
# fits in one datagram.
MAX_CHUNK = 48 * 1024
MAX_FRAME = HEADER.size + MAX_CHUNK
# The largest message: the mesh state of a large cluster, encoded, is a few MB.
MAX_MESSAGE = 64 * 1024 * 1024
MAX_FIELDS = 16
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_I64 = struct.Struct("!q")
_F64 = struct.Struct("!d")


class CodecError(ValueError):
    """A frame or message that is not what the protocol allows; the message says which."""


class Kind(enum.IntEnum):
    HELLO = 1  # worker -> owner: it runs (index, pid)
    STATE = 2  # owner -> worker: the mesh state
    ENROL = 3  # owner -> worker: serve a pod (+ its netns fd)
    RELEASE = 4  # owner -> worker: stop serving a pod, after draining it for `drain` s
    DRAIN = 5  # owner -> worker: stop accepting everywhere, wait for open connections
    DONE = 6  # worker -> owner: the answer to ENROL, RELEASE or DRAIN
    CERT_REQUEST = 7  # worker -> owner: a certificate for an identity, please
    CERT = 8  # owner -> worker: an identity's certificate (asked for, or rotated)
    CERT_FAILED = 9  # owner -> worker: none could be had; why
    REPORT_REQUEST = 10  # owner -> worker: the connection table and counters, please
    REPORT = 11  # worker -> owner: them
    LOG_LEVEL = 12  # owner -> worker: the log level set on the admin port


@dataclass(frozen=True, slots=True)
class Hello:
    KIND: ClassVar[Kind] = Kind.HELLO
    index: int
    pid: int


@dataclass(frozen=True, slots=True)
class State:
    KIND: ClassVar[Kind] = Kind.STATE
    # (type URL, name, body) of every resource, as meshcore.xds.convert encodes them.
    resources: tuple[tuple[str, str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Enrol:
    KIND: ClassVar[Kind] = Kind.ENROL
    seq: int
    uid: str
    # The pod's ZDS WorkloadInfo, when it came with one ("" when not).
    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class Release:
    KIND: ClassVar[Kind] = Kind.RELEASE
    seq: int
    uid: str
    drain: float


@dataclass(frozen=True, slots=True)
class Drain:
    KIND: ClassVar[Kind] = Kind.DRAIN
    seq: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Done:
    KIND: ClassVar[Kind] = Kind.DONE
    seq: int
    value: int  # DRAIN: pods with connections still open at the deadline
    error: str  # "" when it worked


@dataclass(frozen=True, slots=True)
class CertRequest:
    KIND: ClassVar[Kind] = Kind.CERT_REQUEST
    identity: str


@dataclass(frozen=True, slots=True)
class Cert:
    KIND: ClassVar[Kind] = Kind.CERT
    identity: str
    key_pem: bytes
    chain_pem: tuple[bytes, ...]
    roots_pem: bytes
    serial: str  # decimal: a certificate serial is up to 160 bits
    not_before: float  # Unix time
    not_after: float


@dataclass(frozen=True, slots=True)
class CertFailed:
    KIND: ClassVar[Kind] = Kind.CERT_FAILED
    identity: str
    error: str


@dataclass(frozen=True, slots=True)
class ReportRequest:
    KIND: ClassVar[Kind] = Kind.REPORT_REQUEST
    seq: int


@dataclass(frozen=True, slots=True)
class Report:
    KIND: ClassVar[Kind] = Kind.REPORT
    seq: int
    # {"connections": [row, ...], "metrics": TcpMetrics.export(), "pods": {uid: state}}
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LogLevel:
    KIND: ClassVar[Kind] = Kind.LOG_LEVEL
    level: str


Message = (
    Hello | State | Enrol | Release | Drain | Done | CertRequest | Cert | CertFailed
    | ReportRequest | Report | LogLevel
)  # fmt: skip
_CLASSES: dict[Kind, type[Any]] = {
    c.KIND: c
    for c in (
        Hello,
        State,
        Enrol,
        Release,
        Drain,
        Done,
        CertRequest,
        Cert,
        CertFailed,
        ReportRequest,
        Report,
        LogLevel,
    )
}
# The kinds that carry exactly one fd.
WITH_FD = frozenset({Kind.ENROL})


# -- fields ----------------------------------------------------------------------------------


def _pack(items: Iterable[bytes]) -> bytes:
    out = bytearray()
    count = 0
    for item in items:
        out += _U32.pack(len(item))
        out += item
        count += 1
    return _U32.pack(count) + bytes(out)


def _unpack(data: bytes, what: str) -> list[bytes]:
    if len(data) < 4:
        raise CodecError(f"{what}: too short for its item count")
    (count,) = _U32.unpack_from(data)
    pos, out = 4, []
    for i in range(count):
        if pos + 4 > len(data):
            raise CodecError(f"{what}: item {i} of {count} is cut short")
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if pos + n > len(data):
            raise CodecError(f"{what}: item {i} says {n} bytes, {len(data) - pos} are left")
        out.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise CodecError(f"{what}: {len(data) - pos} bytes after the last item")
    return out


def _str(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise CodecError(f"{what} is not UTF-8") from None


def _encode_field(value: Any, type_: str) -> bytes:
    if type_ == "str":
        return str(value).encode()
    if type_ == "bytes":
        return bytes(value)
    if type_ == "int":
        return _I64.pack(value)
    if type_ == "float":
        return _F64.pack(value)
    if type_ == "tuple[bytes, ...]":
        return _pack(value)
    if type_ == "tuple[tuple[str, str, bytes], ...]":
        return _pack(_pack((a.encode(), b.encode(), c)) for a, b, c in value)
    if type_ == "dict[str, Any]":
        return json.dumps(value, separators=(",", ":")).encode()
    raise AssertionError(f"no wire form for {type_}")


def _decode_field(raw: bytes, type_: str, what: str) -> Any:
    if type_ == "str":
        return _str(raw, what)
    if type_ == "bytes":
        return raw
    if type_ in ("int", "float"):
        if len(raw) != 8:
            raise CodecError(f"{what}: {len(raw)} bytes for a number of 8")
        return (_I64 if type_ == "int" else _F64).unpack(raw)[0]
    if type_ == "tuple[bytes, ...]":
        return tuple(_unpack(raw, what))
    if type_ == "tuple[tuple[str, str, bytes], ...]":
        out = []
        for i, item in enumerate(_unpack(raw, what)):
            parts = _unpack(item, f"{what}[{i}]")
            if len(parts) != 3:
                raise CodecError(f"{what}[{i}]: {len(parts)} parts, not 3")
            out.append((_str(parts[0], f"{what}[{i}]"), _str(parts[1], f"{what}[{i}]"), parts[2]))
        return tuple(out)
    if type_ == "dict[str, Any]":
        try:
            value = json.loads(_str(raw, what))
        except json.JSONDecodeError as e:
            raise CodecError(f"{what} is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise CodecError(f"{what} is not a JSON object")
        return value
    raise AssertionError(f"no wire form for {type_}")


def _types(cls: type[Any]) -> list[tuple[str, str]]:
    # `from __future__ import annotations`: the field types are their source text.
    return [(f.name, str(f.type)) for f in fields(cls)]


# -- messages and frames ---------------------------------------------------------------------


def encode_body(msg: Message) -> bytes:
    parts = [_encode_field(getattr(msg, name), t) for name, t in _types(type(msg))]
    out = bytearray(_U16.pack(len(parts)))
    for p in parts:
        out += _U32.pack(len(p))
        out += p
    return bytes(out)


def decode_body(kind: Kind, body: bytes) -> Message:
    cls = _CLASSES[kind]
    types = _types(cls)
    name = kind.name
    if len(body) < 2:
        raise CodecError(f"{name}: no field count")
    (count,) = _U16.unpack_from(body)
    if count != len(types):
        raise CodecError(f"{name}: {count} fields, expected {len(types)}")
    pos, values = 2, []
    for field_name, t in types:
        what = f"{name}.{field_name}"
        if pos + 4 > len(body):
            raise CodecError(f"{what}: cut short")
        (n,) = _U32.unpack_from(body, pos)
        pos += 4
        if pos + n > len(body):
            raise CodecError(f"{what}: says {n} bytes, {len(body) - pos} are left")
        values.append(_decode_field(body[pos : pos + n], t, what))
        pos += n
    if pos != len(body):
        raise CodecError(f"{name}: {len(body) - pos} bytes after the last field")
    msg: Message = cls(*values)
    return msg


def encode(msg: Message) -> list[bytes]:
    """The frames of `msg`, in order (an fd, if any, goes with the first and only one)."""
    body = encode_body(msg)
    if len(body) > MAX_MESSAGE:
        raise CodecError(f"{msg.KIND.name}: {len(body)} bytes, more than {MAX_MESSAGE}")
    chunks = [body[i : i + MAX_CHUNK] for i in range(0, len(body), MAX_CHUNK)] or [b""]
    if msg.KIND in WITH_FD and len(chunks) > 1:
        raise CodecError(f"{msg.KIND.name}: a message carrying an fd must fit one frame")
    last = len(chunks) - 1
    return [
        HEADER.pack(VERSION, msg.KIND, 0 if i == last else MORE) + chunk
        for i, chunk in enumerate(chunks)
    ]


class Reassembler:
    """Frames in, whole messages out: one per receiving end of a channel."""

    def __init__(self) -> None:
        self._kind: Kind | None = None
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, frame: bytes, fds: int = 0) -> Message | None:
        """The message `frame` completes, or None while more frames are due. `fds`: how many
        fds came with the frame (the caller keeps and closes them). CodecError if bad."""
        if len(frame) < HEADER.size:
            raise CodecError(f"a frame of {len(frame)} bytes has no header")
        if len(frame) > MAX_FRAME:
            raise CodecError(f"a frame of {len(frame)} bytes, more than {MAX_FRAME}")
        version, raw_kind, flags = HEADER.unpack_from(frame)
        if version != VERSION:
            raise CodecError(f"protocol version {version}, expected {VERSION}")
        try:
            kind = Kind(raw_kind)
        except ValueError:
            raise CodecError(f"unknown message kind {raw_kind}") from None
        if flags & ~MORE:
            raise CodecError(f"{kind.name}: unknown flags {flags:#x}")
        if self._kind is not None and kind != self._kind:
            raise CodecError(f"a {kind.name} frame inside a {self._kind.name} message")
        first = self._kind is None
        if fds and not (kind in WITH_FD and first and not flags & MORE and fds == 1):
            raise CodecError(f"{kind.name}: {fds} fd(s) where the protocol allows none")
        if kind in WITH_FD and first and not flags & MORE and fds != 1:
            raise CodecError(f"{kind.name}: carries no fd")
        self._size += len(frame) - HEADER.size
        if self._size > MAX_MESSAGE:
            raise CodecError(f"{kind.name}: more than {MAX_MESSAGE} bytes")
        self._parts.append(frame[HEADER.size :])
        if flags & MORE:
            self._kind = kind
            return None
        body = b"".join(self._parts)
        self._kind, self._parts, self._size = None, [], 0
        return decode_body(kind, body)


def frames_of(messages: Iterable[Message]) -> Iterator[bytes]:
    for msg in messages:
        yield from encode(msg)
