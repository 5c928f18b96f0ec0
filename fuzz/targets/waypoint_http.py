"""The waypoint's HTTP/1.1 parsing (waypoint.http.h1, with llhttp beside it) and its
protocol sniffing (waypoint.http.sniff).

The first input byte picks the side (bit 0: a client's requests, or an upstream's
response) and how the rest is cut into reads. A client's bytes go through the server
connection's `RequestParser` as the waypoint drives it: heads, body events, pipelined
requests, the end of the connection. Contract: ProtocolError and nothing else, and the
parser makes progress (every step consumes bytes or waits for more: no hang).
"""

from __future__ import annotations

from waypoint.http.h1 import DEFAULT_LIMITS as LIMITS
from waypoint.http.h1 import (
    BodyReader,
    Data,
    EndOfMessage,
    Framing,
    ProtocolError,
    RequestHead,
    RequestParser,
    chunk,
    last_chunk,
    parse_response_head,
    request_head,
    response_head,
    take_head,
)
from waypoint.http.sniff import classify


class _Switched(Exception):
    """The connection left HTTP/1.1 (an Upgrade or a CONNECT): its parser is done."""


def _drain(parser: RequestParser, current: list[RequestHead], budget: list[int]) -> None:
    """Take every event the buffered bytes make; `budget` bounds the steps (a parser that
    returns events without consuming bytes would loop here forever)."""
    while True:
        budget[0] -= 1
        assert budget[0] > 0, "the parser does not make progress"
        if not current:
            head = parser.next_head()
            if head is None:
                return
            if head.upgrade is not None or head.method == "CONNECT":
                parser.leftover()  # past here the bytes are another protocol's
                raise _Switched
            current.append(head)
        event = parser.next_body()
        if event is None:
            return
        if isinstance(event, EndOfMessage):
            current.clear()
            parser.next_request()


def _requests(body: bytes, step: int) -> None:
    parser = RequestParser(LIMITS)
    current: list[RequestHead] = []
    budget = [4 * len(body) + 64]
    try:
        for off in range(0, len(body), step):
            parser.feed(body[off : off + step])
            _drain(parser, current, budget)
        parser.feed(b"")
        _drain(parser, current, budget)
    except _Switched:
        pass


def _response(body: bytes) -> None:
    buf = bytearray(body)
    head = take_head(buf, LIMITS)
    if head is None:
        return
    parsed = parse_response_head(head, "GET", LIMITS)
    reader = BodyReader(parsed.framing, parsed.length, LIMITS)
    for _ in range(4 * len(body) + 64):
        event = reader.next(buf, eof=True)
        assert isinstance(event, Data | EndOfMessage)
        if isinstance(event, EndOfMessage):
            return
    raise AssertionError("the body reader does not make progress")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    classify(data[1:25])
    step = 1 + (data[0] >> 1) * 4
    try:
        if data[0] & 1:
            _response(data[1:])
        else:
            _requests(data[1:], step)
    except ProtocolError:
        pass


def seeds() -> dict[str, bytes]:
    get = request_head("GET", "flights:80", "/api/v1?x=1", [("x-user", "a")], Framing.NONE, None)
    post = request_head("POST", "flights:80", "/book", [], Framing.CHUNKED, None)
    post += chunk(b'{"seat": "12A"}') + last_chunk([("x-checksum", "1")])
    put = request_head("PUT", "10.96.0.11:80", "/x", [], Framing.LENGTH, 3) + b"abc"
    upgrade = request_head("GET", "ws:80", "/chat", [], Framing.NONE, None, upgrade="websocket")
    ok = (
        response_head(200, [("content-type", "text/plain")], Framing.LENGTH, 5, close=False)
        + b"hello"
    )
    chunked = (
        response_head(200, [], Framing.CHUNKED, None, close=False) + chunk(b"hi") + last_chunk([])
    )
    return {
        "pipelined": b"\x00" + get + post + put,
        "pipelined-split": b"\x0e" + get + post,
        "upgrade": b"\x00" + upgrade,
        "response": b"\x01" + ok,
        "response-chunked": b"\x01" + chunked,
    }
