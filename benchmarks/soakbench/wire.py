"""What the soak load generator sends and how it reads the answers, pure: the two requests,
an incremental parser of the benchmark server's answers, and the naming of a failure's kind.
"""

from __future__ import annotations

import errno

from meshbench.http1 import content_length

# A held connection's round trip: keep-alive, no body (the server answers 1 KB).
HELD_REQUEST = b"GET /held HTTP/1.1\r\nHost: server\r\n\r\n"
# A held connection's first request, with the headers an HTTP library or a browser sends
# (about 300 bytes). Each tunnel counts a connection's bytes in Python ints, and an int
# above 256 is an object of its own (CPython caches only the small ones): with nothing
# but the 36-byte round trips, every held connection's request counters passed 256 on its
# 8th round trip, about 210 s in, and the tunnels took 5 objects per held connection at
# once (+10 000 blocks for 2 000 held on loopback, exactly as the counters passed 256):
# for 10 000 held, a one-time step of about 1 MB inside the judged span, read as growth.
# Past 256 from the first exchange, the counters cost that before the warm-up ends.
HELD_OPEN_REQUEST = (
    b"GET /held HTTP/1.1\r\nHost: server\r\n"
    b"User-Agent: soak-generator/1.0 (held connection; keep-alive)\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: identity\r\n"
    b"Cache-Control: no-cache\r\nX-Request-Id: 0f8fad5b-d9cb-469f-a165-70867728950e\r\n"
    b"\r\n"
)
# A new connection's one exchange: the server closes after answering, so the TIME_WAIT
# state lands on its side and the generator's ephemeral ports are free again at once
# (1000 new connections a second would use the client pod's 28 232 ports up in 28 s).
NEW_REQUEST = b"GET /new HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n"
MAX_HEAD = 8192


class AnswerParser:
    """Reads HTTP/1.1 answers (status 200, body by Content-Length) from a byte stream."""

    __slots__ = ("buf", "need")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = -1  # body bytes still missing, or -1 while reading a head

    def feed(self, data: bytes) -> int:
        """Consume bytes; returns how many answers they completed. ValueError: not an
        answer of the benchmark server."""
        self.buf += data
        done = 0
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        raise ValueError("answer head longer than 8 KiB")
                    return done
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                if not head.startswith(b"HTTP/1.1 200"):
                    raise ValueError(f"unexpected answer {head[:60]!r}")
                self.need = content_length(head)
            if len(self.buf) < self.need:
                return done
            del self.buf[: self.need]
            self.need = -1
            done += 1


def error_kind(exc: BaseException | None, phase: str) -> str:
    """A short, stable name for why a connection failed, prefixed by the phase it failed in
    (`connect`, `answer`, `close`, `held`): `connect:ECONNREFUSED`, `answer:timeout`, ..."""
    if exc is None:
        kind = "closed"
    elif isinstance(exc, TimeoutError):
        kind = "timeout"
    elif isinstance(exc, ValueError):
        kind = "bad_answer"
    elif isinstance(exc, OSError) and exc.errno:
        kind = errno.errorcode.get(exc.errno, f"errno{exc.errno}")
    else:
        kind = type(exc).__name__
    return f"{phase}:{kind}"
