"""Counting gRPC messages in a body as it streams by (pure): each message is a 5-byte prefix
(compressed flag, 4-byte big-endian length) and that many bytes, and a message may be split
across chunks or share one with the next. Feeds `istio_request_messages_total` and
`istio_response_messages_total`."""

from __future__ import annotations

PREFIX = 5


class MessageCounter:
    __slots__ = ("_header", "_left", "messages")

    def __init__(self) -> None:
        self.messages = 0
        self._header = b""  # the prefix read so far of the next message
        self._left = 0  # bytes of the current message still to come

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                self._left -= take
                i += take
                continue
            need = PREFIX - len(self._header)
            self._header += data[i : i + need]
            i += min(need, n - i)
            if len(self._header) == PREFIX:
                self.messages += 1
                self._left = int.from_bytes(self._header[1:5], "big")
                self._header = b""
