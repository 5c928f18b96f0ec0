"""What a benchmark scenario is: something that brings up client and server pods joined by
one kind of mesh (or none), says where the client connects, and which processes are the
scenario's cost.

Every scenario module (plain.py, sidecar.py, haproxy.py, ...) implements `Scenario`; the
harness only talks to this interface, so a new row in the report is a new class here.
The package is `meshbench` with benchmarks/ on sys.path (mesh_bench.py runs from there);
inside it, import relatively (`from .scenario import Endpoint, Running`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Endpoint:
    netns: str  # the client pod's netns path: load runs inside it
    host: str  # where the client connects (pod IP, VIP, or a local sidecar address)
    port: int


@dataclass(slots=True)
class Running:
    http: Endpoint  # HTTP/1.1 server answering 1 KB per 1 KB request (keep-alive)
    bulk: Endpoint  # single-connection throughput peer (sink/source)
    proxies: dict[str, list[int]]  # role -> pids whose CPU/RSS are the scenario's cost
    # (node netns path, "127.0.0.1:15000") when an ambient tunnel serves it, else None
    tunnel_admin: tuple[str, str] | None = None


class Scenario(Protocol):
    name: str  # "none", "ambient", "relay", "sidecar", "sidecar-haproxy", ...
    placement: str  # "cross-node" | "same-node"

    def start(self, workdir: Path) -> Running:
        """Bring everything up (own state root under workdir) and wait until ready."""
        ...

    def stop(self) -> None:
        """Tear everything down; idempotent, also after failures."""
        ...
