"""The waypoint's upstream pool and certificate rotation, on loopback with real TLS: an
upstream HBONE connection made with a certificate about to expire takes no new stream (a
new connection, with the rotated certificate, takes it), and the streams already on it run
on, past the expiry too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from meshcore.hbone.pool import EXPIRY_MARGIN
from meshcore.hbone.stream import HboneStream
from meshcore.identity.spiffe import SpiffeId
from tests.support.aio import Loop, wait_until
from tests.support.certs import InProcessCA
from tests.waypoint.loopback import VIP, WAYPOINT_ID, start
from tests.waypoint.test_waypoint_tcp import echo

# Long enough for the first stream to open well before the pool's margin, short enough
# for a quick test; the manager renews it at half of what is left.
SHORT_TTL = timedelta(seconds=6)


class ShortFirstCA(InProcessCA):
    """Signs the waypoint's first certificate for SHORT_TTL, everything else as asked."""

    def __init__(self, short: SpiffeId) -> None:
        super().__init__()
        self._short: SpiffeId | None = short

    async def sign(self, csr_pem: bytes, ttl: timedelta) -> list[bytes]:
        chain = await super().sign(csr_pem, ttl)
        if self.calls[-1] == self._short:
            self._short = None
            return self.ca.sign_csr(csr_pem, self.calls[-1], SHORT_TTL)
        return chain


@pytest.fixture
def aio() -> Iterator[Loop]:
    loop = Loop("uvloop")
    yield loop
    loop.close()


async def echoed(stream: HboneStream, data: bytes) -> bytes:
    stream.write(data)
    out = b""
    while len(out) < len(data) and (chunk := await stream.read()):
        out += chunk
    return out


@pytest.mark.slow  # real time: about 7 s, the short certificate's life and a little
def test_an_upstream_connection_whose_certificate_is_expiring_takes_no_new_stream(
    aio: Loop,
) -> None:
    async def main() -> None:
        lw = await start(aio, echo, app_protocol="tcp", ca=ShortFirstCA(WAYPOINT_ID))
        first_cert = lw.waypoint.cert
        assert first_cert is not None
        expiry = first_cert.not_after.timestamp()
        assert expiry - time.time() <= SHORT_TTL.total_seconds()
        pool = lw.waypoint.upstream.pool

        first = await lw.connect(f"{VIP}:80")
        assert await echoed(first, b"one") == b"one"
        [(_key, old)] = pool.connections()
        # The earlier notAfter of the two sides: the waypoint's (the endpoint's is 1 h).
        assert old.expires_at == expiry

        # The manager renews the certificate at half of its lifetime left; then wait until
        # what is left of the old one is within the pool's margin.
        await wait_until(lambda: lw.waypoint.cert is not first_cert, "the waypoint's rotation")
        await asyncio.sleep(max(0.0, expiry - EXPIRY_MARGIN - time.time()) + 0.2)

        second = await lw.connect(f"{VIP}:80")
        assert await echoed(second, b"two") == b"two"
        assert pool.opened == 2 and pool.retired == 1
        [(_key, new)] = pool.connections()
        assert new is not old and new.expires_at is not None
        assert new.expires_at > time.time() + 60  # made with the renewed certificate
        assert old.conn.draining and not old.conn.closed  # GOAWAY; its stream goes on
        assert lw.waypoint.config_dump()["upstreamPool"] == {"connections": 1, "retired": 1}

        # The old connection's stream outlives the certificate it was made with.
        await asyncio.sleep(max(0.0, expiry - time.time()) + 0.5)
        assert await echoed(first, b"still there") == b"still there"
        first.write_eof()
        while await first.read():
            pass
        await wait_until(lambda: old.conn.closed, "the drained connection's close")

    aio.run(main)
