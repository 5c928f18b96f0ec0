"""The owner <-> worker socket on the event loop: messages and fds arrive in order; a peer
that sends what the codec refuses, or goes away, closes the channel once, saying why."""

from __future__ import annotations

import os
import socket

from tests.support.aio import Loop, wait_until
from ztunnel.workers import codec
from ztunnel.workers.channel import Channel, socket_pair


def test_messages_and_an_fd_arrive_in_order(aio: Loop) -> None:
    async def main() -> None:
        a, b = socket_pair()
        left, right = Channel(a, "left"), Channel(b, "right")
        got: list[tuple[codec.Message, int | None]] = []
        right.on_message = lambda msg, fd: got.append((msg, fd))
        left.start()
        right.start()
        r, w = os.pipe()
        big = codec.State(tuple(("t", f"n{i}", bytes(2000)) for i in range(300)))
        left.send(codec.Hello(1, 2))
        left.send(big)
        left.send(codec.Enrol(1, "u", "", "", ""), r)
        os.close(r)  # the channel keeps its own copy until the frame is sent
        await wait_until(lambda: len(got) == 3, "three messages")
        assert [m for m, _ in got] == [codec.Hello(1, 2), big, codec.Enrol(1, "u", "", "", "")]
        fd = got[2][1]
        assert fd is not None
        os.write(w, b"x")
        assert os.read(fd, 1) == b"x"  # the same pipe, received as a new fd
        assert not os.get_inheritable(fd)
        os.close(fd)
        os.close(w)
        left.close("done")
        right.close("done")

    aio.run(main())


def test_a_bad_frame_closes_the_channel_with_the_reason(aio: Loop) -> None:
    async def main() -> None:
        raw, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ch = Channel(b, "worker 1")
        closed: list[str] = []
        ch.on_closed = closed.append
        ch.start()
        raw.send(b"\x01\x63\x00\x00")
        await wait_until(lambda: bool(closed), "the channel closed")
        assert closed == ["protocol error: unknown message kind 99"]
        ch.send(codec.Hello(1, 2))  # nothing happens once closed
        raw.close()

    aio.run(main())


def test_the_peer_going_away_closes_the_channel(aio: Loop) -> None:
    async def main() -> None:
        raw, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ch = Channel(b, "owner")
        closed: list[str] = []
        ch.on_closed = closed.append
        ch.start()
        raw.close()
        await wait_until(lambda: bool(closed), "the channel closed")
        assert closed == ["the peer closed the channel"]

    aio.run(main())


def test_a_peer_that_does_not_read_is_cut_off_not_buffered_without_end(
    aio: Loop, monkeypatch
) -> None:
    from ztunnel.workers import channel as channel_module

    monkeypatch.setattr(channel_module, "MAX_QUEUED", 1024 * 1024)

    async def main() -> None:
        a, peer = socket_pair()
        ch = Channel(a, "worker 1")
        closed: list[str] = []
        ch.on_closed = closed.append
        ch.start()
        big = codec.State((("t", "n", bytes(200_000)),))
        for _ in range(20):
            ch.send(big)
            if closed:
                break
        assert closed and "has not read" in closed[0]
        peer.close()

    aio.run(main())
