"""What the end-to-end modules share: small pod-side helpers (the fixtures are in conftest.py)."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
from pathlib import Path

import nsutil
from controlplane.ca import CertificateAuthority
from localcluster import mesh

HERE = Path(__file__).parent
MB = 1 << 20


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


def pod_ip(c: mesh.Cluster, ns: str, name: str) -> str:
    return str(c.layout.pod(ns, name).ip)


def vip(c: mesh.Cluster, ns: str, name: str) -> str:
    return str(c.spec.service(ns, name).vip)


def pod_socket(c: mesh.Cluster, ns: str, pod: str) -> socket.socket:
    """A socket inside a pod, created like the app's own (unmarked: captured if enrolled)."""
    return nsutil.socket_at(c.pod_netns(ns, pod))


def connect(c: mesh.Cluster, ns: str, pod: str, ip: str, port: int) -> socket.socket:
    s = pod_socket(c, ns, pod)
    s.settimeout(15)
    s.connect((ip, port))
    return s


def echo(
    c: mesh.Cluster, ns: str, pod: str, ip: str, port: int, payload: bytes
) -> tuple[str, bytes]:
    """Talk to testapp's echo port: returns (the address the server saw, the echo)."""
    with connect(c, ns, pod, ip, port) as s:
        f = s.makefile("rb")
        seen = f.readline().decode().strip()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = f.read()
    return seen, data


def talk(s: socket.socket, payload: bytes) -> bytes:
    """One echo round trip on an open connection to testapp's echo port."""
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the peer")
        got += chunk
    return got


def tunnel_log(c: mesh.Cluster) -> str:
    return "".join(c.tunnel_log(n.name).read_text() for n in c.spec.nodes)


def logged(c: mesh.Cluster, text: str, timeout: float = 10.0) -> bool:
    """Whether a tunnel logs `text` within `timeout`: the access line is written when the
    tunnel has closed both sides, which may be just after the client saw its EOF."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in tunnel_log(c):
            return True
        time.sleep(0.05)
    return False


def mesh_ca(c: mesh.Cluster, trust_domain: str = "cluster.local") -> CertificateAuthority:
    """The mesh's own root, signing for `trust_domain` (the real CA refuses other domains;
    a test may need a certificate that chains to the mesh root but names another one)."""
    ca = CertificateAuthority.load_or_create(c.state.dir, "cluster.local")
    return dataclasses.replace(ca, trust_domain=trust_domain)
