"""A tiny authoritative DNS server run inside a test pod: the tunnels' upstream resolver.

Written on its own (not with the tunnel's codec), so the tests check the tunnel against an
independent reading of the wire format. UDP and TCP on port 53: `external.example.org` A is
203.0.113.7, each `--record NAME=IP` one more, anything else NXDOMAIN. Each name asked is
printed on its own line (`asked <name> <type>`), so a test can tell which queries reached it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading

RECORDS = {"external.example.org": "203.0.113.7"}


def answer(query: bytes) -> bytes:
    ident, flags, _qdcount = struct.unpack_from("!HHH", query)
    pos, labels = 12, []
    while query[pos]:
        n = query[pos]
        labels.append(query[pos + 1 : pos + 1 + n].decode().lower())
        pos += 1 + n
    qtype = struct.unpack_from("!H", query, pos + 1)[0]
    question = query[12 : pos + 5]
    name = ".".join(labels)
    print(f"asked {name} {qtype}", flush=True)
    ip = RECORDS.get(name)
    rd = flags & 0x0100
    if ip is None:
        return struct.pack("!HHHHHH", ident, 0x8400 | rd | 3, 1, 0, 0, 0) + question
    if qtype != 1:
        return struct.pack("!HHHHHH", ident, 0x8400 | rd, 1, 0, 0, 0) + question
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
    return struct.pack("!HHHHHH", ident, 0x8400 | rd, 1, 1, 0, 0) + question + record


def serve_udp() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 53))
    while True:
        data, peer = s.recvfrom(4096)
        try:
            s.sendto(answer(data), peer)
        except (IndexError, struct.error, UnicodeDecodeError):
            print("malformed query ignored", flush=True)


def serve_tcp_conn(conn: socket.socket) -> None:
    with conn, contextlib.suppress(IndexError, struct.error, UnicodeDecodeError, OSError):
        f = conn.makefile("rb")
        size = struct.unpack("!H", f.read(2))[0]
        out = answer(f.read(size))
        conn.sendall(struct.pack("!H", len(out)) + out)


def main() -> int:
    args = sys.argv[1:]
    while args[:1] == ["--record"] and len(args) >= 2:
        name, _, ip = args[1].partition("=")
        RECORDS[name] = ip
        args = args[2:]
    threading.Thread(target=serve_udp, daemon=True).start()
    t = socket.socket()
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", 53))
    t.listen(16)
    print("resolver listening", flush=True)
    while True:
        conn, _ = t.accept()
        threading.Thread(target=serve_tcp_conn, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
