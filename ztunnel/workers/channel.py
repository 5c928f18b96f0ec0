"""One end of the owner <-> worker socket pair, on the event loop.

A unix SOCK_SEQPACKET socket: datagrams keep the frames' boundaries, the connection's end
is seen (EOF) as with a stream, and an fd travels as SCM_RIGHTS with the frame it belongs
to. Reads and writes never block: frames wait in a bounded queue while the peer does not
read, and a peer that lets it fill, sends what the codec refuses, or goes away closes the
channel, once, with the reason (`on_closed`).
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections import deque
from collections.abc import Callable

import structlog

from ztunnel.workers import codec

log = structlog.get_logger(__name__)

# What may wait for a peer that does not read: a few mesh states; more means it is stuck.
MAX_QUEUED = 256 * 1024 * 1024
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)

OnMessage = Callable[[codec.Message, int | None], None]


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(owner's end, worker's end). The worker's end is inheritable: it is passed to the
    child, which closes the owner's copy of it only after the child has started."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.set_inheritable(True)
    return a, b


class Channel:
    def __init__(self, sock: socket.socket, name: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self.on_message: OnMessage = _unset
        self.on_closed: Callable[[str], None] = lambda _why: None
        self.closed: str | None = None  # why, once closed
        self._reassembler = codec.Reassembler()
        self._queue: deque[tuple[bytes, int | None]] = deque()
        self._queued = 0
        self._writing = False
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def send(self, msg: codec.Message, fd: int | None = None) -> None:
        """Queue `msg` (and `fd`, which stays the caller's: the kernel gives the peer its
        own copy) and send what the socket takes now. Nothing happens once closed."""
        if self.closed is not None:
            return
        frames = codec.encode(msg)
        for i, frame in enumerate(frames):
            self._queue.append((frame, fd if i == 0 else None))
            self._queued += len(frame)
        if fd is not None:
            # The fd must stay open until its frame is sent: keep our own copy till then.
            frame0, _ = self._queue[-len(frames)]
            self._queue[-len(frames)] = (frame0, os.dup(fd))
        if self._queued > MAX_QUEUED:
            self.close(f"the peer has not read {self._queued} bytes; it is stuck")
            return
        self._flush()

    def _flush(self) -> None:
        while self._queue:
            frame, fd = self._queue[0]
            try:
                if fd is None:
                    self.sock.send(frame)
                else:
                    fds = array.array("i", [fd])
                    self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError as e:
                self.close(f"send failed: {e}")
                return
            self._queue.popleft()
            self._queued -= len(frame)
            if fd is not None:
                os.close(fd)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        # A bounded number of datagrams per wake-up, so one busy peer cannot starve the loop.
        for _ in range(64):
            if self.closed is not None:
                return
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(
                    codec.MAX_FRAME + 1, _FD_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.close(f"receive failed: {e}")
                return
            fds = _fds_of(ancdata)
            if not data and not fds:
                self.close("the peer closed the channel")
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                _close_all(fds)
                self.close("a frame or its fds were cut short (larger than the protocol allows)")
                return
            try:
                msg = self._reassembler.feed(data, len(fds))
            except codec.CodecError as e:
                _close_all(fds)
                self.close(f"protocol error: {e}")
                return
            if msg is not None:
                self.on_message(msg, fds[0] if fds else None)

    def close(self, why: str) -> None:
        if self.closed is not None:
            return
        self.closed = why
        try:
            self._loop.remove_reader(self.sock.fileno())
            if self._writing:
                self._loop.remove_writer(self.sock.fileno())
        except (ValueError, OSError):
            pass
        for _, fd in self._queue:
            if fd is not None:
                os.close(fd)
        self._queue.clear()
        self.sock.close()
        self.on_closed(why)


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _unset(msg: codec.Message, fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
    log.error("channel message before a handler was set", kind=msg.KIND.name)
