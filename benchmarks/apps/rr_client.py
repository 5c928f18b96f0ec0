"""The workers benchmark's load, run inside a client pod; prints one JSON object.

`rr`: --connections keep-alive connections, each closed-loop: send --size bytes, wait for
all of them back, send again; requests completed between --warmup and --warmup+--seconds
are counted. `tput`: --connections connections each keep up to WINDOW chunks of 1 MiB in
flight to the sink, which acknowledges each chunk; only acknowledged bytes count. Both
bounded in time: the run ends at its deadline whatever the peers do."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from typing import cast

import uvloop

CHUNK = 1 << 20  # must match rr_server.CHUNK
WINDOW = 4  # chunks in flight per connection


class Counter:
    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self.count = 0

    def add(self, n: int) -> None:
        now = time.monotonic()
        if self.start <= now < self.end:
            self.count += n


class RR(asyncio.Protocol):
    def __init__(self, size: int, counter: Counter) -> None:
        self.msg = b"x" * size
        self.size = size
        self.got = 0
        self.counter = counter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.msg)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        while self.got >= self.size:
            self.got -= self.size
            self.counter.add(1)
            self.transport.write(self.msg)


class Tput(asyncio.Protocol):
    def __init__(self, counter: Counter) -> None:
        self.chunk = b"\x00" * CHUNK
        self.counter = counter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        for _ in range(WINDOW):
            self.transport.write(self.chunk)

    def data_received(self, data: bytes) -> None:
        self.counter.add(len(data) * CHUNK)
        for _ in range(len(data)):
            self.transport.write(self.chunk)


async def run(args: argparse.Namespace) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    counter = Counter(t0 + args.warmup, t0 + args.warmup + args.seconds)
    transports = []
    for _ in range(args.connections):
        factory = (lambda: RR(args.size, counter)) if args.mode == "rr" else (lambda: Tput(counter))
        transport, _ = await asyncio.wait_for(
            loop.create_connection(factory, args.host, args.port), 15
        )
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transports.append(transport)
    await asyncio.sleep(max(0.0, counter.end - time.monotonic()))
    for t in transports:
        t.abort()
    if args.mode == "rr":
        return {"requests": float(counter.count), "seconds": args.seconds}
    return {"bytes": float(counter.count), "seconds": args.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=("rr", "tput"))
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    if not (1 <= args.connections <= 1000 and 0 < args.seconds <= 120 and 1 <= args.size <= 65536):
        sys.exit("rr_client: --connections 1..1000, --seconds up to 120, --size 1..65536")
    json.dump(uvloop.run(run(args)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
