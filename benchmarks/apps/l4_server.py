"""The benchmark server, run inside a pod netns: a sink port and an echo port.

Sink protocol (throughput): the client streams bytes; for every full CHUNK received the
server writes back one byte, so the client knows when all it sent has arrived without
needing TCP half-close (which not every path forwards the same way).
Echo protocol (latency): the client sends MSG-byte requests; each is written back whole.

One thread per connection with blocking sockets: the kernel does the waiting and the
GIL is released in recv/send, which is as fast as an event loop for a handful of conns.
Runs until signalled; every loop ends when its peer closes.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import threading
from collections.abc import Callable

CHUNK = 1 << 20  # must match l4_client.CHUNK
MSG = 1024  # must match l4_client's default --size


def sink(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    pending = 0  # bytes received since the last acknowledged chunk
    with conn:
        while True:
            n = conn.recv_into(view)
            if n == 0:
                return
            pending += n
            if pending >= CHUNK:
                acks, pending = divmod(pending, CHUNK)
                conn.sendall(b"k" * acks)


def echo(conn: socket.socket) -> None:
    buf = bytearray(MSG)
    view = memoryview(buf)
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            got = 0
            while got < MSG:
                n = conn.recv_into(view[got:])
                if n == 0:
                    return
                got += n
            conn.sendall(view)


def serve(port: int, handler: Callable[[socket.socket], None]) -> threading.Thread:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", port))
    lsock.listen(64)

    def accept_loop() -> None:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=_guarded, args=(handler, conn), daemon=True).start()

    t = threading.Thread(target=accept_loop, name=f"accept-{port}", daemon=True)
    t.start()
    return t


def _guarded(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
    # A reset by the peer ends one connection, not the server.
    with contextlib.suppress(OSError):
        handler(conn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sink-port", type=int, required=True)
    ap.add_argument("--echo-port", type=int, required=True)
    args = ap.parse_args()
    threads = [serve(args.sink_port, sink), serve(args.echo_port, echo)]
    print(f"serving sink :{args.sink_port} echo :{args.echo_port}", flush=True)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
