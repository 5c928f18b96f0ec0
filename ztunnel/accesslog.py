"""One access-log line per proxied connection, written when it ends.

`ConnectionLog` is the connection-result guard: whatever path a connection takes, exactly
one line is written, with a default outcome if no path recorded one.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

log = structlog.get_logger("access")


class ConnectionLog:
    __slots__ = ("_done", "_start", "fields")

    def __init__(self, direction: str, **fields: Any) -> None:
        self._start = time.monotonic()
        self._done = False
        self.fields: dict[str, Any] = {"direction": direction, **fields}

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)

    def finish(self, sent: int = 0, received: int = 0, error: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        f = self.fields
        f["bytes_sent"] = sent
        f["bytes_recv"] = received
        f["duration"] = f"{(time.monotonic() - self._start) * 1000:.1f}ms"
        if error:
            f["error"] = error
        log.info("connection complete", **{k: v for k, v in f.items() if v is not None})
