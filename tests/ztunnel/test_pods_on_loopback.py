"""Three pods' proxies on loopback, without root: real TCP, TLS 1.3 and HTTP/2 CONNECT.

Each pod is a real `PodProxy` (15001, 15006 and 15008, with the plain socket factory) on
an address of its own in 127.0.0.0/8, with certificates from the project's CA held in
memory (through the real certificate manager and its worker process), and the real
policy decision of its node. Pods A (client) and C (intruder) are on node1, pod B (web,
behind the `web` service) on node2, so A -> B crosses "nodes" over HBONE.

What needs the kernel is left to the netns tier: capture (here the test records, for
each client connection, the destination REDIRECT and conntrack would have kept: hence
`__recorded_redirects` in the names), transparent sockets (the app sees the tunnel's
address, not the client's) and routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import random
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from meshcore.hbone.h2frames import (
    PREFACE,
    ErrorCode,
    frame_header,
    ping,
    rst_stream,
    settings_frame,
)
from meshcore.hbone.limits import HboneLimits
from meshcore.identity.certs import CertificateManager
from meshcore.identity.spiffe import SpiffeId
from meshcore.observability.connections import ConnectionTable
from meshcore.relay import AppSide, HboneSplice
from meshcore.sockets import LISTEN_BACKLOG, PlainSocketFactory, SocketAddr
from meshcore.state import MeshState, Workload
from meshcore.timewait import tcp_state
from tests.support.aio import Loop, wait_until
from tests.support.certs import InProcessCA, client_hello
from tests.support.gcprobe import cyclic_garbage
from tests.support.h2 import Frames, connect_request, headers_frame
from tests.support.mesh import (
    addr,
    authorization_policy,
    ips,
    mesh_state,
    ports,
    serves,
    service,
    vips,
    workload,
)
from ztunnel.inpod import Enrolment, PodProxy
from ztunnel.node import NodeProxy

LogLines = list[MutableMapping[str, Any]]

VIP = "10.96.0.20"  # never dialled: the outbound proxy maps it to pod B
CLIENT_ID = SpiffeId("cluster.local", "shop", "client")
INTRUDER_ID = SpiffeId("cluster.local", "shop", "intruder")
WEB_ID = SpiffeId("cluster.local", "shop", "web")


def loopback_addresses(n: int) -> list[str]:
    """`n` addresses in 127.0.0.0/8, fresh per run and outside 127.0.0.x. The listeners
    bind the fixed pod ports (15001/15006/15008, which the outbound side dials), so two
    runs at once must not share an address."""
    rng = random.SystemRandom()
    base = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}."
    start = rng.randint(1, 254 - n)
    return [f"{base}{start + i}" for i in range(n)]


class Redirects:
    """The capture's part, recorded by the test: for each client connection, the
    destination it asked for, keyed by the client's own address (recorded before it
    connects, so the proxy can never look first)."""

    def __init__(self) -> None:
        self._by_client: dict[SocketAddr, SocketAddr] = {}

    def original_dst(self, sock: socket.socket) -> SocketAddr:
        try:
            return self._by_client[SocketAddr.of(sock.getpeername())]
        except KeyError:
            raise OSError(errno.ENOENT, "no redirect recorded for this client") from None

    def record(self, sock: socket.socket, dst: SocketAddr) -> None:
        """`sock` (bound) is a client connection to `dst` that the capture redirects."""
        self._by_client[SocketAddr.of(sock.getsockname())] = dst

    async def connect(
        self, src_ip: str, listener: SocketAddr, dst: SocketAddr
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client at `src_ip` whose connection to `dst` the capture sends to `listener`."""
        sock = socket.socket()
        try:
            sock.setblocking(False)
            sock.bind((src_ip, 0))
            self._by_client[SocketAddr.of(sock.getsockname())] = dst
            await asyncio.get_running_loop().sock_connect(sock, listener.pair)
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise


@dataclass
class EchoApp:
    """The app in pod B: echoes every byte, half-closes after the client did. Sent exactly
    `ANSWER_AND_CLOSE`, it answers `BYE` and closes at once, the answer and its FIN in one
    segment (as an HTTP/1.0 server's answer and close usually leave)."""

    peers: list[SocketAddr] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self, ip: str) -> int:
        self.server = await asyncio.start_server(self._serve, ip, 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(SocketAddr.of(writer.get_extra_info("peername")))
        try:
            while data := await reader.read(65536):
                if data == ANSWER_AND_CLOSE:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                    writer.write(BYE)
                    break  # the FIN below leaves with what the cork holds
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


ANSWER_AND_CLOSE = b"answer and close\n"
BYE = b"bye"
TCP_CLOSE_WAIT = 8  # include/net/tcp_states.h: the peer's FIN is in, ours not yet sent


@dataclass
class Pod:
    workload: Workload
    proxy: PodProxy

    @property
    def ip(self) -> str:
        return str(self.workload.ips[0])

    def port(self, number: int) -> SocketAddr:
        return addr(f"{self.ip}:{number}")


@dataclass
class LoopbackMesh:
    a: Pod
    b: Pod
    c: Pod
    node1: NodeProxy
    node2: NodeProxy
    app: EchoApp
    app_port: int
    outsider_ip: str
    redirects: Redirects

    async def from_pod(
        self, pod: Pod, dst: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The pod's app connects to `dst`; the capture hands it to the pod's 15001."""
        return await self.redirects.connect(pod.ip, pod.port(15001), addr(dst))

    async def plaintext_to(self, pod: Pod) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client outside the mesh connects to the pod's app; the capture hands it to
        the pod's 15006."""
        dst = pod.port(self.app_port)
        return await self.redirects.connect(self.outsider_ip, pod.port(15006), dst)


def build_state(ip: dict[str, str], app_port: int) -> MeshState:
    web = service(name="web", namespace="shop", vips=vips(VIP), ports=ports({80: app_port}))
    pods = [
        workload(name="client-0", namespace="shop", service_account="client", ips=ips(ip["a"])),
        workload(
            name="web-0",
            namespace="shop",
            service_account="web",
            ips=ips(ip["b"]),
            node="node2",
            services=serves((web, {})),
        ),
        workload(name="intruder-0", namespace="shop", service_account="intruder", ips=ips(ip["c"])),
    ]
    deny_intruder = authorization_policy(
        "deny-intruder",
        {
            "action": "DENY",
            "rules": [
                {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/intruder"]}}]}
            ],
        },
        namespace="shop",
    )
    return mesh_state(pods, [web], [deny_intruder])


@pytest.fixture
def logs() -> Iterator[LogLines]:
    with capture_logs() as captured:
        yield captured


@pytest.fixture
def aio_uvloop() -> Iterator[Loop]:
    """The tunnel's own loop."""
    loop = Loop("uvloop")
    yield loop
    loop.close()


@pytest.fixture
def limits(request: pytest.FixtureRequest) -> HboneLimits:
    """The nodes' limits: the defaults, unless a test parametrizes this fixture."""
    chosen: HboneLimits = getattr(request, "param", HboneLimits())
    return chosen


@pytest.fixture
def mesh(aio_uvloop: Loop, logs: LogLines, limits: HboneLimits) -> LoopbackMesh:
    aio = aio_uvloop

    async def start() -> LoopbackMesh:
        a_ip, b_ip, c_ip, outsider_ip = loopback_addresses(4)
        app = aio.closing(EchoApp())
        app_port = await app.start(b_ip)
        state = build_state({"a": a_ip, "b": b_ip, "c": c_ip}, app_port)
        certs = CertificateManager(InProcessCA())
        aio.defer(certs.close)  # after the pods stop (last deferred, first run)
        node1 = NodeProxy("node1", certs, "cluster.local", hbone_limits=limits)
        node2 = NodeProxy("node2", certs, "cluster.local", hbone_limits=limits)
        for node in (node1, node2):
            node.on_state(state)
        redirects = Redirects()

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
                guard=node.guard,  # as the node starts its pods: one guard, counted
            )
            aio.defer(proxy.stop)
            await proxy.start()
            return Pod(w, proxy)

        return LoopbackMesh(
            a=await pod("client-0", node1),
            b=await pod("web-0", node2),
            c=await pod("intruder-0", node1),
            node1=node1,
            node2=node2,
            app=app,
            app_port=app_port,
            outsider_ip=outsider_ip,
            redirects=redirects,
        )

    return aio.run(start)


def count(table: ConnectionTable, name: str, **labels: str) -> float:
    """A counter of this node's metrics text, summed over the series matching `labels`."""
    total = 0.0
    text = table.metrics.render().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def access_lines(logs: LogLines, **fields: str) -> list[MutableMapping[str, Any]]:
    return [
        line
        for line in logs
        if line["event"] == "connection complete"
        and all(line.get(k) == v for k, v in fields.items())
    ]


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the connection ends; a reset ends it too (what a denied client
    sees may be either, depending on what the kernel still held)."""
    got = b""
    try:
        while chunk := await reader.read(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def accept_queue_limit(sock: socket.socket) -> int:
    """A listening socket's accept-queue bound as the kernel holds it (TCP_INFO of a
    listener: tcpi_sacked is sk_max_ack_backlog), whatever listen() was last called with."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("=I", info, 28)[0])


def test_a_pods_listeners_keep_their_accept_queue_when_the_loop_serves_them(
    mesh: LoopbackMesh,
) -> None:
    """The loop's create_server(sock=...) calls listen() again, with 100 unless told: the
    pod's 15001 and 15006 queues shrank to 100, and a burst of new connections had SYNs
    dropped and retried 1, 3, 7 s later (the soak's answers after 10 s)."""
    proxy = mesh.a.proxy
    served = [server.sockets[0] for server in proxy.servers]
    assert len(served) == 2
    assert proxy.hbone_server is not None and proxy.hbone_server.sock is not None
    for sock in (*served, proxy.hbone_server.sock):
        assert accept_queue_limit(sock) == LISTEN_BACKLOG


def test_hbone_from_pod_to_service_reaches_the_app_with_the_client_identity__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines
) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: many DATA frames, flow control both ways

    async def main() -> None:
        reader, writer = await mesh.from_pod(mesh.a, f"{VIP}:80")
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        # Open: each side's table shows it, the destination with the proven identity.
        (inbound,) = mesh.node2.connection_table.connections()
        assert inbound["direction"] == "inbound"
        assert inbound["srcIdentity"] == str(CLIENT_ID)
        assert inbound["dstIdentity"] == str(WEB_ID)
        assert inbound["hbone"] == f"{mesh.b.ip}:15008"
        (outbound,) = mesh.node1.connection_table.connections()
        assert outbound["direction"] == "outbound"
        assert outbound["dst"] == f"{mesh.b.ip}:{mesh.app_port}"
        assert outbound["hbone"] == f"{mesh.b.ip}:15008"

        echoed = asyncio.ensure_future(read_all(reader))
        writer.write(payload)
        writer.write_eof()
        assert await echoed == payload
        writer.close()
        await wait_until(lambda: len(access_lines(logs)) == 2, "both access-log lines")

    aio_uvloop.run(main)

    size = 5 + len(payload)
    (src_line,) = access_lines(logs, direction="outbound")
    assert src_line["src.identity"] == str(CLIENT_ID)
    assert src_line["dst.identity"] == str(WEB_ID)
    assert src_line["dst.service"] == "web.shop.svc.cluster.local"
    assert src_line["dst.addr"] == f"{mesh.b.ip}:{mesh.app_port}"
    assert (src_line["bytes_sent"], src_line["bytes_recv"]) == (size, size)
    assert "error" not in src_line
    (dst_line,) = access_lines(logs, direction="inbound")
    assert dst_line["src.identity"] == str(CLIENT_ID)  # what the TLS handshake proved
    # The tunnel's HBONE socket leaves from its own loopback address here, which no
    # workload owns (in a pod it leaves from the pod's IP: the netns tier checks that).
    assert "src.workload" not in dst_line
    assert dst_line["dst.workload"] == "web-0"
    assert (dst_line["bytes_sent"], dst_line["bytes_recv"]) == (size, size)
    assert "error" not in dst_line

    closed = "istio_tcp_connections_closed_total"
    for node, reporter in ((mesh.node1, "source"), (mesh.node2, "destination")):
        labels = {
            "reporter": reporter,
            "source_principal": str(CLIENT_ID),
            "destination_principal": str(WEB_ID),
            "connection_security_policy": "mutual_tls",
            "response_flags": "-",
        }
        assert count(node.connection_table, closed, **labels) == 1
        assert count(node.connection_table, "istio_tcp_received_bytes_total", **labels) == size
        assert count(node.connection_table, "istio_tcp_sent_bytes_total", **labels) == size
    # Without transparent sockets (root) the app sees the tunnel's address, not pod A's.
    assert mesh.app.peers and all(str(p.ip) != mesh.a.ip for p in mesh.app.peers)


def test_a_denied_client_is_cut_off_and_the_denial_counted_on_both_ends__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines
) -> None:
    async def main() -> bytes:
        reader, writer = await mesh.from_pod(mesh.c, f"{VIP}:80")
        writer.write(b"let me in")
        got = await read_all(reader)
        writer.close()
        await wait_until(lambda: len(access_lines(logs)) == 2, "both access-log lines")
        return got

    assert aio_uvloop.run(main) == b""  # not a byte from the app
    assert mesh.app.peers == []  # the app never saw the connection

    (dst_line,) = access_lines(logs, direction="inbound")
    assert dst_line["error"].startswith("401: ")
    assert "shop/deny-intruder" in dst_line["error"]
    assert dst_line["src.identity"] == str(INTRUDER_ID)
    (src_line,) = access_lines(logs, direction="outbound")
    assert src_line["error"] == "HBONE CONNECT answered 401"

    closed = "istio_tcp_connections_closed_total"
    deny = {"response_flags": "DENY", "source_principal": str(INTRUDER_ID)}
    assert count(mesh.node1.connection_table, closed, reporter="source", **deny) == 1
    assert count(mesh.node2.connection_table, closed, reporter="destination", **deny) == 1
    assert (
        mesh.node1.connection_table.connections() == mesh.node2.connection_table.connections() == []
    )


def test_a_pod_that_takes_another_pods_address_still_speaks_as_itself__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines
) -> None:
    """The intruder's app sends from the client's address (a spoofed source): its tunnel
    presents the identity of the pod whose listener took the connection, never one looked
    up by source address, so the intruder's denial holds."""

    async def main() -> bytes:
        reader, writer = await mesh.redirects.connect(
            mesh.a.ip, mesh.c.port(15001), addr(f"{VIP}:80")
        )
        writer.write(b"it is me, the client")
        got = await read_all(reader)
        writer.close()
        await wait_until(lambda: len(access_lines(logs)) == 2, "both access-log lines")
        return got

    assert aio_uvloop.run(main) == b""
    assert mesh.app.peers == []
    (src_line,) = access_lines(logs, direction="outbound")
    assert src_line["src.identity"] == str(INTRUDER_ID)
    (dst_line,) = access_lines(logs, direction="inbound")
    assert dst_line["src.identity"] == str(INTRUDER_ID)
    assert "shop/deny-intruder" in dst_line["error"]


def test_an_answer_and_the_server_s_fin_reach_the_client_together__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines
) -> None:
    """The app answers and closes, its answer and FIN in one segment. Through both tunnels
    the client gets them together again (END_STREAM on the answer's DATA frame, and the
    client's tunnel holds the answer until the FIN can go with it), so when the answer is
    readable the FIN is in: the client closes second and keeps no TIME-WAIT, as without
    the mesh. Apart, a client that closes once it has its answer closes first, and under
    churn its TIME-WAITs fill its port range."""

    def answer_and_state(sock: socket.socket) -> tuple[bytes, int]:
        # A thread of its own, blocked in recv: it runs as soon as the answer is readable,
        # while the tunnels' loop may still be busy (as separate processes would be).
        got = sock.recv(len(BYE))
        return got, tcp_state(sock)

    async def main() -> tuple[bytes, int, bytes]:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        try:
            sock.bind((mesh.a.ip, 0))
            mesh.redirects.record(sock, addr(f"{VIP}:80"))
            sock.setblocking(False)
            await loop.sock_connect(sock, mesh.a.port(15001).pair)
            await loop.sock_sendall(sock, ANSWER_AND_CLOSE)
            sock.setblocking(True)
            sock.settimeout(10)
            got, state = await asyncio.to_thread(answer_and_state, sock)
            rest = await asyncio.to_thread(sock.recv, 100)
            return got, state, rest
        finally:
            sock.close()

    got, state, rest = aio_uvloop.run(main)
    assert got == BYE
    assert state == TCP_CLOSE_WAIT
    assert rest == b""


def test_a_plaintext_client_reaches_the_app_through_15006_without_identity__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines
) -> None:
    async def main() -> bytes:
        reader, writer = await mesh.plaintext_to(mesh.b)
        before = time.time()
        writer.write(b"plain ")
        assert await reader.readexactly(6) == b"plain "
        # Open: the table tells a plaintext client apart, and names the pod's identity as
        # the destination's (the log line, which reports what the connection proved, does
        # not).
        (entry,) = mesh.node2.connection_table.connections()
        assert entry["direction"] == "inbound_plaintext"
        assert entry["srcIdentity"] is None
        assert entry["dstIdentity"] == str(WEB_ID)
        assert entry["hbone"] is None
        assert entry["dst"] == f"{mesh.b.ip}:{mesh.app_port}"
        assert before - 1.0 <= entry["startedAt"] <= time.time()
        writer.write(b"bytes")
        writer.write_eof()
        got = await read_all(reader)
        writer.close()
        await wait_until(lambda: len(access_lines(logs)) == 1, "the access-log line")
        return b"plain " + got

    assert aio_uvloop.run(main) == b"plain bytes"
    (line,) = access_lines(logs)
    assert line["direction"] == "inbound"
    assert line["src.addr"].startswith(f"{mesh.outsider_ip}:")
    assert "src.identity" not in line  # plaintext proves nothing
    assert "dst.identity" not in line
    assert (line["bytes_sent"], line["bytes_recv"]) == (11, 11)
    labels = {
        "reporter": "destination",
        "source_principal": "unknown",
        "connection_security_policy": "unknown",
        "response_flags": "-",
    }
    assert count(mesh.node2.connection_table, "istio_tcp_connections_closed_total", **labels) == 1


def test_outside_the_mesh_is_plain_tcp_and_a_tunnel_port_is_refused__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines
) -> None:
    outside = aio_uvloop.closing(EchoApp())

    async def main() -> tuple[bytes, bytes]:
        # An address no workload has: PASSTHROUGH, plain TCP from pod A.
        port = await outside.start(mesh.outsider_ip)
        reader, writer = await mesh.from_pod(mesh.a, f"{mesh.outsider_ip}:{port}")
        writer.write(b"direct")
        writer.write_eof()
        direct = await read_all(reader)
        writer.close()
        # A self-call through the capture: refused before anything is dialled.
        reader, writer = await mesh.from_pod(mesh.a, f"{mesh.b.ip}:15008")
        refused = await read_all(reader)
        writer.close()
        await wait_until(lambda: len(access_lines(logs)) == 2, "both access-log lines")
        return direct, refused

    direct, refused = aio_uvloop.run(main)
    assert direct == b"direct"
    assert refused == b""
    passed, self_call = access_lines(logs)
    assert passed["direction"] == "outbound" and "error" not in passed
    assert "dst.hbone_addr" not in passed and "dst.identity" not in passed
    assert (passed["bytes_sent"], passed["bytes_recv"]) == (6, 6)
    assert self_call["error"] == "refused: port 15008 is the tunnel's own"
    assert mesh.app.peers == []  # nothing reached pod B's app
    labels = {"reporter": "source", "connection_security_policy": "unknown"}
    assert count(mesh.node1.connection_table, "istio_tcp_connections_closed_total", **labels) == 1


def test_rapid_reset_at_a_pods_15008_ends_the_connection_with_enhance_your_calm(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines
) -> None:
    """2 000 CONNECT + RST_STREAM pairs at pod B's 15008 in one write (issue: 20 000 of
    them made as many app connects). Each reset cancels its stream's app connect and leaves
    the connects in flight at once, so every stream counts as reset before an answer, and
    the 101st ends the connection; none is refused as a connect in flight instead (which
    hid them from the rapid-reset count)."""

    async def main() -> Frames:
        assert mesh.a.proxy.client_ctx is not None  # pod A's certificate, as its tunnel dials
        reader, writer = await asyncio.open_connection(
            mesh.b.ip, 15008, ssl=mesh.a.proxy.client_ctx, server_hostname=None
        )
        encoder = hpack.Encoder()
        authority = f"{mesh.b.ip}:{mesh.app_port}"
        attack = PREFACE + settings_frame({})
        for sid in range(1, 4000, 2):
            block = encoder.encode(connect_request(authority))
            attack += headers_frame(sid, block) + rst_stream(sid, ErrorCode.CANCEL)
        writer.write(attack)
        frames = Frames()
        frames.feed(await read_all(reader))
        writer.close()
        return frames

    frames = aio_uvloop.run(main)
    assert frames.goaway is not None and frames.goaway.code == ErrorCode.ENHANCE_YOUR_CALM
    assert frames.status == {}  # no stream was answered
    refusals = [line for line in logs if line["event"] == "hbone peer refused"]
    assert [line["reason"] for line in refusals] == ["max_premature_resets"]
    assert "101 of 101 streams" in refusals[0]["detail"]


@pytest.mark.parametrize(
    "limits",
    [
        HboneLimits(
            max_pending_handshakes=8,
            max_pending_handshakes_per_source=2,
            max_pending_handshakes_from_strangers=4,
            handshake_timeout=20,
        )
    ],
    indirect=True,
)
def test_strangers_fill_only_their_share_of_the_handshakes_and_a_pod_still_gets_through(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines
) -> None:
    """Eight addresses no workload owns each start two TLS handshakes at pod B's 15008 and
    never finish them. Together they may hold 4 of the node's 8 handshake slots, so the
    other 12 are refused before TLS; pod A, from its own address, still completes a
    mutual-TLS handshake and is served (before, the 16 filled all 8 slots and A was
    refused with them)."""
    hello = client_hello()[:100]
    base = mesh.outsider_ip.rsplit(".", 1)[0]
    taken = {mesh.a.ip, mesh.b.ip, mesh.c.ip, mesh.outsider_ip}
    # Beside the pods, owned by none.
    strangers = [ip for i in range(254, 0, -1) if (ip := f"{base}.{i}") not in taken][:8]

    async def main() -> bool:
        listener = mesh.b.proxy.hbone_server
        assert listener is not None
        assert not any(map(listener.gate.known, strangers)) and listener.gate.known(mesh.a.ip)
        # The tunnel's state groups a pod's handshakes by its node (fairness between nodes).
        assert listener.gate.group_of(mesh.a.ip) == "node/node1"
        assert listener.gate.group_of(mesh.b.ip) == "node/node2"
        held = []
        for ip in strangers:
            for _ in range(2):
                sock = socket.socket()
                aio_uvloop.defer(sock.close)
                sock.setblocking(False)
                sock.bind((ip, 0))
                await asyncio.get_running_loop().sock_connect(sock, (mesh.b.ip, 15008))
                with contextlib.suppress(OSError):  # refused already: it still counts
                    sock.send(hello)
                held.append(sock)
        refused = "hbone_connections_refused_total"
        reason = "max_pending_handshakes_from_strangers"

        def refusals() -> float:
            return count(mesh.node2.connection_table, refused, reason=reason)

        await wait_until(lambda: refusals() == 12, "the strangers' surplus refused")
        assert listener.gate.strangers == 4 and listener.gate.pending == 4
        # Pod A, at its own address, with the certificate its tunnel dials with.
        assert mesh.a.proxy.client_ctx is not None
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((mesh.a.ip, 0))
        await asyncio.get_running_loop().sock_connect(sock, (mesh.b.ip, 15008))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=mesh.a.proxy.client_ctx, server_hostname=""
        )
        aio_uvloop.defer(writer.close)
        block = hpack.Encoder().encode(connect_request(f"{mesh.b.ip}:{mesh.app_port}"))
        writer.write(PREFACE + settings_frame({}) + headers_frame(1, block))
        frames = Frames()
        while 1 not in frames.status and (data := await asyncio.wait_for(reader.read(65536), 10)):
            frames.feed(data)
        assert refusals() == 12  # A's was not among them
        return frames.status.get(1) == 200

    assert aio_uvloop.run(main, limit=60), "pod A's CONNECT was not answered 200"


@pytest.mark.parametrize(
    "limits", [HboneLimits(max_connects_in_flight_per_listener=3)], indirect=True
)
@pytest.mark.parametrize("port", [15001, 15006])
def test_a_pods_listener_holds_a_bounded_number_of_connections_in_flight__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines, port: int
) -> None:
    """A hostile app (15001: in pod A; 15006: a client outside the mesh) opens connections
    to a destination that never answers: each waits in the tunnel for its connect. Past
    `max_connects_in_flight_per_listener` (3 here) a new one is reset at once, counted and
    logged through the node's guard; once the destination answers, the listener takes new
    connections again."""
    aio = aio_uvloop
    outbound = port == 15001
    pod = mesh.a if outbound else mesh.b
    node = mesh.node1 if outbound else mesh.node2
    proxy = pod.proxy.outbound if outbound else pod.proxy.passthrough
    assert proxy is not None
    direction = "outbound" if outbound else "inbound"

    # Where the connections go (outbound: an address outside the mesh, passed through;
    # inbound: a port of pod B's app): a listener whose one-place accept queue is full,
    # so the kernel drops every further SYN and each connect hangs.
    stuck = aio.closing(socket.create_server((mesh.outsider_ip if outbound else pod.ip, 0)))
    stuck.listen(0)
    aio.closing(socket.create_connection(stuck.getsockname()))
    dst = addr("{}:{}".format(*stuck.getsockname()))

    async def connect() -> asyncio.StreamReader:
        if outbound:
            reader, writer = await mesh.redirects.connect(pod.ip, pod.port(15001), dst)
        else:
            reader, writer = await mesh.redirects.connect(mesh.outsider_ip, pod.port(15006), dst)
        aio.defer(writer.close)
        return reader

    def refused() -> float:
        return count(
            node.connection_table,
            "hbone_connections_refused_total",
            direction=direction,
            reason="max_connects_in_flight_per_listener",
        )

    async def main() -> None:
        waiting = [await connect() for _ in range(3)]
        await wait_until(lambda: proxy.in_flight == 3, "three connects in flight")
        over = [await connect() for _ in range(2)]
        for reader in over:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
        assert proxy.in_flight == 3
        assert refused() == 2
        # The destination takes connections again: the dropped SYNs are sent again (after
        # a second), the connects complete, and the listener has room once more.
        stuck.listen(16)
        await wait_until(lambda: proxy.in_flight == 0, "the connects in flight to complete")
        await connect()
        await wait_until(lambda: proxy.in_flight == 0, "the new connection to be joined")
        assert refused() == 2
        assert not any(r.at_eof() for r in waiting)

    aio.run(main)
    lines = [line for line in logs if line["event"] == "hbone peer refused"]
    assert [(line["direction"], line["reason"]) for line in lines] == [
        (direction, "max_connects_in_flight_per_listener")
    ] * 2


@pytest.mark.parametrize(
    "limits",
    [
        HboneLimits(max_connections_per_pod=2),
        HboneLimits(max_connections_per_tunnel=2),
    ],
    ids=["per-pod", "per-tunnel"],
    indirect=True,
)
@pytest.mark.parametrize("port", [15001, 15006])
def test_a_pods_listener_holds_a_bounded_number_of_open_connections__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines, limits: HboneLimits, port: int
) -> None:
    """Two connections relay; past the pod's (or the tunnel's) limit of 2 a new one is reset
    at once, counted with the limit as reason and logged through the guard; the relaying
    ones are untouched, and once one ends the listener takes a new one."""
    aio = aio_uvloop
    outbound = port == 15001
    node = mesh.node1 if outbound else mesh.node2
    direction = "outbound" if outbound else "inbound"
    reason = (
        "max_connections_per_pod"
        if limits.max_connections_per_pod == 2
        else "max_connections_per_tunnel"
    )

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if outbound:
            reader, writer = await mesh.from_pod(mesh.a, f"{mesh.b.ip}:{mesh.app_port}")
        else:
            reader, writer = await mesh.plaintext_to(mesh.b)
        aio.defer(writer.close)
        return reader, writer

    async def echoes(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        conn[1].write(b"ping")
        assert await asyncio.wait_for(conn[0].readexactly(4), 10) == b"ping"

    def refused() -> float:
        return count(
            node.connection_table,
            "hbone_connections_refused_total",
            direction=direction,
            reason=reason,
        )

    async def main() -> None:
        held = [await connect() for _ in range(2)]
        for conn in held:
            await echoes(conn)
        over_reader, _ = await connect()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(over_reader.read(), 5)
        assert refused() == 1
        for conn in held:
            await echoes(conn)  # the relaying ones are untouched
        held[0][1].close()
        await wait_until(
            lambda: len(node.connection_table) < 2, "the first connection to be closed"
        )
        await echoes(await connect())
        assert refused() == 1

    aio.run(main)
    lines = [line for line in logs if line["event"] == "hbone peer refused"]
    assert [(line["direction"], line["reason"]) for line in lines] == [(direction, reason)]


class HostileServer(asyncio.Protocol):
    """Stands where pod B's 15008 was, with pod B's own certificate (a compromised tunnel):
    answers a client's preface with its SETTINGS and then `flood`."""

    def __init__(self, flood: bytes) -> None:
        self.flood = flood
        self.frames = Frames()  # what the client sent, past its preface
        self.transport: asyncio.Transport | None = None
        self._preface = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(settings_frame({}) + self.flood)

    def data_received(self, data: bytes) -> None:
        if len(self._preface) < len(PREFACE):
            take = len(PREFACE) - len(self._preface)
            self._preface += data[:take]
            data = data[take:]
        self.frames.feed(data)


@pytest.mark.parametrize(
    ("flood", "reason"),
    [
        (ping(b"hostile!") * 20_000, "max_control_frames_without_progress"),
        (frame_header(0, 0xFA, 0, 0) * 100, "max_empty_frames"),  # an unknown frame type
    ],
    ids=["PING flood", "empty frames"],
)
def test_a_hostile_hbone_server_is_cut_off_by_the_client_tunnel__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines, flood: bytes, reason: str
) -> None:
    """The outbound side is held to the same limits: pod A's tunnel dials pod B's 15008,
    where a hostile server (with pod B's certificate) floods it. The client side ends the
    connection with GOAWAY ENHANCE_YOUR_CALM, counts and logs it as `outbound`, and the app
    is cut off, not left waiting."""
    aio = aio_uvloop

    async def main() -> tuple[HostileServer, bytes]:
        ctx = mesh.b.proxy.server_ctx
        assert ctx is not None
        await mesh.b.proxy.stop()  # its 15008 goes; the hostile server takes the address
        hostile = HostileServer(flood)
        server = await asyncio.get_running_loop().create_server(
            lambda: hostile, mesh.b.ip, 15008, ssl=ctx
        )
        aio.defer(server.close)
        reader, writer = await mesh.from_pod(mesh.a, f"{VIP}:80")
        aio.defer(writer.close)
        got = await asyncio.wait_for(read_all(reader), 15)
        await wait_until(lambda: hostile.frames.goaway is not None, "the client's GOAWAY")
        return hostile, got

    hostile, got = aio.run(main)
    assert got == b""  # the app was cut off
    assert hostile.frames.goaway is not None
    assert hostile.frames.goaway.code == ErrorCode.ENHANCE_YOUR_CALM
    refused = "hbone_connections_refused_total"
    node1 = mesh.node1.connection_table
    assert count(node1, refused, direction="outbound", reason=reason) == 1
    lines = [line for line in logs if line["event"] == "hbone peer refused"]
    assert [(line["direction"], line["reason"]) for line in lines] == [("outbound", reason)]
    assert lines[0]["peer"] == f"{mesh.b.ip}:15008"


@pytest.mark.slow
def test_ten_thousand_failed_handshakes_at_a_pods_15008_leave_nothing_behind(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines
) -> None:
    """10 000 failed handshakes at pod B's 15008, one at a time: connect then close, a
    ClientHello cut short, no client certificate (issue: each one kept 3.6 KB for ever).
    Through the pod's real listener and the node's guard, each is counted once, and the
    process's objects come back to where they were."""
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no client certificate
    bare.check_hostname = False
    bare.verify_mode = ssl.CERT_NONE
    hello = client_hello()[:100]
    kinds = {"connect then close": 8000, "partial ClientHello": 1500, "no certificate": 500}

    async def once(kind: str) -> None:
        if kind == "no certificate":
            try:
                _, w = await asyncio.open_connection(mesh.b.ip, 15008, ssl=bare)
                w.close()
            except (OSError, ssl.SSLError):
                pass
            return
        _, w = await asyncio.open_connection(mesh.b.ip, 15008)
        if kind == "partial ClientHello":
            w.write(hello)
        w.close()

    async def main() -> tuple[int, int]:
        listener = mesh.b.proxy.hbone_server
        assert listener is not None
        for _ in range(200):  # warm up the caches before counting
            await once("connect then close")
        await wait_until(lambda: listener.gate.pending == 0, "warm-up handshakes to end")
        gc.collect()
        before = len(gc.get_objects()) - len(logs)
        for kind, n in kinds.items():
            for _ in range(n):
                await once(kind)
        await wait_until(lambda: listener.gate.pending == 0, "every handshake to end")
        await asyncio.sleep(0.1)
        gc.collect()
        after = len(gc.get_objects()) - len(logs)  # the test's own log capture is not counted
        assert not listener.handshaking and listener.gate.by_source == {}
        assert mesh.b.proxy.inbound is not None and not mesh.b.proxy.inbound.connections
        return before, after

    before, after = aio_uvloop.run(main, limit=180)
    refused = "hbone_connections_refused_total"
    assert count(mesh.node2.connection_table, refused, direction="inbound") == 10_200
    # A leak of one object per attempt would show as thousands; allow loop bookkeeping.
    assert after - before < 200, (before, after)


async def one_byte_through(mesh: LoopbackMesh) -> None:
    """A short connection from pod A to the service: one byte there and back, then closed."""
    reader, writer = await mesh.from_pod(mesh.a, f"{VIP}:80")
    writer.write(b"x")
    writer.write_eof()
    assert await read_all(reader) == b"x"
    writer.close()
    await writer.wait_closed()


def test_closed_connections_are_not_kept_while_others_stay_open__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh
) -> None:
    """Pod A holds 100 connections open and makes 300 short ones, one after another.
    Once the short ones are over, the process holds the same relay objects as before them
    (issue: the pod's book of accepted connections kept closed ones until it held twice
    as many as were open, so with N held, up to N closed connections' objects stayed:
    memory that rose and fell with the churn, in steps, on a tunnel holding thousands)."""
    held_n, short_n = 100, 300

    def relays() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) in (AppSide, HboneSplice))

    async def settled() -> None:
        # Both tables list only the held ones: every short one ended on both sides.
        await wait_until(
            lambda: (
                len(mesh.node1.connection_table.connections()) == held_n
                and len(mesh.node2.connection_table.connections()) == held_n
            ),
            "the short connections to end",
        )
        await asyncio.sleep(0.1)

    async def main() -> tuple[int, int]:
        held = [await mesh.from_pod(mesh.a, f"{VIP}:80") for _ in range(held_n)]
        for _, writer in held:  # each one through to the app and back
            writer.write(b"h")
        for reader, _ in held:
            assert await reader.readexactly(1) == b"h"
        await one_byte_through(mesh)  # warm-up
        await settled()
        before = relays()
        for _ in range(short_n):
            await one_byte_through(mesh)
        await settled()
        after = relays()
        for _, writer in held:
            writer.close()
        return before, after

    before, after = aio_uvloop.run(main, limit=120)
    assert after == before, (before, after)


def test_a_closed_connections_relay_is_freed_without_the_cyclic_collector__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh
) -> None:
    """Both tunnels' objects of a finished connection (app sides, splices, transports,
    results) are freed by reference counting as it ends. Left in a cycle (an app side and
    its sink refer to each other), they wait for the cyclic collector, and those that
    outlived a young collection wait for a full one: the soak's RSS and Python blocks rose
    between full collections, minutes apart on a tunnel holding 10 000 connections."""

    def ended() -> bool:
        return not mesh.node1.connection_table.connections() and not (
            mesh.node2.connection_table.connections()
        )

    async def main() -> Counter[str]:
        await one_byte_through(mesh)  # warm-up: the HBONE pool dialled, caches filled
        await wait_until(ended, "the warm-up connection to end")
        with cyclic_garbage() as found:
            for _ in range(50):
                await one_byte_through(mesh)
            await wait_until(ended, "the connections to end")
            await asyncio.sleep(0.1)
        return found

    found = aio_uvloop.run(main, limit=60)
    relay = {k: n for k, n in found.items() if k.startswith(("meshcore.", "ztunnel."))}
    assert relay == {}, found.most_common(12)


@pytest.mark.parametrize(
    "limits", [HboneLimits(preface_timeout=0.2, shutdown_timeout=0.3)], indirect=True
)
def test_hbone_connections_that_never_carry_a_stream_are_the_nodes_activity(
    aio_uvloop: Loop, mesh: LoopbackMesh
) -> None:
    """The tunnel hands freed memory back once the node is quiet after activity. An attack
    may open only TLS connections (a failed handshake, a connection ended for a limit):
    those count too, through to their close, or what they held would never be given back
    (300 silent connections: 13 MB kept for good)."""
    aio = aio_uvloop

    async def main() -> None:
        start = mesh.node2.activity()
        _, w = await asyncio.open_connection(mesh.b.ip, 15008)
        w.close()  # a failed handshake
        reader, writer = await asyncio.open_connection(
            mesh.b.ip, 15008, ssl=mesh.a.proxy.client_ctx, server_hostname=None
        )
        aio.defer(writer.close)
        await reader.readexactly(9)  # our SETTINGS: the connection is up, and says nothing
        want = (start[0] + 2, start[1] + 3)  # two handshakes over, then the silent one closed
        await wait_until(lambda: mesh.node2.activity() == want, "both connections to end")

    aio.run(main)


def plaintext_client(mesh: LoopbackMesh, pod: Pod) -> socket.socket:
    """A bound client socket whose connection to the pod's app the capture would send to
    its 15006 (recorded), not yet connected."""
    sock = socket.socket()
    sock.bind((mesh.outsider_ip, 0))
    mesh.redirects.record(sock, pod.port(mesh.app_port))
    return sock


@pytest.mark.netns  # no namespace, but the SYN filter takes CAP_NET_ADMIN: the root tier
def test_a_pod_draining_alone_serves_what_was_on_its_way_in_and_holds_new_syns__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh
) -> None:
    """No other tunnel listens (an upgrade where the old pod goes first): connections the
    kernel had queued when the drain began are served, not reset by the listener's close,
    and a connection begun after it is not refused: its SYN is dropped, for the client's
    kernel to retry with the next tunnel."""

    async def main() -> tuple[list[bytes], bool, bool]:
        pod = mesh.b
        queued = []
        for _ in range(5):
            sock = plaintext_client(mesh, pod)
            sock.connect(pod.port(15006).pair)  # blocking: the kernel queues it, the loop waits
            queued.append(sock)
        pod.proxy.stop_accepting()  # in the same step: nothing accepted yet
        late = plaintext_client(mesh, pod)
        late.setblocking(False)
        assert late.connect_ex(pod.port(15006).pair) == errno.EINPROGRESS
        got = []
        for i, sock in enumerate(queued):
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"queued %d" % i)
            writer.write_eof()
            got.append(await read_all(reader))
            writer.close()
        await wait_until(lambda: not pod.proxy.busy, "the drain to end")
        closed = not any(server.sockets for server in pod.proxy.servers)
        # Still no answer to the late SYN, not even a refusal: no listener is left here.
        late_made = late.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0 or _connected(late)
        late.close()
        return got, closed, late_made

    got, closed, late_made = aio_uvloop.run(main)
    assert got == [b"queued %d" % i for i in range(5)]
    assert closed
    assert not late_made


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def test_a_pod_draining_beside_another_tunnel_closes_its_listeners_at_once(
    aio_uvloop: Loop, mesh: LoopbackMesh
) -> None:
    """Another listener in the outbound port's SO_REUSEPORT group (the next tunnel's,
    here a bare socket) takes what is queued when this one closes: no settle."""

    async def main() -> tuple[bool, bool]:
        pod = mesh.a
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(pod.port(15001).pair)
        other.listen(8)
        try:
            pod.proxy.stop_accepting()
            closed = not any(server.sockets for server in pod.proxy.servers)
            return closed, pod.proxy.busy
        finally:
            other.close()

    closed, busy = aio_uvloop.run(main)
    assert closed
    assert not busy


# --- early data: the app's first bytes with the CONNECT, to another HTTP/2 stack ----------
# An HBONE server on the `h2` library stands where pod B's 15008 was, with pod B's
# certificate.

EARLY_REQUEST = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"


class IndependentServer(asyncio.Protocol):
    """An HBONE server on the `h2` library. It answers each CONNECT at the end of the read
    that brought it (so whatever came in that read came before the answer), echoes what
    the stream carries and ends it when the client does; with `refuse_first`, the first
    stream gets REFUSED_STREAM instead, as a draining tunnel answers."""

    def __init__(self, refuse_first: bool = False, answer: bytes | None = None) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self.refuse_first = refuse_first
        # Given: each stream is answered with it in full and then reset (CANCEL), in the
        # same write as the 200, instead of echoed.
        self.answer = answer
        self.before_answer: dict[int, bytes] = {}  # per stream, in order of opening
        self.answered: set[int] = set()
        self.refused: list[int] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        opened = []
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived) and ev.stream_id is not None:
                self.before_answer[ev.stream_id] = b""
                opened.append(ev.stream_id)
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id is not None:
                sid, got = ev.stream_id, ev.data or b""
                self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                if sid in self.answered:
                    self.conn.send_data(sid, got)
                elif sid not in self.refused:
                    self.before_answer[sid] += got
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in self.answered:
                self.conn.end_stream(ev.stream_id)
        for sid in opened:
            if self.refuse_first and not self.refused:
                self.refused.append(sid)
                self.conn.reset_stream(sid, ErrorCode.REFUSED_STREAM)
                continue
            self.answered.add(sid)
            self.conn.send_headers(sid, [(":status", "200")])
            if self.answer is not None:
                self.conn.send_data(sid, self.answer, end_stream=True)
                self.conn.reset_stream(sid, ErrorCode.CANCEL)
                continue
            if self.before_answer[sid]:
                self.conn.send_data(sid, self.before_answer[sid])
        assert self.transport is not None
        self.transport.write(self.conn.data_to_send())


async def through_independent_server(mesh: LoopbackMesh, server: IndependentServer) -> bytes:
    """Pod B's 15008 replaced by `server`; pod A's app sends EARLY_REQUEST as soon as its
    connect returns, half-closes, and reads everything back."""
    ctx = mesh.b.proxy.server_ctx
    assert ctx is not None
    await mesh.b.proxy.stop()
    listener = await asyncio.get_running_loop().create_server(
        lambda: server, mesh.b.ip, 15008, ssl=ctx
    )
    try:
        reader, writer = await mesh.from_pod(mesh.a, f"{VIP}:80")
        writer.write(EARLY_REQUEST)
        writer.write_eof()
        got = await asyncio.wait_for(read_all(reader), 10)
        writer.close()
        return got
    finally:
        listener.close()


def test_the_apps_first_bytes_go_with_the_connect__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines
) -> None:
    server = IndependentServer()
    got = aio_uvloop.run(lambda: through_independent_server(mesh, server))
    assert got == EARLY_REQUEST
    # In the read that brought the HEADERS, before the server had answered.
    assert list(server.before_answer.values()) == [EARLY_REQUEST]
    (line,) = access_lines(logs, direction="outbound")
    assert line["bytes_sent"] == len(EARLY_REQUEST)  # counted once, early or not


def test_a_refused_stream_is_retried_with_the_same_early_bytes_once__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh, logs: LogLines
) -> None:
    """REFUSED_STREAM says the server did nothing with the stream (RFC 9113 8.7), its early
    data included: the next stream carries the same bytes, and the app's request reaches
    the server once, whole."""
    server = IndependentServer(refuse_first=True)
    got = aio_uvloop.run(lambda: through_independent_server(mesh, server))
    assert got == EARLY_REQUEST
    assert len(server.refused) == 1
    # Refused, then retried: the same bytes before each answer.
    assert list(server.before_answer.values()) == [EARLY_REQUEST, EARLY_REQUEST]
    (line,) = access_lines(logs, direction="outbound")
    assert line["bytes_sent"] == len(EARLY_REQUEST)


@pytest.mark.parametrize("limits", [HboneLimits(early_data_bytes=0)], indirect=True)
def test_without_early_data_the_bytes_wait_for_the_answer__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh
) -> None:
    """`HBONE_EARLY_DATA_BYTES=0`: as upstream ztunnel, nothing before the 200 (for a peer
    that refuses early data)."""
    server = IndependentServer()
    got = aio_uvloop.run(lambda: through_independent_server(mesh, server))
    assert got == EARLY_REQUEST
    assert list(server.before_answer.values()) == [b""]


@pytest.mark.parametrize("limits", [HboneLimits(early_data_bytes=8)], indirect=True)
def test_early_data_stops_at_its_limit_and_the_rest_follows_the_answer__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh
) -> None:
    server = IndependentServer()
    got = aio_uvloop.run(lambda: through_independent_server(mesh, server))
    assert got == EARLY_REQUEST
    assert list(server.before_answer.values()) == [EARLY_REQUEST[:8]]


def test_an_answer_in_full_then_a_reset_reaches_the_app_whole__recorded_redirects(
    aio_uvloop: Loop, mesh: LoopbackMesh
) -> None:
    """A server that answers the request it got as early data in full, ends its side and
    resets the stream, all before pod A's tunnel has joined the app (a waypoint denying a
    POST did so): the app gets the whole answer and then EOF, not a reset."""
    answer = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    server = IndependentServer(answer=answer)
    got = aio_uvloop.run(lambda: through_independent_server(mesh, server))
    assert got == answer
    assert list(server.before_answer.values()) == [EARLY_REQUEST]
