"""`connect_tcp`: the tunnel's TCP connect to an app, with the plain socket factory on
loopback (the pod's own netns in the tunnel: the same loopback device)."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import pytest
import uvloop

from meshcore.sockets import PlainSocketFactory, SocketAddr
from ztunnel.proxy.common import connect_tcp


def _refuse_polling(*_args: Any) -> None:
    raise AssertionError("the connect was polled for writability")


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_a_connect_the_kernel_completed_at_once_is_not_polled(loop_factory: Any) -> None:
    """On loopback the handshake is over when connect() returns: the app side is made
    without watching the socket for writability (no epoll changes, future or timer)."""

    async def main() -> None:
        srv = socket.create_server(("127.0.0.1", 0))
        with srv:
            loop = asyncio.get_running_loop()
            loop.add_writer = _refuse_polling  # type: ignore[method-assign,assignment]
            transport, app = await connect_tcp(
                PlainSocketFactory(), SocketAddr.of(srv.getsockname())
            )
            conn, _ = srv.accept()
            with conn:
                conn.sendall(b"hi")
                for _ in range(100):
                    if app.early:
                        break
                    await asyncio.sleep(0.01)
                # Held until a sink is attached: the connection reads.
                assert app.early == [b"hi"]
            transport.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def test_a_refused_connect_still_fails_with_the_sockets_error() -> None:
    """No peer name and no handshake: the poll path reports the refusal as before."""

    async def main() -> None:
        probe = socket.create_server(("127.0.0.1", 0))
        target = SocketAddr.of(probe.getsockname())
        probe.close()  # nothing listens there now
        with pytest.raises(OSError, match="Connect call failed") as err:
            await connect_tcp(PlainSocketFactory(), target)
        assert err.value.errno == errno.ECONNREFUSED

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
