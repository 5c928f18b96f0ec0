"""What the chaos benchmark kills: each target is one recorded process of the cluster, by
name, with the question that says it is back.

A crash is SIGKILL of that process alone (what the OOM killer or a fatal signal does; its
child processes, e.g. a tunnel's certificate worker, are not signalled and must go by
themselves).
The restart is what a kubelet does for a DaemonSet or Deployment pod with restartPolicy
Always: the same command, environment, working directory and netns, started again once the
old process is gone (after `backoff` seconds; the kubelet's first restart is immediate, the
benchmark waits a little to observe the node while nothing serves it).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localcluster import mesh
from localcluster import waypoints as wps
from localcluster.processes import ManagedProcess, ProcessRecord, spawn_in_netns

from . import cluster as cl
from . import probes

CA_PROBE_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # a key of verdict.EXPECTED
    label: str  # as the report names it
    process: str  # the cluster's process record name
    node: str | None = None

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "-").replace("/", "-")


def targets(c: mesh.Cluster) -> list[Target]:
    out: list[Target] = []
    for n in c.spec.nodes:
        out.append(Target("tunnel", f"tunnel {n.name}", mesh.tunnel_name(n.name), n.name))
    for n in c.spec.nodes:
        out.append(Target("agent", f"node agent {n.name}", mesh.agent_name(n.name), n.name))
    out.append(Target("ca", "CA", "ca"))
    out.append(Target("controlplane", "control plane (xDS)", cl.CONTROLPLANE))
    for g in mesh.current_spec(c).gateways:
        out.append(Target("waypoint", f"waypoint {g.namespace}/{g.name}", wps.process_name(g)))
    return out


def restart(c: mesh.Cluster, old: ProcessRecord, env: dict[str, str], cwd: str) -> ManagedProcess:
    """The same process again, under the same record name (its pidfile is replaced)."""
    return spawn_in_netns(
        old.netns_path, old.argv, env, cwd, old.log_path, c.state.pidfile_dir, old.name
    )


def log_sizes(c: mesh.Cluster) -> dict[Path, int]:
    """Where each xDS client's log ends now (a reconnection is a line after that)."""
    out = {}
    for r in xds_clients(c):
        p = Path(r)
        out[p] = p.stat().st_size if p.exists() else 0
    return out


def xds_clients(c: mesh.Cluster) -> list[str]:
    logs = [str(c.tunnel_log(n.name)) for n in c.spec.nodes]
    logs += [
        str(c.state.log_dir / f"{wps.process_name(g)}.log") for g in mesh.current_spec(c).gateways
    ]
    return logs


def _connected_since(path: Path, offset: int) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return False
    return '"xds_connected"' in text


def ca_answers(c: mesh.Cluster) -> bool:
    """The CA's socket accepts and answers HTTP (a request without a token: any status)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CA_PROBE_TIMEOUT)
    try:
        s.connect(str(c.paths.ca_socket))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return s.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False
    finally:
        s.close()


def ready_check(c: mesh.Cluster, t: Target, marks: dict[Path, int]) -> Callable[[], bool]:
    """The question that says the restarted target serves again."""
    if t.kind in ("tunnel", "agent"):
        node = t.node
        assert node is not None
        return lambda: mesh.node_ready(c, node, mesh.wanted_uids(c, node))
    if t.kind == "ca":
        return lambda: ca_answers(c)
    if t.kind == "controlplane":
        # Back when every xDS client (tunnels, waypoints) has connected to the new one.
        return lambda: all(_connected_since(p, off) for p, off in marks.items())
    spec = mesh.current_spec(c)
    (g,) = [g for g in spec.gateways if wps.process_name(g) == t.process]
    return lambda: wps.readiness(spec, c.state, g).ready


def tunnel_netns_fds(c: mesh.Cluster) -> dict[str, int]:
    """node -> the netns fds its running tunnel holds."""
    out = {}
    for n in c.spec.nodes:
        r = mesh.process_record(c, mesh.tunnel_name(n.name))
        out[n.name] = probes.netns_fds(r.pid) if r is not None else -1
    return out
