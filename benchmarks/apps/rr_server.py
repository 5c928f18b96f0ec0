"""The workers benchmark's server, run inside the server pod: an echo port and a sink port
on uvloop, as cheap per request as a Python server gets, so the tunnels are what a request
costs. Echo: every byte back. Sink: one byte back per CHUNK received (the client counts
only acknowledged bytes)."""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop

CHUNK = 1 << 20  # must match rr_client.CHUNK


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.pending = 0

    def data_received(self, data: bytes) -> None:
        self.pending += len(data)
        acks, self.pending = divmod(self.pending, CHUNK)
        if acks:
            self.transport.write(b"\x01" * acks)


async def serve(echo_port: int, sink_port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(Echo, "0.0.0.0", echo_port, backlog=1024)
    await loop.create_server(Sink, "0.0.0.0", sink_port, backlog=1024)
    print(f"serving echo :{echo_port} sink :{sink_port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--echo-port", type=int, required=True)
    ap.add_argument("--sink-port", type=int, required=True)
    args = ap.parse_args()
    uvloop.run(serve(args.echo_port, args.sink_port))


if __name__ == "__main__":
    main()
