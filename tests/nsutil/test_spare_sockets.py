"""A pod's socket factory makes its sockets in batches, in one visit to the pod's netns:
each socket handed out lives in that netns, carries the tunnel's mark and does not block;
the batch's leftovers are closed with the factory."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator

import pytest

import nsutil
from meshcore.defaults import TUNNEL_MARK
from meshcore.sockets import SPARE_SOCKETS, NetnsSocketFactory
from tests.support.netns import throwaway_netns

pytestmark = pytest.mark.netns

SIOCGSKNS = 0x894C  # ioctl: an fd of the netns a socket lives in


@pytest.fixture
def ns_path() -> Iterator[str]:
    with throwaway_netns("spare", lo_up=False) as path:
        yield path


def _netns_inode(sock: socket.socket) -> int:
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_sockets_come_from_the_pod_netns_in_batches_and_leftovers_close(ns_path: str) -> None:
    pod_inode = os.stat(ns_path).st_ino
    assert pod_inode != os.stat("/proc/self/ns/net").st_ino
    netns_fd = nsutil.open_netns(ns_path)
    nsutil.socket_in(netns_fd).close()  # nsutil keeps this thread's home netns fd from now on
    fds_before = _open_fds()
    factory = NetnsSocketFactory(netns_fd)
    handed = [factory.new() for _ in range(SPARE_SOCKETS + 1)]  # a second batch begins
    try:
        for s in handed:
            assert _netns_inode(s) == pod_inode
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == TUNNEL_MARK
            assert not s.getblocking()
        assert len({s.fileno() for s in handed}) == len(handed)
        six = factory.new(socket.AF_INET6)  # each family has its own batch
        assert six.family == socket.AF_INET6 and _netns_inode(six) == pod_inode
        handed.append(six)
        # the handed-out sockets and the spares of both families
        spares = (SPARE_SOCKETS - 1) + (SPARE_SOCKETS - 1)
        assert _open_fds() == fds_before + len(handed) + spares
    finally:
        for s in handed:
            s.close()
        factory.close()
    assert _open_fds() == fds_before - 1  # the spares and the netns fd are gone
