"""The waypoint's HTTP/2 server side (waypoint.http.h2base over the `h2` library): a
client's bytes into a connection configured as the waypoint's, and each request's
headers read as `H2Server._on_request` reads them.

The first input byte picks how the rest is cut into reads. Contract: `receive_data`
raises h2's ProtocolError and nothing else (the server's loop ends the connection on it);
reading a request's headers never raises.
"""

from __future__ import annotations

import h2.events
import h2.exceptions

from waypoint.http.h2base import (
    Http2Limits,
    content_length,
    decoded,
    new_connection,
    split_pseudo,
)

LIMITS = Http2Limits()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    step = 1 + data[0] * 4
    conn = new_connection(False, LIMITS)
    conn.initiate_connection()
    body = data[1:]
    try:
        for off in range(0, len(body), step):
            for event in conn.receive_data(body[off : off + step]):
                if isinstance(event, h2.events.RequestReceived):
                    _, headers = split_pseudo(decoded(event.headers))
                    length = content_length(headers)
                    assert length is None or length >= 0
                elif isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            conn.data_to_send()
    except h2.exceptions.ProtocolError:
        pass


def _client_bytes() -> bytes:
    """The waypoint's own client connection: a GET and a POST with a body and trailers."""
    conn = new_connection(True, LIMITS)
    conn.initiate_connection()
    base = [(":scheme", "http"), (":authority", "flights.travel:80")]
    conn.send_headers(1, [(":method", "GET"), (":path", "/api?x=1"), *base], end_stream=True)
    post = [(":method", "POST"), (":path", "/book"), *base, ("content-length", "5")]
    conn.send_headers(3, post)
    conn.send_data(3, b"hello")
    conn.send_headers(3, [("x-checksum", "1")], end_stream=True)
    conn.ping(b"12345678")
    return conn.data_to_send()


def seeds() -> dict[str, bytes]:
    opening = _client_bytes()
    return {"requests": b"\xff" + opening, "requests-split": b"\x02" + opening}
