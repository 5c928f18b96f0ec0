"""The tunnel's DNS proxy on loopback, without root: queries per second and CPU per query.

One process holds a `DnsProxy` on 127.0.0.1 (a plain socket factory), a mesh state of
`--services` services, and `--clients` UDP clients each sending its next query as soon as
its answer arrives (closed loop), for `--seconds`. `--kind local` asks service names the
proxy answers itself (by the search path: `svc-N`); `--kind forward` asks names it forwards
to an upstream in this process that answers at once. Printed: JSON with queries, answers per
second and process CPU microseconds per query.

    .venv/bin/python benchmarks/dns_loopback.py --kind local
    .venv/bin/python benchmarks/dns_loopback.py --kind forward

Client, proxy and upstream share one event loop: figures are the process's; compare runs
of this script, not with other benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshcore.sockets import PlainSocketFactory
from meshcore.state import MeshState, NetworkAddress
from tests.support.mesh import service, workload
from ztunnel.dns import message as m
from ztunnel.dns.server import DnsProxy


class _Upstream(asyncio.DatagramProtocol):
    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = m.parse_query(data)
        rec = m.a(q.question.labels, ipaddress.IPv4Address("192.0.2.1"), 30)
        self.transport.sendto(m.build_response(q, 0, (rec,), authoritative=False), addr)


async def _client(target: tuple[str, int], names: list[bytes], stop: float) -> int:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.connect(target)
    done = 0
    try:
        while time.monotonic() < stop:
            await loop.sock_sendall(s, names[done % len(names)])
            await loop.sock_recv(s, 4096)
            done += 1
    finally:
        s.close()
    return done


async def main(args: argparse.Namespace) -> dict[str, float]:
    client_wl = workload(name="bench", namespace="ns1")
    services = [
        service(
            name=f"svc-{i}",
            namespace="ns1",
            vips=(NetworkAddress("", ipaddress.IPv4Address(0x0A600000 + i)),),
        )
        for i in range(args.services)
    ]
    state = MeshState.build([client_wl], services, [])
    loop = asyncio.get_running_loop()
    up, _ = await loop.create_datagram_endpoint(_Upstream, local_addr=("127.0.0.1", 0))
    port = up.get_extra_info("sockname")[1]
    proxy = DnsProxy(
        lambda: client_wl,
        lambda: state,
        PlainSocketFactory(),
        (ipaddress.IPv4Address("127.0.0.1"),),
        upstream_port=port,
    )
    await proxy.start("127.0.0.1", 0)
    assert proxy.udp_address is not None
    if args.kind == "local":
        names = [f"svc-{i}" for i in range(min(args.services, 1000))]
    else:
        names = [f"host-{i}.example.org" for i in range(1000)]
    queries = [m.build_query(i & 0xFFFF, m.name_labels(n), m.RType.A) for i, n in enumerate(names)]
    cpu0, t0 = time.process_time(), time.monotonic()
    stop = t0 + args.seconds
    counts = await asyncio.gather(
        *(_client(proxy.udp_address, queries, stop) for _ in range(args.clients))
    )
    cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    await proxy.close()
    up.close()
    total = sum(counts)
    return {
        "kind": args.kind,
        "queries": total,
        "answers_per_second": round(total / wall),
        "cpu_us_per_query": round(cpu / total * 1e6, 1),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=("local", "forward"), default="local")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=5.0)
    print(json.dumps(asyncio.run(main(p.parse_args()))))
