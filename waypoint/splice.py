"""Two byte streams joined both ways (TCP passed through, a WebSocket after its 101).

Each direction copies until its reader ends, then half-closes the other side, so a
protocol that keeps talking after one side's FIN still works; `drain()` after each write
keeps a slow reader from growing a buffer here.
"""

from __future__ import annotations

import asyncio

from waypoint.http.stream import ByteStream


async def _pump(src: ByteStream, dst: ByteStream) -> int:
    moved = 0
    while chunk := await src.read():
        moved += len(chunk)
        dst.write(chunk)
        await dst.drain()
    dst.write_eof()
    return moved


async def splice(a: ByteStream, b: ByteStream, a_prefix: bytes = b"") -> tuple[int, int]:
    """Copy a -> b and b -> a until both directions end; returns (a->b bytes, b->a bytes).
    `a_prefix`: bytes already read from `a` (a sniffed prefix) sent to `b` first."""
    if a_prefix:
        b.write(a_prefix)
    try:
        up, down = await asyncio.gather(_pump(a, b), _pump(b, a))
    except BaseException:
        a.abort("splice failed")
        b.abort("splice failed")
        raise
    return up + len(a_prefix), down
