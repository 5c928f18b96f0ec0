"""ZDS packets on a SOCK_SEQPACKET unix socket, with the event loop (no threads).

One message per packet, no length prefix: SEQPACKET keeps message boundaries, so a
`recvmsg` returns exactly one packet, and an empty read is the end of the stream (no ZDS
message encodes to zero bytes). A packet may carry one fd as SCM_RIGHTS.

Waiting is done with `loop.add_reader` / `add_writer` on a non-blocking socket, and the
syscall is made only once the socket is ready. Two properties follow: a task cancelled
while waiting has taken nothing off the socket, so no packet (and no fd riding on one) is
ever lost to a cancellation; and no thread is needed, so nothing here can block the loop.

Fd hygiene: every fd the kernel hands us is closed on every path that does not hand it on
to the caller (truncated packet, more than one fd, a message that must not carry one).
Received fds are opened close-on-exec (MSG_CMSG_CLOEXEC).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

from zds.messages import (
    MAX_MESSAGE_SIZE,
    AddWorkload,
    WorkloadRequest,
    WorkloadResponse,
    ZdsError,
    ZdsHello,
    decode_hello,
    decode_request,
    decode_response,
    encode,
)

log = structlog.get_logger(__name__)

DEFAULT_SOCKET_PATH = "/var/run/ztunnel/ztunnel.sock"
# Room for a few fds, so a peer sending too many is seen (and all of them closed) rather
# than cut off by MSG_CTRUNC with the extra fds silently dropped by the kernel.
_ANCILLARY_SPACE = socket.CMSG_SPACE(8 * array.array("i").itemsize)
_INT_SIZE = array.array("i").itemsize


class ZdsClosed(ZdsError):
    """The peer closed the connection (or it was reset)."""


@dataclass(frozen=True, slots=True)
class Packet:
    data: bytes
    fd: int | None  # the caller owns it and must close it


def close_fd(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


async def _wait(sock: socket.socket, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    if fd < 0:
        raise ZdsClosed("socket is closed")
    if writable:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _INT_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


async def recv_packet(sock: socket.socket) -> Packet | None:
    """The next packet, or None at the end of the stream. ZdsError for a truncated packet,
    truncated ancillary data or more than one fd (every fd received is closed then)."""
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(
                MAX_MESSAGE_SIZE + 1, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
            )
            break
        except (BlockingIOError, InterruptedError):
            await _wait(sock, writable=False)
        except (ConnectionResetError, BrokenPipeError) as e:
            raise ZdsClosed(f"connection lost: {e}") from None
    fds = _fds_of(ancdata)
    problem = ""
    if flags & socket.MSG_TRUNC or len(data) > MAX_MESSAGE_SIZE:
        problem = f"packet truncated (over {MAX_MESSAGE_SIZE} bytes)"
    elif flags & socket.MSG_CTRUNC:
        problem = "ancillary data truncated (too many fds?)"
    elif len(fds) > 1:
        problem = f"packet carries {len(fds)} fds, at most 1 is allowed"
    if problem:
        for fd in fds:
            close_fd(fd)
        raise ZdsError(problem)
    if not data:
        for fd in fds:
            close_fd(fd)
        return None
    return Packet(data, fds[0] if fds else None)


async def send_packet(sock: socket.socket, data: bytes, fd: int | None = None) -> None:
    """Send one packet, with `fd` (still owned by the caller) as SCM_RIGHTS if given."""
    if not data or len(data) > MAX_MESSAGE_SIZE:
        raise ZdsError(f"refusing to send a {len(data)}-byte packet")
    while True:
        try:
            sent = sock.send(data) if fd is None else socket.send_fds(sock, [data], [fd])
        except (BlockingIOError, InterruptedError):
            await _wait(sock, writable=True)
            continue
        except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError) as e:
            raise ZdsClosed(f"connection lost: {e}") from None
        if sent != len(data):  # SEQPACKET sends whole packets; anything else is a bug
            raise ZdsError(f"short send: {sent} of {len(data)} bytes")
        return


# ---- typed messages ----------------------------------------------------------------------


async def recv_hello(sock: socket.socket) -> ZdsHello | None:
    packet = await recv_packet(sock)
    if packet is None:
        return None
    close_fd(packet.fd)
    if packet.fd is not None:
        raise ZdsError("ZdsHello must not carry an fd")
    return decode_hello(packet.data)


async def recv_request(sock: socket.socket) -> tuple[WorkloadRequest, int | None] | None:
    """The next request and, for AddWorkload only, its netns fd (the caller owns it).

    As upstream: an AddWorkload must carry exactly one fd, nothing else may carry any.
    """
    packet = await recv_packet(sock)
    if packet is None:
        return None
    try:
        request = decode_request(packet.data)
        is_add = isinstance(request.payload, AddWorkload)
        if is_add and packet.fd is None:
            raise ZdsError("AddWorkload without a netns fd")
        if not is_add and packet.fd is not None:
            raise ZdsError(f"{type(request.payload).__name__} must not carry an fd")
    except ZdsError:
        close_fd(packet.fd)
        raise
    return request, packet.fd


async def recv_response(sock: socket.socket) -> WorkloadResponse | None:
    packet = await recv_packet(sock)
    if packet is None:
        return None
    close_fd(packet.fd)
    if packet.fd is not None:
        raise ZdsError("WorkloadResponse must not carry an fd")
    return decode_response(packet.data)


async def send_message(
    sock: socket.socket,
    msg: ZdsHello | WorkloadRequest | WorkloadResponse,
    fd: int | None = None,
) -> None:
    await send_packet(sock, encode(msg), fd)


# ---- sockets -----------------------------------------------------------------------------


def _check_path(path: Path) -> None:
    if len(os.fsencode(path)) > 107:
        raise ZdsError(f"unix socket path is too long (over 107 bytes): {path}")


def listen(path: str | Path, backlog: int = 16) -> socket.socket:
    """A listening SEQPACKET socket at `path`, mode 0600. A stale socket file left by a
    previous run is removed; any other file there is an error (it is not ours to delete)."""
    path = Path(path)
    _check_path(path)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise ZdsError(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        # The socket file takes the socket inode's mode at bind(), so it is never, even
        # briefly, open to other users.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 1.0


async def accept(listener: socket.socket) -> socket.socket:
    """The next connection. Out of fds (EMFILE, ENFILE) or memory, the pending connection
    stays in the backlog and the listener stays readable, so retrying at once would spin:
    it backs off (doubling up to a second), logs once per episode, and takes the
    connection as soon as fds are free again."""
    backoff = 0.0
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            await _wait(listener, writable=False)
            continue
        except OSError as e:
            if e.errno in (errno.EBADF, errno.EINVAL):
                raise
            if e.errno in _OUT_OF_RESOURCES:
                if backoff == 0.0:
                    log.error(
                        "cannot accept: out of resources; backing off until they free up",
                        error=str(e),
                    )
                backoff = min(_BACKOFF_MAX, max(_BACKOFF_FIRST, backoff * 2))
                await asyncio.sleep(backoff)
            # Else the peer gave up between connect and accept: take the next one.
            continue
        if backoff:
            log.info("accepting again after running out of resources")
        conn.setblocking(False)
        return conn


async def connect(path: str | Path) -> socket.socket:
    """Connect to the agent's socket; OSError (ENOENT, ECONNREFUSED, ...) while it is away."""
    path = Path(path)
    _check_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        try:
            sock.connect(str(path))
        except (BlockingIOError, InterruptedError):
            # A full backlog: wait until the connection completes, then read its outcome.
            await _wait(sock, writable=True)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err)) from None
    except BaseException:
        sock.close()
        raise
    return sock
