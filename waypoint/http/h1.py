"""HTTP/1.1 on the wire, without I/O: request and response heads, body framing, and what a
response's framing must be.

The shells (`h1server`, `h1client`) feed bytes in and pull events out; nothing here touches
a socket or the loop, so every rule below is tested on transcripts of bytes.

Invariants:
- A head is accepted only if both our byte-level checks and llhttp (`httptools`, strict
  mode) accept it. Our checks exist because request smuggling lives in the gaps between
  parsers: anything two parsers might read differently (a bare CR or LF, obsolete line
  folding, whitespace before a colon, two Content-Lengths, Content-Length beside
  Transfer-Encoding, a coding list not ending in one `chunked`) is refused with 400 and the
  connection is closed, never guessed at.
- A body is framed by exactly one of: nothing, one Content-Length, or chunked; chunked is
  decoded here (strict: hex size of at most 16 digits, bounded extensions, CRLF after each
  chunk, a bounded trailer section).
- Hop-by-hop fields never reach a `Request`/`Response`: `Connection`, the fields it names,
  `Keep-Alive`, `Transfer-Encoding`, `Upgrade`, `Proxy-Connection`, and `TE` unless it is
  `trailers`. `Host` becomes `Request.authority`. Content-Length stays as information, but
  writers frame by `Body.length`, so a filter that replaces a body cannot break framing.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from waypoint.http.message import HOP_BY_HOP, Headers

REASONS: dict[int, str] = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    421: "Misdirected Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True, slots=True)
class Http1Limits:
    """What one HTTP/1.1 connection may cost; every field a named, documented setting.

    Defaults follow Envoy (`max_request_headers_kb` 60, `max_headers_count` 100) and nginx
    (`client_header_timeout` 60 s is generous; 10 s still lets a slow phone send a head).
    """

    max_head_bytes: int = 60 * 1024  # request line + header lines (431 past it)
    max_headers: int = 100  # header (and trailer) fields per message (431)
    max_line_bytes: int = 16 * 1024  # one request line (414) or header line (431)
    max_body_bytes: int | None = None  # None: streamed, unbounded (413 past it)
    max_chunk_ext_bytes: int = 4096  # chunk extensions per body: ignored, but they cost CPU
    idle_timeout: float = 60.0  # keep-alive: waiting for the first byte of the next request
    head_timeout: float = 10.0  # first byte to end of head (slow-loris: 408)
    body_timeout: float = 60.0  # silence in the middle of a request body


DEFAULT_LIMITS = Http1Limits()


class ProtocolError(Exception):
    """The peer broke HTTP/1.1: answer `status` (a server) and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Framing(enum.Enum):
    NONE = "none"  # no body
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"
    CLOSE = "close"  # until the connection ends (responses only)


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str  # as sent
    authority: str  # the absolute-form target's authority, else Host
    path: str  # origin-form path and query ("*" for OPTIONS *)
    version: tuple[int, int]
    headers: Headers  # hop-by-hop and Host removed, names lower-case
    framing: Framing
    length: int | None  # the Content-Length, if framing is LENGTH
    keep_alive: bool  # the client allows another request on this connection
    expect_continue: bool
    upgrade: str | None  # Upgrade's value when Connection names it


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: str
    version: tuple[int, int]
    headers: Headers  # hop-by-hop removed
    framing: Framing
    length: int | None
    keep_alive: bool  # the server keeps the connection open after this response
    upgrade: str | None


# RFC 9110 tokens (methods, field names) and what a field value may hold (visible ASCII,
# space, tab, obs-text); everything else, NUL and lone CR/LF included, is refused.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_HOST = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:\[\]%]*")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_DIGITS = re.compile(r"[0-9]{1,18}")
_TCHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
# chunk-size [ chunk-ext ] (RFC 9112 7.1.1): extensions are read past, never acted on.
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*"
    + _TCHARS
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TCHARS
    + rb"|"
    + _QUOTED
    + rb"))?)*)"
)
# Fields that a trailer section may not carry: they frame, route or authenticate the message.
_NOT_IN_TRAILERS = frozenset(
    {"content-length", "transfer-encoding", "host", "content-type", "authorization", "te"}
    | HOP_BY_HOP
)


def _tokens(headers: Headers, name: str) -> list[str]:
    """The comma-separated, lower-cased members of every `name` field."""
    out: list[str] = []
    for k, v in headers:
        if k == name:
            out.extend(t.strip().lower() for t in v.split(",") if t.strip())
    return out


def _check_fields(lines: list[bytes], limits: Http1Limits, what: str) -> Headers:
    """Header (or trailer) lines to lower-case (name, value) pairs, or ProtocolError."""
    if len(lines) > limits.max_headers:
        raise ProtocolError(431, f"more than {limits.max_headers} {what} fields")
    headers: Headers = []
    for line in lines:
        if len(line) > limits.max_line_bytes:
            raise ProtocolError(431, f"a {what} line longer than {limits.max_line_bytes} bytes")
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError(400, "obsolete line folding is not accepted")
        name, colon, value = line.partition(b":")
        if not colon:
            raise ProtocolError(400, f"a {what} line without a colon")
        if not _TOKEN.fullmatch(name):
            # Includes whitespace between the name and the colon (RFC 9112 5.1: reject).
            raise ProtocolError(400, f"invalid {what} field name {name[:40]!r}")
        value = value.strip(b" \t")
        if not _VALUE.fullmatch(value):
            raise ProtocolError(400, f"invalid {what} field value for {name.decode()!r}")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    return headers


def _check_line_endings(head: bytes) -> None:
    if b"\x00" in head:
        raise ProtocolError(400, "NUL in the message head")
    rest = head.replace(b"\r\n", b"")
    if b"\r" in rest or b"\n" in rest:
        raise ProtocolError(400, "a bare CR or LF in the message head")


def _content_length(headers: Headers) -> int | None:
    values = [v.strip() for k, v in headers if k == "content-length"]
    if not values:
        return None
    # "5, 5" in one field or two equal fields is one length (RFC 9110 8.6); anything else,
    # differing values or a non-number, is how requests get smuggled.
    parts = {p.strip() for v in values for p in v.split(",")}
    if len(parts) != 1:
        raise ProtocolError(400, "several differing Content-Length values")
    (text,) = parts
    if not _DIGITS.fullmatch(text):
        raise ProtocolError(400, f"invalid Content-Length {text[:20]!r}")
    return int(text)


def _body_framing(headers: Headers, version: tuple[int, int]) -> tuple[Framing, int | None]:
    """How a message with these fields is framed (RFC 9112 6.3), or ProtocolError."""
    codings = _tokens(headers, "transfer-encoding")
    has_te = any(k == "transfer-encoding" for k, _ in headers)
    length = _content_length(headers)
    if has_te:
        if length is not None:
            raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
        if version < (1, 1):
            raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 message")
        if not codings or codings[-1] != "chunked":
            raise ProtocolError(400, "Transfer-Encoding does not end in chunked")
        if codings.count("chunked") > 1:
            raise ProtocolError(400, "chunked applied more than once")
        if len(codings) > 1:
            raise ProtocolError(501, f"transfer codings {codings[:-1]} are not supported")
        return Framing.CHUNKED, None
    if length is None:
        return Framing.NONE, None
    return Framing.LENGTH, length


def _end_to_end(headers: Headers) -> Headers:
    """`headers` without the hop-by-hop fields (and those `Connection` names)."""
    named = set(_tokens(headers, "connection"))
    out: Headers = []
    for k, v in headers:
        if k == "te" and v.strip().lower() == "trailers":
            out.append((k, "trailers"))
        elif k not in HOP_BY_HOP and k not in named:
            out.append((k, v))
    return out


class _LlhttpHead:
    """Collects what llhttp parsed from one head (its verdict is the second opinion)."""

    __slots__ = ("complete", "fields", "url")

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def _llhttp_accepts(head: bytes, request: bool) -> _LlhttpHead:
    seen = _LlhttpHead()
    parser: httptools.HttpRequestParser | httptools.HttpResponseParser
    parser = httptools.HttpRequestParser(seen) if request else httptools.HttpResponseParser(seen)
    try:
        parser.feed_data(head + b"\r\n\r\n")
    except httptools.HttpParserUpgrade:
        pass  # the head was complete; what follows is not ours to parse
    except httptools.HttpParserError as e:
        raise ProtocolError(400, f"malformed message head ({e})") from None
    if not seen.complete:
        raise ProtocolError(400, "malformed message head")
    return seen


def parse_request_head(head: bytes, limits: Http1Limits = DEFAULT_LIMITS) -> RequestHead:
    """A request head (request line and field lines, CRLF-separated, without the blank
    line) to a `RequestHead`, or ProtocolError with the status to answer."""
    _check_line_endings(head)
    lines = head.split(b"\r\n")
    request_line = lines[0]
    if len(request_line) > limits.max_line_bytes:
        raise ProtocolError(414, f"request line longer than {limits.max_line_bytes} bytes")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise ProtocolError(400, "malformed request line: expected METHOD TARGET HTTP/1.1")
    method_b, target_b, version_b = parts
    if not _TOKEN.fullmatch(method_b):
        raise ProtocolError(400, "malformed request line: bad method")
    if not _TARGET.fullmatch(target_b):
        raise ProtocolError(400, "malformed request line: bad target")
    match = _VERSION.fullmatch(version_b)
    if match is None:
        raise ProtocolError(400, "malformed request line: bad HTTP version")
    version = (int(match.group(1)), int(match.group(2)))
    if version not in ((1, 0), (1, 1)):
        raise ProtocolError(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
    raw = _check_fields(lines[1:], limits, "header")
    _llhttp_accepts(head, request=True)
    method = method_b.decode("ascii")
    target = target_b.decode("ascii")

    hosts = [v for k, v in raw if k == "host"]
    if len(hosts) > 1:
        raise ProtocolError(400, "more than one Host")
    if version == (1, 1) and not hosts:
        raise ProtocolError(400, "HTTP/1.1 request without Host")
    host = hosts[0] if hosts else ""
    if not _HOST.fullmatch(host):
        raise ProtocolError(400, "invalid Host")
    authority, path = _target(method, target, host)

    framing, length = _body_framing(raw, version)
    if limits.max_body_bytes is not None and length is not None and length > limits.max_body_bytes:
        raise ProtocolError(413, f"request body larger than {limits.max_body_bytes} bytes")
    connection = _tokens(raw, "connection")
    keep_alive = "close" not in connection and (version >= (1, 1) or "keep-alive" in connection)
    expects = _tokens(raw, "expect")
    if expects and expects != ["100-continue"]:
        raise ProtocolError(417, "only Expect: 100-continue is understood")
    upgrade_values = [v for k, v in raw if k == "upgrade"]
    upgrade = upgrade_values[0] if upgrade_values and "upgrade" in connection else None
    if upgrade is not None and version < (1, 1):
        upgrade = None  # RFC 9110 7.8: ignore Upgrade received in HTTP/1.0
    # Host is the authority; Expect is answered by this hop (100 Continue when the handler
    # reads the body), as Envoy does by default.
    headers = [(k, v) for k, v in _end_to_end(raw) if k not in ("host", "expect")]
    return RequestHead(
        method=method,
        target=target,
        authority=authority,
        path=path,
        version=version,
        headers=headers,
        framing=framing,
        length=length,
        keep_alive=keep_alive,
        expect_continue=bool(expects) and version >= (1, 1) and framing is not Framing.NONE,
        upgrade=upgrade,
    )


def _target(method: str, target: str, host: str) -> tuple[str, str]:
    """(authority, origin-form path) from the request target (RFC 9112 3.2)."""
    if target.startswith("/"):
        return host, target
    if target == "*" and method == "OPTIONS":
        return host, "*"
    if method == "CONNECT":
        raise ProtocolError(405, "CONNECT is not served over HTTP/1.1 here")
    lowered = target[:8].lower()
    if lowered.startswith(("http://", "https://")):
        # absolute-form: the target's authority wins over Host (RFC 9112 3.2.2).
        split = urlsplit(target)
        if not split.netloc or "@" in split.netloc:
            raise ProtocolError(400, "absolute-form target without a usable authority")
        path = split.path or "/"
        if split.query:
            path += "?" + split.query
        return split.netloc, path
    raise ProtocolError(400, "request target must be origin-form or absolute-form")


def parse_response_head(
    head: bytes, request_method: str, limits: Http1Limits = DEFAULT_LIMITS
) -> ResponseHead:
    """A response head (without the blank line) to a `ResponseHead`; `request_method`
    decides whether a body follows (HEAD, CONNECT). ProtocolError: a broken upstream."""
    _check_line_endings(head)
    lines = head.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise ProtocolError(502, f"malformed status line {lines[0][:60]!r}")
    version = (int(match.group(1)), int(match.group(2)))
    if version not in ((1, 0), (1, 1)):
        raise ProtocolError(502, "upstream does not speak HTTP/1.x")
    status = int(match.group(3))
    if status < 100:
        raise ProtocolError(502, f"status {status} out of range")
    try:
        raw = _check_fields(lines[1:], limits, "header")
        _llhttp_accepts(head, request=False)
        if 100 <= status < 200 or status in (204, 304) or request_method == "HEAD":
            framing, length = Framing.NONE, None
            _content_length(raw)  # still refuse one that is malformed
        else:
            framing, length = _body_framing(raw, version)
            if framing is Framing.NONE:
                framing = Framing.CLOSE
    except ProtocolError as e:
        raise ProtocolError(502, e.reason) from None
    connection = _tokens(raw, "connection")
    keep_alive = (
        "close" not in connection
        and (version >= (1, 1) or "keep-alive" in connection)
        and framing is not Framing.CLOSE
    )
    upgrade_values = [v for k, v in raw if k == "upgrade"]
    return ResponseHead(
        status=status,
        reason=(match.group(4) or b"").decode("latin-1"),
        version=version,
        headers=_end_to_end(raw),
        framing=framing,
        length=length,
        keep_alive=keep_alive,
        upgrade=upgrade_values[0] if status == 101 and upgrade_values else None,
    )


# --- Bodies -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    trailers: Headers


BodyEvent = Data | EndOfMessage


class BodyReader:
    """Decodes one body from a shared receive buffer: `next(buf)` consumes what it can and
    returns an event, or None when it needs more bytes. ProtocolError on broken framing."""

    __slots__ = ("_chunk_left", "_ext_bytes", "_framing", "_left", "_limits", "_state", "_total")

    def __init__(self, framing: Framing, length: int | None, limits: Http1Limits) -> None:
        self._framing = framing
        self._left = length or 0
        self._limits = limits
        self._chunk_left = 0
        self._ext_bytes = 0
        self._total = 0
        # chunked: "size" (expect a size line), "data", "crlf" (after data), "trailers", "done"
        self._state = "size"
        if framing is Framing.NONE or (framing is Framing.LENGTH and not length):
            self._state = "done"

    @property
    def done(self) -> bool:
        return self._state == "done"

    def _count(self, n: int) -> None:
        self._total += n
        cap = self._limits.max_body_bytes
        if cap is not None and self._total > cap:
            raise ProtocolError(413, f"body larger than {cap} bytes")

    def next(self, buf: bytearray, eof: bool = False) -> BodyEvent | None:
        if self._state == "done":
            self._state = "finished"
            return EndOfMessage([])
        if self._state == "finished":
            raise RuntimeError("body already complete")
        if self._framing is Framing.LENGTH:
            if not buf:
                if eof:
                    raise ProtocolError(400, "connection closed inside a body")
                return None
            take = min(self._left, len(buf))
            data = bytes(buf[:take])
            del buf[:take]
            self._left -= take
            self._count(take)
            if not self._left:
                self._state = "done"
            return Data(data)
        if self._framing is Framing.CLOSE:
            if not buf:
                if eof:
                    self._state = "finished"
                    return EndOfMessage([])
                return None
            data = bytes(buf)
            buf.clear()
            self._count(len(data))
            return Data(data)
        return self._chunked(buf, eof)

    def _chunked(self, buf: bytearray, eof: bool) -> BodyEvent | None:
        while True:
            if self._state == "size":
                end = buf.find(b"\r\n", 0, 1024)
                if end < 0:
                    if len(buf) >= 1024 or b"\n" in buf:
                        raise ProtocolError(400, "bad chunk size line")
                    return self._need(eof)
                line = bytes(buf[:end])
                match = _CHUNK_LINE.fullmatch(line)
                if match is None:
                    raise ProtocolError(400, f"bad chunk size line {line[:40]!r}")
                self._ext_bytes += len(match.group(2))
                if self._ext_bytes > self._limits.max_chunk_ext_bytes:
                    raise ProtocolError(400, "too many chunk extension bytes")
                del buf[: end + 2]
                self._chunk_left = int(match.group(1), 16)
                self._state = "data" if self._chunk_left else "trailers"
            elif self._state == "data":
                if not buf:
                    return self._need(eof)
                take = min(self._chunk_left, len(buf))
                data = bytes(buf[:take])
                del buf[:take]
                self._chunk_left -= take
                self._count(take)
                if not self._chunk_left:
                    self._state = "crlf"
                return Data(data)
            elif self._state == "crlf":
                if len(buf) < 2:
                    return self._need(eof)
                if buf[:2] != b"\r\n":
                    raise ProtocolError(400, "chunk data not followed by CRLF")
                del buf[:2]
                self._state = "size"
            elif self._state == "trailers":
                if buf[:2] == b"\r\n":
                    del buf[:2]
                    self._state = "finished"
                    return EndOfMessage([])
                end = buf.find(b"\r\n\r\n", 0, self._limits.max_head_bytes + 4)
                if end < 0:
                    if len(buf) > self._limits.max_head_bytes:
                        raise ProtocolError(431, "trailer section too large")
                    return self._need(eof)
                section = bytes(buf[:end])
                del buf[: end + 4]
                _check_line_endings(section)
                fields = _check_fields(section.split(b"\r\n"), self._limits, "trailer")
                self._state = "finished"
                return EndOfMessage([(k, v) for k, v in fields if k not in _NOT_IN_TRAILERS])
            else:
                raise RuntimeError("body already complete")

    @staticmethod
    def _need(eof: bool) -> None:
        if eof:
            raise ProtocolError(400, "connection closed inside a chunked body")
        return None


# --- The server's receive side ------------------------------------------------------------


class RequestParser:
    """One server connection's receive side: `feed` bytes, then take `next_head()` and,
    for its body, `next_body()` events until EndOfMessage. After a message the parser waits
    for `next_request()`: until then pipelined bytes stay in the buffer (`leftover` after a
    101)."""

    __slots__ = ("_body", "_buf", "_eof", "_limits", "_scanned")

    def __init__(self, limits: Http1Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._eof = False
        self._scanned = 0
        self._body: BodyReader | None = None

    def feed(self, data: bytes) -> None:
        """Bytes read from the client; b"" when it ended its side."""
        if data:
            self._buf += data
        else:
            self._eof = True

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def head_started(self) -> bool:
        """Some bytes of the next head have arrived (the head timeout runs, not idle)."""
        return bool(self._buf) and self._body is None

    def next_head(self) -> RequestHead | None:
        """The next request head, None until it is complete. ProtocolError when broken."""
        buf = self._buf
        limit = self._limits.max_head_bytes
        end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3), limit + 4)
        if end < 0:
            self._scanned = len(buf)
            first_line = buf.find(b"\r\n", 0, self._limits.max_line_bytes + 2)
            if first_line < 0 and len(buf) > self._limits.max_line_bytes:
                raise ProtocolError(414, "request line too long")
            if len(buf) > limit:
                raise ProtocolError(431, f"request head larger than {limit} bytes")
            if self._eof and buf:
                raise ProtocolError(400, "connection closed inside a request head")
            return None
        head = bytes(buf[:end])
        del buf[: end + 4]
        self._scanned = 0
        parsed = parse_request_head(head, self._limits)
        self._body = BodyReader(parsed.framing, parsed.length, self._limits)
        return parsed

    def next_body(self) -> BodyEvent | None:
        """The next body event of the current request, None until more bytes arrive."""
        if self._body is None:
            raise RuntimeError("no request head yet")
        return self._body.next(self._buf, self._eof)

    @property
    def body_done(self) -> bool:
        return self._body is None or self._body.done

    def next_request(self) -> None:
        """The current request is answered; parse the next one from the buffer."""
        self._body = None

    def leftover(self) -> bytes:
        """Bytes received past the current message (after a 101: the new protocol's)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


# --- Writing ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseFraming:
    framing: Framing
    close: bool  # send Connection: close and end the connection after this response


def response_framing(
    *,
    method: str,
    version: tuple[int, int],
    status: int,
    body_length: int | None,
    keep_alive: bool,
    request_complete: bool,
    draining: bool,
) -> ResponseFraming:
    """How to frame a response and whether the connection ends after it.

    `request_complete`: the request body was read to its end; if not (a 100-continue the
    handler never accepted, or an upload it ignored), the rest cannot be told apart from
    the next request without reading it, so the connection closes."""
    close = not keep_alive or draining or not request_complete
    if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return ResponseFraming(Framing.NONE, close)
    if body_length is not None:
        return ResponseFraming(Framing.LENGTH, close)
    if version >= (1, 1):
        return ResponseFraming(Framing.CHUNKED, close)
    # An HTTP/1.0 client cannot read chunked: the end of the connection ends the body.
    return ResponseFraming(Framing.CLOSE, True)


def _field_lines(headers: Headers) -> list[str]:
    lines = []
    for name, value in headers:
        if not _TOKEN.fullmatch(name.encode("latin-1", "replace")) or not _VALUE.fullmatch(
            value.encode("latin-1", "replace")
        ):
            raise ValueError(f"header {name!r} cannot be written as given")
        lines.append(f"{name}: {value}")
    return lines


def _framing_fields(framing: Framing, length: int | None) -> list[str]:
    if framing is Framing.LENGTH:
        return [f"content-length: {length}"]
    if framing is Framing.CHUNKED:
        return ["transfer-encoding: chunked"]
    return []


def response_head(
    status: int,
    headers: Headers,
    framing: Framing,
    length: int | None,
    *,
    close: bool,
    version: tuple[int, int] = (1, 1),
    upgrade: str | None = None,
) -> bytes:
    """The bytes of a response head. Framing and connection fields in `headers` are
    replaced by ours (a HEAD/304 answer keeps its Content-Length: it describes the
    resource, not this message)."""
    keep_cl = framing is Framing.NONE
    fields = [
        (k, v) for k, v in headers if k not in HOP_BY_HOP and (keep_cl or k != "content-length")
    ]
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", *_field_lines(fields)]
    lines += _framing_fields(framing, length)
    if upgrade is not None:
        lines += ["connection: upgrade", f"upgrade: {upgrade}"]
    elif close:
        lines.append("connection: close")
    elif version < (1, 1):
        lines.append("connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def request_head(
    method: str,
    authority: str,
    path: str,
    headers: Headers,
    framing: Framing,
    length: int | None,
    *,
    upgrade: str | None = None,
    expect_continue: bool = False,
) -> bytes:
    """The bytes of a request head (origin-form target; Host from `authority`)."""
    fields = [
        (k, v)
        for k, v in headers
        if k not in HOP_BY_HOP and k not in ("host", "content-length", "expect")
    ]
    lines = [f"{method} {path} HTTP/1.1", f"host: {authority}", *_field_lines(fields)]
    lines += _framing_fields(framing, length)
    if upgrade is not None:
        lines += ["connection: upgrade", f"upgrade: {upgrade}"]
    if expect_continue:
        lines.append("expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never the last: empty data writes nothing)."""
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


def last_chunk(trailers: Headers) -> bytes:
    lines = _field_lines([(k, v) for k, v in trailers if k not in _NOT_IN_TRAILERS])
    return b"0\r\n" + "".join(f"{line}\r\n" for line in lines).encode("latin-1") + b"\r\n"


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def take_head(buf: bytearray, limits: Http1Limits) -> bytes | None:
    """Remove and return one complete head (without its blank line) from `buf`; None if
    it is not complete yet; ProtocolError(502) if it grew past the limit."""
    end = buf.find(b"\r\n\r\n", 0, limits.max_head_bytes + 4)
    if end < 0:
        if len(buf) > limits.max_head_bytes:
            raise ProtocolError(502, "response head too large")
        return None
    head = bytes(buf[:end])
    del buf[: end + 4]
    return head


def error_response(status: int, reason: str) -> bytes:
    """A complete plain-text answer that closes the connection (400, 408, 431, ...)."""
    body = (reason + "\n").encode("latin-1", "replace")
    head = response_head(
        status, [("content-type", "text/plain")], Framing.LENGTH, len(body), close=True
    )
    return head + body
