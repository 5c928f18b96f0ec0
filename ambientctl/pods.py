"""`ambientctl get pods` (`po`, `pod`): the facts about each pod, gathered, then rendered by
`ambientctl.podsview`.

A local cluster: the pods of its file (labels as in force now) and its waypoints' pods;
liveness from the process records (the app's pid and start time still match a live
process), how an app ended from the pod supervisor's record (`localcluster.appstatus`),
mesh state from each node agent's status file. A Kubernetes cluster (`--kubeconfig`/
`--context`, set by `get`'s dispatcher for the cluster it chose): the Pods the API server
lists, readiness and restarts from their status, mesh state from the node agent's
`ambient.istio.io/redirection` mark and the labels (`ambientctl.kubepods`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ambientctl import context, podsview
from ambientctl.kubefetch import choose
from ambientctl.podsview import PodRow
from localcluster import appstatus, mesh, waypoints
from localcluster.apps import process_name
from localcluster.network import waypoint_layout
from localcluster.podenv import identity
from localcluster.processes import ProcessRecord, is_running, read_records
from localcluster.spec import PodSpec, waypoint_pod
from localcluster.xds import workload_uid
from meshcore.defaults import NAMESPACE

EXIT_RUNTIME = 1


def run_get_pods(args: argparse.Namespace) -> int:
    """The handler `ambientctl get pods` dispatches to (see the module doc)."""
    rows = gather(args)
    all_ns = bool(getattr(args, "all_namespaces", False))
    namespace = context.namespace(args, NAMESPACE)
    output = getattr(args, "output", None) or "table"
    name = getattr(args, "name", None)
    if name and "/" in name:  # NAMESPACE/NAME, as the other kinds take it
        namespace, _, name = name.rpartition("/")
        all_ns = False
    rows = sorted(
        (r for r in rows if all_ns or r.namespace == namespace),
        key=lambda r: (r.namespace, r.name),
    )
    if name:
        rows = [r for r in rows if r.name == name]
        if not rows:
            print(f'Error from server (NotFound): pods "{name}" not found', file=sys.stderr)
            return EXIT_RUNTIME
        if output in ("json", "yaml"):
            print(podsview.render_one(rows[0], output), end="")
            return 0
    text = podsview.render(
        rows,
        output,
        time.time(),
        all_namespaces=all_ns,
        show_labels=bool(getattr(args, "show_labels", False)),
        namespace=namespace,
    )
    print(text, end="")
    return 0


def run_describe_pod(args: argparse.Namespace) -> int:
    """`describe pod [NAMESPACE/]NAME`: one pod's facts, kubectl describe's layout."""
    namespace, _, name = str(args.name).rpartition("/")
    namespace = namespace or context.namespace(args, NAMESPACE)
    found = [r for r in gather(args) if (r.namespace, r.name) == (namespace, name)]
    if not found:
        print(f'Error from server (NotFound): pods "{name}" not found', file=sys.stderr)
        return EXIT_RUNTIME
    print(podsview.describe(found[0], time.time()), end="")
    return 0


def gather(args: argparse.Namespace) -> list[PodRow]:
    """Every pod of the cluster `args` name: a Kubernetes cluster when the dispatcher set
    --kubeconfig/--context (`get`'s dispatcher sets them for the Kubernetes cluster it
    chose), else the local cluster `context.attach` finds."""
    kubeconfig = getattr(args, "kubeconfig", None)
    kube_context = getattr(args, "context", None)
    if kubeconfig is None and kube_context is None:
        return local_rows(context.attach(args))
    target = choose(None, kubeconfig, kube_context, os.environ)
    assert target is not None  # choose() is None only for a cluster file
    from ambientctl import kubepods  # the API client is loaded only when it is used

    return kubepods.rows(target)


# ---- a local cluster --------------------------------------------------------------------


def started_at(rec: ProcessRecord) -> float | None:
    """When a recorded process started (seconds since the epoch), from the kernel."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    return boot + rec.start_time / os.sysconf("SC_CLK_TCK")


def local_rows(cluster: mesh.Cluster) -> list[PodRow]:
    spec = mesh.current_spec(cluster) if cluster.mesh else cluster.spec
    apps = appstatus.read(cluster.state.dir)
    alive = {
        r.name: r
        for r in read_records(cluster.state.pidfile_dir)
        if is_running(r.pid, r.start_time)
    }
    agents = (
        {n.name: mesh.agent_status(cluster, n.name) for n in spec.nodes} if cluster.mesh else {}
    )
    wanted = {n.name: mesh.wanted_uids(cluster, n.name) for n in spec.nodes} if cluster.mesh else {}

    def row(pod: PodSpec, netns: str, pname: str, waypoint: bool) -> PodRow:
        rec = alive.get(pname)
        known = apps.get(appstatus.key(pod.namespace, pod.name))
        status, code = podsview.app_status(rec is not None, known.to_json() if known else None)
        uid = workload_uid(spec, pod)
        agent = agents.get(pod.node)
        entry = ((agent or {}).get("pods") or {}).get(uid)
        state, reason = podsview.mesh_state(
            mesh=cluster.mesh,
            waypoint=waypoint,
            wanted=uid in wanted.get(pod.node, set()),
            agent_running=agent is not None,
            agent_entry=entry if isinstance(entry, dict) else None,
        )
        in_mesh = state not in (podsview.NOT_ENROLLED, podsview.NO_MESH)
        created = known.created_at if known is not None else None
        if created is None and rec is not None:
            created = started_at(rec)
        return PodRow(
            namespace=pod.namespace,
            name=pod.name,
            ready=rec is not None,
            status=status,
            mesh=state,
            mesh_reason=reason,
            restarts=known.restarts if known is not None else None,
            created_at=created,
            node=pod.node,
            ip=str(pod.ip),
            netns=netns,
            identity=identity(spec, pod) if in_mesh else "",
            exit_code=code,
            labels=dict(pod.labels),
        )

    rows = [
        row(
            p,
            cluster.layout.pod(p.namespace, p.name).netns,
            process_name(p.namespace, p.name),
            False,
        )
        for p in spec.pods
    ]
    for g in spec.gateways:
        if g.placement is None:
            continue
        rows.append(
            row(
                waypoint_pod(spec, g),
                waypoint_layout(spec, g).netns,
                waypoints.process_name(g),
                True,
            )
        )
    return rows
