"""HTTP/2 frame layout (RFC 9113 section 4): constants and the encoders the hot path uses.

Pure functions over bytes. The frame header is 9 bytes: 24-bit length, type, flags, 31-bit
stream id. DATA and WINDOW_UPDATE frames are built here by hand because a general HTTP/2
library on the data path costs about three times the CPU of the proxy itself.
"""

from __future__ import annotations

import struct
from enum import IntEnum

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_LEN = 9
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_FRAME_LIMIT = 16_777_215
MAX_WINDOW = 2**31 - 1

_HDR = struct.Struct(">HBBBL")  # length as 16+8 bits, type, flags, stream id
_U32 = struct.Struct(">L")


class FrameType(IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag:
    END_STREAM = 0x1
    ACK = 0x1
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


class Setting(IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6
    ENABLE_CONNECT_PROTOCOL = 0x8


class ErrorCode(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _HDR.pack(length >> 8, length & 0xFF, ftype, flags, stream_id & 0x7FFFFFFF)


def frame_header_into(
    buf: bytearray | memoryview, length: int, ftype: int, flags: int, stream_id: int
) -> None:
    """Write a frame header into the first FRAME_HEADER_LEN bytes of `buf`."""
    _HDR.pack_into(buf, 0, length >> 8, length & 0xFF, ftype, flags, stream_id & 0x7FFFFFFF)


def parse_header(buf: bytes | bytearray | memoryview, off: int) -> tuple[int, int, int, int]:
    """(length, type, flags, stream id) of the frame header at `off`."""
    hi, lo, ftype, flags, sid = _HDR.unpack_from(buf, off)
    return (hi << 8) | lo, ftype, flags, sid & 0x7FFFFFFF


def settings_frame(settings: dict[int, int]) -> bytes:
    body = b"".join(struct.pack(">HL", k, v) for k, v in settings.items())
    return frame_header(len(body), FrameType.SETTINGS, 0, 0) + body


def settings_ack() -> bytes:
    return frame_header(0, FrameType.SETTINGS, Flag.ACK, 0)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame_header(4, FrameType.WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment)


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame_header(4, FrameType.RST_STREAM, 0, stream_id) + _U32.pack(code)


def ping(payload: bytes, ack: bool = False) -> bytes:
    return frame_header(8, FrameType.PING, Flag.ACK if ack else 0, 0) + payload


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    body = _U32.pack(last_stream_id & 0x7FFFFFFF) + _U32.pack(code) + debug
    return frame_header(len(body), FrameType.GOAWAY, 0, 0) + body


def u32(buf: bytes | bytearray | memoryview, off: int = 0) -> int:
    value: int = _U32.unpack_from(buf, off)[0]
    return value
