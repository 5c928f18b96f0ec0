"""The small HTTP/1.1 parser (meshcore.http1.parse) of the tunnel's admin, metrics and
readiness ports, of the control plane's admission webhook and of the tunnel's CA client: a
request head (and whether it keeps the connection), a response head, a chunked body.

The input is cut at its first blank line: the head (as the server's `readuntil` hands it
over) and the rest (a body). Contract: raises HttpError and nothing else.
"""

from __future__ import annotations

import contextlib

from meshcore.http1.parse import (
    HttpError,
    content_length,
    decode_chunked,
    format_request,
    format_response,
    keeps_alive,
    parse_request_head,
    parse_response_head,
)


def test_one_input(data: bytes) -> None:
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        request = parse_request_head(head)
    except HttpError:
        pass
    else:
        assert request.path.startswith("/") and request.content_length >= 0
        keeps_alive(request)  # whether a kept connection may carry the next request
    try:
        response = parse_response_head(head)
        content_length(response.headers)
    except HttpError:
        pass
    else:
        assert 0 <= response.status <= 999
    with contextlib.suppress(HttpError):
        decode_chunked(body)


def seeds() -> dict[str, bytes]:
    return {
        "get": format_request("GET", "/config_dump?x=1", "127.0.0.1:15000", b"", {}),
        "post": format_request(
            "POST", "/logging?level=debug", "localhost", b"{}", {"content-type": "application/json"}
        ),
        # absolute-form, as a client talking to a proxy sends it
        "absolute": b"GET http://127.0.0.1:15000/stats?format=json HTTP/1.1\r\nHost: x\r\n\r\n",
        "response": format_response(200, b'{"ok": true}', "application/json"),
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n0\r\n\r\n",
    }
