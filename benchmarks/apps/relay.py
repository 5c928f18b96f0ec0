"""A plain TCP relay (no TLS, no framing): the baseline a tunnel hop is compared with.

`--forward LPORT:HOST:PORT` (repeatable) listens on LPORT and pipes each accepted
connection to HOST:PORT. uvloop asyncio Protocols, back-pressure through
pause_writing/resume_writing, half-close forwarded with write_eof, both sides closed once
both directions have ended (as the tunnel does). Runs until signalled.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import socket
from typing import cast

import uvloop


class Pipe(asyncio.Protocol):
    """One side of a relayed connection; `peer` is the transport of the other side."""

    __slots__ = ("early", "eof", "peer", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        # uvloop starts reading even if paused in connection_made, so data that arrives
        # before the upstream is connected is held here and flushed on link.
        self.early: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def link(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        for data in self.early:
            peer.write(data)
        self.early.clear()
        if self.eof:
            self._pass_eof()

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
            return
        self.peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None:
            self._pass_eof()
        return True  # keep the other direction open until it ends too

    def _pass_eof(self) -> None:
        """Our side ended: end the peer's, and close both once both have ended. uvloop
        leaves a transport open with both halves shut (its descriptor too), and a relay
        that left them so died under a new-connection load with glibc's "double free or
        corruption"."""
        peer = self.peer
        assert peer is not None and self.transport is not None
        if not peer.is_closing() and peer.can_write_eof():
            peer.write_eof()
        other = peer.get_protocol()
        if isinstance(other, Pipe) and other.eof:
            self.transport.close()
            peer.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()

    # Our transport's send buffer is full: stop reading from the other side.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()


class Downstream(Pipe):
    """The accepted side: on accept, connect upstream and join the two."""

    __slots__ = ("target",)

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__()
        self.target = target

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            up_t, up_p = await loop.create_connection(Pipe, *self.target)
        except OSError:
            self.transport.abort()
            return
        up_p.link(self.transport)
        self.link(up_t)


def parse_forward(text: str) -> tuple[int, str, int]:
    try:
        lport, host, port = text.split(":")
        return int(lport), host, int(port)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--forward {text!r}: expected LPORT:HOST:PORT") from e


async def run(forwards: list[tuple[int, str, int]], bind: str) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for lport, host, port in forwards:
        factory = functools.partial(Downstream, (host, port))
        servers.append(await loop.create_server(factory, bind, lport, backlog=64))
        print(f"relay {bind}:{lport} -> {host}:{port}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--forward", type=parse_forward, action="append", required=True)
    ap.add_argument("--bind", default="0.0.0.0")
    args = ap.parse_args()
    uvloop.install()
    asyncio.run(run(args.forward, args.bind))


if __name__ == "__main__":
    main()
