"""Listeners under a real EMFILE, in a subprocess with a low RLIMIT_NOFILE: they do not
spin, say so once, and serve again when descriptors are free (asyncio with our handler,
and uvloop, the proxies' loop)."""

from __future__ import annotations

import pytest

from tests.support.child import FD_HOG, run_child

_CHILD = (
    FD_HOG
    + """
import asyncio, json, os, resource, socket, sys, time
import uvloop
from meshcore.runtime import accepterrors

async def main():
    if sys.argv[1] == "asyncio":
        accepterrors.install(asyncio.get_running_loop())
    async def answer(reader, writer):
        writer.write(b"ok")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cpu, waiting = await connect_while_out_of_fds(port, 2.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    again = await asyncio.wait_for(reader.read(), 30)
    print("RESULT " + json.dumps({"cpu": cpu, "served_again": again.decode()}), flush=True)

resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
(uvloop.run if sys.argv[1] == "uvloop" else asyncio.run)(main())
"""
)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_listener_out_of_fds_backs_off_logs_once_and_recovers(loop: str) -> None:
    result, done = run_child(_CHILD, loop)
    assert result["served_again"] == "ok"
    # CPU time, not wall time: a spinning accept loop uses all of the 2.5 s it waits.
    assert result["cpu"] < 1.0, result
    output = done.stdout + done.stderr
    assert "Traceback" not in output  # asyncio's per-connection tracebacks are gone
    if loop == "asyncio":
        assert output.count("cannot accept: out of resources") == 1, output


_TLS_CHILD = (
    FD_HOG
    + """
import asyncio, encodings.idna, json, os, resource, socket, ssl, time
import uvloop
from meshcore.hbone.server import HandshakeGate, TlsListener

async def main():
    gate = HandshakeGate()
    listener = TlsListener(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), asyncio.Protocol, gate)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await listener.start(sock)
    cpu, waiting = await connect_while_out_of_fds(port, 2.5)
    during = gate.accepted  # the listener's retry has not run yet: this step holds the loop
    deadline = time.monotonic() + 30
    while gate.accepted == during and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    listener.close()
    print("RESULT " + json.dumps({"cpu": cpu, "during": during, "after": gate.accepted}),
          flush=True)

resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
uvloop.run(main())
"""
)


def test_the_hbone_listener_out_of_fds_backs_off_and_takes_the_queued_connection_later() -> None:
    result, done = run_child(_TLS_CHILD)
    assert result["during"] == 0
    assert result["after"] == 1  # the connection queued meanwhile, accepted once fds are free
    assert result["cpu"] < 1.0, result  # CPU time: a spinning accept uses all 2.5 s
    assert "Traceback" not in done.stdout + done.stderr
