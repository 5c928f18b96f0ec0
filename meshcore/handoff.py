"""A listener that leaves without dropping what is on its way in.

When a listening socket closes, the kernel moves the connections queued on it (accepted by
the kernel, not yet by us) and the half-open ones to another listener of its SO_REUSEPORT
group (`tcp_migrate_req`), or resets them when it was the last one. A tunnel that drains
with a newer tunnel beside it (an upgrade with surge) can close at once. One that leaves
alone (an upgrade where the old pod must go before the new one is made, a pod's release)
would reset every connection that arrived in the moment before its close.

So a listener with no successor first stops taking new connections and only then closes:
a socket filter drops every new SYN (the client's kernel retries it 1 s later, when the next
tunnel listens or the capture's own rule holds it for the next one), connections whose
handshake is in flight complete and are accepted as usual for a short settle, and the
close then finds nothing queued.

Whether another tunnel listens is asked of the kernel (NETLINK_SOCK_DIAG, from the pod's
namespace): more listeners on the address than this tunnel's own processes hold.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Callable

from meshcore.timewait import (
    DIAG_REQ,
    NETLINK_SOCK_DIAG,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_HEADER,
    SOCK_DIAG_BY_FAMILY,
    dumped,
)

# How long a listener with no successor keeps accepting after it stopped taking new SYNs:
# a handshake in flight needs one round trip, well under a millisecond between pods.
SETTLE_SECONDS = 0.05

TCP_LISTEN = 10
SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>

# Classic BPF, run on a TCP segment as it reaches the socket (the data starts at the TCP
# header): a segment with SYN set and ACK clear, a new connection, is dropped; everything
# else passes whole. Children accepted later inherit the filter; no segment of theirs is a
# bare SYN.
_TCP_FLAGS_OFFSET = 13
_SYN, _ACK = 0x02, 0x10
_DROP_SYN = (
    (0x30, 0, 0, _TCP_FLAGS_OFFSET),  # ldb [13]
    (0x54, 0, 0, _SYN | _ACK),  # and #(SYN|ACK)
    (0x15, 0, 1, _SYN),  # jeq #SYN -> next, else skip one
    (0x06, 0, 0, 0),  # ret #0: dropped
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: kept whole
)
_PROGRAM = b"".join(struct.pack("=HBBI", *insn) for insn in _DROP_SYN)


def refuse_new_connections(sock: socket.socket) -> None:
    """From now on the kernel drops new connections' SYNs to `sock` (a listener); the ones
    already queued or completing their handshake are still accepted. OSError when the
    kernel refuses the filter (kernels here ask CAP_NET_ADMIN, which the tunnel has)."""
    program = ctypes.create_string_buffer(_PROGRAM, len(_PROGRAM))
    fprog = struct.pack("@HP", len(_DROP_SYN), ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def listeners_request(family: int, seq: int) -> bytes:
    """SOCK_DIAG_BY_FAMILY: every TCP socket of `family` in LISTEN in the namespace."""
    body = DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN) + bytes(48)
    header = NLMSG_HEADER.pack(
        NLMSG_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + body


def listening(data: bytes, seq: int, family: int) -> tuple[list[tuple[str, int]], bool, int]:
    """From one read of the dump's answer: each listener's (address, port), whether the
    dump is done, and its errno (0 unless it failed)."""
    socks, done, code = dumped(data, seq)
    size = 4 if family == socket.AF_INET else 16
    # inet_diag_sockid: sport, dport (2 bytes each), then the source address.
    found = [(socket.inet_ntop(family, sid[4 : 4 + size]), lport) for sid, lport, _ in socks]
    return found, done, code


def count_listeners(open_socket: Callable[[], socket.socket], address: tuple[str, int]) -> int:
    """How many TCP listeners the namespace of `open_socket`'s netlink socket has on
    `address` (IPv4; a wildcard listener counts for every address). Raises OSError when the
    kernel cannot say."""
    host, port = address
    seq = 1
    nl = open_socket()
    try:
        nl.settimeout(2.0)  # the kernel answers in the call; never wait long
        nl.send(listeners_request(socket.AF_INET, seq))
        found: list[tuple[str, int]] = []
        done = False
        while not done:
            part, done, code = listening(nl.recv(65536), seq, socket.AF_INET)
            if code:
                raise OSError(code, f"sock_diag: {errno.errorcode.get(code, code)}")
            found += part
    finally:
        nl.close()
    return sum(1 for ip, p in found if p == port and ip in (host, "0.0.0.0"))


def diag_socket() -> socket.socket:
    """A NETLINK_SOCK_DIAG socket in the current namespace."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
