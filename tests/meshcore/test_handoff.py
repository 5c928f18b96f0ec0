"""A leaving listener's two tools, on loopback with real sockets: the SYN filter (queued
connections still accepted and carried, new ones held off, not refused, and made by the
client's own retry once a listener without the filter is there) and the count of a
port's listeners that tells whether another tunnel is there. Plus the dump parser on bad
input. The filter's test is in the root tier: the kernels here ask CAP_NET_ADMIN to attach
a socket filter (the tunnel has it)."""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from meshcore import handoff
from meshcore.timewait import NLMSG_DONE, NLMSG_ERROR, SOCK_DIAG_BY_FAMILY


def reuseport_listener(address: tuple[str, int]) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(address)
    s.listen(16)
    return s


@pytest.fixture
def first() -> Iterator[socket.socket]:
    s = reuseport_listener(("127.0.0.1", 0))
    yield s
    s.close()


def test_the_count_is_of_the_group_on_that_address_and_port(first: socket.socket) -> None:
    address = first.getsockname()
    assert handoff.count_listeners(handoff.diag_socket, address) == 1
    second = reuseport_listener(address)
    elsewhere = socket.create_server(("127.0.0.2", address[1]))  # same port, other address
    try:
        assert handoff.count_listeners(handoff.diag_socket, address) == 2
    finally:
        second.close()
        elsewhere.close()
    assert handoff.count_listeners(handoff.diag_socket, address) == 1
    first.close()
    assert handoff.count_listeners(handoff.diag_socket, address) == 0


@pytest.mark.netns  # attaching a socket filter takes CAP_NET_ADMIN on kernels here
def test_a_filtered_listener_still_gives_what_was_queued_and_holds_new_syns_off(
    first: socket.socket,
) -> None:
    address = first.getsockname()
    queued = socket.create_connection(address, timeout=5)
    handoff.refuse_new_connections(first)
    late = socket.socket()
    late.setblocking(False)
    t0 = time.monotonic()
    assert late.connect_ex(address) == errno.EINPROGRESS
    # Queued before the filter: accepted, and it carries data both ways (the accepted
    # socket inherits the filter, which lets everything but a bare SYN through).
    conn, _ = first.accept()
    with conn, queued:
        conn.sendall(b"to the client")
        assert queued.recv(100) == b"to the client"
        queued.sendall(b"to the server")
        assert conn.recv(100) == b"to the server"
    # The late SYN got no answer at all (a reset would have failed the connect).
    time.sleep(0.3)
    assert late.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    first.close()
    # The next listener gets the client's retransmitted SYN (1 s after the first).
    nxt = socket.create_server(address)
    with nxt, late:
        nxt.settimeout(10)
        conn, _ = nxt.accept()
        conn.close()
    assert time.monotonic() - t0 >= 0.9  # made by the retry, not by the first SYN


def test_the_dump_parser_reports_broken_and_failed_answers() -> None:
    seq = 7
    header = struct.Struct("=IHHII")
    truncated = header.pack(400, SOCK_DIAG_BY_FAMILY, 0, seq, 0) + bytes(20)
    assert handoff.listening(truncated, seq, socket.AF_INET) == ([], True, errno.EBADMSG)
    failed = header.pack(20, NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -errno.EPERM)
    assert handoff.listening(failed, seq, socket.AF_INET) == ([], True, errno.EPERM)
    other = header.pack(16, NLMSG_DONE, 0, seq + 1, 0)  # another request's end
    assert handoff.listening(other, seq, socket.AF_INET) == ([], False, 0)
