"""The control plane's gRPC server (istiod's 15012) under hostile clients, on loopback:
oversized messages, connections that never speak, and an xDS client that never reads its
pushes. Each time a well-behaved client is served alongside."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

import grpc
import h2.config
import h2.connection
import pytest

from controlplane.grpc_limits import GrpcLimits, grpc_limits, new_server, server_options
from controlplane.xds.server import METHOD, SERVICE, XdsServer
from controlplane.xds.tls import bind
from meshcore.state import MeshState
from meshcore.xds import convert
from meshcore.xds import messages as m
from tests.support.aio import Loop, wait_until
from tests.support.mesh import workload
from tests.xds.conftest import OPEN
from tests.xds.states import demo_state

ADS = f"/{SERVICE}/{METHOD}"


def subscribe(node: str = "good") -> bytes:
    return bytes(
        m.encode(m.DeltaDiscoveryRequest(node=m.Node(id=node), type_url=convert.RESOURCE_TYPES[0]))
    )


async def serve(aio: Loop, xds: XdsServer, limits: GrpcLimits) -> int:
    server = new_server(limits)
    xds.add_to_server(server)
    port = bind(server, "127.0.0.1:0", None)  # plaintext: loopback only
    await server.start()
    aio.defer(lambda: server.stop(None))
    return port


async def first_push(port: int, request: bytes) -> bytes:
    """What a well-behaved client gets: the first response to its subscription."""
    options = [("grpc.max_receive_message_length", 64 << 20)]  # as the proxies' clients
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options) as channel:
        call = channel.stream_stream(ADS)(iter([request]))
        async with asyncio.timeout(20):
            answer: bytes = await call.read()
        call.cancel()
        return answer


def big_state(n: int) -> MeshState:
    return MeshState.build(
        [
            workload(
                name=f"w{i}",
                namespace="big",
                ips=(ipaddress.ip_address(f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}"),),
                canonical_name="x" * 200,
            )
            for i in range(n)
        ],
        [],
        [],
    )


def test_the_options_carry_every_limit_and_are_settings() -> None:
    limits = grpc_limits({"CONTROLPLANE_GRPC_HANDSHAKE_TIMEOUT": "2.5"})
    options = dict(server_options(limits))
    assert options["grpc.server_handshake_timeout_ms"] == 2500
    assert options["grpc.max_allowed_incoming_connections"] == 4096
    assert options["grpc.max_receive_message_length"] == 4 * 1024 * 1024
    assert options["grpc.max_concurrent_streams"] == 100


def test_an_oversized_message_ends_its_stream_and_others_are_served(aio: Loop) -> None:
    async def main() -> None:
        xds = XdsServer(demo_state(), auth=OPEN)
        port = await serve(aio, xds, GrpcLimits(max_receive_message_bytes=64 * 1024))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(ADS)(iter([b"\x0a" + b"\xff" * (1 << 20)]))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async with asyncio.timeout(20):
                    await call.read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await first_push(port, subscribe())

    aio.run(main)


def test_connections_that_never_speak_are_capped_and_timed_out(aio: Loop) -> None:
    async def main() -> None:
        xds = XdsServer(demo_state(), auth=OPEN)
        limits = GrpcLimits(max_connections=8, handshake_timeout=1.0)
        port = await serve(aio, xds, limits)
        loop = asyncio.get_running_loop()
        silent = []
        for _ in range(40):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", port))
            silent.append(s)
        try:
            # Each is closed by the server (at once past the cap, else at the handshake
            # timeout): a recv that never ended would fail the test at the timeout here.
            for s in silent:
                async with asyncio.timeout(30):
                    try:
                        got = await loop.sock_recv(s, 4096)
                    except ConnectionResetError:
                        got = b""
                    # Plaintext: the server's SETTINGS may come first; then the close.
                    while got:
                        got = await loop.sock_recv(s, 4096)
        finally:
            for s in silent:
                s.close()
        assert await first_push(port, subscribe())

    aio.run(main)


def test_a_client_that_never_reads_its_pushes_is_closed(aio: Loop) -> None:
    """A raw HTTP/2 client subscribes, then never reads its socket: the push it does not
    take is given up after `push_timeout` (the stream's state freed), and the connection
    is closed at its maximum age; a well-behaved client is served throughout."""

    async def main() -> None:
        xds = XdsServer(demo_state(), push_timeout=1.0, auth=OPEN)
        limits = GrpcLimits(max_connection_age=5.0, max_connection_age_grace=1.0)
        port = await serve(aio, xds, limits)
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(
                1,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", ADS),
                    (":authority", f"127.0.0.1:{port}"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                ],
            )
            request = subscribe("lazy")
            conn.send_data(1, b"\0" + struct.pack(">I", len(request)) + request)
            await loop.sock_sendall(sock, conn.data_to_send())
            await wait_until(lambda: xds.open_streams == 1, "the lazy stream")
            # Pushes far larger than the windows (64 KiB, and a 4 KiB socket buffer).
            for n in (3_000, 3_001):
                xds.update(big_state(n))
            await wait_until(lambda: xds.stalled == 1, "the stalled push to be given up", 60)
            assert xds.open_streams == 0  # what the stream held on our side is freed
            assert await first_push(port, subscribe())  # others are served meanwhile
            # The connection ends at its maximum age: reading now, the client gets to EOF.
            async with asyncio.timeout(60):
                while await loop.sock_recv(sock, 1 << 20):
                    pass
        finally:
            sock.close()

    aio.run(main)
