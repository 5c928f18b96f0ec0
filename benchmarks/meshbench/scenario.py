"""What a benchmark scenario is: something that brings up client and server pods joined by
one kind of mesh (or none), says where the client connects, and which processes are the
scenario's cost.

Every scenario module (plain.py, sidecar.py, haproxy.py, ...) implements `Scenario`; the
harness only talks to this interface, so a new row in the report is a new class here.
The package is `meshbench` with benchmarks/ on sys.path (mesh_bench.py runs from there);
inside it, import relatively (`from .scenario import Endpoint, Running`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Endpoint:
    netns: str  # the client pod's netns path: load runs inside it
    host: str  # where the client connects (pod IP, VIP, or a local sidecar address)
    port: int


HBONE = "hbone"  # HTTP/2 CONNECT (ALPN h2), answered 200 once the app is connected
HTTP = "http"  # one HTTP/1.1 request over the TLS connection (HAProxy's HTTP frontend)


@dataclass(frozen=True, slots=True)
class ClientTls:
    cert: Path  # leaf (plus intermediates) presented to the server
    key: Path
    roots: Path  # the mesh roots the server's chain must lead to


@dataclass(frozen=True, slots=True)
class HandshakeTarget:
    """The destination side's mTLS listener and how to reach it uncaptured."""

    netns: str  # where the attempts run (the client pod's netns)
    host: str  # the server pod's IP
    port: int  # the listener: the tunnel's 15008, or HAProxy's TLS port
    protocol: str  # HBONE or HTTP
    app_port: int  # the app port named in the CONNECT authority (or behind the HTTP frontend)
    server_identity: str  # the SPIFFE id the server must prove
    tls: ClientTls
    # SO_MARK of the attempts' sockets (0: none). In a captured pod every outbound TCP
    # connection without the tunnel's mark is redirected to the tunnel's outbound port, and
    # the tunnel refuses a destination port of its own (15008); with the mark the attempts
    # leave the pod as the source tunnel's own HBONE connections do.
    mark: int
    server_roles: tuple[str, ...]  # Running.proxies roles that accept the handshakes
    origin: str  # one line for the report: from where, to what

    def loadgen_args(self, seconds: float, workers: int) -> list[str]:
        """`meshbench.loadgen handshake`'s options for this target (host and port apart)."""
        return [
            "--protocol", self.protocol, "--app-port", str(self.app_port),
            "--server-identity", self.server_identity,
            "--cert", str(self.tls.cert), "--key", str(self.tls.key),
            "--roots", str(self.tls.roots), "--mark", str(self.mark),
            "--seconds", str(seconds), "--workers", str(workers),
        ]  # fmt: skip


@dataclass(slots=True)
class Running:
    http: Endpoint  # HTTP/1.1 server answering 1 KB per 1 KB request (keep-alive)
    bulk: Endpoint  # single-connection throughput peer (sink/source)
    proxies: dict[str, list[int]]  # role -> pids whose CPU/RSS are the scenario's cost
    # (node netns path, "127.0.0.1:15000") when an ambient tunnel serves it, else None
    tunnel_admin: tuple[str, str] | None = None
    # Where new mTLS handshakes are measured; None: the scenario has no mTLS.
    handshake: HandshakeTarget | None = None
    # The server app's pids (the harness pins them as it pins the load generator); empty:
    # not known, left where the scheduler puts them.
    server: list[int] = field(default_factory=list)


class Scenario(Protocol):
    name: str  # "none", "ambient", "relay", "sidecar", "sidecar-haproxy", ...
    placement: str  # "cross-node" | "same-node"

    def start(self, workdir: Path) -> Running:
        """Bring everything up (own state root under workdir) and wait until ready."""
        ...

    def stop(self) -> None:
        """Tear everything down; idempotent, also after failures."""
        ...
