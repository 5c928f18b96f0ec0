"""One listener under attack, alone in a process (`python -m tests.hostile.host KIND`), so
a test can read its resident memory and CPU time from /proc: it starts the listener(s) of
KIND on 127.0.0.1, prints their ports as one JSON line, and serves until stdin closes.

KIND: node-http (the admin/metrics/readiness server), dns (two pods' DNS proxies: one
attacked, one asked by a well-behaved client), grpc (the control plane's xDS server with
its limits), waypoint (the waypoint's HTTP/1.1 and HTTP/2 servers, as inside an HBONE
stream)."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import sys
from typing import Any

from meshcore.http1.server import NodeHttpServer, Request, Response, Routes
from meshcore.sockets import PlainSocketFactory
from tests.waypoint.http.loopback import Server
from waypoint.http.h1server import serve_http1
from waypoint.http.h2server import serve_http2
from waypoint.http.message import BufferedBody
from waypoint.http.message import Request as HttpRequest
from waypoint.http.message import Response as HttpResponse
from waypoint.http.stream import ByteStream

METRICS = b"# a scrape of some size\n" + b"metric_total 1\n" * 2000


class Metrics(NodeHttpServer):
    async def _metrics(self, request: Request) -> Response:
        return Response(body=METRICS)

    def routes(self) -> Routes:
        return {"/metrics": {"GET": self._metrics}}


async def node_http() -> tuple[dict[str, int], list[Any]]:
    server = Metrics(0, "127.0.0.1")
    await server.start()
    return {"http": server.port}, [server]


async def dns() -> tuple[dict[str, int], list[Any]]:
    from tests.ztunnel.dns.test_server import CLIENT, STATE
    from ztunnel.dns.server import DnsProxy

    ports: dict[str, int] = {}
    servers = []
    for name in ("attacked", "good"):
        proxy = DnsProxy(
            lambda: CLIENT,
            lambda: STATE,
            PlainSocketFactory(),
            (ipaddress.ip_address("127.0.0.1"),),
            upstream_port=9,  # discard: a forwarded query fails at once (ICMP)
        )
        await proxy.start("127.0.0.1", 0)
        assert proxy.udp_address is not None and proxy.tcp_address is not None
        ports[f"{name}_udp"] = proxy.udp_address[1]
        ports[f"{name}_tcp"] = proxy.tcp_address[1]
        servers.append(proxy)
    return ports, servers


async def grpc_server() -> tuple[dict[str, int], list[Any]]:
    from controlplane.grpc_limits import GrpcLimits, new_server
    from controlplane.xds.server import XdsServer
    from controlplane.xds.tls import bind
    from tests.xds.conftest import OPEN
    from tests.xds.states import demo_state

    xds = XdsServer(demo_state(), auth=OPEN)  # the server's limits, not authentication
    server = new_server(GrpcLimits(max_connections=64, handshake_timeout=2.0))
    xds.add_to_server(server)
    port = bind(server, "127.0.0.1:0", None)
    await server.start()
    return {"grpc": port}, [server, xds]


async def answer(request: HttpRequest) -> HttpResponse:
    while await request.body.read():  # read (and drop) whatever body comes
        pass
    return HttpResponse(200, [], BufferedBody(b"ok"))


async def waypoint() -> tuple[dict[str, int], list[Any]]:
    async def h1(stream: ByteStream) -> None:
        await serve_http1(stream, answer)

    async def h2(stream: ByteStream) -> None:
        await serve_http2(stream, answer)

    one = await Server(h1).start()
    two = await Server(h2).start()
    return {"h1": one.port, "h2": two.port}, [one, two]


KINDS = {"node-http": node_http, "dns": dns, "grpc": grpc_server, "waypoint": waypoint}


async def main(kind: str) -> None:
    ports, keep = await KINDS[kind]()
    gc.collect()
    print(json.dumps(ports), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin
    del keep


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
