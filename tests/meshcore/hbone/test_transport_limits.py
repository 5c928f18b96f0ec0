"""The HBONE shell's limits against a real peer on loopback (plain TCP: TLS is beside the
point here): a client that never speaks HTTP/2, one that never reads the replies it asks
for, one that reads no data, and one that sits idle. Each is ended, told why, and reported
once."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator

import hpack
import pytest

from meshcore.hbone.h2frames import (
    PREFACE,
    ErrorCode,
    Flag,
    FrameType,
    frame_header,
    parse_header,
    ping,
    settings_frame,
)
from meshcore.hbone.limits import HboneLimits
from meshcore.hbone.transport import H2Transport


class Server:
    """One HBONE server transport per accepted connection; what it reported."""

    def __init__(self, limits: HboneLimits, reply: bytes = b"") -> None:
        self.limits = limits
        self.reply = reply  # what the server sends on each stream it answers
        self.refused: list[str] = []
        self.transports: list[H2Transport] = []
        self.server: asyncio.Server | None = None

    def answer(self, h2: H2Transport, sid: int, _headers: object) -> None:
        h2.conn.respond(sid, 200, None, end=False)
        if self.reply:
            h2.conn.send_data(sid, self.reply)
            h2.flush()

    def protocol(self) -> H2Transport:
        t = H2Transport(
            client=False,
            on_request=self.answer,
            limits=self.limits,
            on_refused=lambda _t, reason: self.refused.append(reason),
        )
        self.transports.append(t)
        return t

    async def start(self) -> int:
        self.server = await asyncio.get_running_loop().create_server(self.protocol, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def goaway_code(data: bytes) -> int | None:
    off = 0
    while off + 9 <= len(data):
        length, ftype, _, _ = parse_header(data, off)
        if ftype == FrameType.GOAWAY and off + 9 + 8 <= len(data):
            code: int = struct.unpack(">L", data[off + 13 : off + 17])[0]
            return code
        off += 9 + length
    return None


async def read_all(reader: asyncio.StreamReader, limit: float = 10.0) -> bytes:
    out = b""
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), limit)
        if not chunk:
            return out
        out += chunk


def run(loop: asyncio.AbstractEventLoop, server: Server, client: object) -> object:
    async def main() -> object:
        port = await server.start()
        try:
            return await client(port)  # type: ignore[operator]
        finally:
            assert server.server is not None
            server.server.close()
            for t in server.transports:
                if t.transport is not None:
                    t.transport.abort()

    return loop.run_until_complete(main())


def test_a_client_that_never_sends_the_preface_is_closed(loop: asyncio.AbstractEventLoop):
    server = Server(HboneLimits(preface_timeout=0.2))

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await read_all(reader)
        finally:
            writer.close()

    data = run(loop, server, client)
    assert isinstance(data, bytes) and goaway_code(data) == ErrorCode.PROTOCOL_ERROR
    assert server.refused == ["preface_timeout"]


def frames(data: bytes) -> list[tuple[int, int]]:
    """(type, flags) of each whole frame in `data`."""
    out, off = [], 0
    while off + 9 <= len(data):
        length, ftype, flags, _ = parse_header(data, off)
        out.append((ftype, flags))
        off += 9 + length
    return out


def test_the_server_preface_waits_for_the_client_s_and_leaves_with_its_ack(
    loop: asyncio.AbstractEventLoop,
):
    """RFC 9113 3.4: the client speaks first. Our SETTINGS and window go out with the ACK
    of the client's SETTINGS, in one write (one TLS record on HBONE), not one write each."""
    server = Server(HboneLimits())

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(65536), 0.3)  # nothing before ours
            writer.write(PREFACE + settings_frame({}))
            return await asyncio.wait_for(reader.read(65536), 10)
        finally:
            writer.close()

    got = run(loop, server, client)
    assert isinstance(got, bytes)
    assert frames(got) == [
        (FrameType.SETTINGS, 0),
        (FrameType.WINDOW_UPDATE, 0),
        (FrameType.SETTINGS, Flag.ACK),
    ]
    assert server.refused == []


def test_a_client_that_asks_for_replies_and_never_reads_them_is_cut_off(
    loop: asyncio.AbstractEventLoop,
):
    """PINGs into a socket nobody reads: the replies back up into our TLS (here TCP) write
    buffer; once it pushes back, only `max_queued_replies` more are queued, then the
    connection ends. The memory it held is the transport's buffer plus those replies."""
    limits = HboneLimits(max_queued_replies=500, max_control_frames_without_progress=10**9)
    server = Server(limits)

    async def client(port: int) -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        burst = ping(b"12345678") * 4096
        await asyncio.get_running_loop().sock_sendall(sock, PREFACE + settings_frame({}))
        sent = 0
        try:
            while sent < 2_000_000 and not server.refused:  # bounded: 2 M PINGs at most
                await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, burst), 10)
                sent += 4096
        except (ConnectionError, OSError):
            pass  # the server closed on us: expected
        finally:
            sock.close()
        return sent

    sent = run(loop, server, client)
    assert server.refused == ["max_queued_replies"]
    assert isinstance(sent, int) and sent < 2_000_000


def test_an_idle_connection_is_drained(loop: asyncio.AbstractEventLoop):
    server = Server(HboneLimits(idle_timeout=0.3, ping_interval=0.1))

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(PREFACE + settings_frame({}))
        try:
            return await read_all(reader)
        finally:
            writer.close()

    data = run(loop, server, client)
    assert isinstance(data, bytes) and goaway_code(data) == ErrorCode.NO_ERROR
    assert b"idle for" in data
    assert server.refused == []  # idle is not misbehaviour


def test_a_peer_that_reads_nothing_is_closed_after_the_stall_timeout(
    loop: asyncio.AbstractEventLoop,
):
    """Bytes queued for a peer that grants no window are held only for `stall_timeout`."""
    server = Server(HboneLimits(stall_timeout=0.3, ping_interval=0.1), reply=b"r" * 300_000)

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        writer.write(
            PREFACE
            + settings_frame({})
            + frame_header(len(block), FrameType.HEADERS, Flag.END_HEADERS, 1)
            + block
        )
        try:
            return await read_all(reader)  # reads, but never sends a WINDOW_UPDATE
        finally:
            writer.close()

    data = run(loop, server, client)
    assert isinstance(data, bytes) and goaway_code(data) == ErrorCode.ENHANCE_YOUR_CALM
    assert server.refused == ["stall_timeout"]


class Producers:
    """Stands for every stream's producer (app reader) of a server connection."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def pause_producing(self) -> None:
        self.events.append("pause")

    def resume_producing(self) -> None:
        self.events.append("resume")


def test_every_producer_pauses_while_the_queues_are_over_the_budget(
    loop: asyncio.AbstractEventLoop,
):
    """A peer that grants no window: once the streams' queues together pass the budget,
    every producer of the connection pauses at once; when the peer reads, they resume."""
    server = Server(HboneLimits(max_buffered_per_connection=1 << 20), reply=b"r" * 600_000)
    producers = Producers()
    original = server.protocol

    def protocol() -> H2Transport:
        t = original()
        t.listeners[producers] = None
        return t

    server.protocol = protocol  # type: ignore[method-assign]

    async def client(port: int) -> list[str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        encoder = hpack.Encoder()
        writer.write(PREFACE + settings_frame({0x4: 0}))  # INITIAL_WINDOW_SIZE 0
        for sid in (1, 3, 5):
            block = encoder.encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
            writer.write(frame_header(len(block), FrameType.HEADERS, Flag.END_HEADERS, sid) + block)
        await writer.drain()
        deadline = asyncio.get_running_loop().time() + 10
        while "pause" not in producers.events:
            assert asyncio.get_running_loop().time() < deadline, "never paused"
            await asyncio.sleep(0.01)
        assert server.transports[0].conn.buffered > 1 << 20
        grant = frame_header(4, FrameType.WINDOW_UPDATE, 0, 0) + struct.pack(">L", 1 << 24)
        for sid in (1, 3, 5):
            grant += frame_header(4, FrameType.WINDOW_UPDATE, 0, sid) + struct.pack(">L", 1 << 20)
        writer.write(grant)
        while "resume" not in producers.events:
            assert asyncio.get_running_loop().time() < deadline, "never resumed"
            await reader.read(65536)
        writer.close()
        return producers.events

    events = run(loop, server, client)
    assert events == ["pause", "resume"]
