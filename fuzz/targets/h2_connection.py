"""The sans-IO HTTP/2 connection (meshcore.hbone.conn) fed a peer's bytes.

Contract: `receive()` never raises; a bad peer ends its connection with GOAWAY. The first
input byte picks the side (bit 0: server or client) and how the rest is cut into reads
(so that frames split across reads are covered); the connection's owner behaves as the
tunnel does (answers every CONNECT with 200, acks the bytes it is given, echoes a little).
"""

from __future__ import annotations

from meshcore.hbone.conn import H2Connection, Headers
from meshcore.hbone.h2frames import ErrorCode

CONNECT: Headers = [(":method", "CONNECT"), (":authority", "10.0.0.2:8080")]


class _Stream:
    def __init__(self, conn: H2Connection) -> None:
        self.conn = conn
        self.sid = 0

    def on_response(self, status: int, headers: Headers) -> None:
        self.conn.send_data(self.sid, b"hello")

    def on_data(self, data: memoryview) -> None:
        self.conn.ack(self.sid, len(data))
        self.conn.send_data(self.sid, bytes(data[:64]))

    def on_end(self) -> None:
        self.conn.end_stream(self.sid)

    def on_reset(self, code: int) -> None:
        pass

    def on_send_ready(self) -> None:
        pass


class _Owner:
    def __init__(self) -> None:
        self.conn: H2Connection | None = None

    def on_request(self, stream_id: int, headers: Headers) -> None:
        assert self.conn is not None
        stream = _Stream(self.conn)
        stream.sid = stream_id
        if stream_id % 4 == 3:
            self.conn.respond(stream_id, 503, None, end=True)
            self.conn.reset(stream_id, ErrorCode.NO_ERROR)
        else:
            self.conn.respond(stream_id, 200, stream, end=False)

    def on_terminated(self, code: int, reason: str) -> None:
        pass

    def on_ping_ack(self, payload: bytes) -> None:
        pass


def test_one_input(data: bytes) -> None:
    if not data:
        return
    client = bool(data[0] & 1)
    step = 1 + (data[0] >> 1) * 8
    owner = _Owner()
    conn = H2Connection(client=client, handler=owner)
    owner.conn = conn
    conn.initiate()
    if client:
        stream = _Stream(conn)
        stream.sid = conn.open_stream(CONNECT, stream)
    body = data[1:]
    for off in range(0, len(body), step):
        conn.receive(body[off : off + step])
        conn.take_output()
        conn.peer_caught_up()
        if conn.closed:
            break
    # What a peer may cost is bounded, whatever it sent.
    assert conn.open_streams <= conn.limits.max_concurrent_streams + (1 if client else 0)
    assert conn.buffered >= 0


def _client_bytes() -> bytes:
    """A tunnel client's opening: preface, SETTINGS, a CONNECT and some data."""
    owner = _Owner()
    conn = H2Connection(client=True, handler=owner)
    owner.conn = conn
    conn.initiate()
    stream = _Stream(conn)
    stream.sid = conn.open_stream(CONNECT, stream)
    conn.send_data(stream.sid, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.send_ping(b"12345678")
    second = _Stream(conn)
    second.sid = conn.open_stream([*CONNECT, ("baggage", "k=v")], second)
    conn.end_stream(stream.sid)
    conn.reset(second.sid)
    return b"".join(bytes(b) for b in conn.take_output())


def _server_bytes(client_opening: bytes) -> bytes:
    """A tunnel server's answer to that opening."""
    owner = _Owner()
    conn = H2Connection(client=False, handler=owner)
    owner.conn = conn
    conn.initiate()
    conn.receive(client_opening)
    return b"".join(bytes(b) for b in conn.take_output())


def seeds() -> dict[str, bytes]:
    opening = _client_bytes()
    return {
        "server-opening": b"\x00" + opening,
        "server-opening-split": b"\x02" + opening,
        "client-answer": b"\x01" + _server_bytes(opening),
    }
