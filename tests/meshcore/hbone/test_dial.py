"""Dialling an HBONE peer that does not answer, or answers late.

The error names the step that timed out and the source ports, so a user can tell lost
SYNs from a peer that never finishes its handshake, and find the flows in a capture. The
TCP connect does not wait on the kernel's SYN backoff: a port whose SYNs are dropped is
left for a fresh one (meshcore.staggered)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import subprocess

import pytest

import nsutil
from meshcore.hbone.dial import REFUSED_GRACE, REFUSED_MEMORY, RefusalMemory, hbone_connect
from meshcore.hbone.pool import PoolKey
from meshcore.hbone.transport import H2Transport
from meshcore.identity.spiffe import SpiffeId
from meshcore.sockets import PlainSocketFactory
from meshcore.staggered import StaggeredTimeout, connect_staggered
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
    """Plain sockets, remembering every one made."""

    def __init__(self) -> None:
        self.made: list[socket.socket] = []

    def new(self, family: int = socket.AF_INET) -> socket.socket:
        sock = super().new(family)
        self.made.append(sock)
        return sock


def _dial(port: int, factory: _Recorder, seconds: float) -> str:
    async def main() -> str:
        with pytest.raises(TimeoutError) as caught:
            await hbone_connect(
                _key(port), factory, _context, _never, lambda _h2: None, connect_timeout=seconds
            )
        return str(caught.value)

    return run(main)


def test_a_peer_that_accepts_but_never_handshakes_times_out_in_the_tls_step() -> None:
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)  # the kernel completes the TCP handshake; nobody speaks TLS
        factory = _Recorder()
        why = _dial(mute.getsockname()[1], factory, 0.3)
    assert len(factory.made) == 1 and factory.made[0].fileno() == -1  # closed
    assert re.match(
        r"TLS handshake with 127\.0\.0\.1:\d+ from port \d+ timed out after 0\.3 s", why
    )


def test_a_peer_whose_syns_are_dropped_times_out_in_the_tcp_step_after_fresh_attempts() -> None:
    # A full accept queue (backlog 0 holds one) makes the kernel drop further SYNs.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            factory = _Recorder()
            why = _dial(port, factory, 2.5)
    # Attempts at 0, 1 and 2 s, each from its own port, every one closed.
    assert len(factory.made) == 3
    assert all(s.fileno() == -1 for s in factory.made)
    ports = re.search(r"SYNs from ports ([\d, ]+) unanswered", why)
    assert why.startswith(f"TCP connect to 127.0.0.1:{port} timed out after 2.5 s"), why
    assert ports is not None and len(set(ports.group(1).split(", "))) == 3


def test_a_refused_attempt_ends_the_connect_at_once() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: a SYN there is refused
        made: list[socket.socket] = []

        def new() -> socket.socket:
            made.append(PlainSocketFactory().new())
            return made[-1]

        async def main() -> None:
            with pytest.raises(ConnectionRefusedError):
                await connect_staggered(new, ("127.0.0.1", port), 5.0, stagger=0.05)

        run(main)
    assert len(made) == 1 and made[0].fileno() == -1


def test_a_port_refused_while_its_listener_restarts_is_tried_again_within_the_grace() -> None:
    """A listener replaced in place (a waypoint's process restarted in its pod) refuses for
    a moment: within the grace the connect tries fresh sockets and is made once the port
    listens again; every refused socket is closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    factory = _Recorder()

    async def main() -> float:
        loop = asyncio.get_running_loop()
        back = socket.socket()
        back.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

        def listen_again() -> None:
            back.bind(("127.0.0.1", port))
            back.listen(8)

        loop.call_later(0.5, listen_again)
        start = loop.time()
        try:
            sock = await connect_staggered(factory.new, ("127.0.0.1", port), 5.0, refused_grace=2.0)
            sock.close()
        finally:
            back.close()
        return loop.time() - start

    took = run(main)
    assert 0.5 <= took < 1.0, took
    assert len(factory.made) >= 3  # refused at 0, then fresh attempts every 0.1 s
    assert all(s.fileno() == -1 for s in factory.made)


def test_a_port_refused_for_the_whole_grace_fails_after_it_not_before() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: refused
        factory = _Recorder()

        async def main() -> float:
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(ConnectionRefusedError):
                await connect_staggered(factory.new, ("127.0.0.1", port), 5.0, refused_grace=0.4)
            return loop.time() - start

        took = run(main)
    assert 0.4 <= took < 1.0, took
    assert 3 <= len(factory.made) <= 6
    assert all(s.fileno() == -1 for s in factory.made)


def test_a_dial_to_a_port_that_keeps_refusing_says_so_and_how_long_it_tried() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

        async def main() -> str:
            with pytest.raises(ConnectionRefusedError) as caught:
                await hbone_connect(
                    _key(port), _Recorder(), _context, _never, lambda _h2: None, connect_timeout=0.3
                )
            return str(caught.value)

        why = run(main)
        again = run(main)
    assert f"127.0.0.1:{port} refused the connection (tried for 0.3 s)" in why, why
    # Refused through a whole grace: the next dial to it gets none (a waypoint that stays
    # down costs the first connection the wait, not every one).
    assert f"127.0.0.1:{port} refused the connection (refused again lately" in again, again


def test_the_refusal_memory_gives_a_peer_the_grace_again_once_it_answered_or_time_passed() -> None:
    memory = RefusalMemory(size=2)
    a, b, c = ("10.0.0.1", 15008), ("10.0.0.2", 15008), ("10.0.0.3", 15008)
    assert memory.grace(a, 0.0) == REFUSED_GRACE
    memory.refused(a, 0.0)
    assert memory.grace(a, 1.0) == 0.0
    assert memory.grace(a, REFUSED_MEMORY) == REFUSED_GRACE  # long enough ago
    memory.refused(a, 5.0)
    memory.answered(a)
    assert memory.grace(a, 6.0) == REFUSED_GRACE
    # Bounded: the oldest peer is forgotten first.
    memory.refused(a, 7.0)
    memory.refused(b, 8.0)
    memory.refused(c, 9.0)
    assert memory.grace(a, 9.0) == REFUSED_GRACE
    assert memory.grace(b, 9.0) == memory.grace(c, 9.0) == 0.0


def test_an_attempt_that_cannot_be_made_ends_the_connect_instead_of_hanging() -> None:
    """The second attempt's socket cannot be made (here: a factory's own error): the
    connect fails with it at once, the first attempt's socket closed."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # the queue full
            made: list[socket.socket] = []

            def new() -> socket.socket:
                if made:
                    raise ValueError("no second socket")
                made.append(PlainSocketFactory().new())
                return made[-1]

            async def main() -> None:
                with pytest.raises(ValueError, match="no second socket"):
                    await connect_staggered(new, ("127.0.0.1", port), 30.0, stagger=0.1)

            run(main, limit=10)
    assert len(made) == 1 and made[0].fileno() == -1


BLACKHOLED_PORT = 40999  # the first attempt's source port, whose SYNs the netns drops


@pytest.mark.netns
def test_a_source_port_whose_syns_are_lost_is_left_for_a_fresh_one() -> None:
    """The kernel retransmits a lost SYN from the same port: were every retransmission
    lost too (a listener that drops them, a stale path), only a new port gets through."""
    from tests.support.netns import throwaway_netns

    with throwaway_netns("dial") as path:
        name = os.path.basename(path)
        subprocess.run(
            ["ip", "netns", "exec", name, "iptables", "-w", "-A", "INPUT", "-p", "tcp",
             "--syn", "--sport", str(BLACKHOLED_PORT), "-j", "DROP"],
            check=True, timeout=30,
        )  # fmt: skip
        fd = os.open(path, os.O_RDONLY)
        try:
            (server,) = nsutil.sockets_in(fd, 1)
            with server:
                server.bind(("127.0.0.1", 0))
                server.listen(8)
                port = server.getsockname()[1]
                made: list[socket.socket] = []

                def new() -> socket.socket:
                    (sock,) = nsutil.sockets_in(fd, 1)
                    sock.setblocking(False)
                    sock.bind(("127.0.0.1", BLACKHOLED_PORT if not made else 0))
                    made.append(sock)
                    return sock

                async def main(stagger: float) -> int:
                    sock = await connect_staggered(new, ("127.0.0.1", port), 3.0, stagger)
                    with sock:
                        return int(sock.getsockname()[1])

                # Waiting on the kernel alone: every SYN from that port is lost.
                with pytest.raises(StaggeredTimeout) as caught:
                    run(lambda: main(stagger=10.0))
                assert caught.value.ports == [BLACKHOLED_PORT] and len(made) == 1
                made.clear()
                # Staggered: the second attempt, a second later, from a new port, is made.
                assert run(lambda: main(stagger=1.0)) != BLACKHOLED_PORT
                assert len(made) == 2 and made[0].fileno() == -1
        finally:
            os.close(fd)
