"""A waypoint on loopback, without root: a real `Waypoint` (TLS 1.3, HTTP/2 CONNECT, its
own certificate from the project's CA held in memory), a real destination pod proxy
(`ztunnel.inpod.PodProxy` on 15008) in front of an app, and an HBONE client holding a
client pod's certificate, as the client's tunnel would be.

Addresses are fresh per run in 127.0.0.0/8, so runs in parallel never share a port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from meshcore import tls
from meshcore.discovery import parse_resource_entry
from meshcore.hbone.dial import hbone_connect
from meshcore.hbone.pool import ConnectionPool, PoolKey
from meshcore.hbone.stream import HboneStream
from meshcore.hbone.transport import H2Transport
from meshcore.identity.certs import CertificateClient, CertificateManager
from meshcore.identity.spiffe import SpiffeId
from meshcore.sockets import PlainSocketFactory
from meshcore.state import GatewayAddress, MeshState, Service, Workload, parse_app_protocol
from tests.support.aio import Loop
from tests.support.certs import InProcessCA
from tests.support.mesh import (
    authorization_policy,
    ips,
    mesh_state,
    ports,
    serves,
    service,
    vips,
    workload,
)
from waypoint.config import WaypointConfig
from waypoint.http.splice import splice
from waypoint.http.stream import AsyncioByteStream
from waypoint.instance import Waypoint
from ztunnel.inpod import Enrolment, PodProxy
from ztunnel.node import NodeProxy

TD = "cluster.local"
VIP = "10.96.0.30"
CLIENT_ID = SpiffeId(TD, "shop", "client")
WAYPOINT_ID = SpiffeId(TD, "shop", "waypoint")
WAYPOINT_HOST = "shop/waypoint.shop.svc.cluster.local"

AppServe = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def addresses(n: int) -> list[str]:
    rng = random.SystemRandom()
    base = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}."
    start = rng.randint(1, 254 - n)
    return [f"{base}{start + i}" for i in range(n)]


@dataclass
class LoopbackWaypoint:
    waypoint: Waypoint
    state: MeshState
    certs: CertificateManager
    waypoint_ip: str
    client_ip: str
    backend_ips: list[str]
    app_port: int
    node2: NodeProxy
    pool: ConnectionPool | None = None

    async def connect(self, authority: str, identity: SpiffeId = CLIENT_ID) -> HboneStream:
        """A CONNECT to the waypoint, as the client's tunnel sends it."""
        cert = await self.certs.get(identity)
        ctx = tls.client_context(cert)

        async def dial(key: PoolKey) -> H2Transport:
            def verify(h2: H2Transport, expected: frozenset[SpiffeId]) -> None:
                assert h2.transport is not None
                peer = tls.hbone_peer(h2.transport.get_extra_info("ssl_object"))
                tls.verify_server(peer, expected)

            assert self.pool is not None
            return await hbone_connect(
                key, PlainSocketFactory(), lambda _i: ctx, verify, self.pool.forget
            )

        if self.pool is None:
            self.pool = ConnectionPool(dial)
        key = PoolKey(identity, frozenset({WAYPOINT_ID}), (self.waypoint_ip, 15008), self.client_ip)
        h2 = await self.pool.checkout(key)
        headers = [
            (":method", "CONNECT"),
            (":authority", authority),
            ("forwarded", f'for="{self.client_ip}:40000"'),
        ]
        return await HboneStream.open(h2, headers, 5.0, reserved=True)


def build_state(
    wp_ip: str, client_ip: str, backend_ips: list[str], app_port: int, app_protocol: str = ""
) -> MeshState:
    bound = GatewayAddress(hostname=WAYPOINT_HOST)
    web = service(
        name="web", namespace="shop", vips=vips(VIP), ports=ports({80: app_port}), waypoint=bound
    )
    if app_protocol:
        web = with_port_protocol(web, app_protocol)
    wp_service = service(
        name="waypoint", namespace="shop", vips=vips("10.96.0.31"), ports=ports({15008: 15008})
    )
    pods: list[Workload] = [
        workload(name="client-0", namespace="shop", service_account="client", ips=ips(client_ip)),
        workload(
            name="waypoint-0",
            namespace="shop",
            service_account="waypoint",
            ips=ips(wp_ip),
            services=serves((wp_service, {})),
        ),
    ]
    for i, ip in enumerate(backend_ips):
        pods.append(
            workload(
                name=f"web-{i}",
                namespace="shop",
                service_account="web",
                ips=ips(ip),
                node="node2",
                services=serves((web, {})),
                waypoint=None,
            )
        )
    return mesh_state(pods, [web, wp_service])


def with_port_protocol(svc: Service, app_protocol: str) -> Service:
    """The service with every port declaring `app_protocol` (Istio's names: http, grpc...)."""
    if not app_protocol:
        return svc  # undeclared: the waypoint sniffs
    protocol = parse_app_protocol(app_protocol)
    ports_ = tuple(dataclasses.replace(p, app_protocol=protocol) for p in svc.ports)
    return dataclasses.replace(svc, ports=ports_)


async def start(
    aio: Loop,
    serve_app: AppServe,
    backends: int = 1,
    app_protocol: str = "",
    ca: CertificateClient | None = None,
) -> LoopbackWaypoint:
    """`ca` signs every certificate of the run (default: an `InProcessCA`)."""
    wp_ip, client_ip, *backend_ips = addresses(2 + backends)
    servers = []
    app_port = 0
    for ip in backend_ips:
        server = await asyncio.start_server(serve_app, ip, app_port)
        app_port = server.sockets[0].getsockname()[1]
        servers.append(server)
        aio.defer(_closer(server))
    state = build_state(wp_ip, client_ip, backend_ips, app_port, app_protocol)
    return await _start_with(aio, state, wp_ip, client_ip, backend_ips, app_port, ca)


def _closer(server: asyncio.Server) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        server.close()

    return close


async def _close_pool(lw: LoopbackWaypoint) -> None:
    if lw.pool is not None:
        for _k, h2 in lw.pool.connections():
            h2.close()
        lw.pool.close()


@dataclass
class Mesh:
    """`start_mesh`'s cluster: several services behind the waypoint, each with its pods."""

    lw: LoopbackWaypoint
    vips: dict[str, str]  # service name -> VIP
    pods: dict[str, list[str]]  # service name -> its pods' IPs
    servers: list[asyncio.Server] = dataclasses.field(default_factory=list)

    async def forwarder(self, service: str, port: int = 80) -> tuple[str, int]:
        """A local TCP port whose connections each become one CONNECT to the service through
        the waypoint (what the client's tunnel does), for clients that need a socket
        (grpcio, websockets)."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            stream = await self.lw.connect(f"{self.vips[service]}:{port}")
            await splice(AsyncioByteStream(reader, writer), stream)
            writer.close()

        server = await asyncio.start_server(serve, self.lw.client_ip, 0)
        self.servers.append(server)
        listening: tuple[str, int] = server.sockets[0].getsockname()[:2]
        return listening

    async def request(self, service: str, raw: bytes, port: int = 80) -> bytes:
        """One HTTP/1.1 exchange (the client's bytes as written) through the waypoint: the
        whole answer, read until the waypoint ends the stream."""
        stream = await self.lw.connect(f"{self.vips[service]}:{port}")
        stream.write(raw)
        stream.write_eof()
        out = b""
        while chunk := await stream.read():
            out += chunk
        return out


async def start_mesh(
    aio: Loop,
    services: dict[str, list[Any]],  # AppServe, or an app with start_on(ip, port)/stop
    app_protocol: str = "http",
    resources: list[dict[str, Any]] | None = None,
    policies: list[dict[str, Any]] | None = None,
) -> Mesh:
    """Services (name -> one app per pod), every one bound to the waypoint, port 80 declaring
    `app_protocol`, with L7 `resources` (HTTPRoute, DestinationRule, ...) and targeted
    AuthorizationPolicies in the mesh config."""
    count = sum(len(apps) for apps in services.values())
    wp_ip, client_ip, *pod_ips = addresses(2 + count)
    app_port = 0
    bound = GatewayAddress(hostname=WAYPOINT_HOST)
    svc_objs: list[Service] = []
    pods: list[Workload] = [
        workload(name="client-0", namespace="shop", service_account="client", ips=ips(client_ip)),
    ]
    vip_of: dict[str, str] = {}
    pods_of: dict[str, list[str]] = {}
    i = 0
    for n, (name, apps) in enumerate(services.items()):
        vip = f"10.96.1.{10 + n}"
        vip_of[name] = vip
        for app in apps:
            ip = pod_ips[i]
            i += 1
            start_on = getattr(app, "start_on", None)
            if start_on is not None:  # an app with a server of its own (grpcio, websockets)
                app_port = await start_on(ip, app_port)
                aio.defer(getattr(app, "stop"))  # noqa: B009 (an optional method)
            else:
                server = await asyncio.start_server(app, ip, app_port)
                app_port = server.sockets[0].getsockname()[1]
                aio.defer(_closer(server))
            pods_of.setdefault(name, []).append(ip)
    for name in services:
        svc = service(name=name, namespace="shop", vips=vips(vip_of[name]),
                      ports=ports({80: app_port}), waypoint=bound)  # fmt: skip
        svc = with_port_protocol(svc, app_protocol)
        svc_objs.append(svc)
        for k, ip in enumerate(pods_of[name]):
            pods.append(
                workload(
                    name=f"{name}-{k}",
                    namespace="shop",
                    service_account=name,
                    ips=ips(ip),
                    node="node2",
                    services=serves((svc, {})),
                    labels=(("app", name), ("version", f"v{k}")),
                )
            )
    wp_service = service(
        name="waypoint", namespace="shop", vips=vips("10.96.0.31"), ports=ports({15008: 15008})
    )
    svc_objs.append(wp_service)
    pods.append(
        workload(
            name="waypoint-0",
            namespace="shop",
            service_account="waypoint",
            ips=ips(wp_ip),
            services=serves((wp_service, {})),
        )
    )
    raw = [parse_resource_entry(doc, f"resources[{k}]") for k, doc in enumerate(resources or [])]
    pols = [
        authorization_policy(str(doc["name"]), doc["spec"], namespace="shop")
        for doc in (policies or [])
    ]
    state = MeshState.build(pods, svc_objs, pols, raw)
    lw = await _start_with(aio, state, wp_ip, client_ip, pod_ips, app_port)
    mesh = Mesh(lw, vip_of, pods_of)

    async def close_forwarders() -> None:
        for server in mesh.servers:
            server.close()

    aio.defer(close_forwarders)
    return mesh


async def _start_with(
    aio: Loop,
    state: MeshState,
    wp_ip: str,
    client_ip: str,
    backend_ips: list[str],
    app_port: int,
    ca: CertificateClient | None = None,
) -> LoopbackWaypoint:
    certs = CertificateManager(ca if ca is not None else InProcessCA())
    aio.defer(certs.close)
    node2 = NodeProxy("node2", certs, TD)
    node2.on_state(state)
    for w in state.workloads:
        if w.node != "node2":
            continue
        proxy = PodProxy(
            Enrolment(w.uid, "loopback"),
            w,
            lambda: node2.state,
            certs,
            TD,
            node2.authorize,
            factory=PlainSocketFactory(),
            connection_table=node2.connection_table,
            listen_ip=str(w.ips[0]),
            guard=node2.guard,
        )
        aio.defer(proxy.stop)
        await proxy.start()
    cfg = WaypointConfig(
        name="waypoint",
        namespace="shop",
        node_name="node1",
        pod_ip=ip_address(wp_ip),
        local_xds_path=Path("/nonexistent"),
        ca_address=Path("/nonexistent"),
        ca_token_path=Path("/nonexistent"),
        trust_domain=TD,
    )
    wp = Waypoint(cfg, certs=certs, state=state)
    aio.defer(wp.close)
    await wp.start()
    lw = LoopbackWaypoint(wp, state, certs, wp_ip, client_ip, backend_ips, app_port, node2)
    aio.defer(lambda: _close_pool(lw))
    return lw
