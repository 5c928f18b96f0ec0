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

On 15001 the TIME-WAIT protects nothing (the app's packets reach the tunnel over the
pod's own loopback, never late). On 15006 the peer is a plaintext client across the
network, where ending it early gives up the usual guard against its late segments, as
tcp_tw_reuse would; a hang of the client's next connection costs more. So the tunnel ends
it once it is made: SOCK_DESTROY over NETLINK_SOCK_DIAG, from a socket in the pod's
namespace, for exactly that socket (its cookie, which the TIME-WAIT socket keeps). With
the cookie a listener or another connection on the same addresses can never be hit.

The messages are built and parsed by pure functions; `TimeWaitReaper` does the I/O on a
netlink socket its caller opens in the right namespace.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections.abc import Callable

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_MARK_COND = 10
TCP_TIME_WAIT = 6
SO_COOKIE = 57  # <asm-generic/socket.h>: the socket's 64-bit cookie (Python 3.11 has none)

NLMSG_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
DIAG_REQ = struct.Struct("=BBBxI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # inet_diag_sockid: sport, dport, src, dst (network)
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[0], cookie[1] (host order)
_ERR = struct.Struct("=i")
_BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, yes, no
_SOCKID_SIZE = _SOCKID.size + _SOCKID_TAIL.size  # 48
_DIAG_MSG_SIZE = 4 + _SOCKID_SIZE + 20  # inet_diag_msg: 4 bytes, the sockid, 5 words


def cookie_of(sock: socket.socket) -> int:
    """The socket's cookie (the kernel's 64-bit id of it, kept by its TIME-WAIT socket)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


TCP_CLOSE = 7  # a socket's state once the kernel moved its connection to a TIME-WAIT socket
ANSWER_WAIT = 2.0  # seconds a dump's answer may take (the kernel answers in the call)


def tcp_state(sock: socket.socket) -> int:
    """The TCP state of `sock` (the first byte of TCP_INFO)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def _packed(family: int, ip: str) -> bytes:
    raw = socket.inet_pton(family, ip)
    return raw + bytes(16 - len(raw))


def sockid(family: int, local: tuple[str, int], remote: tuple[str, int], cookie: int) -> bytes:
    """inet_diag_sockid: the socket's addresses (local is the tunnel's side) and cookie."""
    return _SOCKID.pack(
        local[1], remote[1], _packed(family, local[0]), _packed(family, remote[0])
    ) + _SOCKID_TAIL.pack(0, cookie & 0xFFFFFFFF, cookie >> 32)


def destroy_request(
    family: int, local: tuple[str, int], remote: tuple[str, int], cookie: int, seq: int
) -> bytes:
    """SOCK_DESTROY for the TCP socket with these addresses and this cookie, asking for an
    acknowledgement."""
    return _destroy(family, sockid(family, local, remote, cookie), seq)


def _destroy(family: int, sid: bytes, seq: int) -> bytes:
    body = DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_TIME_WAIT) + sid
    header = NLMSG_HEADER.pack(
        NLMSG_HEADER.size + len(body), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, 0
    )
    return header + body


def dump_request(family: int, mark: int, seq: int) -> bytes:
    """SOCK_DIAG_BY_FAMILY: every TCP TIME-WAIT socket of `family` whose mark is `mark`
    (a kernel-side filter: the app's own sockets never come back)."""
    nocookie = _SOCKID.pack(0, 0, bytes(16), bytes(16)) + _SOCKID_TAIL.pack(
        0, ~0 & 0xFFFFFFFF, ~0 & 0xFFFFFFFF
    )
    # One condition: "mark matches" jumps to the end (accept), else past it (reject).
    code = _BC_OP.pack(INET_DIAG_BC_MARK_COND, _BC_OP.size + 8, _BC_OP.size + 8 + 4)
    code += struct.pack("=II", mark, 0xFFFFFFFF)
    attr = struct.pack("=HH", 4 + len(code), INET_DIAG_REQ_BYTECODE) + code
    body = DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_TIME_WAIT) + nocookie + attr
    header = NLMSG_HEADER.pack(
        NLMSG_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + body


def dumped(data: bytes, seq: int) -> tuple[list[tuple[bytes, int, int]], bool, int]:
    """From one read of a dump's answer: each socket's (inet_diag_sockid, local port,
    remote port), whether the dump is done, and its errno (0 unless it failed)."""
    found: list[tuple[bytes, int, int]] = []
    at = 0
    while at + NLMSG_HEADER.size <= len(data):
        length, kind, _flags, got_seq, _pid = NLMSG_HEADER.unpack_from(data, at)
        if length < NLMSG_HEADER.size or at + length > len(data):
            return found, True, errno.EBADMSG
        if got_seq == seq:
            if kind == NLMSG_DONE:
                return found, True, 0
            if kind == NLMSG_ERROR:
                code: int = _ERR.unpack_from(data, at + NLMSG_HEADER.size)[0]
                return found, True, -code
            if kind == SOCK_DIAG_BY_FAMILY and length >= NLMSG_HEADER.size + _DIAG_MSG_SIZE:
                sid = data[at + NLMSG_HEADER.size + 4 : at + NLMSG_HEADER.size + 4 + _SOCKID_SIZE]
                lport, rport = struct.unpack_from("!HH", sid)
                found.append((sid, lport, rport))
        at += (length + 3) & ~3
    return found, False, 0


def ack_errno(data: bytes, seq: int) -> int | None:
    """The errno of the acknowledgement of request `seq` in `data` (0: done), or None when
    `data` holds no acknowledgement of it (a stale one, or not an acknowledgement)."""
    at = 0
    while at + NLMSG_HEADER.size <= len(data):
        length, kind, _flags, got_seq, _pid = NLMSG_HEADER.unpack_from(data, at)
        if length < NLMSG_HEADER.size:
            return None  # malformed: nothing further can be framed
        if kind == NLMSG_ERROR and got_seq == seq and at + NLMSG_HEADER.size + 4 <= len(data):
            code: int = _ERR.unpack_from(data, at + NLMSG_HEADER.size)[0]
            return -code
        at += (length + 3) & ~3
    return None


class TimeWaitReaper:
    """Ends TIME-WAIT sockets through one NETLINK_SOCK_DIAG socket, which must live in the
    namespace of the sockets it ends; `open_socket` makes it at the first use (a pod whose
    capture mirrors nothing never holds one). Its socket does not block: the kernel
    handles a sock_diag request in the sender's own system call, so its answer is already
    queued when `send` returns (a dump would wait at most ANSWER_WAIT for a later part).
    Counts what it did, for the tunnel's views and the tests."""

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
        return self._end(family, sockid(family, local, remote, cookie))

    def sweep(
        self,
        mark: int,
        spare_port: int,
        families: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6),
    ) -> int:
        """End every TIME-WAIT socket of this namespace that carries `mark` (the tunnel's),
        except those with `spare_port` at either end (HBONE, which crosses the network,
        where a TIME-WAIT does protect). For what a tunnel that is gone left behind (a
        crash: its sockets were closed by the kernel, not by it). How many it ended.
        `families`: the address families to look at. Each one's dump walks the kernel's
        whole table of connections (all namespaces share it), about 1.3 ms of CPU here
        however few sockets match, with the event loop waiting: a namespace whose pod
        has no IPv6 address has no IPv6 socket of ours to look for."""
        ended = self.ended
        for family in families:
            if self.failed is not None:
                break
            for sid, lport, rport in self._dump(family, mark):
                if spare_port not in (lport, rport):
                    self._end(family, sid)
        return self.ended - ended

    def _dump(self, family: int, mark: int) -> list[tuple[bytes, int, int]]:
        seq = self._next()
        found: list[tuple[bytes, int, int]] = []
        try:
            nl = self._socket()
            nl.send(dump_request(family, mark, seq))
            deadline = time.monotonic() + ANSWER_WAIT
            done = False
            while not done:
                try:
                    data = nl.recv(65536)
                except BlockingIOError:
                    # A dump's later parts are made as it is read; never expected to wait.
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([nl], [], [], left)[0]:
                        raise TimeoutError("no answer to the dump") from None
                    continue
                part, done, code = dumped(data, seq)
                found += part
                if code:
                    self._refused(code)
        except OSError as e:
            self._refused(e.errno or errno.EIO)
        return found

    def _next(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _socket(self) -> socket.socket:
        if self._nl is None:
            # Non-blocking: the kernel answers inside the send, and a socket with a timeout
            # would cost a poll() before every send and receive (two per connection ended).
            self._nl = self._open()
            self._nl.setblocking(False)
        return self._nl

    def _refused(self, code: int) -> None:
        if code in (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EINVAL):
            self.failed = code  # the kernel or our privileges will not do it: stop asking

    def _end(self, family: int, sid: bytes) -> int:
        if self.failed is not None:
            return self.failed
        seq = self._next()
        try:
            nl = self._socket()
            nl.send(_destroy(family, sid, seq))
            code = None
            while code is None:
                code = ack_errno(nl.recv(4096, socket.MSG_DONTWAIT), seq)
        except BlockingIOError:
            code = errno.ETIMEDOUT  # no answer queued: not expected from sock_diag
        except OSError as e:
            code = e.errno or errno.EIO
        if code == 0:
            self.ended += 1
        elif code == errno.ENOENT:
            self.missed += 1
        else:
            self._refused(code)
        return code

    def close(self) -> None:
        nl, self._nl = self._nl, None
        if nl is not None:
            nl.close()
