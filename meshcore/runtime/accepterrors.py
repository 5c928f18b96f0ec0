"""Quiet asyncio's accept errors when a process runs out of descriptors.

asyncio's own listeners survive EMFILE/ENFILE (they stop reading the listening socket and
retry a second later), but they report it through the loop's exception handler once per
connection waiting in the backlog, with a traceback, every retry: a node out of fds gets
a hundred tracebacks a second per listener, which buries the one line that matters. This
handler logs that condition once per `interval` (with how many were left out) and passes
every other exception on to the handler that was there before. uvloop (the proxies' loop)
does not report it at all: libuv accepts and closes what waits while it is out of fds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from meshcore.localtrust import RateLog

log = structlog.get_logger(__name__)

_ACCEPT_MESSAGE = "socket.accept() out of system resource"


def is_accept_exhaustion(context: dict[str, Any]) -> bool:
    return str(context.get("message", "")).startswith(_ACCEPT_MESSAGE)


def install(
    loop: asyncio.AbstractEventLoop,
    interval: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    previous = loop.get_exception_handler()
    rate = RateLog(interval)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if is_accept_exhaustion(context):
            suppressed = rate.due(clock())
            if suppressed is not None:
                exc = context.get("exception")
                log.error(
                    "cannot accept: out of resources; retrying every second until they free up",
                    error=str(exc) if exc is not None else None,
                    not_logged=suppressed,
                )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
