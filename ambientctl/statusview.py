"""A local cluster's `status` as a table: per node, the tunnel's readiness and the mesh
config it runs, the node agent and its pods (enrolled, pending, failed), the waypoints on
the node; then each problem in words. Pure: the answers in, the text and problems out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ambientctl import tables

HEADERS = ["NODE", "TUNNEL", "CONFIG", "AGENT", "ENROLLED", "PENDING", "FAILED", "WAYPOINTS"]
NONE = "-"


@dataclass(frozen=True, slots=True)
class WaypointState:
    ref: str  # namespace/name
    ready: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class NodeState:
    """What a node answered: the tunnel's readiness JSON and the agent's status (None: it
    did not answer), the problem with the config it runs (`mesh.config_problem`), the
    waypoints placed on it."""

    name: str
    tunnel: Mapping[str, Any] | None
    agent: Mapping[str, Any] | None
    config_problem: str | None = None
    waypoints: Sequence[WaypointState] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Status:
    rows: list[list[str]]
    problems: list[str]
    refused: bool  # a tunnel refused the mesh config (the next change regenerates it)

    @property
    def ok(self) -> bool:
        return not self.problems


def not_running(nodes: Sequence[NodeState]) -> bool:
    """Nothing of the mesh answers on any node: the cluster is not running."""
    return all(n.tunnel is None and n.agent is None for n in nodes)


def _pods(agent: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    pods = (agent or {}).get("pods")
    if not isinstance(pods, dict):
        return {}
    return {str(k): v for k, v in pods.items() if isinstance(v, dict)}


def status(nodes: Sequence[NodeState]) -> Status:
    rows: list[list[str]] = []
    problems: list[str] = []
    refused = False
    for n in nodes:
        tunnel_ready = bool(n.tunnel and n.tunnel.get("ready"))
        tunnel = "Unreachable" if n.tunnel is None else "Ready" if tunnel_ready else "NotReady"
        if not tunnel_ready:
            problems.append(f"node {n.name}: tunnel {'not ready' if n.tunnel else 'unreachable'}")
        config = (n.tunnel or {}).get("config")
        digest = config.get("digest") if isinstance(config, Mapping) else None
        if n.tunnel is None:
            config_cell = NONE
        elif isinstance(config, Mapping) and isinstance(config.get("rejected"), Mapping):
            config_cell = f"{str(digest)[:12]} (REFUSED NEW)"
        else:
            config_cell = str(digest)[:12] if digest else NONE
        if n.tunnel is not None and n.config_problem is not None:
            refused = refused or "refused" in n.config_problem
            problems.append(f"node {n.name}: {n.config_problem}")
        pods = _pods(n.agent)
        counts = {"enrolled": 0, "pending": 0, "failed": 0}
        for p in pods.values():
            state = str(p.get("state"))
            counts[state if state in counts else "pending"] += 1
        if n.agent is None:
            problems.append(f"node {n.name}: node agent not running")
        waiting = sorted(
            f"{uid} ({p.get('state')}{': ' + str(p['reason']) if p.get('reason') else ''})"
            for uid, p in pods.items()
            if p.get("state") != "enrolled"
        )
        if waiting:
            problems.append(f"node {n.name}: pods not enrolled: {', '.join(waiting)}")
        for w in n.waypoints:
            if not w.ready:
                problems.append(f"node {n.name}: waypoint {w.ref} not programmed ({w.reason})")
        ready_waypoints = sum(1 for w in n.waypoints if w.ready)
        rows.append(
            [
                n.name,
                tunnel,
                config_cell,
                "Running" if n.agent is not None else "NotRunning",
                *(
                    (str(counts["enrolled"]), str(counts["pending"]), str(counts["failed"]))
                    if n.agent is not None
                    else (NONE, NONE, NONE)
                ),
                f"{ready_waypoints}/{len(n.waypoints)}" if n.waypoints else NONE,
            ]
        )
    return Status(rows, problems, refused)


def render(st: Status) -> str:
    return tables.render(HEADERS, st.rows)
