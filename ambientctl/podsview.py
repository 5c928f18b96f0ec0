"""`ambientctl get pods`: pods as a user sees them, kubectl style (pure).

One row per pod: whether its app is alive (READY 1/1 or 0/1), how it runs or ended
(STATUS), where it stands in the mesh (MESH), restarts, age, node and IP; `-o wide` adds
the pod's network namespace (usable with `ip netns exec`) and its SPIFFE identity. The rows
are built from facts gathered elsewhere (`ambientctl.pods` for a local cluster or the API
server), so this module is tested with fixed data (golden tables).

MESH is one of:
- `enrolled`: captured, its tunnel serves it;
- `pending` / `failed`: its labels put it in the mesh but the node agent has not enrolled
  it, with the agent's reason (e.g. "no tunnel connected (traffic blocked)");
- `removing`: leaving the mesh (the agent is releasing it);
- `not-enrolled`: outside the mesh by its labels (nothing to fix);
- `waypoint`: a waypoint's own pod (never captured; it speaks HBONE itself);
- `-`: a cluster without a mesh.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from ambientctl import resourceviews, tables

MISSING = "-"
ENROLLED = "enrolled"
PENDING = "pending"
NOT_ENROLLED = "not-enrolled"
WAYPOINT = "waypoint"
NO_MESH = MISSING


@dataclass(frozen=True, slots=True)
class PodRow:
    namespace: str
    name: str
    ready: bool  # the app (the pod's one container) runs
    status: str  # Running | Completed | Error | Killed | CrashLoopBackOff | Pending | ...
    mesh: str  # see the module doc
    mesh_reason: str = ""  # why not enrolled as its labels want (the agent's words)
    restarts: int | None = None  # None: not known
    created_at: float | None = None  # seconds since the epoch
    node: str = ""
    ip: str = ""
    netns: str = ""  # the netns name (`ip netns exec <netns> ...`)
    identity: str = ""  # SPIFFE id, for a pod in the mesh
    exit_code: int | None = None  # how the app last ended, if it did
    labels: Mapping[str, str] = field(default_factory=dict)

    def mesh_cell(self) -> str:
        return f"{self.mesh}: {self.mesh_reason}" if self.mesh_reason else self.mesh


# ---- the app's state (pure decisions) -------------------------------------------------------


def app_status(alive: bool, known: Mapping[str, Any] | None) -> tuple[str, int | None]:
    """(STATUS, exit code) from whether the app's process runs now and what its supervisor
    recorded (`localcluster.appstatus` fields, None when nothing is recorded). The process
    is the truth for liveness: a record can be stale if the supervisor itself is gone."""
    if alive:
        return "Running", None
    if known is None:
        return "Unknown", None
    code = known.get("exitCode")
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    if known.get("waitingRestart"):
        return "CrashLoopBackOff", code
    reason = str(known.get("reason") or "")
    if reason == "StartError":
        return "StartError", None
    if code is None:
        return reason or "Unknown", None
    if code == 0:
        return "Completed", 0
    return f"{reason or 'Error'} (exit {code})", code


def mesh_state(
    *,
    mesh: bool,
    waypoint: bool,
    wanted: bool,
    agent_running: bool,
    agent_entry: Mapping[str, Any] | None,
) -> tuple[str, str]:
    """(MESH, reason) from the pod's labels (`wanted`: the node agent's own enrolment rule)
    and the node agent's status entry for it."""
    if not mesh:
        return NO_MESH, ""
    if waypoint:
        return WAYPOINT, ""
    if agent_entry is not None:
        state = str(agent_entry.get("state") or PENDING)
        reason = str(agent_entry.get("reason") or "")
        if state == ENROLLED:
            return ENROLLED, ""
        return state, reason
    if not wanted:
        return NOT_ENROLLED, ""
    if not agent_running:
        return PENDING, "node agent not running"
    return PENDING, "not yet seen by the node agent"


# ---- rendering ------------------------------------------------------------------------------


def age(seconds: float) -> str:
    """kubectl's AGE (apimachinery's HumanDuration): 45s, 3m7s, 17m, 5h2m, 30h, 3d4h, 40d."""
    s = int(max(seconds, 0))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = s // 3600
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    d = h // 24
    if h < 24 * 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    if d < 365 * 2:
        return f"{d}d"
    y = d // 365
    if y < 8:
        return f"{y}y{d % 365}d" if d % 365 else f"{y}y"
    return f"{y}y"


def table(
    rows: Sequence[PodRow],
    now: float,
    *,
    wide: bool = False,
    all_namespaces: bool = False,
    show_labels: bool = False,
) -> str:
    headers = ["NAME", "READY", "STATUS", "MESH", "RESTARTS", "AGE", "NODE", "IP"]
    if all_namespaces:
        headers.insert(0, "NAMESPACE")
    if wide:
        headers += ["NETNS", "IDENTITY"]
    if show_labels:
        headers.append("LABELS")
    cells = []
    for r in rows:
        cell = [
            r.name,
            "1/1" if r.ready else "0/1",
            r.status,
            r.mesh_cell(),
            MISSING if r.restarts is None else str(r.restarts),
            MISSING if r.created_at is None else age(now - r.created_at),
            r.node or MISSING,
            r.ip or MISSING,
        ]
        if all_namespaces:
            cell.insert(0, r.namespace)
        if wide:
            cell += [r.netns or MISSING, r.identity or MISSING]
        if show_labels:
            cell.append(tables.labels_text(dict(r.labels)))
        cells.append(cell)
    return tables.render(headers, cells)


def document(r: PodRow) -> dict[str, Any]:
    """A pod as a Kubernetes-shaped document (what kubectl -o json users script against),
    with the mesh's view in `status.mesh`."""
    state: dict[str, Any]
    if r.ready:
        state = {"running": {}}
    elif r.status == "CrashLoopBackOff":
        state = {"waiting": {"reason": "CrashLoopBackOff"}}
    else:
        state = {"terminated": {"reason": r.status.split(" ", 1)[0], "exitCode": r.exit_code}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": r.name,
            "namespace": r.namespace,
            "labels": dict(sorted(r.labels.items())),
        },
        "spec": {"nodeName": r.node or None},
        "status": {
            "phase": phase(r),
            "podIP": r.ip or None,
            "containerStatuses": [
                {"name": "app", "ready": r.ready, "restartCount": r.restarts, "state": state}
            ],
            "mesh": {
                "state": r.mesh,
                "reason": r.mesh_reason or None,
                "identity": r.identity or None,
                "netns": r.netns or None,
            },
        },
    }


def phase(r: PodRow) -> str:
    if r.ready or r.status == "CrashLoopBackOff":
        return "Running"
    if r.status == "Completed":
        return "Succeeded"
    if r.status in ("Unknown", "Pending"):
        return r.status
    return "Failed"


def as_list(rows: Sequence[PodRow]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": [document(r) for r in rows]}


def render(
    rows: Sequence[PodRow],
    output: str,
    now: float,
    *,
    all_namespaces: bool = False,
    show_labels: bool = False,
    namespace: str = "default",
) -> str:
    """The whole output of `get pods` for `output` table|wide|json|yaml."""
    if output == "json":
        return json.dumps(as_list(rows), indent=2) + "\n"
    if output == "yaml":
        return str(yaml.safe_dump(as_list(rows), sort_keys=False))
    if not rows:
        where = "" if all_namespaces else f" in {namespace} namespace"
        return f"No resources found{where}.\n"
    return table(
        rows,
        now,
        wide=output == "wide",
        all_namespaces=all_namespaces,
        show_labels=show_labels,
    )


def render_one(r: PodRow, output: str) -> str:
    """`get pods NAME -o json|yaml`: the one Pod document, as kubectl prints it."""
    if output == "json":
        return json.dumps(document(r), indent=2) + "\n"
    return str(yaml.safe_dump(document(r), sort_keys=False))


def describe(r: PodRow, now: float) -> str:
    """`describe pod`: what `get pods -o wide` shows, one fact a line, and why the mesh
    holds the pod where it is."""
    exit_code = None if r.exit_code is None else str(r.exit_code)
    return resourceviews.describe(
        [
            ("Name", r.name),
            ("Namespace", r.namespace),
            ("Node", r.node),
            ("IP", r.ip),
            ("Labels", tables.labels_text(dict(r.labels))),
            ("Status", r.status),
            ("Ready", "True" if r.ready else "False"),
            ("Last Exit Code", exit_code),
            ("Restarts", None if r.restarts is None else str(r.restarts)),
            ("Age", None if r.created_at is None else age(now - r.created_at)),
            ("Mesh", r.mesh),
            ("Mesh Reason", r.mesh_reason),
            ("Identity", r.identity),
            ("Netns", r.netns),
        ]
    )
