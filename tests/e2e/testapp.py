"""A test server run inside pods: port 9000 echoes (after telling the client its address),
port 9001 is a bulk peer (sends N seeded bytes while hashing what it receives)."""

from __future__ import annotations

import hashlib
import random
import socket
import sys
import threading


def echo(conn: socket.socket, peer: tuple[str, int]) -> None:
    with conn:
        conn.sendall(f"{peer[0]}:{peer[1]}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)


def bulk(conn: socket.socket) -> None:
    with conn:
        f = conn.makefile("rb")
        line = f.readline()
        if not line:
            return  # a readiness check: connected, then closed
        _, n, seed = line.split()
        count, rng = int(n), random.Random(int(seed))
        digest = hashlib.sha256()
        got = [0]

        def reader() -> None:
            while data := f.read1(1 << 20):
                digest.update(data)
                got[0] += len(data)

        t = threading.Thread(target=reader)
        t.start()
        sent = 0
        while sent < count:
            block = rng.randbytes(min(1 << 20, count - sent))
            conn.sendall(block)
            sent += len(block)
        t.join()
        conn.sendall(f"\nHASH {digest.hexdigest()} {got[0]}\n".encode())
        conn.shutdown(socket.SHUT_WR)


def serve(port: int, handler: str) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(512)
    while True:
        conn, peer = s.accept()
        if handler == "echo":
            threading.Thread(target=echo, args=(conn, peer), daemon=True).start()
        else:
            threading.Thread(target=bulk, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    threading.Thread(target=serve, args=(9001, "bulk"), daemon=True).start()
    try:
        serve(9000, "echo")
    except KeyboardInterrupt:
        sys.exit(0)
