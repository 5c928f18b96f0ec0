"""One HTTP/1.1 request over a unix socket: what the tunnel needs to ask its local CA.

A connection per request (`Connection: close`), a Content-Length body out, and an answer
framed by Content-Length, chunked, or the end of the connection. The answer is bounded by
`max_response` bytes; the caller bounds the time (`asyncio.timeout`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from meshcore.http1.parse import (
    HttpError,
    content_length,
    decode_chunked,
    format_request,
    parse_response_head,
)

MAX_RESPONSE = 1024 * 1024
_MAX_HEAD = 64 * 1024


class ProtocolError(Exception):
    """The peer answered, but not with a well-formed HTTP response within the limits."""


async def post_unix(
    socket_path: str,
    target: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    host: str = "localhost",
    max_response: int = MAX_RESPONSE,
) -> tuple[int, bytes]:
    """POST `body` to `target` on the server at `socket_path`; returns (status, body).

    Raises OSError when the socket cannot be reached or the connection breaks, and
    ProtocolError when the answer is not HTTP or is larger than `max_response`."""
    reader, writer = await asyncio.open_unix_connection(socket_path, limit=_MAX_HEAD)
    try:
        writer.write(format_request("POST", target, host, body, headers))
        await writer.drain()
        return await _read_response(reader, max_response)
    finally:
        writer.close()


async def _read_response(reader: asyncio.StreamReader, max_response: int) -> tuple[int, bytes]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"response head longer than {_MAX_HEAD} bytes") from None
    except asyncio.IncompleteReadError as e:
        what = "an incomplete response head" if e.partial else "no response"
        raise ProtocolError(f"the server closed the connection with {what}") from None
    try:
        head = parse_response_head(raw[:-4])
        length = content_length(head.headers)
    except HttpError as e:
        raise ProtocolError(str(e)) from None
    if length is not None:
        if length > max_response:
            raise ProtocolError(f"response body of {length} bytes exceeds {max_response}")
        try:
            return head.status, await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ProtocolError("response body shorter than its Content-Length") from None
    # No length: the body runs to the end of the connection (we asked it to close).
    data = await _read_to_eof(reader, max_response)
    if "chunked" in head.headers.get("transfer-encoding", "").lower():
        try:
            data = decode_chunked(data)
        except HttpError as e:
            raise ProtocolError(str(e)) from None
    return head.status, data


async def _read_to_eof(reader: asyncio.StreamReader, limit: int) -> bytes:
    data = bytearray()
    while chunk := await reader.read(65536):
        data += chunk
        if len(data) > limit:
            # A chunked body carries framing too; the bound is on what arrives.
            raise ProtocolError(f"response larger than {limit} bytes")
    return bytes(data)
