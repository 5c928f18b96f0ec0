"""Waypoints with pods on loopback, without root: real TCP, TLS 1.3 and HTTP/2 CONNECT.

Pod A (client, node1) and pod B (web, node2, behind the `web` service) are real
`PodProxy`s as in test_pods_on_loopback. The `web` service and pod B are bound to the
waypoint `shop/waypoint`, whose pod W runs a test HBONE listener (the project's
`TlsListener` + `H2Transport`, with the waypoint's own certificate from the mesh CA): it
records each CONNECT's `:authority` and the client's proven identity, then relays the
stream to pod B's app. A waypoint pod is never captured, so no tunnel serves W.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pytest
from structlog.testing import capture_logs

from meshcore import tls
from meshcore.hbone.h2frames import PREFACE, settings_frame
from meshcore.hbone.server import HandshakeGate, TlsListener
from meshcore.hbone.transport import H2Transport
from meshcore.identity.certs import CertificateManager
from meshcore.identity.spiffe import SpiffeId
from meshcore.relay import HboneSplice
from meshcore.sockets import PlainSocketFactory, SocketAddr
from meshcore.state import GatewayAddress, HealthStatus, MeshState
from tests.support.aio import Loop, wait_until
from tests.support.certs import InProcessCA
from tests.support.h2 import Frames, connect_request, data_frame, headers_frame
from tests.support.mesh import ips, mesh_state, ports, serves, service, vips, workload
from tests.ztunnel.test_pods_on_loopback import (
    EchoApp,
    LogLines,
    Pod,
    Redirects,
    access_lines,
    count,
    loopback_addresses,
    read_all,
)
from ztunnel.inpod import Enrolment, PodProxy
from ztunnel.node import NodeProxy
from ztunnel.proxy.common import connect_tcp
from ztunnel.proxy.waypoint import WAYPOINT_UNAVAILABLE

VIP = "10.96.0.20"  # never dialled: the client's tunnel sends it to the waypoint as authority
CLIENT_ID = SpiffeId("cluster.local", "shop", "client")
WAYPOINT_ID = SpiffeId("cluster.local", "shop", "waypoint")
WP = GatewayAddress(hostname="shop/waypoint.shop.svc.cluster.local")


@dataclass
class Seen:
    authority: str
    peer: SpiffeId
    headers: dict[str, str]


@dataclass
class RecordingWaypoint:
    """A waypoint's HBONE side: accepts CONNECT, records it, relays to `upstream`."""

    upstream: SocketAddr
    seen: list[Seen] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    served: list[H2Transport] = field(default_factory=list)

    def protocol(self) -> H2Transport:
        h2 = H2Transport(client=False, on_request=self._on_request)
        self.served.append(h2)
        return h2

    def _on_request(self, h2: H2Transport, sid: int, headers: list[tuple[str, str]]) -> None:
        assert h2.transport is not None
        peer = tls.hbone_peer(h2.transport.get_extra_info("ssl_object"))
        got = dict(headers)
        self.seen.append(Seen(got[":authority"], peer, got))
        splice = HboneSplice(h2)
        splice.sid = sid
        h2.conn.streams[sid].handler = splice  # holds what arrives before the answer
        task = asyncio.get_running_loop().create_task(self._serve(h2, splice))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, h2: H2Transport, splice: HboneSplice) -> None:
        _, app = await connect_tcp(PlainSocketFactory(), self.upstream)
        h2.conn.respond(splice.sid, 200, splice, end=False)
        splice.start(app)

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for h2 in self.served:
            if h2.transport is not None:
                h2.transport.abort()


@dataclass
class WaypointMesh:
    a: Pod
    b: Pod
    w_ip: str
    node1: NodeProxy
    node2: NodeProxy
    app: EchoApp
    app_port: int
    waypoint: RecordingWaypoint
    waypoint_ctx: ssl.SSLContext  # the waypoint's client side (its upstream leg)
    redirects: Redirects
    outsider_ip: str
    state: MeshState
    listener: TlsListener

    def set_state(self, state: MeshState) -> None:
        """A config change, as the nodes see it (they update the pods they enrolled; these
        pods were started by the test, so it updates them)."""
        self.state = state
        for node in (self.node1, self.node2):
            node.on_state(state)
        for pod in (self.a, self.b):
            new = state.workload_by_uid(pod.workload.uid)
            assert new is not None
            pod.workload = pod.proxy.workload = new


def build_state(a: str, b: str, w: str, app_port: int, waypoint_ready: bool = True) -> MeshState:
    wp_svc = service(name="waypoint", namespace="shop", vips=vips("10.96.0.99"))
    web = service(
        name="web", namespace="shop", vips=vips(VIP), ports=ports({80: app_port}), waypoint=WP
    )
    return mesh_state(
        [
            workload(name="client-0", namespace="shop", service_account="client", ips=ips(a)),
            workload(
                name="web-0",
                namespace="shop",
                service_account="web",
                ips=ips(b),
                node="node2",
                services=serves((web, {})),
                waypoint=WP,
            ),
            workload(
                name="waypoint-0",
                namespace="shop",
                service_account="waypoint",
                ips=ips(w),
                node="node3",  # no tunnel here serves it: a waypoint pod is not captured
                services=serves((wp_svc, {})),
                status=HealthStatus.HEALTHY if waypoint_ready else HealthStatus.UNHEALTHY,
                labels=(("istio.io/dataplane-mode", "none"),),
            ),
        ],
        [web, wp_svc],
    )


@pytest.fixture
def logs() -> Iterator[LogLines]:
    with capture_logs() as captured:
        yield captured


@pytest.fixture
def aio() -> Iterator[Loop]:
    loop = Loop("uvloop")
    yield loop
    loop.close()


@pytest.fixture
def mesh(aio: Loop, logs: LogLines) -> WaypointMesh:
    async def start() -> WaypointMesh:
        a_ip, b_ip, w_ip, outsider_ip = loopback_addresses(4)
        app = aio.closing(EchoApp())
        app_port = await app.start(b_ip)
        state = build_state(a_ip, b_ip, w_ip, app_port)
        certs = CertificateManager(InProcessCA())
        aio.defer(certs.close)
        node1 = NodeProxy("node1", certs, "cluster.local")
        node2 = NodeProxy("node2", certs, "cluster.local")
        for node in (node1, node2):
            node.on_state(state)
        redirects = Redirects()

        # The waypoint: its certificate from the mesh CA, a listener at W:15008 that
        # relays every stream to pod B's app.
        wp_cert = await certs.get(WAYPOINT_ID)
        waypoint = aio.closing(RecordingWaypoint(SocketAddr.of((b_ip, app_port))))
        listener = TlsListener(tls.server_context(wp_cert), waypoint.protocol, HandshakeGate())
        await listener.start(socket.create_server((w_ip, 15008)))
        aio.defer(listener.close)

        async def pod(name: str, node: NodeProxy) -> Pod:
            w = next(w for w in state.workloads if w.name == name)
            proxy = PodProxy(
                Enrolment(w.uid, "loopback"),
                w,
                lambda: node.state,
                certs,
                "cluster.local",
                node.authorize,
                factory=PlainSocketFactory(),
                connection_table=node.connection_table,
                listen_ip=str(w.ips[0]),
                orig_dst=redirects.original_dst,
                guard=node.guard,
            )
            aio.defer(proxy.stop)
            await proxy.start()
            return Pod(w, proxy)

        return WaypointMesh(
            a=await pod("client-0", node1),
            b=await pod("web-0", node2),
            w_ip=w_ip,
            node1=node1,
            node2=node2,
            app=app,
            app_port=app_port,
            waypoint=waypoint,
            waypoint_ctx=tls.client_context(wp_cert),
            redirects=redirects,
            outsider_ip=outsider_ip,
            state=state,
            listener=listener,
        )

    return aio.run(start)


async def hbone_to(
    ctx: ssl.SSLContext, ip: str, authority: str, payload: bytes = b"ping"
) -> Frames:
    """An HBONE client written by hand: CONNECT `authority` at `ip`:15008 with the
    certificate of `ctx`; once answered 200, send `payload` and wait for its echo."""
    reader, writer = await asyncio.open_connection(ip, 15008, ssl=ctx, server_hostname=None)
    frames = Frames()
    try:
        writer.write(PREFACE + settings_frame({}) + headers_frame(1, connect_request(authority)))
        while 1 not in frames.status and 1 not in frames.resets:
            data = await reader.read(65536)
            if not data:
                return frames
            frames.feed(data)
        if frames.status.get(1) == 200:
            writer.write(data_frame(1, payload))
            while frames.data < len(payload):
                data = await reader.read(65536)
                if not data:
                    break
                frames.feed(data)
        return frames
    finally:
        writer.close()


def test_a_service_with_a_waypoint_is_reached_through_it_with_the_original_authority(
    aio: Loop, mesh: WaypointMesh, logs: LogLines
) -> None:
    async def main() -> None:
        reader, writer = await mesh.redirects.connect(
            mesh.a.ip, mesh.a.port(15001), SocketAddr.of((VIP, 80))
        )
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.write_eof()
        assert await read_all(reader) == b""
        writer.close()
        await wait_until(lambda: len(access_lines(logs, direction="outbound")) == 1, "the log")

    aio.run(main)
    (seen,) = mesh.waypoint.seen
    assert seen.authority == f"{VIP}:80"  # the original VIP:port, not translated
    assert seen.peer == CLIENT_ID  # the client's identity, proven to the waypoint
    assert seen.headers["forwarded"].endswith(";host=web.shop.svc.cluster.local")
    (line,) = access_lines(logs, direction="outbound")
    assert line["dst.hbone_addr"] == f"{mesh.w_ip}:15008"
    assert line["dst.addr"] == f"{VIP}:80"
    assert line["dst.identity"] == str(WAYPOINT_ID)
    assert "error" not in line
    # The client's tunnel never joined it in process, and pod B's tunnel saw no client.
    assert access_lines(logs, direction="inbound") == []


def test_a_pod_ip_bound_to_a_waypoint_goes_through_it_too(
    aio: Loop, mesh: WaypointMesh, logs: LogLines
) -> None:
    async def main() -> None:
        dst = mesh.b.port(mesh.app_port)
        reader, writer = await mesh.redirects.connect(mesh.a.ip, mesh.a.port(15001), dst)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        writer.close()

    aio.run(main)
    (seen,) = mesh.waypoint.seen
    assert seen.authority == f"{mesh.b.ip}:{mesh.app_port}"
    assert seen.peer == CLIENT_ID


def test_a_direct_connection_to_a_bound_pod_is_refused_and_the_waypoints_accepted(
    aio: Loop, mesh: WaypointMesh, logs: LogLines
) -> None:
    authority = f"{mesh.b.ip}:{mesh.app_port}"

    async def main() -> tuple[Frames, Frames, bytes]:
        assert mesh.a.proxy.client_ctx is not None
        bypass = await hbone_to(mesh.a.proxy.client_ctx, mesh.b.ip, authority)
        through = await hbone_to(mesh.waypoint_ctx, mesh.b.ip, authority, b"via waypoint")
        # Plaintext from outside the mesh at pod B's 15006: refused as well.
        dst = mesh.b.port(mesh.app_port)
        reader, writer = await mesh.redirects.connect(mesh.outsider_ip, mesh.b.port(15006), dst)
        writer.write(b"plain")
        plain = await read_all(reader)
        writer.close()
        await wait_until(
            lambda: len(access_lines(logs, direction="inbound")) == 3, "three inbound lines"
        )
        return bypass, through, plain

    bypass, through, plain = aio.run(main)
    assert bypass.status == {1: 401}
    assert through.status == {1: 200} and through.data == len(b"via waypoint")
    assert plain == b""
    lines = access_lines(logs, direction="inbound")
    refused = [line for line in lines if "bound to waypoint" in line.get("error", "")]
    assert [line.get("src.identity") for line in refused] == [str(CLIENT_ID), None]
    for line in refused:
        assert "bound to waypoint shop/waypoint.shop.svc.cluster.local" in line["error"]
        assert "tried to bypass it" in line["error"]
    # The waypoint's stream reached the app (the hand-written client then reset it).
    (accepted,) = [line for line in lines if line not in refused]
    assert accepted["src.identity"] == str(WAYPOINT_ID)
    assert accepted["bytes_sent"] == len(b"via waypoint")
    assert len(mesh.app.peers) == 1  # only the waypoint's got through
    table = mesh.node2.connection_table
    assert count(table, "istio_tcp_connections_closed_total", response_flags="DENY") == 2


def test_a_waypoint_with_no_ready_endpoint_refuses_and_counts_it(
    aio: Loop, mesh: WaypointMesh, logs: LogLines
) -> None:
    mesh.set_state(
        build_state(mesh.a.ip, mesh.b.ip, mesh.w_ip, mesh.app_port, waypoint_ready=False)
    )

    async def main() -> bytes:
        reader, writer = await mesh.redirects.connect(
            mesh.a.ip, mesh.a.port(15001), SocketAddr.of((VIP, 80))
        )
        writer.write(b"hello")
        got = await read_all(reader)
        writer.close()
        await wait_until(lambda: bool(access_lines(logs, direction="outbound")), "the log")
        return got

    assert aio.run(main) == b""
    assert mesh.waypoint.seen == [] and mesh.app.peers == []
    (line,) = access_lines(logs, direction="outbound")
    assert line["error"].startswith(f"refused [{WAYPOINT_UNAVAILABLE}]: waypoint shop/waypoint")
    assert "not ready; refused (fail closed)" in line["error"]
    warned = [e for e in logs if e["event"] == "waypoint unavailable: connection refused"]
    assert warned and warned[0]["waypoint"] == "shop/waypoint.shop.svc.cluster.local"
    flags = {"response_flags": WAYPOINT_UNAVAILABLE}
    assert count(mesh.node1.connection_table, "istio_tcp_connections_closed_total", **flags) == 1


def test_fail_open_goes_straight_to_the_pod_and_says_so(
    aio: Loop, mesh: WaypointMesh, logs: LogLines
) -> None:
    state = build_state(mesh.a.ip, mesh.b.ip, mesh.w_ip, mesh.app_port, waypoint_ready=False)
    opened = replace(WP, fail_open=True)
    mesh.set_state(
        mesh_state(
            [replace(w, waypoint=opened) if w.waypoint else w for w in state.workloads],
            [replace(s, waypoint=opened) if s.waypoint else s for s in state.services],
        )
    )

    async def main() -> None:
        reader, writer = await mesh.redirects.connect(
            mesh.a.ip, mesh.a.port(15001), SocketAddr.of((VIP, 80))
        )
        writer.write(b"open")
        assert await reader.readexactly(4) == b"open"
        writer.close()

    aio.run(main)
    assert mesh.waypoint.seen == []
    assert len(mesh.app.peers) == 1  # pod B's tunnel let it in
    warned = [e for e in logs if e["event"] == "waypoint unavailable: failing open"]
    assert warned and warned[0]["problem"] == "not ready"


def test_a_fail_open_waypoint_that_cannot_be_reached_is_bypassed(
    aio: Loop, mesh: WaypointMesh, logs: LogLines
) -> None:
    """Ready by the config, but its port is closed (its pod went down before the control
    plane noticed): nothing of the app's was sent, so the connection goes straight to the
    pod, and the tunnel says why. Without failOpen the same connection fails (closed).
    Here only the service is bound: a pod bound itself admits no peer but its waypoint,
    and its tunnel cannot know that the waypoint is down."""
    opened = replace(WP, fail_open=True)
    state = mesh.state
    mesh.set_state(
        mesh_state(
            [replace(w, waypoint=None) for w in state.workloads],
            [replace(s, waypoint=opened) if s.waypoint else s for s in state.services],
        )
    )
    mesh.listener.close()

    async def main() -> None:
        reader, writer = await mesh.redirects.connect(
            mesh.a.ip, mesh.a.port(15001), SocketAddr.of((VIP, 80))
        )
        writer.write(b"open")
        assert await reader.readexactly(4) == b"open"
        writer.close()

    aio.run(main)
    assert mesh.waypoint.seen == []
    assert len(mesh.app.peers) == 1
    warned = [e for e in logs if e["event"] == "waypoint unreachable: failing open"]
    assert warned and warned[0]["waypoint"] == "shop/waypoint.shop.svc.cluster.local"


def test_a_fail_closed_waypoint_that_cannot_be_reached_fails_the_connection(
    aio: Loop, mesh: WaypointMesh, logs: LogLines
) -> None:
    mesh.listener.close()

    async def main() -> bytes:
        reader, writer = await mesh.redirects.connect(
            mesh.a.ip, mesh.a.port(15001), SocketAddr.of((VIP, 80))
        )
        writer.write(b"closed")
        got = await read_all(reader)
        writer.close()
        return got

    assert aio.run(main) == b""
    assert mesh.app.peers == []
    assert not [e for e in logs if e["event"] == "waypoint unreachable: failing open"]
