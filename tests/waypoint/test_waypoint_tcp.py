"""The waypoint on loopback, TCP: a CONNECT to a bound service's VIP:port reaches one of its
endpoints through the endpoint's tunnel, as the waypoint's own identity; anything not bound
to the waypoint is refused before a byte is read."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from meshcore.hbone.stream import HboneStream, HboneStreamError
from tests.support.aio import Loop
from tests.waypoint.loopback import VIP, WAYPOINT_ID, start


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def read_to_end(stream: HboneStream) -> bytes:
    out = b""
    while chunk := await stream.read():
        out += chunk
    return out


@pytest.fixture
def aio() -> Iterator[Loop]:
    loop = Loop("uvloop")
    yield loop
    loop.close()


def test_tcp_through_the_waypoint_reaches_the_app_as_the_waypoint(aio: Loop) -> None:
    payload = bytes(range(256)) * 2048  # 512 KiB: flow control on both legs

    async def main() -> None:
        lw = await start(aio, echo)
        stream = await lw.connect(f"{VIP}:80")
        stream.write(payload)
        await stream.drain()
        stream.write_eof()
        assert await read_to_end(stream) == payload

    aio.run(main)


def test_a_stream_that_only_reads_returns_its_credit(aio: Loop) -> None:
    """Three stream windows (4 MiB each) from an app that speaks first, to a client that
    writes nothing: whenever a read makes credit due, a flush is on its way (reads that
    owe none schedule nothing); without it the bytes would wait at each window for a
    write that never comes."""
    payload = bytes(range(256)) * (3 * 4 * 4096 + 1)

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            await reader.read()  # until the client ends its side
        writer.close()

    async def main() -> None:
        lw = await start(aio, source)
        stream = await lw.connect(f"{VIP}:80")
        got = bytearray()
        owed = 0  # reads after which a WINDOW_UPDATE was due
        while chunk := await stream.read():
            got += chunk
            if stream.h2.conn.out:
                owed += 1
                # Due and on its way: a flush at the end of this turn (nothing else of
                # this connection would send it: the client writes nothing).
                assert stream.h2._flush_scheduled
        assert owed >= 2
        assert len(got) == len(payload) and got == payload
        stream.write_eof()

    aio.run(main)


@pytest.mark.parametrize(
    ("authority", "status"),
    [
        ("10.96.0.99:80", "404"),  # no such service
        ("10.96.0.31:15008", "403"),  # a service that does not use this waypoint
        (f"{VIP}:81", "404"),  # a port the service does not have
        ("web.shop:80", "400"),  # not an ip:port
    ],
    ids=["unknown VIP", "service not bound", "unknown port", "hostname authority"],
)
def test_what_is_not_bound_to_the_waypoint_is_refused(
    aio: Loop, authority: str, status: str
) -> None:
    async def main() -> None:
        lw = await start(aio, echo)
        with pytest.raises(HboneStreamError, match=status):
            await lw.connect(authority)
        assert lw.waypoint.server.refused == 1
        # The connection stays usable: a good request right after works.
        good = await lw.connect(f"{VIP}:80")
        good.write(b"ping")
        good.write_eof()
        assert await read_to_end(good) == b"ping"

    aio.run(main)


def test_the_waypoint_needs_a_client_certificate(aio: Loop) -> None:
    import ssl

    async def main() -> None:
        lw = await start(aio, echo)
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.check_hostname = False
        bare.verify_mode = ssl.CERT_NONE
        bare.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection(lw.waypoint_ip, 15008, ssl=bare)
        try:
            # TLS 1.3: the server's refusal of a missing certificate arrives after the
            # client's handshake completes, as an alert on the first read.
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            try:
                data = await reader.read(100)
            except (ssl.SSLError, ConnectionError):
                data = b""
            assert data == b"", "the waypoint answered a client without a certificate"
        finally:
            writer.close()

    aio.run(main)


def test_waypoint_identity_is_what_the_destination_sees(aio: Loop) -> None:
    async def main() -> None:
        lw = await start(aio, echo)
        stream = await lw.connect(f"{VIP}:80")
        stream.write(b"x")
        assert await stream.read() == b"x"
        # Waypoints do not impersonate clients: the destination's tunnel saw the waypoint's
        # identity and address.
        (entry,) = lw.node2.connection_table.connections()
        assert entry["srcIdentity"] == str(WAYPOINT_ID)
        assert entry["src"].startswith(f"{lw.waypoint_ip}:")
        stream.write_eof()
        assert await read_to_end(stream) == b""

    aio.run(main)
