"""The sans-IO HTTP/1.1 layer: request heads, body transcripts fed in every split, the
response framing decision, written heads, and `h11` as an independent oracle.

The oracle property: we never accept a request that h11 rejects, and a request both accept
parses to the same method, target, fields and body. Deliberate differences (we refuse,
h11 accepts), each because two parsers reading one message differently is how requests
get smuggled past a proxy:
- obsolete line folding (h11 joins the lines): RFC 9112 5.2 lets a server reject it;
- bare LF line endings (h11 accepts `\\n`): RFC 9112 2.2 allows rejecting them;
- whitespace before CRLF after a chunk size, and chunk extensions that are not
  `;token[=token|quoted]` (h11 reads `;.*`); extension bytes beyond a budget;
- HTTP versions other than 1.0 and 1.1 (h11 passes `HTTP/2.0` as a version): 505;
- `Transfer-Encoding` in an HTTP/1.0 request; a Host with characters no host has;
- Expect values other than 100-continue (417); CONNECT (405: not served over HTTP/1.1);
- a Content-Length list, even of equal values ("3, 3"): llhttp refuses it.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from waypoint.http import h1
from waypoint.http.h1 import (
    BodyReader,
    Data,
    EndOfMessage,
    Framing,
    Http1Limits,
    ProtocolError,
    RequestParser,
    parse_request_head,
    parse_response_head,
    response_framing,
)

# --- Request heads ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expect"),
    [
        (b"GET / HTTP/1.1\r\nHost: svc", ("GET", "svc", "/", Framing.NONE, True)),
        (b"GET /a?b=1 HTTP/1.0", ("GET", "", "/a?b=1", Framing.NONE, False)),
        (
            b"POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 3",
            ("POST", "svc", "/x", Framing.LENGTH, True),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked",
            ("POST", "a", "/", Framing.CHUNKED, True),
        ),
        (
            b"GET http://svc.ns:8080/p HTTP/1.1\r\nHost: other",
            ("GET", "svc.ns:8080", "/p", Framing.NONE, True),
        ),
        (b"OPTIONS * HTTP/1.1\r\nHost: a", ("OPTIONS", "a", "*", Framing.NONE, True)),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive, CLOSE",
            ("GET", "a", "/", Framing.NONE, False),
        ),
        (
            b"GET / HTTP/1.0\r\nConnection: keep-alive",
            ("GET", "", "/", Framing.NONE, True),
        ),
    ],
    ids=[
        "minimal-http11",
        "http10-without-host",
        "content-length",
        "chunked-any-case",
        "absolute-form-wins-over-host",
        "asterisk-form",
        "connection-close-any-case",
        "http10-keep-alive",
    ],
)
def test_request_heads(head: bytes, expect: tuple[str, str, str, Framing, bool]) -> None:
    parsed = parse_request_head(head)
    assert (
        parsed.method,
        parsed.authority,
        parsed.path,
        parsed.framing,
        parsed.keep_alive,
    ) == expect


def test_a_content_length_list_is_refused_even_when_equal() -> None:
    # RFC 9110 8.6 allows "3, 3"; llhttp refuses it, and so do we (h11 accepts it).
    with pytest.raises(ProtocolError):
        parse_request_head(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3")


def test_upgrade_and_expect_are_read_and_consumed() -> None:
    parsed = parse_request_head(
        b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: k\r\nX-A: 1"
    )
    assert parsed.upgrade == "websocket"
    assert parsed.headers == [("sec-websocket-key", "k"), ("x-a", "1")]
    put = parse_request_head(
        b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nExpect: 100-Continue"
    )
    assert put.expect_continue
    assert ("expect", "100-Continue") not in put.headers
    # Without Connection: upgrade the Upgrade field is a hop-by-hop field, nothing more.
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket").upgrade is None


# --- Body transcripts ---------------------------------------------------------------------


def feed_all(framing: Framing, length: int | None, wire: bytes, step: int) -> list[object]:
    """Feed `wire` `step` bytes at a time; the events in order (Data merged)."""
    reader = BodyReader(framing, length, Http1Limits())
    buf = bytearray()
    events: list[object] = []
    data = b""
    for i in range(0, len(wire) + 1, step):
        buf += wire[i : i + step]
        while (event := reader.next(buf)) is not None:
            if isinstance(event, Data):
                data += event.data
            else:
                events.append(data)
                events.append(event)
                events.append(bytes(buf) + wire[i + step :])  # what was not fed yet
                return events
    raise AssertionError(f"body incomplete: {data!r}")


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize(
    ("framing", "length", "wire", "data", "trailers", "rest"),
    [
        (Framing.LENGTH, 5, b"helloNEXT", b"hello", [], b"NEXT"),
        (Framing.CHUNKED, None, b"5\r\nhello\r\n0\r\n\r\nNEXT", b"hello", [], b"NEXT"),
        (
            Framing.CHUNKED,
            None,
            b'2;a=b;c="d e"\r\nhe\r\n3\r\nllo\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\n',
            b"hello",
            [("x-t", "1"), ("x-u", "2")],
            b"",
        ),
        (Framing.CHUNKED, None, b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789", [], b""),
    ],
    ids=["content-length", "chunked", "chunked-extensions-trailers", "chunked-hex-size"],
)
def test_body_transcripts(
    framing: Framing,
    length: int | None,
    wire: bytes,
    data: bytes,
    trailers: list[tuple[str, str]],
    rest: bytes,
    step: int,
) -> None:
    got_data, end, got_rest = feed_all(framing, length, wire, step)
    assert got_data == data
    assert isinstance(end, EndOfMessage)
    assert end.trailers == trailers
    # What follows the body stays for the next request (pipelining), however it was split.
    assert got_rest == rest


def test_parser_transcript_pipelined_then_upgrade_leftover() -> None:
    parser = RequestParser()
    parser.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /ws HTTP/1.1\r\nHost: a\r\n")
    first = parser.next_head()
    assert first is not None and first.path == "/1"
    assert isinstance(parser.next_body(), EndOfMessage)
    parser.next_request()
    assert parser.next_head() is None  # the second head is not complete yet
    assert parser.head_started
    parser.feed(b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello")
    second = parser.next_head()
    assert second is not None and second.upgrade == "websocket"
    assert isinstance(parser.next_body(), EndOfMessage)
    assert parser.leftover() == b"\x81\x05hello"


def test_eof_inside_a_body_is_an_error() -> None:
    reader = BodyReader(Framing.LENGTH, 10, Http1Limits())
    buf = bytearray(b"abc")
    assert reader.next(buf) == Data(b"abc")
    with pytest.raises(ProtocolError):
        reader.next(buf, eof=True)


# --- Responses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "framing", "close"),
    [
        ({}, Framing.LENGTH, False),
        ({"body_length": None}, Framing.CHUNKED, False),
        ({"body_length": None, "version": (1, 0)}, Framing.CLOSE, True),
        ({"method": "HEAD"}, Framing.NONE, False),
        ({"status": 204}, Framing.NONE, False),
        ({"status": 304}, Framing.NONE, False),
        ({"keep_alive": False}, Framing.LENGTH, True),
        ({"draining": True}, Framing.LENGTH, True),
        ({"request_complete": False}, Framing.LENGTH, True),
    ],
    ids=[
        "known-length",
        "unknown-length-chunked",
        "http10-unknown-length-closes",
        "head",
        "no-content",
        "not-modified",
        "client-asked-close",
        "draining",
        "request-body-unread",
    ],
)
def test_response_framing(kw: dict[str, object], framing: Framing, close: bool) -> None:
    args: dict[str, object] = {
        "method": "GET",
        "version": (1, 1),
        "status": 200,
        "body_length": 5,
        "keep_alive": True,
        "request_complete": True,
        "draining": False,
    }
    args.update(kw)
    assert response_framing(**args) == h1.ResponseFraming(framing, close)  # type: ignore[arg-type]


def test_response_head_replaces_framing_and_hop_by_hop_fields() -> None:
    head = h1.response_head(
        200,
        [("content-length", "99"), ("transfer-encoding", "chunked"), ("x-a", "1")],
        Framing.LENGTH,
        5,
        close=True,
    )
    assert head == (b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\nconnection: close\r\n\r\n")
    with pytest.raises(ValueError, match="cannot be written"):
        h1.response_head(200, [("x-a", "1\r\nInjected: yes")], Framing.NONE, None, close=False)


@pytest.mark.parametrize(
    ("head", "method", "framing", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3", "GET", Framing.LENGTH, True),
        (b"HTTP/1.1 200 OK", "GET", Framing.CLOSE, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3", "HEAD", Framing.NONE, True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 3", "GET", Framing.NONE, True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3", "GET", Framing.LENGTH, False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", "GET", Framing.CHUNKED, True),
    ],
    ids=["length", "close-delimited", "head", "not-modified", "http10", "chunked"],
)
def test_response_heads(head: bytes, method: str, framing: Framing, keep_alive: bool) -> None:
    parsed = parse_response_head(head, method)
    assert (parsed.framing, parsed.keep_alive) == (framing, keep_alive)


# --- h11 as the oracle ----------------------------------------------------------------------

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"}


def ours(raw: bytes) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
    """Our reading of one complete request in `raw` (then EOF), or None if refused."""
    parser = RequestParser(Http1Limits())
    parser.feed(raw)
    parser.feed(b"")
    try:
        head = parser.next_head()
        if head is None:
            return None
        body = b""
        while True:
            event = parser.next_body()
            if event is None:
                return None
            if isinstance(event, EndOfMessage):
                break
            body += event.data
    except ProtocolError:
        return None
    return head.method, head.target, head.headers, body


def theirs(raw: bytes) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
    """h11's reading of the same, or None if it refuses or finds no complete request."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=70 * 1024)
    conn.receive_data(raw)
    conn.receive_data(b"")
    try:
        request = conn.next_event()
        if not isinstance(request, h11.Request):
            return None
        body = b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                break
            else:
                return None
    except h11.RemoteProtocolError:
        return None
    named = {
        t.strip().lower()
        for k, v in request.headers
        if k == b"connection"
        for t in v.decode("latin-1").split(",")
    }
    headers = [
        (k.decode(), v.decode("latin-1"))
        for k, v in request.headers
        if k.decode() not in HOP
        and k.decode() not in named
        and k != b"expect"
        and not (k == b"te" and v.lower() != b"trailers")
    ]
    headers = [(k, "trailers" if k == "te" else v) for k, v in headers]
    return request.method.decode(), request.target.decode("latin-1"), headers, body


def check_against_h11(raw: bytes) -> None:
    mine, h11s = ours(raw), theirs(raw)
    if mine is None:
        return  # refusing is always allowed (the differences are listed above)
    assert h11s is not None, f"we accepted what h11 refuses: {raw!r}"
    assert mine == h11s


HAND_PICKED = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A:   spaced   value  \r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: \x80\xff obs-text\r\n\r\n",
    b"GET http://x/y HTTP/1.1\r\nHost: z\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\nx",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-priv\r\nX-Priv: 1\r\nTE: trailers\r\n\r\n",
]


@pytest.mark.parametrize("raw", HAND_PICKED, ids=[f"case{i}" for i in range(len(HAND_PICKED))])
def test_hand_picked_requests_against_h11(raw: bytes) -> None:
    check_against_h11(raw)


_names = st.sampled_from(
    [
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Expect",
        "TE",
        "X-A",
        "x-b",
        "Upgrade",
        "Keep-Alive",
        "Bad Name",
        "X:Y",
        "",
        "Ü",
    ]
)
_values = st.one_of(
    st.sampled_from(
        [
            "a",
            "5",
            "0",
            "5, 5",
            "5, 6",
            "-1",
            "chunked",
            "gzip, chunked",
            "chunked, identity",
            "close",
            "keep-alive",
            "upgrade",
            "100-continue",
            "trailers",
            "x-a",
            " ",
            "",
            "a\rb",
            "a\nb",
            "a\x00b",
            "\x80",
            "a  b",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=12),
)
_header = st.tuples(_names, st.sampled_from([": ", ":", " : ", ":\t"]), _values)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "X-Y", "G T"]))
    target = draw(st.sampled_from(["/", "/a?b=c", "http://h:1/x", "*", "a", "/\x7f", "/é"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "http/1.1"]))
    eol = draw(st.sampled_from(["\r\n"] * 8 + ["\n", "\r"]))
    headers = draw(st.lists(_header, max_size=6))
    if draw(st.booleans()):
        headers.insert(0, ("Host", ": ", "svc"))
    lines = [f"{method} {target} {version}"] + [f"{n}{sep}{v}" for n, sep, v in headers]
    head = (eol.join(lines) + eol + eol).encode("latin-1")
    body = draw(
        st.sampled_from(
            [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"3;x=y\r\nabc\r\n0\r\n\r\n"]
        )
    )
    return head + body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
@example(b"GET / HTTP/1.1\r\nHost: svc\r\nContent-Length: 0\r\n\r\n")
def test_generated_requests_against_h11(raw: bytes) -> None:
    check_against_h11(raw)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_and_never_beat_h11(raw: bytes) -> None:
    check_against_h11(b"POST / HTTP/1.1\r\nHost: a\r\n" + raw)


def test_the_oracle_compares_accepted_requests() -> None:
    """Guard against a vacuous oracle: these are accepted by both and compared."""
    accepted = [raw for raw in HAND_PICKED if ours(raw) is not None]
    assert len(accepted) >= 8
    assert all(theirs(raw) == ours(raw) for raw in accepted)
    assert ours(HAND_PICKED[3]) == ("POST", "/p", [], b"hello")


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    st.lists(st.tuples(st.sampled_from(["x-a", "grpc-status"]), st.sampled_from(["0", "v w"]))),
    st.integers(min_value=1, max_value=13),
)
def test_chunked_round_trip_in_any_split(
    parts: list[bytes], trailers: list[tuple[str, str]], step: int
) -> None:
    """What `chunk`/`last_chunk` write, `BodyReader` reads back, however it arrives."""
    wire = b"".join(h1.chunk(p) for p in parts) + h1.last_chunk(trailers) + b"NEXT"
    data, end, rest = feed_all(Framing.CHUNKED, None, wire, step)
    assert data == b"".join(parts)
    assert isinstance(end, EndOfMessage)
    assert end.trailers == trailers
    assert rest == b"NEXT"
