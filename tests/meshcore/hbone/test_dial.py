"""Dialling an HBONE peer that does not answer: the error names the step that timed out
and the local port, so a user can tell a lost SYN from a peer that never finishes its
handshake, and find the flow in a packet capture."""

from __future__ import annotations

import re
import socket
import ssl

import pytest

from meshcore.hbone.dial import hbone_connect
from meshcore.hbone.pool import PoolKey
from meshcore.hbone.transport import H2Transport
from meshcore.identity.spiffe import SpiffeId
from meshcore.sockets import PlainSocketFactory
from tests.support.aio import run


def _context(_identity: SpiffeId) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _never(_h2: H2Transport, _ids: frozenset[SpiffeId]) -> None:
    raise AssertionError("no connection was expected to be made")


def _key(port: int) -> PoolKey:
    return PoolKey(
        SpiffeId("cluster.local", "shop", "client"),
        frozenset({SpiffeId("cluster.local", "shop", "web")}),
        ("127.0.0.1", port),
        "127.0.0.1",
    )


class _Recorder(PlainSocketFactory):
    """Plain sockets, remembering the last one made (its port is in the error)."""

    made: socket.socket | None = None

    def new(self, family: int = socket.AF_INET) -> socket.socket:
        self.made = super().new(family)
        self.made.bind(("127.0.0.1", 0))
        return self.made


def _dial(port: int, factory: _Recorder) -> str:
    async def main() -> str:
        with pytest.raises(TimeoutError) as caught:
            await hbone_connect(
                _key(port), factory, _context, _never, lambda _h2: None, connect_timeout=0.3
            )
        return str(caught.value)

    return run(main)


def test_a_peer_that_accepts_but_never_handshakes_times_out_in_the_tls_step() -> None:
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)  # the kernel completes the TCP handshake; nobody speaks TLS
        factory = _Recorder()
        why = _dial(mute.getsockname()[1], factory)
    assert factory.made is not None and factory.made.fileno() == -1  # closed
    assert re.match(r"TLS handshake to 127\.0\.0\.1:\d+ from port \d+ timed out after 0\.3 s", why)


def test_a_peer_whose_syns_are_dropped_times_out_in_the_tcp_step() -> None:
    # A full accept queue (backlog 0 holds one) makes the kernel drop further SYNs: the
    # client's connect waits.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        queued = []
        try:
            queued.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            factory = _Recorder()
            why = _dial(port, factory)
        finally:
            for s in queued:
                s.close()
    local = re.search(r"from port (\d+)", why)
    assert why.startswith(f"TCP connect to 127.0.0.1:{port}"), why
    assert local is not None and int(local.group(1)) > 0
