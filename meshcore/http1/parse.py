"""HTTP/1.1 messages for the tunnel's small servers and its CA client, without I/O.

Only what those need: one request or response per connection (`Connection: close`; a
server may keep a connection for the next request, `keeps_alive`), bodies framed by
Content-Length (a response may also be chunked or end at EOF). Parsing
takes the bytes of a message head and returns a frozen value or raises `HttpError` with
the status a server should answer; nothing here touches a socket.

Invariants: a parsed head has a known method token, an origin-form path (percent-decoded)
and its query, lower-cased header names, and a body length that is either 0 or the one
Content-Length every copy of the header agreed on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

REASONS: dict[int, str] = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

# RFC 9110 token characters (methods and header names).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
# A field value may hold visible characters, spaces, tabs and obs-text, nothing else.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class HttpError(Exception):
    """The request cannot be served; `status` and the message are what to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str  # percent-decoded, always starts with "/"
    query: Mapping[str, str]  # the first value of each name wins (as aiohttp's .get)
    version: tuple[int, int]
    headers: Mapping[str, str] = field(default_factory=dict)  # names lower-cased
    content_length: int = 0


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: Mapping[str, str]  # names lower-cased


def parse_request_head(head: bytes) -> RequestHead:
    """A request line plus header lines, each ending in CRLF, the blank line excluded.

    Raises HttpError: 400 for anything malformed, 505 for an HTTP version other than 1.x,
    501 for a request body in a transfer coding (only Content-Length is supported)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line: expected METHOD TARGET HTTP/1.1")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "malformed request line: bad method")
    match = _VERSION.fullmatch(version)
    if match is None:
        raise HttpError(400, "malformed request line: bad HTTP version")
    if match.group(1) != b"1":
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    path, query = _parse_target(target)
    headers = _parse_headers(lines[1:])
    if "transfer-encoding" in headers:
        raise HttpError(501, "request bodies must be sent with Content-Length")
    return RequestHead(
        method=method.decode("ascii"),
        path=path,
        query=query,
        version=(int(match.group(1)), int(match.group(2))),
        headers=headers,
        content_length=_content_length(headers),
    )


def keeps_alive(head: RequestHead) -> bool:
    """Whether the client lets the connection carry another request after this one
    (RFC 9112 9.3): HTTP/1.1 unless it says `Connection: close`, HTTP/1.0 only when it
    says `Connection: keep-alive`."""
    options = {t.strip().lower() for t in head.headers.get("connection", "").split(",")}
    if head.version >= (1, 1):
        return "close" not in options
    return "keep-alive" in options


def parse_response_head(head: bytes) -> ResponseHead:
    """A status line plus header lines (the blank line excluded). Raises HttpError with
    status 0: the peer does not speak HTTP, and a client has nobody to answer."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not _VERSION.fullmatch(parts[0]) or not parts[1].isdigit():
        raise HttpError(0, f"malformed status line {lines[0][:80]!r}")
    if len(parts[1]) != 3:
        raise HttpError(0, f"malformed status code {parts[1][:80]!r}")
    try:
        headers = _parse_headers(lines[1:])
    except HttpError as e:
        raise HttpError(0, str(e)) from None
    return ResponseHead(status=int(parts[1]), headers=headers)


def content_length(headers: Mapping[str, str]) -> int | None:
    """The Content-Length of a message, None when it has none. Raises HttpError(400)."""
    if "content-length" not in headers:
        return None
    return _content_length(headers)


def format_response(
    status: int,
    body: bytes,
    content_type: str,
    extra: Mapping[str, str] | None = None,
    *,
    head_only: bool = False,
    keep_alive: bool = False,
) -> bytes:
    """A complete response that closes the connection, or with `keep_alive` one after
    which the connection waits for the next request; `head_only` for HEAD requests."""
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        # Said either way: an HTTP/1.0 client keeps a connection only when told it may.
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def format_request(
    method: str, target: str, host: str, body: bytes, headers: Mapping[str, str]
) -> bytes:
    """A complete request with a Content-Length body that asks the server to close."""
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {host}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    for name, value in headers.items():
        if _BAD_VALUE.search(value.encode("latin-1")) or not _TOKEN.fullmatch(name.encode()):
            raise ValueError(f"header {name!r} cannot be sent as given")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def decode_chunked(data: bytes) -> bytes:
    """The payload of a complete chunked body (trailers ignored). Raises HttpError(0)."""
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise HttpError(0, "truncated chunked body")
        size_field = data[pos:end].split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            raise HttpError(0, f"bad chunk size {size_field[:20]!r}") from None
        if size < 0:
            raise HttpError(0, "bad chunk size")
        if size == 0:
            return bytes(out)
        start = end + 2
        if data[start + size : start + size + 2] != b"\r\n":
            raise HttpError(0, "truncated chunked body")
        out += data[start : start + size]
        pos = start + size + 2


def _parse_target(target: bytes) -> tuple[str, dict[str, str]]:
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request target must be ASCII (percent-encode the rest)") from None
    if text.startswith(("http://", "https://")):
        # absolute-form: what a client talking to a proxy sends; servers must accept it.
        try:
            split = urlsplit(text)
        except ValueError:  # "http://[": an unclosed IPv6 literal
            raise HttpError(400, "malformed absolute-form request target") from None
        raw_path, raw_query = split.path or "/", split.query
    elif text.startswith("/"):
        raw_path, _, raw_query = text.partition("?")
        raw_query = raw_query.partition("#")[0]
    else:
        raise HttpError(400, "request target must be a path starting with /")
    try:
        path = unquote(raw_path, errors="strict")
        pairs = parse_qsl(raw_query, keep_blank_values=True, errors="strict")
    except ValueError:  # UnicodeDecodeError: a percent-escape that is not UTF-8
        raise HttpError(400, "request target is not valid percent-encoded UTF-8") from None
    query: dict[str, str] = {}
    for name, value in pairs:
        query.setdefault(name, value)
    return path, query


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            # Also refuses obs-fold (a line starting with whitespace) and "Name :".
            raise HttpError(400, f"malformed header line {line[:40]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise HttpError(400, f"control character in header {name.decode()!r}")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        if key in headers:
            # Repeated fields combine with a comma (RFC 9110 5.3); Content-Length checks them.
            headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text
    return headers


def _content_length(headers: Mapping[str, str]) -> int:
    raw = headers.get("content-length")
    if raw is None:
        return 0
    values = {v.strip() for v in raw.split(",")}
    if len(values) != 1:
        raise HttpError(400, "conflicting Content-Length headers")
    value = values.pop()
    if not value.isdigit() or not value.isascii() or len(value) > 18:
        raise HttpError(400, f"bad Content-Length {value[:20]!r}")
    return int(value)
