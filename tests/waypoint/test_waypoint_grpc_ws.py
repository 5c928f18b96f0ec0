"""gRPC (HTTP/2) and WebSocket (HTTP/1.1 upgrade) through the waypoint on loopback, with
independent peers on both ends: grpcio client and server, websockets client and server.
A client socket becomes one CONNECT to the waypoint (as the client's tunnel would make)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tests.support.aio import Loop
from tests.waypoint.apps import app, get, parse
from tests.waypoint.loopback import start_mesh

SAY = "/demo.Echo/Say"
COUNT = "/demo.Echo/Count"


class GrpcApp:
    """A grpcio server with two raw-bytes methods: Say (unary: echoes, or fails with
    INVALID_ARGUMENT on b"fail") and Count (server streaming: n messages)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server: grpc.aio.Server | None = None

    async def start_on(self, ip: str, port: int) -> int:
        async def say(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if request == b"fail":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "asked to fail")
            return self.name.encode() + b":" + request

        async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            for i in range(int(request)):
                yield str(i).encode()

        handler = grpc.method_handlers_generic_handler(
            "demo.Echo",
            {
                "Say": grpc.unary_unary_rpc_method_handler(say),
                "Count": grpc.unary_stream_rpc_method_handler(count),
            },
        )
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((handler,))
        bound = self.server.add_insecure_port(f"{ip}:{port}")
        await self.server.start()
        return int(bound)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)


class WsEcho:
    def __init__(self) -> None:
        self.server: Any = None

    async def start_on(self, ip: str, port: int) -> int:
        async def echo(ws: Any) -> None:
            async for message in ws:
                await ws.send(message)

        self.server = await websockets.serve(echo, ip, port)
        sock = next(iter(self.server.sockets))
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
def aio() -> Iterator[Loop]:
    loop = Loop("uvloop")
    yield loop
    loop.close()


def test_grpc_unary_and_server_streaming_through_the_waypoint(aio: Loop) -> None:
    async def main() -> None:
        mesh = await start_mesh(aio, {"echo": [GrpcApp("e0")]}, app_protocol="grpc")
        host, port = await mesh.forwarder("echo")
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            say = channel.unary_unary(SAY)
            assert await say(b"hi", timeout=10) == b"e0:hi"
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await say(b"fail", timeout=10)
            # The status travelled in the trailers, through both HTTP/2 legs.
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert failed.value.details() == "asked to fail"
            count = channel.unary_stream(COUNT)
            got = [m async for m in count(b"5", timeout=10)]
            assert got == [b"0", b"1", b"2", b"3", b"4"]
        text = mesh.lw.waypoint.render().decode()
        assert 'request_protocol="grpc"' in text and 'grpc_response_status="3"' in text
        # Messages counted by their framing: 3 requests; 1 + 0 + 5 answers.
        families = {f.name: f for f in text_string_to_metric_families(text)}
        sent = sum(s.value for s in families["istio_request_messages"].samples)
        answered = sum(s.value for s in families["istio_response_messages"].samples)
        assert (sent, answered) == (3, 6)

    aio.run(main, limit=60)


def test_websocket_echo_through_the_waypoint(aio: Loop) -> None:
    async def main() -> None:
        mesh = await start_mesh(aio, {"ws": [WsEcho()]}, app_protocol="http")
        host, port = await mesh.forwarder("ws")
        async with websockets.connect(f"ws://{host}:{port}/chat") as ws:
            for text in ("one", "two", "x" * 100_000):
                await ws.send(text)
                assert await ws.recv() == text

    aio.run(main, limit=60)


def test_undeclared_port_http_is_sniffed_and_routed(aio: Loop) -> None:
    async def main() -> None:
        mesh = await start_mesh(aio, {"web": [app("web")]}, app_protocol="")
        status, headers, _ = parse(await mesh.request("web", get("/")))
        assert status == 200 and headers["x-served-by"] == "web"
        # Seen at L7: counted as a request.
        assert "istio_requests_total" in mesh.lw.waypoint.render().decode()

    aio.run(main)


def test_a_server_first_protocol_on_an_undeclared_port_is_not_stalled(aio: Loop) -> None:
    async def smtp_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mail ready\r\n")  # the server speaks first
        await writer.drain()
        line = await reader.readline()
        writer.write(b"250 got " + line)
        await writer.drain()
        writer.close()

    async def main() -> None:
        mesh = await start_mesh(aio, {"mail": [smtp_like]}, app_protocol="")
        host, port = await mesh.forwarder("mail")
        reader, writer = await asyncio.open_connection(host, port)
        greeting = await asyncio.wait_for(reader.readline(), 5)
        assert greeting == b"220 mail ready\r\n"
        writer.write(b"HELO me\r\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"250 got HELO me\r\n"
        writer.close()

    aio.run(main)
