"""ZDS packets on real SOCK_SEQPACKET sockets: boundaries, fds via SCM_RIGHTS, truncation,
fd hygiene on every error path, cancellation, and the listening socket."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

from tests.support.aio import LOOPS, run
from tests.support.fds import open_fds, opened
from zds import wire
from zds.messages import (
    MAX_MESSAGE_SIZE,
    Ack,
    AddWorkload,
    DelWorkload,
    WorkloadInfo,
    WorkloadRequest,
    WorkloadResponse,
    ZdsError,
    ZdsHello,
    encode,
)

INFO = WorkloadInfo("pod", "ns", "sa")


@pytest.fixture(params=list(LOOPS))
def loop_name(request):
    return request.param


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def raw_send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def test_packets_keep_their_boundaries_and_carry_one_fd(loop_name):
    async def main():
        a, b = pair()
        with a, b, opened("/proc/self/ns/net") as ns:
            await wire.send_packet(a, b"one")
            await wire.send_packet(a, b"two", ns)
            first = await wire.recv_packet(b)
            second = await wire.recv_packet(b)
            assert first == wire.Packet(b"one", None)
            assert second is not None and second.data == b"two" and second.fd is not None
            try:
                # The same namespace arrived, as a new close-on-exec fd.
                assert os.fstat(second.fd).st_ino == os.fstat(ns).st_ino
                assert second.fd != ns
                assert not os.get_inheritable(second.fd)
            finally:
                os.close(second.fd)
            a.close()
            assert await wire.recv_packet(b) is None  # end of stream

    run(main, loop=loop_name)


def test_a_packet_over_the_limit_is_refused_and_its_fd_closed(loop_name):
    async def main():
        a, b = pair()
        with a, b:
            before = open_fds()
            with opened("/dev/null") as f:
                raw_send_fds(a, b"x" * (MAX_MESSAGE_SIZE + 100), [f])
            with pytest.raises(ZdsError, match="truncated"):
                await wire.recv_packet(b)
            assert open_fds() == before
            # The stream goes on: the next packet is whole.
            await wire.send_packet(a, b"next")
            assert await wire.recv_packet(b) == wire.Packet(b"next", None)

    run(main, loop=loop_name)


def test_two_fds_are_refused_and_both_closed(loop_name):
    async def main():
        a, b = pair()
        with a, b:
            before = open_fds()
            with opened("/dev/null") as f, opened("/dev/zero") as g:
                raw_send_fds(a, b"\x1a\x00", [f, g])
            with pytest.raises(ZdsError, match="2 fds"):
                await wire.recv_packet(b)
            assert open_fds() == before

    run(main, loop=loop_name)


def test_too_many_fds_truncate_the_ancillary_data_and_all_are_closed(loop_name):
    async def main():
        a, b = pair()
        with a, b:
            before = open_fds()
            with opened("/dev/null") as f:
                raw_send_fds(a, b"\x1a\x00", [f] * 40)
            with pytest.raises(ZdsError, match="ancillary data truncated"):
                await wire.recv_packet(b)
            assert open_fds() == before

    run(main, loop=loop_name)


@pytest.mark.parametrize(
    ("data", "with_fd", "says"),
    [
        (encode(WorkloadRequest(AddWorkload("u", INFO))), False, "without a netns fd"),
        (encode(WorkloadRequest(DelWorkload("u"))), True, "must not carry an fd"),
        (b"\x0a\x05", True, "truncated"),
        (b"\xff\xff", True, "truncated varint"),
        (encode(ZdsHello()), False, "wire type"),  # a hello is no request
    ],
)
def test_bad_requests_are_refused_without_leaking_fds(loop_name, data, with_fd, says):
    async def main():
        a, b = pair()
        with a, b:
            before = open_fds()
            with opened("/dev/null") as f:
                raw_send_fds(a, data, [f]) if with_fd else a.send(data)
            with pytest.raises(ZdsError, match=says):
                await wire.recv_request(b)
            assert open_fds() == before

    run(main, loop=loop_name)


def test_hello_and_responses_must_not_carry_fds(loop_name):
    async def main():
        a, b = pair()
        with a, b:
            before = open_fds()
            with opened("/dev/null") as f:
                raw_send_fds(a, encode(ZdsHello()), [f])
                raw_send_fds(a, encode(WorkloadResponse(Ack())), [f])
            with pytest.raises(ZdsError, match="ZdsHello must not carry an fd"):
                await wire.recv_hello(b)
            with pytest.raises(ZdsError, match="WorkloadResponse must not carry an fd"):
                await wire.recv_response(b)
            assert open_fds() == before

    run(main, loop=loop_name)


def test_typed_round_trip(loop_name):
    async def main():
        a, b = pair()
        with a, b, opened("/proc/self/ns/net") as ns:
            await wire.send_message(a, ZdsHello())
            assert await wire.recv_hello(b) == ZdsHello()
            add = WorkloadRequest(AddWorkload("u", INFO))
            await wire.send_message(b, add, ns)
            got = await wire.recv_request(a)
            assert got is not None and got[0] == add and got[1] is not None
            os.close(got[1])
            await wire.send_message(a, WorkloadResponse(Ack("why")))
            assert await wire.recv_response(b) == WorkloadResponse(Ack("why"))

    run(main, loop=loop_name)


def test_a_cancelled_receive_loses_nothing(loop_name):
    async def main():
        a, b = pair()
        with a, b:
            waiting = asyncio.ensure_future(wire.recv_packet(b))
            await asyncio.sleep(0.01)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await wire.send_packet(a, b"kept")
            assert await wire.recv_packet(b) == wire.Packet(b"kept", None)

    run(main, loop=loop_name)


def test_sending_to_a_closed_peer_is_zds_closed(loop_name):
    async def main():
        a, b = pair()
        with a:
            b.close()
            with pytest.raises(wire.ZdsClosed):
                await wire.send_packet(a, b"x")

    run(main, loop=loop_name)


def test_a_full_socket_waits_for_room(loop_name):
    async def main():
        a, b = pair()
        with a, b:
            sent = 0
            while True:  # fill the buffer
                try:
                    a.send(b"f" * 1000)
                    sent += 1
                except BlockingIOError:
                    break
            blocked = asyncio.ensure_future(wire.send_packet(a, b"last"))
            await asyncio.sleep(0.01)
            assert not blocked.done()
            for _ in range(sent):
                assert (await wire.recv_packet(b)) == wire.Packet(b"f" * 1000, None)
            await blocked
            assert await wire.recv_packet(b) == wire.Packet(b"last", None)

    run(main, loop=loop_name)


def test_refuses_to_send_empty_or_overlong_packets():
    async def main():
        a, b = pair()
        with a, b:
            for data in (b"", b"x" * (MAX_MESSAGE_SIZE + 1)):
                with pytest.raises(ZdsError, match="refusing"):
                    await wire.send_packet(a, data)

    run(main)


def test_listen_is_private_replaces_a_stale_socket_and_accepts(tmp_path: Path, loop_name):
    path = tmp_path / "sub" / "ztunnel.sock"

    async def main():
        stale = wire.listen(path)
        stale.close()  # a crashed agent leaves its socket file behind
        with pytest.raises(ConnectionRefusedError):
            await wire.connect(path)
        listener = wire.listen(path)
        with listener:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            client = await wire.connect(path)
            server = await wire.accept(listener)
            with client, server:
                assert server.type == socket.SOCK_SEQPACKET
                await wire.send_message(client, ZdsHello())
                assert await wire.recv_hello(server) == ZdsHello()

    run(main, loop=loop_name)


def test_listen_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path: Path):
    path = tmp_path / "ztunnel.sock"
    path.write_text("not mine")
    with pytest.raises(ZdsError, match="not a socket"):
        wire.listen(path)
    assert path.read_text() == "not mine"


def test_socket_paths_over_the_unix_limit_are_refused(tmp_path: Path):
    path = tmp_path / ("x" * 120)
    with pytest.raises(ZdsError, match="too long"):
        wire.listen(path)
    with pytest.raises(ZdsError, match="too long"):
        run(lambda: wire.connect(path))


def test_connect_to_a_missing_agent_is_an_os_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        run(lambda: wire.connect(tmp_path / "absent.sock"))
