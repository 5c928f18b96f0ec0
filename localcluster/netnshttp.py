"""One HTTP/1.0 request from inside a network namespace: how the CLI, the dashboard and the
cluster's own waiters read a proxy's admin, readiness and metrics ports (which listen only
inside their netns). Blocking, bounded in time and size."""

from __future__ import annotations

import nsutil

LOOPBACK = "127.0.0.1"
MAX_BODY = 16 << 20  # an answer larger than this is cut: no port of ours sends one


def request(
    netns_path: str,
    port: int,
    path: str,
    *,
    ip: str = LOOPBACK,
    method: str = "GET",
    timeout: float = 5.0,
    max_body: int = MAX_BODY,
) -> tuple[int, bytes]:
    """(status, body) of `method path` to ip:port inside the netns. Raises OSError when
    unreachable or when what answers is not HTTP."""
    s = nsutil.socket_at(netns_path)
    try:
        s.settimeout(timeout)
        s.connect((ip, port))
        host = "localhost" if ip == LOOPBACK else ip
        s.sendall(f"{method} {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while len(data) < max_body and (chunk := s.recv(65536)):
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP answer from {ip}:{port} in {netns_path}") from None
    return status, body
