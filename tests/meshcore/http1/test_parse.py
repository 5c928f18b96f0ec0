"""HTTP/1.1 message heads, parsed and written without I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.http1.parse import (
    HttpError,
    decode_chunked,
    format_request,
    format_response,
    keeps_alive,
    parse_request_head,
    parse_response_head,
)


def test_request_head():
    head = parse_request_head(
        b"POST /logging?level=debug&level=info&x HTTP/1.1\r\n"
        b"Host: localhost\r\nContent-Length: 3\r\nX-A: 1\r\nx-a: 2\r\n"
    )
    assert head.method == "POST"
    assert head.path == "/logging"
    assert head.query == {"level": "debug", "x": ""}  # the first value wins, as aiohttp
    assert head.version == (1, 1)
    assert head.headers == {"host": "localhost", "content-length": "3", "x-a": "1, 2"}
    assert head.content_length == 3


@pytest.mark.parametrize(
    ("head", "kept"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n", True),  # HTTP/1.1: persistent unless told
        (b"GET / HTTP/1.1\r\nConnection: close\r\n", False),
        (b"GET / HTTP/1.1\r\nConnection: Upgrade, CLOSE\r\n", False),  # any token, any case
        (b"GET / HTTP/1.1\r\nConnection: te\r\nConnection: close\r\n", False),  # repeated
        (b"GET / HTTP/1.0\r\n", False),  # HTTP/1.0: closed unless asked
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n", True),
    ],
)
def test_keeps_alive(head, kept):
    assert keeps_alive(parse_request_head(head)) is kept


def test_repeated_equal_content_lengths_are_one():
    head = parse_request_head(b"POST / HTTP/1.0\r\nContent-Length: 4\r\nContent-Length: 4\r\n")
    assert head.content_length == 4


@pytest.mark.parametrize("target", [b"http://[", b"http://127.0.0.1:15000\x01[/stats"])
def test_an_unclosed_ipv6_literal_in_an_absolute_target_is_a_400(target):
    # Found by fuzz/targets/http1_node.py: urlsplit's ValueError escaped the parser.
    with pytest.raises(HttpError) as e:
        parse_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n")
    assert e.value.status == 400


def test_an_absolute_target_is_its_path_and_query():
    head = parse_request_head(b"GET http://127.0.0.1:15000/stats?format=json HTTP/1.1\r\n")
    assert (head.path, head.query) == ("/stats", {"format": "json"})


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_http_error(data):
    try:
        head = parse_request_head(data)
    except HttpError as e:
        status = e.status
    else:
        status = 200
        assert head.path.startswith("/")
    assert 200 <= status < 600


@given(st.binary(max_size=300))
def test_any_response_bytes_parse_or_raise_http_error(data):
    status = None
    try:
        parse_response_head(data)
    except HttpError as e:
        status = e.status
    assert status in (None, 0)


def test_response_head():
    head = parse_response_head(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n")
    assert head.status == 403
    assert head.headers == {"content-type": "application/json"}
    assert parse_response_head(b"HTTP/1.0 200").status == 200
    for bad in (b"SSH-2.0-OpenSSH", b"HTTP/1.1 2000 OK", b"HTTP/1.1 abc", b""):
        with pytest.raises(HttpError):
            parse_response_head(bad)


def test_chunked_bodies():
    assert decode_chunked(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n") == b"hello world"
    assert decode_chunked(b"0\r\n\r\n") == b""
    for bad in (b"5\r\nhel", b"zz\r\n", b"5\r\nhelloXX0\r\n\r\n", b"-1\r\n\r\n"):
        with pytest.raises(HttpError):
            decode_chunked(bad)


def test_written_messages():
    assert format_response(200, b"OK\n", "text/plain") == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\nOK\n"
    )
    assert b"\r\nConnection: keep-alive\r\n" in format_response(200, b"", "t", keep_alive=True)
    assert format_response(405, b"x", "t", {"Allow": "GET"}, head_only=True).endswith(
        b"Allow: GET\r\n\r\n"
    )
    req = format_request("POST", "/v1/certificates", "ca", b"{}", {"Authorization": "Bearer t"})
    head = parse_request_head(req.split(b"\r\n\r\n")[0])
    assert (head.method, head.path, head.content_length) == ("POST", "/v1/certificates", 2)
    assert head.headers["authorization"] == "Bearer t"
    # A header value that would smuggle another header is refused, not sent.
    with pytest.raises(ValueError, match="cannot be sent"):
        format_request("POST", "/", "ca", b"", {"Authorization": "Bearer t\r\nX: y"})
