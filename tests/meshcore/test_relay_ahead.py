"""`AppSide.take_ahead` and `give_back`: an app's first bytes taken to go with an HBONE
CONNECT (early data), on real socket pairs under uvloop, the tunnel's loop: what the loop
already read and what still waits in the socket, in order; never the FIN; never more than
asked; and bytes given back come first again."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from meshcore.relay import AppSide
from tests.support.aio import Loop, wait_until

pytestmark = pytest.mark.parametrize("aio", ["uvloop"], indirect=True)  # the tunnel's loop


class Recorder:
    """A sink that keeps what the app side delivers."""

    def __init__(self) -> None:
        self.data = b""
        self.eof = False

    def app_data(self, data: bytes | memoryview, framed: memoryview | None) -> None:
        self.data += bytes(data)

    def app_last_data(self, data: bytes | memoryview, framed: memoryview | None) -> None:
        self.data += bytes(data)

    def app_eof(self) -> None:
        self.eof = True

    def app_lost(self, exc: Exception | None) -> None:
        pass

    def app_pause_writing(self) -> None:
        pass

    def app_resume_writing(self) -> None:
        pass


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


async def app_side(ours: socket.socket) -> AppSide:
    """`ours` under the loop, as the tunnel holds an accepted connection (no sink yet)."""
    _, app = await asyncio.get_running_loop().connect_accepted_socket(AppSide, ours.dup())
    return app


def test_what_the_loop_read_comes_first_then_what_waits_in_the_socket(
    aio: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, app_end = pair

    async def main() -> tuple[bytes, AppSide]:
        app = await app_side(ours)
        app_end.sendall(b"one ")
        await wait_until(lambda: app.early is not None, "the loop's first read")
        app_end.sendall(b"two")  # the loop paused reading: this waits in the socket
        return app.take_ahead(1024), app

    taken, app = aio.run(main)
    assert taken == b"one two"
    assert app.early is None


def test_never_more_than_the_limit_and_the_rest_stays_in_order(
    aio: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, app_end = pair
    sent = bytes(range(100))

    async def main() -> tuple[bytes, Recorder]:
        app = await app_side(ours)
        app_end.sendall(sent)
        taken = app.take_ahead(10)
        sink = Recorder()
        app.attach(sink)
        await wait_until(lambda: len(sink.data) == 90, "the rest, read by the loop")
        return taken, sink

    taken, sink = aio.run(main)
    assert taken == sent[:10]
    assert sink.data == sent[10:]


def test_the_fin_is_left_for_the_loop(aio: Loop, pair: tuple[socket.socket, socket.socket]) -> None:
    """An app that sends its request and half-closes at once: the bytes go early, and the
    loop still reads the FIN (it becomes END_STREAM after the answer)."""
    ours, app_end = pair

    async def main() -> tuple[bytes, Recorder]:
        app = await app_side(ours)
        app_end.sendall(b"request")
        app_end.shutdown(socket.SHUT_WR)
        taken = app.take_ahead(1024)  # before the loop has had a turn to read anything
        sink = Recorder()
        app.attach(sink)
        await wait_until(lambda: sink.eof, "the FIN, read by the loop")
        return taken, sink

    taken, sink = aio.run(main)
    assert taken == b"request"
    assert sink.data == b""


def test_nothing_waiting_is_nothing_taken(
    aio: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    """A protocol in which the server speaks first: no wait, nothing sent early."""
    ours, _ = pair

    async def main() -> bytes:
        app = await app_side(ours)
        return app.take_ahead(1024)

    assert aio.run(main) == b""


def test_bytes_given_back_come_before_what_arrived_since(
    aio: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    """A refused stream gives its early bytes back; whatever carries the connection next
    delivers them first, then what the app sent meanwhile."""
    ours, app_end = pair

    async def main() -> Recorder:
        app = await app_side(ours)
        app_end.sendall(b"first ")
        taken = app.take_ahead(1024)
        app_end.sendall(b"then")
        await wait_until(lambda: app.early is not None, "the loop's read of the rest")
        app.give_back(taken)
        sink = Recorder()
        app.attach(sink)
        await wait_until(lambda: sink.data == b"first then", "every byte, in order")
        return sink

    assert aio.run(main).data == b"first then"
