"""Two byte streams joined both ways: a WebSocket after its 101, or TCP passed through.

Each direction copies until its source ends, then ends its destination's side
(half-close), so a client that shuts down its writing side still gets the rest of the
answer. Back-pressure: a direction waits for its destination to drain before reading more.
"""

from __future__ import annotations

import asyncio
import contextlib

from waypoint.http.stream import ByteStream

READ_SIZE = 65536


async def _copy(src: ByteStream, dst: ByteStream, prefix: bytes) -> int:
    sent = 0
    try:
        if prefix:
            dst.write(prefix)
            sent += len(prefix)
            await dst.drain()
        while data := await src.read(READ_SIZE):
            dst.write(data)
            sent += len(data)
            await dst.drain()
    finally:
        dst.write_eof()
    return sent


async def splice(
    a: ByteStream, b: ByteStream, *, from_a: bytes = b"", from_b: bytes = b""
) -> tuple[int, int]:
    """Copy a -> b and b -> a until both directions ended; (bytes a->b, bytes b->a).

    `from_a` / `from_b`: bytes already read from a / b (past an HTTP head) that go first.
    If one side is aborted, the other is aborted too: a reset is not a clean end. On
    cancellation both directions stop and both streams are aborted."""
    forward = asyncio.create_task(_copy(a, b, from_a), name="splice-a-to-b")
    backward = asyncio.create_task(_copy(b, a, from_b), name="splice-b-to-a")
    try:
        await asyncio.wait((forward, backward), return_when=asyncio.ALL_COMPLETED)
    except asyncio.CancelledError:
        for task in (forward, backward):
            task.cancel()
        for task in (forward, backward):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        a.abort("splice cancelled")
        b.abort("splice cancelled")
        raise
    counts = []
    for task in (forward, backward):
        exc = task.exception()
        if exc is not None:
            a.abort(f"splice failed: {exc}")
            b.abort(f"splice failed: {exc}")
            counts.append(0)
        else:
            counts.append(task.result())
    return counts[0], counts[1]
