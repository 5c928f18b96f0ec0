"""Readiness probes, run from the node's netns as the real kubelet runs them (I/O).

An HTTP probe passes on a 2xx or 3xx status line; a TCP probe when the connection is
accepted. Anything else (refused, timed out, not HTTP) fails, with a reason for the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import nsutil
from localcluster.kube.podplan import Probe


async def run_probe(probe: Probe, node_netns_path: str, pod_ip: str) -> tuple[bool, str]:
    """(passed, why) for one try of `probe` against the pod at `pod_ip`."""
    host = probe.host or pod_ip
    try:
        sock = nsutil.socket_at(node_netns_path)
    except OSError as e:
        return False, f"cannot open a socket in {node_netns_path}: {e}"
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(probe.timeout_s):
            await loop.sock_connect(sock, (host, probe.port))
            if probe.kind == "tcpSocket":
                return True, "connected"
            request = (
                f"GET {probe.path} HTTP/1.1\r\nHost: {host}:{probe.port}\r\n"
                "User-Agent: kube-probe/1.20\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            )
            await loop.sock_sendall(sock, request.encode())
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    break
                head += chunk
    except TimeoutError:
        return False, f"timed out after {probe.timeout_s:g} s"
    except OSError as e:
        return False, str(e)
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False, "the answer is not HTTP"
    code = int(parts[1])
    return 200 <= code < 400, f"HTTP {code}"
