"""Ending a mirrored socket's TIME-WAIT (meshcore.timewait): the netlink message, its
answer, and, in a namespace of its own, the real kernel ending exactly that one socket."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

import nsutil
from meshcore.timewait import NETLINK_SOCK_DIAG as DIAG
from meshcore.timewait import (
    NLMSG_ERROR,
    SOCK_DESTROY,
    TCP_CLOSE,
    TimeWaitReaper,
    ack_errno,
    cookie_of,
    destroy_request,
    dump_request,
    dumped,
    tcp_state,
)
from tests.support.child import ROOT, run_child_under
from tests.support.netns import throwaway_netns

# ---- the message ---------------------------------------------------------------------------


def test_the_request_names_tcp_the_addresses_both_ports_and_the_cookie() -> None:
    cookie = 0x1122334455667788
    raw = destroy_request(socket.AF_INET, ("10.1.2.3", 9000), ("10.9.8.7", 40001), cookie, 5)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", raw)
    assert (length, kind, seq, pid) == (len(raw), SOCK_DESTROY, 5, 0)
    assert flags == 0x1 | 0x4  # a request, acknowledged
    family, proto, _ext, states = struct.unpack_from("=BBBxI", raw, 16)
    assert (family, proto, states) == (socket.AF_INET, socket.IPPROTO_TCP, 1 << 6)
    sport, dport, src, dst = struct.unpack_from("!HH16s16s", raw, 24)
    assert (sport, dport) == (9000, 40001)
    assert src[:4] == socket.inet_aton("10.1.2.3") and src[4:] == bytes(12)
    assert dst[:4] == socket.inet_aton("10.9.8.7")
    ifindex, low, high = struct.unpack_from("=III", raw, 24 + 36)
    assert (ifindex, low, high) == (0, 0x55667788, 0x11223344)
    assert len(raw) == 16 + 8 + 48


def test_an_ipv6_request_carries_all_sixteen_bytes() -> None:
    raw = destroy_request(socket.AF_INET6, ("fd00::1", 1), ("fd00::2", 2), 0, 1)
    _, _, src, dst = struct.unpack_from("!HH16s16s", raw, 24)
    assert src == socket.inet_pton(socket.AF_INET6, "fd00::1")
    assert dst == socket.inet_pton(socket.AF_INET6, "fd00::2")


def _answer(seq: int, code: int, kind: int = NLMSG_ERROR) -> bytes:
    body = struct.pack("=i", code) + bytes(16)  # the error, then the request's header
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


def test_the_answer_is_read_for_its_own_request_only() -> None:
    assert ack_errno(_answer(7, 0), 7) == 0
    assert ack_errno(_answer(7, -errno.ENOENT), 7) == errno.ENOENT
    assert ack_errno(_answer(6, 0), 7) is None  # a stale answer
    assert ack_errno(_answer(6, 0) + _answer(7, -errno.EPERM), 7) == errno.EPERM
    assert ack_errno(_answer(7, 0, kind=3), 7) is None  # not an acknowledgement


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 15, struct.pack("=IHHII", 0, NLMSG_ERROR, 0, 7, 0) + bytes(8)],
    ids=["empty", "short", "zero-length"],
)
def test_a_malformed_answer_is_no_answer(data: bytes) -> None:
    assert ack_errno(data, 7) is None


def _entry(seq: int, lport: int, rport: int) -> bytes:
    sid = struct.pack("!HH16s16s", lport, rport, bytes(16), bytes(16)) + bytes(12)
    body = bytes([socket.AF_INET, 6, 0, 0]) + sid + bytes(20)
    return struct.pack("=IHHII", 16 + len(body), 20, 2, seq, 0) + body


def test_a_dump_asks_for_tcp_time_waits_with_the_mark_and_reads_its_answer() -> None:
    raw = dump_request(socket.AF_INET, 0x539, 9)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", raw)
    assert (length, kind, flags & 0x300, seq) == (len(raw), 20, 0x300, 9)
    # The filter: one mark condition whose "no" jumps past the end (reject).
    attr_len, attr_type, op, yes, no, mark, mask = struct.unpack_from("=HHBBHII", raw, 72)
    assert (attr_type, op, mark, mask) == (1, 10, 0x539, 0xFFFFFFFF)
    assert (yes, no) == (attr_len - 4, attr_len)
    done = struct.pack("=IHHII", 20, 3, 2, 9, 0) + bytes(4)
    got, finished, code = dumped(_entry(9, 9000, 40000) + _entry(9, 15008, 1), 9)
    assert [(lp, rp) for _, lp, rp in got] == [(9000, 40000), (15008, 1)] and not finished
    assert len(got[0][0]) == 48 and code == 0
    assert dumped(done, 9) == ([], True, 0)
    assert dumped(_entry(8, 1, 2) + done, 9) == ([], True, 0)  # another request's: skipped
    assert dumped(_answer(9, -errno.EPERM), 9) == ([], True, errno.EPERM)
    assert dumped(_entry(9, 1, 2)[:40], 9)[1:] == (True, errno.EBADMSG)  # cut short


# ---- the kernel ------------------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[tuple[str, int]]:
    """A namespace of its own: its path and an open fd of it."""
    with throwaway_netns("tw") as path:
        fd = nsutil.open_netns(path)
        try:
            yield path, fd
        finally:
            os.close(fd)


def _time_wait(
    fd: int, mark: int = 0, port: int = 0
) -> tuple[socket.socket, int, tuple[str, int], tuple[str, int]]:
    """In namespace `fd`: a listener (on `port`, with `mark`), and a connection whose server
    side sent the first FIN, so that the server's socket is now a TIME-WAIT socket. Returns
    the listener, and the server socket's cookie and local and remote addresses."""
    lst, cli = nsutil.sockets_in(fd, 2)
    if mark:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)  # accepted sockets inherit it
    lst.bind(("127.0.0.1", port))
    lst.listen()
    cli.settimeout(5)
    cli.connect(lst.getsockname())
    srv, _ = lst.accept()
    with srv, cli:
        cookie = cookie_of(srv)
        local, remote = srv.getsockname(), srv.getpeername()
        srv.shutdown(socket.SHUT_WR)  # the first FIN: ours
        assert cli.recv(1) == b""
        cli.close()  # the app's FIN after it: ours goes to TIME-WAIT
        for _ in range(1000):
            if tcp_state(srv) == TCP_CLOSE:
                break
            time.sleep(0.001)
        assert tcp_state(srv) == TCP_CLOSE
    return lst, cookie, local, remote


def _time_waits(path: str) -> str:
    out = subprocess.run(
        ["ip", "netns", "exec", os.path.basename(path), "ss", "-Htan", "state", "time-wait"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.netns
def test_the_time_wait_socket_of_that_cookie_is_ended_and_nothing_else(
    netns: tuple[str, int],
) -> None:
    path, fd = netns
    lst, cookie, local, remote = _time_wait(fd)
    reaper = TimeWaitReaper(
        lambda: nsutil.sockets_in(fd, 1, socket.AF_NETLINK, socket.SOCK_RAW, DIAG)[0]
    )
    try:
        assert f"{local[0]}:{local[1]}" in _time_waits(path)
        # Another cookie on the same addresses ends nothing, nor does the right cookie on
        # other addresses: neither the TIME-WAIT socket nor the listener (the kernel's
        # lookup falls back to a listener on the local address).
        assert reaper.forget(socket.AF_INET, local, remote, cookie ^ 1) == errno.ENOENT
        assert reaper.forget(socket.AF_INET, local, ("127.0.0.1", 1), cookie) == errno.ENOENT
        assert f"{local[0]}:{local[1]}" in _time_waits(path)
        assert reaper.forget(socket.AF_INET, local, remote, cookie) == 0
        assert _time_waits(path) == ""
        assert reaper.forget(socket.AF_INET, local, remote, cookie) == errno.ENOENT
        assert (reaper.ended, reaper.missed, reaper.failed) == (1, 3, None)
        # Its socket does not block: no poll() before each send and receive.
        assert reaper._nl is not None and reaper._nl.gettimeout() == 0.0
        # The listener lives on, and the same 4-tuple can be used again at once.
        (again,) = nsutil.sockets_in(fd, 1)
        with again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(remote)
            again.settimeout(5)
            again.connect(lst.getsockname())
            conn, peer = lst.accept()
            conn.close()
        assert peer == remote
    finally:
        reaper.close()
        lst.close()


@pytest.mark.netns
def test_a_sweep_ends_the_marked_time_waits_but_spares_the_hbone_port(
    netns: tuple[str, int],
) -> None:
    """What a killed tunnel left: TIME-WAIT sockets with its mark. The app's own (no mark)
    and the tunnel's HBONE ones (port 15008, across the network) stay."""
    path, fd = netns
    made = [
        _time_wait(fd, mark=0x539),
        _time_wait(fd, mark=0x539),
        _time_wait(fd),  # the app's
        _time_wait(fd, mark=0x539, port=15008),
    ]
    reaper = TimeWaitReaper(
        lambda: nsutil.sockets_in(fd, 1, socket.AF_NETLINK, socket.SOCK_RAW, DIAG)[0]
    )
    try:
        assert len(_time_waits(path).splitlines()) == 4
        # Another family's dump finds none of these IPv4 sockets.
        assert reaper.sweep(0x539, 15008, families=(socket.AF_INET6,)) == 0
        assert len(_time_waits(path).splitlines()) == 4
        assert reaper.sweep(0x539, 15008) == 2
        left = _time_waits(path)
        assert f"127.0.0.1:{made[2][2][1]} " in left and "127.0.0.1:15008 " in left
        assert len(left.splitlines()) == 2
        assert reaper.sweep(0x539, 15008) == 0
        assert reaper.failed is None
    finally:
        reaper.close()
        for lst, *_ in made:
            lst.close()


_WITHOUT_PRIVILEGE = """
import errno, json, socket, time
from meshcore.timewait import NETLINK_SOCK_DIAG, TCP_CLOSE, TimeWaitReaper, cookie_of, tcp_state
lst = socket.create_server(("127.0.0.1", 0))
cli = socket.create_connection(lst.getsockname(), timeout=5)
srv, _ = lst.accept()
cookie, local, remote = cookie_of(srv), srv.getsockname(), srv.getpeername()
srv.shutdown(socket.SHUT_WR)
cli.recv(1)
cli.close()
while tcp_state(srv) != TCP_CLOSE:
    time.sleep(0.001)
opened = []
def diag():
    opened.append(1)
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
reaper = TimeWaitReaper(diag)
got = [reaper.forget(socket.AF_INET, local, remote, cookie) for _ in range(3)]
print("RESULT", json.dumps({"got": got, "opened": len(opened), "failed": reaper.failed}))
"""


def test_a_reaper_without_the_privilege_stops_asking() -> None:
    """A tunnel without CAP_NET_ADMIN keeps its TIME-WAITs (the old behaviour), and the
    kernel's refusal stops it asking: one request, not one per connection. Run as nobody
    (scripts/unprivileged.sh, as the unprivileged tier runs)."""
    unprivileged = ("bash", str(ROOT / "scripts/unprivileged.sh"))
    result, _ = run_child_under(unprivileged, _WITHOUT_PRIVILEGE, timeout=60)
    assert result == {
        "got": [errno.EPERM] * 3,
        "opened": 1,
        "failed": errno.EPERM,
    }
