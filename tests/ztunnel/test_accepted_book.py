"""A pod's book of accepted connections, on the tunnel's loop with real TCP connections: what
a drain waits for and what a stopped pod does with a connection made after it stopped.

The loop creates a listener's protocol as it accepts and calls `connection_made` a turn
later. A drain that looked in that turn once found the pod idle, stopped it, and the
connection, made just after, was closed before its first byte: in an upgrade under load the
client saw `closed before the greeting`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from meshcore.relay import AppSide
from tests.support.aio import Loop
from ztunnel.inpod import _Accepted


@pytest.fixture
def aio() -> Iterator[Loop]:
    loop = Loop("uvloop")
    yield loop
    loop.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Both ends of one loopback TCP connection: (the accepted end, the client end)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        accepted, _ = srv.accept()
    return accepted, client


def test_a_connection_accepted_and_not_yet_made_is_open() -> None:
    book = _Accepted()
    make = book.wrap(AppSide)
    make()  # what the loop does as it accepts; connection_made comes a turn later
    assert book.open_count() == 1


def test_open_count_follows_a_connection_from_accepted_to_closing(aio: Loop) -> None:
    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        book = _Accepted()
        make = book.wrap(AppSide)
        accepted, client = tcp_pair()
        counts = [book.open_count()]
        protocol = make()
        counts.append(book.open_count())
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, accepted)
        counts.append(book.open_count())
        transport.close()
        counts.append(book.open_count())
        client.close()
        return counts

    assert aio.run(scenario) == [0, 1, 1, 0]


def test_a_connection_made_after_the_pod_stopped_is_reset_not_served(aio: Loop) -> None:
    async def scenario() -> tuple[list[AppSide], BaseException | bytes]:
        loop = asyncio.get_running_loop()
        served: list[AppSide] = []
        book = _Accepted()
        make = book.wrap(lambda: AppSide(on_made=served.append))
        accepted, client = tcp_pair()
        protocol = make()
        book.abort_all()  # the pod stops in the turn between accept and connection_made
        assert book.open_count() == 0
        await loop.connect_accepted_socket(lambda: protocol, accepted)
        client.settimeout(5)
        try:
            got: BaseException | bytes = client.recv(10)
        except OSError as e:
            got = e
        client.close()
        return served, got

    served, got = aio.run(scenario)
    assert served == []  # no handler ran for it
    assert isinstance(got, ConnectionResetError), got  # a refusal, not an empty answer
