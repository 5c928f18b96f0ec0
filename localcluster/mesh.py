"""Bringing a whole local cluster up with the mesh, and down again.

Order of `up` (each step recorded before it happens, so `down` can always undo it):
network -> service VIP rules -> mesh config file -> pod source file -> CA (in the cluster
netns; it only serves a unix socket) -> per node, in the node netns: the node agent (it
captures each enrolled pod and hands it to the tunnel over ZDS) and the tunnel -> wait
until every agent reports its pods enrolled and every tunnel ready with exactly those
pods -> start the apps. Capture before the tunnel is ready fails closed: the redirected
connections are refused, never sent in plaintext around the tunnel.

Waypoints (Gateways of class istio-waypoint, from the cluster file or applied later) each
get a pod and a `python -m waypoint` process (`localcluster.waypoints`), started once the
tunnels are ready; `apply_resources` / `delete_resources` add and remove them at runtime
along with policies and L7 resources, all or nothing.

Enrolment is by labels at runtime (`label_namespace`, `label_pod`): the pod source file
(`<state>/mesh/pods.json`, what a Kubernetes API server would say) and the mesh config's
workloads are rewritten, and the agents and tunnels follow without restarting any app.
The labels in force live in the pod source file; `current_spec` overlays them on the
cluster file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import nsutil
from localcluster import appstatus, meshconfig, netnshttp, policies, registry, waypoints
from localcluster import gateways as gw
from localcluster.apps import INHERITED_ENV, missing_commands, process_name
from localcluster.labels import LabelChange, LabelError, label_errors
from localcluster.meshconfig import MeshPaths as MeshPaths
from localcluster.meshconfig import pod_info as pod_info
from localcluster.meshconfig import pod_source_doc as pod_source_doc
from localcluster.meshconfig import write_pod_source as write_pod_source
from localcluster.network import NetworkLayout, apply_service_rules, build_network, plan_layout
from localcluster.processes import (
    ManagedProcess,
    ProcessRecord,
    proc_stat,
    read_records,
    spawn_in_netns,
    terminate,
)
from localcluster.spec import ClusterSpec, SpecError, gateway_problem, load_cluster, place_gateway
from localcluster.state import (
    FAILED_UP_LOGS,
    ClusterState,
    TeardownReport,
    keep_spec,
    live_netns,
    state_dir,
    teardown,
)
from localcluster.xds import binding_problems, local_xds, workload_uid
from meshcore.defaults import ADMIN_PORT, NAMESPACE, READINESS_PORT, TUNNEL_MARK
from meshcore.discovery import MeshConfigError, parse_local_config
from meshcore.serviceentry import KIND as SERVICE_ENTRY
from redirect.enrolment import SourceError, parse_source, wanted

READY_TIMEOUT = 60.0

# Where a long operation reports its steps as it takes them (`ambientctl.progress`): one
# short line each, in the user's words. None: silent.
ProgressFn = Callable[[str], None] | None


def _report(progress: ProgressFn, text: str) -> None:
    if progress is not None:
        progress(text)


class MeshUpError(RuntimeError):
    """The cluster could not be brought up; the message says which step and why."""


@dataclass(frozen=True, slots=True)
class Cluster:
    """A running local cluster: what tests and the CLI need to reach into it."""

    spec: ClusterSpec
    layout: NetworkLayout
    state: ClusterState
    mesh: bool

    @property
    def paths(self) -> MeshPaths:
        return MeshPaths(self.state.dir / "mesh")

    def tunnel_log(self, node: str) -> Path:
        return self.state.log_dir / f"ztunnel-{node}.log"

    def agent_log(self, node: str) -> Path:
        return self.state.log_dir / f"{agent_name(node)}.log"

    def pod_netns(self, namespace: str, name: str) -> str:
        return self.layout.pod(namespace, name).netns_path


def write_mesh_config(
    spec: ClusterSpec, paths: MeshPaths, policies: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """Generate the mesh config (see `localcluster.meshconfig`); returns its digest."""
    return meshconfig.write_mesh_config(spec, paths, policies)


def service_rules(cluster: Cluster) -> None:
    """Every node's service DNAT for the labels in force, without the pods whose app is not
    running (the pod supervisor calls this too when an app exits or comes back)."""
    apply_service_rules(current_spec(cluster), cluster.layout, meshconfig.not_ready(cluster.paths))


def current_spec(cluster: Cluster) -> ClusterSpec:
    """The cluster file's spec with the labels in force now (from the pod source file)."""
    return meshconfig.current_spec(cluster.spec, cluster.paths)


def read_pod_source(cluster: Cluster) -> dict[str, Any]:
    return meshconfig.read_pod_source(cluster.paths)


def enrolled_uids(spec: ClusterSpec, node: str) -> set[str]:
    return {workload_uid(spec, p) for p in spec.pods_on(node) if p.enrolled(spec)}


# ---- policies --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """What a change through the records did: one line per resource (`<kind> <ns>/<name>
    created|configured|unchanged|deleted`), warnings, and the digest of the mesh config
    written (None for a dry run: nothing was written)."""

    lines: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    digest: str | None = None


def read_policies(cluster: Cluster) -> list[dict[str, Any]]:
    """The policy resources in force (the record the mesh config is generated from)."""
    return meshconfig.read_policy_records(cluster.spec, cluster.paths)


def _verb(current: dict[policies.Key, dict[str, Any]], res: policies.Resource) -> str:
    old = current.get(res.key)
    if old is None:
        return "created"
    return "unchanged" if old == dict(res.doc) else "configured"


def apply_policies(
    cluster: Cluster, docs: Sequence[Any], source: str = "policy", dry_run: bool = False
) -> ConfigChange:
    """Create or replace policies in the running mesh (the tunnels reload without a
    restart). Every document is checked with the tunnels' own parsers first; one bad
    document refuses them all (PolicyError) and nothing is written."""
    checked = policies.check_documents(docs, source)
    with meshconfig.records_lock(cluster.paths):
        current_docs = read_policies(cluster)
        current = {policies.key_of(d): d for d in current_docs}
        lines = tuple(f"{policies.describe(r.key)} {_verb(current, r)}" for r in checked)
        warnings = tuple(f"{policies.describe(r.key)}: {w}" for r in checked for w in r.warnings)
        merged = policies.merge(current_docs, checked)
        if dry_run:
            return ConfigChange(lines, warnings)
        meshconfig.write_policy_records(cluster.paths, merged)
        digest = meshconfig.regenerate(cluster.spec, cluster.paths)
    return ConfigChange(lines, warnings, digest)


def delete_policies(
    cluster: Cluster, keys: Sequence[policies.Key], dry_run: bool = False
) -> ConfigChange:
    """Remove the named policies; if one is not there, PolicyError and nothing changes."""
    with meshconfig.records_lock(cluster.paths):
        kept = policies.remove(read_policies(cluster), keys)
        lines = tuple(f"{policies.describe(k)} deleted" for k in dict.fromkeys(keys))
        if dry_run:
            return ConfigChange(lines)
        meshconfig.write_policy_records(cluster.paths, kept)
        digest = meshconfig.regenerate(cluster.spec, cluster.paths)
    return ConfigChange(lines, digest=digest)


def apply_resources(
    cluster: Cluster,
    docs: Sequence[Any],
    source: str = "resource",
    dry_run: bool = False,
    node: str | None = None,
) -> ConfigChange:
    """`kubectl apply` of any mix of policies, L7 resources and waypoint Gateways: every
    document checked first, one bad document refuses them all (PolicyError) and nothing is
    written. A new waypoint Gateway gets its pod (on `node`, default the first) and process;
    if that fails, what this call built is removed and the records are as before."""
    batch = policies.check_batch(docs, source)
    with meshconfig.records_lock(cluster.paths):
        now = current_spec(cluster)
        old_policies = read_policies(cluster)
        old_resources = meshconfig.read_resource_records(cluster.paths)
        had_gateways = cluster.paths.gateways.exists()
        lines: list[str] = []
        current = {policies.key_of(d): d for d in [*old_policies, *old_resources]}
        lines += [f"{policies.describe(r.key)} {_verb(current, r)}" for r in batch.policies]
        lines += [f"{policies.describe(r.key)} {_verb(current, r)}" for r in batch.resources]
        warnings = tuple(
            f"{policies.describe(r.key)}: {w}" for r in batch.policies for w in r.warnings
        )
        new_policies = policies.merge(old_policies, batch.policies)
        new_resources = policies.merge(
            old_resources, batch.resources, policies.MAX_RESOURCES, "L7 resources"
        )
        gateways, created, gw_lines = _merge_gateways(now, batch.waypoints, node)
        lines += gw_lines
        if any(r.kind == SERVICE_ENTRY for r in batch.resources):
            _check_config(dataclasses.replace(now, gateways=tuple(gateways)), new_policies,
                          new_resources)  # fmt: skip
        if dry_run:
            return ConfigChange(tuple(lines), warnings)
        after = dataclasses.replace(now, gateways=tuple(gateways))
        built: list[gw.GatewaySpec] = []
        try:
            for g in created:
                built.append(g)
                waypoints.create(after, cluster.layout, cluster.state, g)
            meshconfig.write_policy_records(cluster.paths, new_policies)
            meshconfig.write_resource_records(cluster.paths, new_resources)
            meshconfig.write_gateway_records(cluster.paths, gateways)
            digest = meshconfig.regenerate(cluster.spec, cluster.paths)
            service_rules(cluster)
            for g in created:
                waypoints.start(after, cluster.state, cluster.paths, g)
        except BaseException:
            for g in built:
                waypoints.remove(after, cluster.state, g)
            meshconfig.write_policy_records(cluster.paths, old_policies)
            meshconfig.write_resource_records(cluster.paths, old_resources)
            if had_gateways:
                meshconfig.write_gateway_records(cluster.paths, now.gateways)
            else:
                cluster.paths.gateways.unlink(missing_ok=True)
            meshconfig.regenerate(cluster.spec, cluster.paths)
            raise
    return ConfigChange(tuple(lines), warnings, digest)


def _check_config(
    spec: ClusterSpec, policy_docs: Sequence[Mapping[str, Any]], docs: Sequence[Mapping[str, Any]]
) -> None:
    """Refuse a change whose mesh config the tunnels would refuse as a whole: a
    ServiceEntry is checked alone by `check_batch`, but its hosts and addresses must also
    be free in the mesh (not another service's hostname or VIP)."""
    try:
        parse_local_config(json.dumps(local_xds(spec, policy_docs, docs)))
    except MeshConfigError as e:
        raise policies.PolicyError([f"the mesh would refuse the result: {e}"]) from None


def _merge_gateways(
    now: ClusterSpec, new: Sequence[gw.GatewaySpec], node: str | None
) -> tuple[list[gw.GatewaySpec], list[gw.GatewaySpec], list[str]]:
    """(the gateways after apply, the ones to create, one line each). An existing Gateway
    keeps its placement; a new one is placed on `node`. Raises PolicyError naming every
    Gateway that cannot join the cluster."""
    gateways = list(now.gateways)
    created: list[gw.GatewaySpec] = []
    lines: list[str] = []
    problems: list[str] = []
    for g in new:
        label = f"{gw.GATEWAY_KIND} {g.namespace}/{g.name}"
        index = next((i for i, o in enumerate(gateways) if o.key == g.key), None)
        if index is not None:
            old = gateways[index]
            gateways[index] = dataclasses.replace(g, placement=old.placement)
            lines.append(f"{label} {'unchanged' if old.doc == g.doc else 'configured'}")
            continue
        problem = gateway_problem(now, g)
        if problem is not None:
            problems.append(problem)
            continue
        try:
            placed = place_gateway(dataclasses.replace(now, gateways=tuple(gateways)), g, node)
        except SpecError as e:
            problems.append(f"{label}: {e}")
            continue
        gateways.append(placed)
        created.append(placed)
        lines.append(f"{label} created (waypoint pod {g.pod_name} on node {placed.placed().node})")
    if problems:
        raise policies.PolicyError(problems)
    return gateways, created, lines


def delete_resources(
    cluster: Cluster, keys: Sequence[policies.Key], dry_run: bool = False
) -> ConfigChange:
    """Remove the named policies, L7 resources and waypoints (their pods and processes
    too); if one is not there, PolicyError and nothing changes."""
    wanted = list(dict.fromkeys(keys))
    with meshconfig.records_lock(cluster.paths):
        now = current_spec(cluster)
        old_policies = read_policies(cluster)
        old_resources = meshconfig.read_resource_records(cluster.paths)
        present = {policies.key_of(d) for d in [*old_policies, *old_resources]}
        present |= {(gw.GATEWAY_KIND, g.namespace, g.name) for g in now.gateways}
        missing = [k for k in wanted if k not in present]
        if missing:
            raise policies.PolicyError([f"no {policies.describe(k)}" for k in missing])
        gone = set(wanted)
        doomed = [g for g in now.gateways if (gw.GATEWAY_KIND, g.namespace, g.name) in gone]
        lines = tuple(f"{policies.describe(k)} deleted" for k in wanted)
        if dry_run:
            return ConfigChange(lines)
        meshconfig.write_policy_records(
            cluster.paths, [d for d in old_policies if policies.key_of(d) not in gone]
        )
        meshconfig.write_resource_records(
            cluster.paths, [d for d in old_resources if policies.key_of(d) not in gone]
        )
        meshconfig.write_gateway_records(
            cluster.paths, [g for g in now.gateways if g not in doomed]
        )
        digest = meshconfig.regenerate(cluster.spec, cluster.paths)
        service_rules(cluster)
        # The records first: no tunnel is told of a waypoint whose pod is already gone.
        for g in doomed:
            waypoints.remove(now, cluster.state, g)
    return ConfigChange(lines, digest=digest)


def waypoint_status(
    cluster: Cluster, namespace: str | None = None
) -> list[tuple[gw.GatewaySpec, gw.Readiness]]:
    """Each waypoint (of `namespace`, or all) and whether it is Programmed, asked now."""
    spec = current_spec(cluster)
    return [
        (g, waypoints.readiness(spec, cluster.state, g))
        for g in gw.sorted_gateways(spec.gateways)
        if namespace is None or g.namespace == namespace
    ]


def read_resources(cluster: Cluster) -> list[dict[str, Any]]:
    """The L7 resources in force."""
    return meshconfig.read_resource_records(cluster.paths)


def waypoint_problems(cluster: Cluster) -> list[str]:
    """Waypoint labels that do not take effect as written, or name a missing waypoint."""
    return binding_problems(current_spec(cluster))


def start_waypoints(cluster: Cluster) -> list[ManagedProcess]:
    """Start the process of every waypoint whose pod exists (at `up`, after the tunnels)."""
    spec = current_spec(cluster)
    return [waypoints.start(spec, cluster.state, cluster.paths, g) for g in spec.gateways]


def delete_policy(cluster: Cluster, kind: str, namespace: str, name: str) -> bool:
    """Remove one policy; False if there is none of that kind and name."""
    try:
        delete_policies(cluster, [(kind, namespace, name)])
    except policies.PolicyError:
        return False
    return True


# ---- labels: enrolment at runtime --------------------------------------------------------


def label(cluster: Cluster, kind: str, name: str, changes: Sequence[LabelChange]) -> ConfigChange:
    """Apply every change to one namespace (`kind` "namespace", `name` NS) or pod ("pod",
    NS/POD) at once, as `kubectl label` does: the agents enrol or release its pods and the
    mesh config follows. Raises KeyError for an unknown target, LabelError for a change
    the agents would not accept; then nothing changes."""
    if kind == "service":
        return _label_service(cluster, name, changes)
    with meshconfig.records_lock(cluster.paths):
        doc = read_pod_source(cluster)
        if kind == "namespace":
            entry = (doc.get("namespaces") or {}).get(name)
            if entry is None:
                known = ", ".join(sorted(doc.get("namespaces") or {}))
                raise KeyError(
                    f"no namespace {name!r} in cluster {cluster.spec.name} (namespaces: {known})"
                )
        else:
            ns, _, pod = name.rpartition("/")
            found = [
                e
                for e in doc.get("pods") or []
                if e.get("namespace") == (ns or NAMESPACE) and e.get("name") == pod
            ]
            if not found:
                known = ", ".join(f"{p.namespace}/{p.name}" for p in cluster.spec.pods)
                raise KeyError(
                    f"no pod {ns or 'default'}/{pod} in cluster {cluster.spec.name} (pods: {known})"
                )
            entry = found[0]
        labels = dict(entry.get("labels") or {})
        for change in changes:
            if change.value is None:
                labels.pop(change.key, None)
            else:
                labels[change.key] = change.value
        problems = label_errors(labels)
        if problems:
            raise LabelError("; ".join(problems))
        entry["labels"] = labels
        digest = _publish(cluster, doc)
    return ConfigChange((f"{kind} {name} labeled",), digest=digest)


def _label_service(cluster: Cluster, name: str, changes: Sequence[LabelChange]) -> ConfigChange:
    """A Service's labels (`istio.io/use-waypoint` binds it to a waypoint); the mesh config
    follows, no app restarts."""
    ns, _, svc_name = name.rpartition("/")
    ns = ns or NAMESPACE
    with meshconfig.records_lock(cluster.paths):
        spec = current_spec(cluster)
        found = [s for s in spec.services if s.namespace == ns and s.name == svc_name]
        if not found:
            known = ", ".join(f"{s.namespace}/{s.name}" for s in spec.services)
            raise KeyError(
                f"no service {ns}/{svc_name} in cluster {cluster.spec.name} (services: {known})"
            )
        labels = dict(found[0].labels)
        for change in changes:
            if change.value is None:
                labels.pop(change.key, None)
            else:
                labels[change.key] = change.value
        problems = label_errors(labels)
        if problems:
            raise LabelError("; ".join(problems))
        records = meshconfig.read_service_labels(cluster.paths)
        records[f"{ns}/{svc_name}"] = labels
        meshconfig.write_service_labels(cluster.paths, records)
        digest = meshconfig.regenerate(cluster.spec, cluster.paths)
    return ConfigChange((f"service {ns}/{svc_name} labeled",), digest=digest)


def label_namespace(cluster: Cluster, namespace: str, key: str, value: str | None) -> None:
    """Set (or with None remove) a namespace label in the running cluster."""
    label(cluster, "namespace", namespace, [LabelChange(key, value)])


def label_pod(cluster: Cluster, namespace: str, name: str, key: str, value: str | None) -> None:
    """Set (or with None remove) a pod label in the running cluster."""
    label(cluster, "pod", f"{namespace}/{name}", [LabelChange(key, value)])


def _publish(cluster: Cluster, doc: dict[str, Any]) -> str:
    # The pod source first, as the API server would change first; then the mesh config,
    # where a workload's protocol and labels are derived from it (as istiod derives them).
    try:
        parse_source(json.dumps(doc), "")
    except SourceError as e:
        raise LabelError(f"label change rejected: {e}") from None
    meshconfig.write_pod_source(cluster.paths, doc)
    digest = meshconfig.regenerate(cluster.spec, cluster.paths)
    # Service endpoints are chosen by pod labels: keep the nodes' service rules in step.
    service_rules(cluster)
    return digest


def wanted_uids(cluster: Cluster, node: str) -> set[str]:
    """The pods of `node` an agent should enrol now, by the agents' own rule."""
    try:
        view = parse_source(cluster.paths.pods.read_text(), node)
    except (OSError, SourceError):
        return enrolled_uids(current_spec(cluster), node)
    return set(wanted(view))


def _python() -> str:
    return sys.executable


def start_control_plane(
    spec: ClusterSpec,
    layout: NetworkLayout,
    state: ClusterState,
    workloads_file: Path | None = None,
) -> None:
    """The node CA. It vouches for (node, identity) from `workloads_file` (default: the mesh
    config this module writes; in Kubernetes mode, the one the control plane computes)."""
    write_node_tokens(spec, state)
    start_ca(spec, layout, state, workloads_file)
    wait_for_ca(state)


def write_node_tokens(spec: ClusterSpec, state: ClusterState) -> None:
    """A fresh token per node (its file, 0600, for that node's tunnel and waypoints) and
    the token -> node file that the CA, and a discovery server, authenticate them by."""
    paths = MeshPaths(state.dir / "mesh")
    tokens = {}
    for node in spec.nodes:
        token = secrets.token_hex(32)
        tokens[token] = node.name
        meshconfig.write_file(paths.token(node.name), token, mode=0o600)
    meshconfig.write_file(paths.tokens, yaml.safe_dump(tokens), mode=0o600)


def wait_for_ca(state: ClusterState) -> None:
    paths = MeshPaths(state.dir / "mesh")
    _wait_for(lambda: paths.ca_socket.exists(), 15.0, "the CA socket to appear (see ca.log)")


CA_NAME = "ca"


def start_ca(
    spec: ClusterSpec,
    layout: NetworkLayout,
    state: ClusterState,
    workloads_file: Path | None = None,
) -> ManagedProcess:
    """The CA process alone, with the tokens already written (a restart after an outage:
    the tunnels keep the tokens they read at start). Its log is appended to."""
    paths = MeshPaths(state.dir / "mesh")
    return spawn_in_netns(
        layout.cluster_netns_path,
        [
            _python(),
            "-m",
            "controlplane.ca_server",
            "--state-dir",
            str(state.dir),
            "--socket",
            str(paths.ca_socket),
            "--tokens-file",
            str(paths.tokens),
            "--trust-domain",
            spec.trust_domain,
            "--workloads-file",
            str(workloads_file or paths.xds),
        ],
        _base_env(),
        Path.cwd(),
        state.log_dir / "ca.log",
        state.pidfile_dir,
        CA_NAME,
    )


def kill_ca(cluster: Cluster) -> bool:
    """SIGKILL the CA (an outage: no goodbye, its socket file is left behind)."""
    return _stop(cluster, CA_NAME, signal.SIGKILL)


def _base_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tunnel_name(node: str) -> str:
    return f"ztunnel-{node}"


def agent_name(node: str) -> str:
    return f"agent-{node}"


def start_tunnel(
    spec: ClusterSpec,
    layout: NetworkLayout,
    state: ClusterState,
    node: str,
    name: str = "",
    extra_env: Mapping[str, str] | None = None,
    source_env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start a node's tunnel. A distinct `name` starts a second one beside it (an upgrade
    overlap: SO_REUSEPORT listeners, and the agent sends new pods to the newest).
    `extra_env` adds tunnel settings (ztunnel/config.py), e.g. SAME_NODE_IN_PROCESS."""
    paths = MeshPaths(state.dir / "mesh")
    env = _base_env()
    env.update(
        {
            "NODE_NAME": node,
            "CA_ADDRESS": str(paths.ca_socket),
            "CA_TOKEN_PATH": str(paths.token(node)),
            "TRUST_DOMAIN": spec.trust_domain,
        }
    )
    # Where its mesh state comes from: the file this module writes, unless the caller names
    # another source (an xDS server: XDS_ADDRESS and XDS_ROOT_CERT).
    env.update(source_env or {"LOCAL_XDS_PATH": str(paths.xds)})
    env["ZDS_SOCKET"] = str(paths.zds_socket(node))
    if spec.dns.capture:
        env.update(_dns_env(spec, paths))
    if spec.cert_ttl_seconds is not None:
        env["CERT_TTL_SECONDS"] = str(spec.cert_ttl_seconds)
    if spec.tunnel_workers is not None:
        env["TUNNEL_WORKERS"] = str(spec.tunnel_workers)
    env.update(extra_env or {})
    pname = name or tunnel_name(node)
    return spawn_in_netns(
        layout.node(node).netns_path,
        [_python(), "-m", "ztunnel"],
        env,
        Path.cwd(),
        state.log_dir / f"{pname}.log",
        state.pidfile_dir,
        pname,
    )


def _dns_env(spec: ClusterSpec, paths: MeshPaths) -> dict[str, str]:
    """The tunnel's DNS proxy settings; its resolv.conf names the cluster file's resolvers."""
    resolv = paths.root / "resolv.conf"
    meshconfig.write_file(resolv, "".join(f"nameserver {ip}\n" for ip in spec.dns.nameservers))
    return {"ISTIO_META_DNS_CAPTURE": "true", "DNS_RESOLV_CONF": str(resolv)}


def start_agent(
    spec: ClusterSpec,
    layout: NetworkLayout,
    state: ClusterState,
    node: str,
    redirect_mode: str = "iptables",
) -> ManagedProcess:
    """Start a node's agent in the node netns (it captures pods and serves ZDS)."""
    paths = MeshPaths(state.dir / "mesh")
    pname = agent_name(node)
    return spawn_in_netns(
        layout.node(node).netns_path,
        [
            _python(),
            "-m",
            "redirect.agent",
            "--node",
            node,
            "--pods-file",
            str(paths.pods),
            "--zds-socket",
            str(paths.zds_socket(node)),
            "--status-file",
            str(paths.agent_status(node)),
            "--redirect-mode",
            redirect_mode,
            "--dns-capture" if spec.dns.capture else "--no-dns-capture",
        ],
        _base_env(),
        Path.cwd(),
        state.log_dir / f"{pname}.log",
        state.pidfile_dir,
        pname,
    )


# ---- stopping and restarting one node's processes (upgrade and failure tests) ---------


def process_record(cluster: Cluster, name: str) -> ProcessRecord | None:
    """The record of a running process of the cluster, by its name."""
    for r in read_records(cluster.state.pidfile_dir):
        if r.name == name:
            st = proc_stat(r.pid)
            if st is not None and st[2] == r.start_time and st[0] != "Z":
                return r
    return None


def _stop(cluster: Cluster, name: str, sig: signal.Signals) -> bool:
    """Stop a recorded process (SIGTERM: graceful-then-forced; SIGKILL: at once).
    Returns whether it was running."""
    rec = process_record(cluster, name)
    if rec is None:
        return False
    if sig == signal.SIGKILL:
        st = proc_stat(rec.pid)
        try:
            if st is not None and st[1] == rec.pid:
                os.killpg(rec.pid, signal.SIGKILL)
            else:
                os.kill(rec.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    terminate([rec])  # waits until it is gone (escalating if SIGTERM is not enough)
    (cluster.state.pidfile_dir / f"{name}.pid").unlink(missing_ok=True)
    return True


def stop_agent(cluster: Cluster, node: str) -> bool:
    return _stop(cluster, agent_name(node), signal.SIGTERM)


def start_node_agent(cluster: Cluster, node: str) -> ManagedProcess:
    try:
        mode = cluster.paths.redirect_mode.read_text().strip() or "iptables"
    except FileNotFoundError:
        mode = "iptables"
    return start_agent(cluster.spec, cluster.layout, cluster.state, node, mode)


def restart_agent(cluster: Cluster, node: str) -> ManagedProcess:
    stop_agent(cluster, node)
    return start_node_agent(cluster, node)


def stop_tunnel(cluster: Cluster, node: str, name: str = "") -> bool:
    return _stop(cluster, name or tunnel_name(node), signal.SIGTERM)


def kill_tunnel(cluster: Cluster, node: str, name: str = "") -> bool:
    """SIGKILL: no drain, no goodbye; the agent sees the ZDS connection drop."""
    return _stop(cluster, name or tunnel_name(node), signal.SIGKILL)


def start_node_tunnel(
    cluster: Cluster, node: str, name: str = "", extra_env: Mapping[str, str] | None = None
) -> ManagedProcess:
    return start_tunnel(cluster.spec, cluster.layout, cluster.state, node, name, extra_env)


def restart_tunnel(cluster: Cluster, node: str) -> ManagedProcess:
    stop_tunnel(cluster, node)
    return start_node_tunnel(cluster, node)


def node_http(
    layout: NetworkLayout,
    node: str,
    port: int,
    path: str,
    method: str = "GET",
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP/1.0 request to a port of a node's tunnel on 127.0.0.1, from inside the node
    netns (the admin port listens nowhere else). Raises OSError when unreachable."""
    return netns_http(layout.node(node).netns_path, port, path, method, timeout)


def netns_http(
    netns_path: str, port: int, path: str, method: str = "GET", timeout: float = 5.0
) -> tuple[int, bytes]:
    """One HTTP/1.0 request to 127.0.0.1:`port` inside a netns: (status, body). Raises
    OSError when unreachable or when what answers is not HTTP."""
    return netnshttp.request(netns_path, port, path, method=method, timeout=timeout)


def tunnel_status(layout: NetworkLayout, node: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """GET /healthz/ready of a node's tunnel, from inside the node netns."""
    try:
        _, body = node_http(layout, node, READINESS_PORT, "/healthz/ready", timeout=timeout)
        doc = json.loads(body)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def agent_status(cluster: Cluster, node: str) -> dict[str, Any] | None:
    """The node agent's status file, or None if there is none or its process is gone."""
    try:
        doc = json.loads(cluster.paths.agent_status(node).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not doc.get("running"):
        return None
    rec = process_record(cluster, agent_name(node))
    if rec is None or rec.pid != doc.get("pid"):
        return None  # a file left by an agent that has since stopped
    return doc


def agent_pods(cluster: Cluster, node: str, state: str | None = None) -> dict[str, Any]:
    """uid -> the agent's entry for each pod it tracks (optionally only in `state`)."""
    doc = agent_status(cluster, node) or {}
    pods = doc.get("pods") or {}
    return {u: p for u, p in pods.items() if state is None or p.get("state") == state}


def node_ready(cluster: Cluster, node: str, want: set[str]) -> bool:
    """The agent has enrolled exactly `want` and the tunnel is ready holding exactly it."""
    agent = agent_status(cluster, node)
    if agent is None:
        return False
    pods = agent.get("pods") or {}
    if set(pods) != want or any(p.get("state") != "enrolled" for p in pods.values()):
        return False
    # Ready alone is not enough: a tunnel that has not yet been given the new pods is
    # ready with none. It must also hold exactly the pods it was given.
    status = tunnel_status(cluster.layout, node) or {}
    held = status.get("pods")
    return bool(status.get("ready")) and isinstance(held, dict) and set(held) == want


def _protocols(cluster: Cluster) -> dict[str, str]:
    """uid -> tunnel protocol, as the mesh config file says now."""
    doc = yaml.safe_load(cluster.paths.xds.read_text()) or {}
    return {str(w.get("uid")): str(w.get("protocol", "TCP")) for w in doc.get("workloads") or []}


def config_in_force(cluster: Cluster, node: str, protocols: dict[str, str]) -> bool:
    """Whether a node's tunnel has loaded the mesh config's workload protocols (after a
    label change, a tunnel must know which peers now speak HBONE)."""
    try:
        status, body = node_http(cluster.layout, node, ADMIN_PORT, "/config_dump", timeout=2.0)
        doc = json.loads(body)
    except (OSError, ValueError):
        return False
    if status != 200 or not isinstance(doc, dict):
        return False
    seen = {str(w.get("uid")): w.get("protocol") for w in doc.get("workloads") or []}
    return all(seen.get(uid) == proto for uid, proto in protocols.items())


def wait_ready(
    cluster: Cluster, timeout: float = READY_TIMEOUT, progress: ProgressFn = None
) -> None:
    want = {n.name: wanted_uids(cluster, n.name) for n in cluster.spec.nodes}
    protocols = _protocols(cluster)
    said: list[str] = []

    def ready(node: str) -> bool:
        return node_ready(cluster, node, want[node]) and config_in_force(cluster, node, protocols)

    def all_ready() -> bool:
        done = [n for n in want if ready(n)]
        text = f"waiting for the tunnels to be ready: {len(done)}/{len(want)} nodes"
        if done and len(done) < len(want):
            text += f" ({', '.join(done)})"
        if said[-1:] != [text]:
            said.append(text)
            _report(progress, text)
        return len(done) == len(want)

    try:
        _wait_for(all_ready, timeout, "every tunnel to report ready")
    except MeshUpError as e:
        raise MeshUpError(f"{e}; not ready: {_not_ready(cluster, want)}") from None


def _not_ready(cluster: Cluster, want: dict[str, set[str]]) -> str:
    """What each unready node lacks, for the error message."""
    out = []
    for node, uids in want.items():
        if node_ready(cluster, node, uids):
            continue
        agent = agent_status(cluster, node)
        tunnel = tunnel_status(cluster.layout, node)
        pods = {} if agent is None else agent.get("pods") or {}
        waiting = {u: f"{p.get('state')}: {p.get('reason')}" for u, p in pods.items()}
        if tunnel is None:
            held = "unreachable"
        else:
            held = f"ready={tunnel.get('ready')} pods={sorted(tunnel.get('pods') or {})}"
        running = "not running" if agent is None else waiting
        out.append(f"{node} (want {sorted(uids)}; agent {running}; tunnel {held})")
    return "; ".join(out) or "(ready now)"


def _wait_for(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    failed: Callable[[], str | None] | None = None,
) -> None:
    """Poll `cond` until true; `failed` says why waiting longer is pointless (fail fast)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        why = failed() if failed is not None else None
        if why is not None:
            raise MeshUpError(f"{what}: {why}")
        time.sleep(0.1)
    raise MeshUpError(f"timed out after {timeout:.0f} s waiting for {what}")


class NotRunning(RuntimeError):
    """The cluster a command names is not up (under the state root given)."""


class ConfigNotInForce(RuntimeError):
    """A tunnel refused the mesh config just written, or did not load it in time."""


def up(
    cluster_file: Path | str,
    state_root: Path | str | None = None,
    mesh: bool = True,
    redirect_mode: str = "iptables",
    progress: ProgressFn = None,
) -> Cluster:
    """Build the cluster; `redirect_mode` is the node agents' capture mode (iptables|ebpf);
    each step is reported to `progress` as it starts.

    Nothing is built unless the file is valid, every pod's command exists and the name
    is free (`localcluster.registry`). On any failure or interrupt, everything built is
    torn down; a failure keeps the logs (`<state>/<cluster>/failed-up-logs`) and says so."""
    _report(progress, f"reading {cluster_file}")
    spec = load_cluster(cluster_file)
    missing = missing_commands(spec)
    if missing:
        raise MeshUpError("; ".join(missing))
    d = state_dir(spec.name, state_root)
    try:
        registry.claim(spec.name, d)
    except registry.ClusterConflict as e:
        raise MeshUpError(str(e)) from None
    running = live_netns(spec.name)
    if running:
        # Never tear down what this call did not build: another run may own it.
        registry.release(spec.name, d)
        raise MeshUpError(
            f"network namespaces named like cluster {spec.name}'s exist ({len(running)}, e.g. "
            f"{running[0]}): it is already up, or they are another cluster's; `ambientctl "
            "down` the cluster they belong to first"
        )
    try:
        state = ClusterState.open(spec.name, state_root)
        keep_spec(state, cluster_file)  # later commands may name the cluster alone
        _report(
            progress,
            f"building the network: {len(spec.nodes)} nodes, {len(spec.pods)} pods "
            "(one network namespace each)",
        )
        layout = build_network(spec, state)
        _report(progress, f"service rules for {len(spec.services)} services")
        apply_service_rules(spec, layout)
        cluster = Cluster(spec, layout, state, mesh)
        if mesh:
            _report(progress, "writing the mesh config")
            cluster.paths.root.mkdir(parents=True, exist_ok=True)
            write_mesh_config(spec, cluster.paths)
            write_pod_source(cluster.paths, pod_source_doc(spec, layout))
            meshconfig.write_file(cluster.paths.redirect_mode, redirect_mode + "\n")
            _report(progress, "starting the certificate authority")
            start_control_plane(spec, layout, state)
            for node in spec.nodes:
                _report(progress, f"starting the node agent and tunnel on {node.name}")
                start_agent(spec, layout, state, node.name, redirect_mode)
                start_tunnel(spec, layout, state, node.name)
            wait_ready(cluster, progress=progress)
            if spec.gateways:
                _report(progress, f"starting {len(spec.gateways)} waypoints")
            start_waypoints(cluster)
        _report(progress, f"starting the apps of {len(spec.pods)} pods")
        start_supervisor(cluster, cluster_file)
        _report(progress, "waiting for the apps to listen")
        _wait_apps(cluster)
    except Exception as e:
        kept = _keep_logs(d)
        teardown(spec.name, state_root)
        where = f"; the logs are kept in {kept}" if kept is not None else ""
        raise MeshUpError(f"cluster {spec.name} did not come up: {e}{where}") from e
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): tear down, say nothing more
        teardown(spec.name, state_root)
        raise
    return cluster


def _keep_logs(d: Path) -> Path | None:
    """Move the logs of a failed `up` where teardown leaves them (replacing the previous
    failure's). The processes still writing keep their files: they are moved, not copied."""
    logs = d / "logs"
    if not logs.is_dir() or not any(logs.iterdir()):
        return None
    kept = d / FAILED_UP_LOGS
    shutil.rmtree(kept, ignore_errors=True)
    logs.rename(kept)
    return kept


SUPERVISOR = "supervisor"


def start_supervisor(cluster: Cluster, cluster_file: Path | str) -> ManagedProcess:
    """The pod supervisor (`localcluster.supervisor`): it starts every pod's app and keeps
    the mesh config's workload health in step with them."""
    return spawn_in_netns(
        cluster.layout.cluster_netns_path,
        [
            _python(),
            "-m",
            "localcluster.supervisor",
            "--cluster-file",
            str(Path(cluster_file).resolve()),
            "--state-root",
            str(cluster.state.dir.parent.resolve()),
        ],
        _base_env(),
        Path.cwd(),
        cluster.state.log_dir / f"{SUPERVISOR}.log",
        cluster.state.pidfile_dir,
        SUPERVISOR,
    )


def _wait_apps(cluster: Cluster, timeout: float = 15.0) -> None:
    """Wait until each pod with a listening app port (a service target) accepts; fail at
    once when such a pod's app has exited (as its supervisor recorded) or the supervisor
    itself has, and name what does not listen."""
    targets: list[tuple[str, str, int]] = []  # (ns/pod, process name, port)
    for svc in cluster.spec.services:
        for pod in cluster.spec.endpoints(svc):
            for port in svc.ports:
                target = (f"{pod.namespace}/{pod.name}", process_name(pod.namespace, pod.name))
                targets.append((*target, port.target_port))

    def closed() -> list[tuple[str, str, int]]:
        out = []
        for ref, pname, port in targets:
            where = cluster.layout.pod(*ref.split("/", 1))
            if not _port_open(where.netns_path, str(where.ip), port):
                out.append((ref, pname, port))
        return out

    every = {appstatus.key(p.namespace, p.name) for p in cluster.spec.pods}

    def started() -> bool:
        # As when `up` started the apps itself: it returns once every app was started.
        return every <= set(appstatus.read(cluster.state.dir))

    def exited() -> str | None:
        if process_record(cluster, SUPERVISOR) is None:
            return f"the pod supervisor is not running (its log: {SUPERVISOR}.log)"
        apps = appstatus.read(cluster.state.dir)
        for ref, known in sorted(apps.items()):
            if known.reason == "StartError":
                return f"the app of pod {ref} did not start: {known.message}"
        for ref, pname, port in closed():
            app = apps.get(ref)
            if app is not None and not app.running and not app.waiting_restart:
                how = app.message or f"exited with code {app.exit_code}"
                return (
                    f"the app of pod {ref} {how} before listening on port {port} "
                    f"(its log: {pname}.log)"
                )
        return None

    try:
        _wait_for(started, timeout, "the pod supervisor to start the apps", exited)
        _wait_for(lambda: not closed(), timeout, "the apps to listen", exited)
    except MeshUpError as e:
        if "timed out" not in str(e):
            raise
        waiting = ", ".join(f"pod {ref} port {port}" for ref, _, port in closed())
        raise MeshUpError(f"{e}; not listening: {waiting or '(listening now)'}") from None


def _port_open(netns_path: str, ip: str, port: int) -> bool:
    s = nsutil.socket_at(netns_path)
    try:
        # Marked like the tunnel's own sockets so the probe is not captured.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, TUNNEL_MARK)
        s.settimeout(0.5)
        s.connect((ip, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def attach(cluster_file: Path | str, state_root: Path | str | None = None) -> Cluster:
    """The handle of a running cluster (for the CLI's other commands). Creates nothing;
    raises NotRunning unless the cluster's record and its bridge namespace exist."""
    return attach_spec(load_cluster(cluster_file), state_root, cluster_file)


def attach_spec(
    spec: ClusterSpec, state_root: Path | str | None, cluster_file: Path | str
) -> Cluster:
    """`attach` of a spec already read (the copy a cluster's record keeps)."""
    state = ClusterState.load(spec.name, state_root)
    layout = plan_layout(spec)
    if (
        state is None
        or layout.cluster_netns not in state.netns
        or not os.path.exists(layout.cluster_netns_path)
    ):
        root = state_dir(spec.name, state_root).parent
        raise NotRunning(
            f"cluster {spec.name} is not running under {root} (ambientctl up {cluster_file})"
        )
    return Cluster(spec, layout, state, (state.dir / "mesh").exists())


def down(
    name: str, state_root: Path | str | None = None, progress: ProgressFn = None
) -> TeardownReport:
    """Tear down exactly what the cluster's record names (see `localcluster.state`)."""
    return teardown(name, state_root, progress)


def end_run(
    tool: str, cluster: Cluster | None, state_root: Path, ok: bool, interrupted: bool
) -> None:
    """A benchmark's cluster torn down at the end of its run. A run that failed (and was
    not interrupted) keeps a copy of its logs first, since teardown deletes them, and its
    state directory; otherwise the state directory goes too."""
    if cluster is not None:
        if not ok and not interrupted:
            kept = state_root / "logs-kept"
            shutil.copytree(cluster.state.log_dir, kept, dirs_exist_ok=True)
            print(f"{tool}: logs kept in {kept}", file=sys.stderr)
        down(cluster.spec.name, state_root)
    if ok or interrupted:
        shutil.rmtree(state_root, ignore_errors=True)


def config_problem(status: Mapping[str, Any] | None, digest: str | None) -> str | None:
    """Why a tunnel (its readiness JSON) does not run the mesh config `digest`, or None.
    Pure: `status` is None when the tunnel did not answer."""
    if status is None:
        return "tunnel unreachable"
    config = status.get("config")
    if not isinstance(config, Mapping):
        return "the tunnel does not report its config"
    rejected = config.get("rejected")
    if isinstance(rejected, Mapping):
        return (
            f"the tunnel refused the mesh config {str(rejected.get('digest'))[:12]}: "
            f"{rejected.get('error')}; it keeps running the previous one "
            f"{str(config.get('digest'))[:12]}"
        )
    if digest is not None and config.get("digest") != digest:
        return f"the tunnel runs {str(config.get('digest'))[:12]}, not {digest[:12]} (yet)"
    return None


def wait_config(
    cluster: Cluster, digest: str, timeout: float = READY_TIMEOUT, progress: ProgressFn = None
) -> None:
    """Until every node's tunnel runs the mesh config `digest`; raises ConfigNotInForce at
    once when one refuses it, or at the timeout naming the nodes that do not run it."""
    deadline = time.monotonic() + timeout
    said = ""
    while True:
        waiting = {}
        for n in cluster.spec.nodes:
            status = tunnel_status(cluster.layout, n.name)
            config = (status or {}).get("config") or {}
            rejected = config.get("rejected") if isinstance(config, dict) else None
            if isinstance(rejected, dict) and rejected.get("digest") == digest:
                error = rejected.get("error")
                raise ConfigNotInForce(
                    f"node {n.name}: the tunnel refused the new mesh config: {error}"
                )
            problem = config_problem(status, digest)
            if problem is not None:
                waiting[n.name] = problem
        nodes = len(cluster.spec.nodes)
        text = (
            f"waiting for every tunnel to run mesh config {digest[:12]}: "
            f"{nodes - len(waiting)}/{nodes} nodes"
        )
        if text != said:
            said = text
            _report(progress, text)
        if not waiting:
            return
        if time.monotonic() >= deadline:
            detail = "; ".join(f"node {k}: {v}" for k, v in waiting.items())
            raise ConfigNotInForce(
                f"timed out after {timeout:g} s waiting for every tunnel to run the new mesh "
                f"config: {detail}"
            )
        time.sleep(0.1)
