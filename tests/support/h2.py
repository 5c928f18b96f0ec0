"""HTTP/2 for tests of the sans-IO connection (meshcore.hbone.conn): CONNECT requests,
frames written by hand, and one established CONNECT stream between our connection and the
`h2` library (a different HTTP/2 stack, so what is tested is conformance, not agreement of
our code with itself).

Frames the hot path encodes (SETTINGS, WINDOW_UPDATE, RST_STREAM, PING, GOAWAY) come from
`meshcore.hbone.h2frames`; DATA and HEADERS, which a test may need malformed or after the
`h2` library refuses to send them, are built here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import hpack

from meshcore.hbone.conn import H2Connection, Headers, error_name
from meshcore.hbone.h2frames import Flag, FrameType, frame_header, parse_header

STATUS_OK = [(":status", "200")]


def connect_request(authority: str = "10.0.0.2:8080") -> Headers:
    """The request headers of an HBONE CONNECT to `authority`."""
    return [(":method", "CONNECT"), (":authority", authority)]


CONNECT = connect_request()


def data_frame(stream_id: int, payload: bytes = b"", end_stream: bool = False) -> bytes:
    flags = Flag.END_STREAM if end_stream else 0
    return frame_header(len(payload), FrameType.DATA, flags, stream_id) + payload


def headers_frame(
    stream_id: int, headers: Headers | bytes, end_stream: bool = False, end_headers: bool = True
) -> bytes:
    """A HEADERS frame; `headers` as pairs (HPACK-encoded here, with a fresh table) or as
    a raw header block (to send a malformed one)."""
    block = headers if isinstance(headers, bytes) else hpack.Encoder().encode(headers)
    flags = (Flag.END_STREAM if end_stream else 0) | (Flag.END_HEADERS if end_headers else 0)
    return frame_header(len(block), FrameType.HEADERS, flags, stream_id) + block


@dataclass(frozen=True)
class Goaway:
    code: int
    debug: str

    @property
    def name(self) -> str:
        return error_name(self.code)


class Frames:
    """What a server sent on one connection, parsed as it arrives (`feed`), for a client
    written by hand: the GOAWAY, each stream's status or reset, PING ACKs, DATA bytes."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._decoder = hpack.Decoder()
        self.goaways: list[Goaway] = []  # a graceful one may be followed by another
        self.status: dict[int, int] = {}  # stream -> :status of its response
        self.resets: dict[int, int] = {}  # stream -> RST_STREAM code
        self.ping_acks = 0
        self.settings = 0
        self.data = 0

    @property
    def goaway(self) -> Goaway | None:
        """The first GOAWAY: why the server ended (or began to end) the connection."""
        return self.goaways[0] if self.goaways else None

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        off = 0
        while len(buf) - off >= 9:
            length, ftype, flags, sid = parse_header(buf, off)
            if len(buf) - off - 9 < length:
                break
            payload = bytes(buf[off + 9 : off + 9 + length])
            off += 9 + length
            self._frame(ftype, flags, sid, payload)
        del buf[:off]

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype == FrameType.GOAWAY:
            code = struct.unpack(">L", payload[4:8])[0]
            self.goaways.append(Goaway(code, payload[8:].decode("latin-1")))
        elif ftype == FrameType.HEADERS:
            raw = self._decoder.decode(payload, raw=True)
            headers = {bytes(k).decode(): bytes(v).decode() for k, v in raw}
            self.status[sid] = int(headers.get(":status", "0"))
        elif ftype == FrameType.RST_STREAM:
            self.resets[sid] = struct.unpack(">L", payload)[0]
        elif ftype == FrameType.PING and flags & Flag.ACK:
            self.ping_acks += 1
        elif ftype == FrameType.SETTINGS and not flags & Flag.ACK:
            self.settings += 1
        elif ftype == FrameType.DATA:
            self.data += len(payload)


class Recorder:
    """A connection handler that records what the connection told it."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, Headers]] = []
        self.terminated: list[tuple[int, str]] = []
        self.pings: list[bytes] = []

    def on_request(self, stream_id: int, headers: Headers) -> None:
        self.requests.append((stream_id, headers))

    def on_terminated(self, code: int, reason: str) -> None:
        self.terminated.append((code, reason))

    def on_ping_ack(self, payload: bytes) -> None:
        self.pings.append(payload)


class StreamRec:
    """A stream handler that records what arrived; it returns receive credit at once
    unless `auto_ack` is off (then the test acks, as a slow app would)."""

    def __init__(self, conn: H2Connection | None = None, auto_ack: bool = True) -> None:
        self.conn = conn
        self.sid = 0
        self.auto_ack = auto_ack
        self.data = bytearray()
        self.ended = False
        self.reset: int | None = None
        self.response: tuple[int, Headers] | None = None
        self.ready = 0

    def on_response(self, status: int, headers: Headers) -> None:
        self.response = (status, headers)

    def on_data(self, data: memoryview) -> None:
        self.data += data
        if self.auto_ack and self.conn is not None:
            self.conn.ack(self.sid, len(data))

    def on_end(self) -> None:
        self.ended = True

    def on_reset(self, code: int) -> None:
        self.reset = code

    def on_send_ready(self) -> None:
        self.ready += 1


def h2_client() -> h2.connection.H2Connection:
    """The `h2` library as a client, its preface and SETTINGS queued."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    return c


def h2_server() -> h2.connection.H2Connection:
    """The `h2` library as a server (not yet initiated)."""
    return h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))


def pump_to_ours(theirs: h2.connection.H2Connection, ours: H2Connection) -> None:
    data = theirs.data_to_send()
    if data:
        ours.receive(data)


def pump_to_theirs(ours: H2Connection, theirs: h2.connection.H2Connection) -> list[h2.events.Event]:
    out = taken(ours)
    return theirs.receive_data(out) if out else []


def taken(ours: H2Connection) -> bytes:
    """Everything our connection has queued to send, as one byte string."""
    return b"".join(bytes(x) for x in ours.take_output())


class ServedStream:
    """Our server with one CONNECT stream from an `h2` client, answered 200: settings
    exchanged both ways, nothing else sent yet."""

    def __init__(self, auto_ack: bool = True, request: Headers = CONNECT) -> None:
        self.handler = Recorder()
        self.server = H2Connection(client=False, handler=self.handler)
        self.server.initiate()
        self.client = h2_client()
        pump_to_ours(self.client, self.server)
        pump_to_theirs(self.server, self.client)
        self.stream = self.open(1, auto_ack, request)

    def open(self, sid: int, auto_ack: bool = True, request: Headers = CONNECT) -> StreamRec:
        """Another stream on the connection, requested by the client and answered 200."""
        self.client.send_headers(sid, request)
        pump_to_ours(self.client, self.server)
        stream = StreamRec(self.server, auto_ack=auto_ack)
        stream.sid = sid
        self.server.respond(sid, 200, stream, end=False)
        pump_to_theirs(self.server, self.client)
        return stream


def our_client_stream(server: h2.connection.H2Connection) -> tuple[H2Connection, StreamRec]:
    """Our client with one CONNECT stream to an `h2` server, answered 200."""
    server.initiate_connection()
    ours = H2Connection(client=True, handler=Recorder())
    ours.initiate()
    pump_to_theirs(ours, server)
    pump_to_ours(server, ours)
    stream = StreamRec(ours)
    stream.sid = ours.open_stream(CONNECT, stream)
    pump_to_theirs(ours, server)
    server.send_headers(stream.sid, STATUS_OK)
    pump_to_ours(server, ours)
    return ours, stream
