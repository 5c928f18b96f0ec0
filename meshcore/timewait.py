"""Ending the TIME-WAIT of a tunnel socket that mirrors an app's own connection.

Under the eBPF capture a connection the tunnel accepts (15001, 15006) keeps the app's
addresses: in the client's pod the tunnel's socket is `server:port <- client:port`, the
mirror of the client's own socket. When the far end closes first the tunnel sends the
first FIN to the app, so the tunnel's socket, not the app's, ends in TIME-WAIT, and holds
that 4-tuple for a minute. The client's kernel does not see it when it picks a source port
for its next connection (its own socket on that port is closed), and the new SYN, steered
to the tunnel's listener, is refused by the kernel as a duplicate of the TIME-WAIT socket:
the client's connect hangs until the minute is over. A real server's TIME-WAIT would
accept such a SYN (RFC 6191); the steered one cannot.

The TIME-WAIT protects nothing here (the app's packets reach the tunnel over the pod's
own loopback, never late), so the tunnel ends it once it is made: SOCK_DESTROY over
NETLINK_SOCK_DIAG, from a socket in the pod's namespace, for exactly that socket (its
cookie, which the TIME-WAIT socket keeps). With the cookie a listener or another
connection on the same addresses can never be hit.

Pure message building and parsing here; the netlink socket is the caller's.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable

NETLINK_SOCK_DIAG = 4
SOCK_DESTROY = 21
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
TCP_TIME_WAIT = 6
SO_COOKIE = 57  # <asm-generic/socket.h>: the socket's 64-bit cookie (Python 3.11 has none)

_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_REQ = struct.Struct("=BBBxI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # inet_diag_sockid: sport, dport, src, dst (network)
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[0], cookie[1] (host order)
_ERR = struct.Struct("=i")


def cookie_of(sock: socket.socket) -> int:
    """The socket's cookie (the kernel's 64-bit id of it, kept by its TIME-WAIT socket)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


TCP_CLOSE = 7  # a socket's state once the kernel moved its connection to a TIME-WAIT socket


def tcp_state(sock: socket.socket) -> int:
    """The TCP state of `sock` (the first byte of TCP_INFO)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def _packed(family: int, ip: str) -> bytes:
    raw = socket.inet_pton(family, ip)
    return raw + bytes(16 - len(raw))


def destroy_request(
    family: int, local: tuple[str, int], remote: tuple[str, int], cookie: int, seq: int
) -> bytes:
    """SOCK_DESTROY for the TCP socket with these addresses (local is the tunnel's side)
    and this cookie, asking for an acknowledgement."""
    body = (
        _REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_TIME_WAIT)
        + _SOCKID.pack(local[1], remote[1], _packed(family, local[0]), _packed(family, remote[0]))
        + _SOCKID_TAIL.pack(0, cookie & 0xFFFFFFFF, cookie >> 32)
    )
    header = _NLMSG.pack(_NLMSG.size + len(body), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
    return header + body


def ack_errno(data: bytes, seq: int) -> int | None:
    """The errno of the acknowledgement of request `seq` in `data` (0: done), or None when
    `data` holds no acknowledgement of it (a stale one, or not an acknowledgement)."""
    at = 0
    while at + _NLMSG.size <= len(data):
        length, kind, _flags, got_seq, _pid = _NLMSG.unpack_from(data, at)
        if length < _NLMSG.size:
            return None  # malformed: nothing further can be framed
        if kind == NLMSG_ERROR and got_seq == seq and at + _NLMSG.size + 4 <= len(data):
            code: int = _ERR.unpack_from(data, at + _NLMSG.size)[0]
            return -code
        at += (length + 3) & ~3
    return None


class TimeWaitReaper:
    """Ends TIME-WAIT sockets through one NETLINK_SOCK_DIAG socket, which must live in the
    namespace of the sockets it ends; `open_socket` makes it at the first use (a pod whose
    capture mirrors nothing never holds one). Blocking calls, but short: the kernel handles
    a sock_diag request in the sender's own system call, so its answer is already queued
    when `send` returns. Counts what it did, for the tunnel's views and the tests."""

    def __init__(self, open_socket: Callable[[], socket.socket]) -> None:
        self._open = open_socket
        self._nl: socket.socket | None = None
        self._seq = 0
        self.ended = 0  # TIME-WAIT sockets ended
        self.missed = 0  # requests that found none (the socket had not reached TIME-WAIT)
        self.failed: int | None = None  # the errno that stopped it for good (EPERM...)

    def forget(
        self, family: int, local: tuple[str, int], remote: tuple[str, int], cookie: int
    ) -> int:
        """End the TIME-WAIT of the socket (addresses, cookie); the errno, 0 when done.
        Never raises: a TIME-WAIT left behind is the old behaviour, not an error."""
        if self.failed is not None:
            return self.failed
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        try:
            if self._nl is None:
                self._nl = self._open()
            self._nl.send(destroy_request(family, local, remote, cookie, self._seq))
            code = None
            while code is None:
                code = ack_errno(self._nl.recv(4096, socket.MSG_DONTWAIT), self._seq)
        except BlockingIOError:
            code = errno.ETIMEDOUT  # no answer queued: not expected from sock_diag
        except OSError as e:
            code = e.errno or errno.EIO
        if code == 0:
            self.ended += 1
        elif code == errno.ENOENT:
            self.missed += 1
        elif code in (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EINVAL):
            self.failed = code  # the kernel or our privileges will not do it: stop asking
        return code

    def close(self) -> None:
        nl, self._nl = self._nl, None
        if nl is not None:
            nl.close()
