"""`ambientctl` against a Kubernetes cluster: what the mesh looks like from the API objects.

Pure: a `Snapshot` (the objects as the API server lists them) in, records and text out, so
every view is tested without a cluster. The mesh config is computed with the control plane's
own functions (`controlplane.compute`, `build_written`) and policy with the tunnels' own
(`PolicyIndex`, `ztunnel.explain`), so what is shown is what the tunnels are sent, not a
second reading of the objects. `ambientctl.kubefetch` lists the objects.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ambientctl.views import MISSING, ViewError, render_explain, table
from controlplane.compute import Computed, Inputs, build_written, compute
from controlplane.controller import WATCHED
from controlplane.endpoints import Obj, Problem, is_ready, key_of, labels, meta, pod_ips
from controlplane.waypoints import GATEWAY_NAME_LABEL, WAYPOINT_CLASS
from localcluster import gateways as gw
from meshcore.admin.views import mesh_json
from meshcore.defaults import REDIRECTION_ANNOTATION, ROOT_NAMESPACE, TRUST_DOMAIN
from meshcore.policy.index import PolicyIndex
from meshcore.state import MeshConfigError, MeshState, Workload
from waypoint import explain as wx
from ztunnel import explain as zx

ISTIO_NAMESPACE = "istio-system"
CONTROL_PLANE = "istiod"
TUNNEL = "ztunnel"
NODE_AGENT = "ambient-node-agent"
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
DEFAULT_NAMESPACE = "default"
MESH_KINDS = tuple(WATCHED)  # the Inputs fields, as the control plane's informers fill them


# ---- the objects ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """The control plane's own flags, read from its Deployment (else its defaults)."""

    trust_domain: str = TRUST_DOMAIN
    cluster_id: str = "Kubernetes"
    root_namespace: str = ROOT_NAMESPACE


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the API server listed: the control plane's inputs (by `Inputs` field name), and
    the mesh's own workloads (nodes, Deployments and DaemonSets of the istio namespace)."""

    objects: Mapping[str, Sequence[Obj]] = field(default_factory=dict)
    nodes: Sequence[Obj] = ()
    deployments: Sequence[Obj] = ()
    daemonsets: Sequence[Obj] = ()
    istio_namespace: str = ISTIO_NAMESPACE

    def of(self, kind: str) -> Sequence[Obj]:
        return self.objects.get(kind, ())

    def settings(self) -> MeshSettings:
        istiod = next((d for d in self.deployments if _name(d) == CONTROL_PLANE), None)
        return settings_from_args(_container_args(istiod) if istiod is not None else [])


def _name(obj: Obj) -> str:
    return str(meta(obj).get("name", ""))


def _namespace(obj: Obj) -> str:
    return str(meta(obj).get("namespace", ""))


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _container_args(deployment: Obj) -> list[str]:
    spec = _dict(_dict(_dict(deployment.get("spec")).get("template")).get("spec"))
    out: list[str] = []
    for c in spec.get("containers") or ():
        if isinstance(c, Mapping):
            out += [str(a) for a in (c.get("command") or ()) if isinstance(a, str)]
            out += [str(a) for a in (c.get("args") or ()) if isinstance(a, str)]
    return out


def settings_from_args(args: Sequence[str]) -> MeshSettings:
    """`--trust-domain T`, `--cluster-id C`, `--root-namespace N` (or `--flag=value`)."""
    found: dict[str, str] = {}
    flags = {"--trust-domain": "trust_domain", "--cluster-id": "cluster_id"}
    flags["--root-namespace"] = "root_namespace"
    for i, a in enumerate(args):
        flag, eq, value = a.partition("=")
        if flag not in flags:
            continue
        if not eq:
            if i + 1 >= len(args):
                continue
            value = args[i + 1]
        if value:
            found[flags[flag]] = value
    return MeshSettings(**found)


def annotated(pod: Obj) -> bool:
    """Captured by the node agent: it marks each pod it redirects (istio-cni's annotation)."""
    return _dict(meta(pod).get("annotations")).get(REDIRECTION_ANNOTATION) == "enabled"


# ---- the computed mesh ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mesh:
    computed: Computed
    state: MeshState
    policies: PolicyIndex
    problems: tuple[Problem, ...]  # the compute's, and entries the parser refused alone


def compute_mesh(snap: Snapshot) -> Mesh:
    """The mesh config the control plane computes from these objects, parsed as the tunnels
    parse it, with the tunnels' policy index."""
    s = snap.settings()
    objects: dict[str, Any] = {k: tuple(snap.of(k)) for k in MESH_KINDS}
    inputs = Inputs(
        **objects,
        cluster_id=s.cluster_id,
        trust_domain=s.trust_domain,
        root_namespace=s.root_namespace,
    )
    computed = compute(inputs)
    try:
        built = build_written(computed.document)
    except MeshConfigError as e:
        raise ViewError(f"{e} (the control plane keeps the mesh config in force)") from None
    policies = PolicyIndex.build(built.state, s.root_namespace)
    return Mesh(computed, built.state, policies, (*computed.problems, *built.problems))


# ---- status ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Component:
    name: str
    kind: str  # Deployment | DaemonSet
    namespace: str
    desired: int
    ready: int
    found: bool
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.found and self.desired > 0 and self.ready >= self.desired

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "namespace": self.namespace,
            "found": self.found,
            "desired": self.desired,
            "ready": self.ready,
            "ok": self.ok,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class NodeRow:
    node: str
    pods: tuple[tuple[str, str, bool], ...]  # (component, pod name or "", ready)

    @property
    def ok(self) -> bool:
        return all(name and ready for _, name, ready in self.pods)


@dataclass(frozen=True, slots=True)
class NamespaceRow:
    name: str
    pods: int
    captured: int
    waypoint: str


@dataclass(frozen=True, slots=True)
class Status:
    components: tuple[Component, ...]
    nodes: tuple[NodeRow, ...]
    namespaces: tuple[NamespaceRow, ...]

    @property
    def problems(self) -> list[str]:
        out = [f"{c.kind} {c.namespace}/{c.name}: {c.message}" for c in self.components if not c.ok]
        # A node without a component's pod is not said here: whether the DaemonSet should
        # run there (selectors, taints) is its controller's call, summed up in `desired`.
        for n in self.nodes:
            for component, pod, ready in n.pods:
                if pod and not ready:
                    out.append(f"node {n.node}: {component} pod {pod} is not ready")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "components": [c.to_json() for c in self.components],
            "nodes": [
                {
                    "node": n.node,
                    "pods": [{"component": c, "pod": p or None, "ready": r} for c, p, r in n.pods],
                }
                for n in self.nodes
            ],
            "ambientNamespaces": [
                {"name": n.name, "pods": n.pods, "captured": n.captured, "waypoint": n.waypoint}
                for n in self.namespaces
            ],
            "problems": self.problems,
        }


def _deployment(obj: Obj | None, name: str, namespace: str) -> Component:
    if obj is None:
        return Component(name, "Deployment", namespace, 0, 0, False, "not found")
    spec, st = _dict(obj.get("spec")), _dict(obj.get("status"))
    desired = _int(spec.get("replicas")) if "replicas" in spec else 1
    ready = _int(st.get("readyReplicas"))
    message = "" if desired > 0 and ready >= desired else f"{ready}/{desired} replicas ready"
    if desired == 0:
        message = "scaled to 0 replicas"
    return Component(name, "Deployment", namespace, desired, ready, True, message)


def _daemonset(obj: Obj | None, name: str, namespace: str) -> Component:
    if obj is None:
        return Component(name, "DaemonSet", namespace, 0, 0, False, "not found")
    st = _dict(obj.get("status"))
    desired, ready = _int(st.get("desiredNumberScheduled")), _int(st.get("numberReady"))
    message = ""
    if desired == 0:
        message = "scheduled on no node"
    elif ready < desired:
        message = f"{ready}/{desired} pods ready"
    return Component(name, "DaemonSet", namespace, desired, ready, True, message)


def _owned_by(pod: Obj, kind: str, name: str) -> bool:
    return any(
        isinstance(o, Mapping) and o.get("kind") == kind and o.get("name") == name
        for o in meta(pod).get("ownerReferences") or ()
    )


def target_node(pod: Obj) -> str:
    """Where a pod runs: its nodeName, or (a DaemonSet's pod not bound yet) the node its
    affinity names."""
    spec = _dict(pod.get("spec"))
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    required = _dict(_dict(_dict(spec.get("affinity")).get("nodeAffinity")).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ))  # fmt: skip
    for term in required.get("nodeSelectorTerms") or ():
        for field_ in _dict(term).get("matchFields") or ():
            f = _dict(field_)
            if f.get("key") == "metadata.name" and f.get("values"):
                return str(f["values"][0])
    return ""


def status(snap: Snapshot) -> Status:
    ns = snap.istio_namespace
    deps = {_name(d): d for d in snap.deployments if _namespace(d) == ns}
    dss = {_name(d): d for d in snap.daemonsets if _namespace(d) == ns}
    components = (
        _deployment(deps.get(CONTROL_PLANE), CONTROL_PLANE, ns),
        _daemonset(dss.get(TUNNEL), TUNNEL, ns),
        _daemonset(dss.get(NODE_AGENT), NODE_AGENT, ns),
    )
    nodes = []
    pods = snap.of("pods")
    daemon_pods = {
        ds: [
            p
            for p in pods
            if _namespace(p) == ns
            and _owned_by(p, "DaemonSet", ds)
            and not meta(p).get("deletionTimestamp")
        ]
        for ds in (TUNNEL, NODE_AGENT)
        if ds in dss  # an absent DaemonSet is said once, as its own problem
    }
    # The nodes the DaemonSets run on (or mean to), as the Node objects name them.
    targeted = {target_node(p) for found in daemon_pods.values() for p in found}
    for node in sorted(_name(n) for n in snap.nodes if _name(n) in targeted):
        row = []
        for ds, found in daemon_pods.items():
            mine = [p for p in found if target_node(p) == node]
            best = next((p for p in mine if is_ready(p)), mine[0] if mine else None)
            row.append((ds, _name(best) if best else "", best is not None and is_ready(best)))
        if row:
            nodes.append(NodeRow(node, tuple(row)))
    namespaces = []
    for n in sorted(snap.of("namespaces"), key=_name):
        lb = labels(n)
        if lb.get(DATAPLANE_MODE_LABEL) != "ambient":
            continue
        mine = [
            p
            for p in pods
            if _namespace(p) == _name(n)
            and _dict(p.get("status")).get("phase") not in ("Succeeded", "Failed")
        ]
        namespaces.append(
            NamespaceRow(
                _name(n),
                len(mine),
                sum(1 for p in mine if annotated(p)),
                lb.get(USE_WAYPOINT_LABEL, ""),
            )
        )
    return Status(components, tuple(nodes), tuple(namespaces))


def render_status(st: Status) -> str:
    out = table(
        ["COMPONENT", "KIND", "NAMESPACE", "READY", "STATUS"],
        [
            [
                c.name,
                c.kind,
                c.namespace,
                f"{c.ready}/{c.desired}" if c.found else MISSING,
                "Ready" if c.ok else f"NotReady: {c.message}",
            ]
            for c in st.components
        ],
    )
    if st.nodes:
        headers = ["NODE", *(c.upper() for c, _, _ in st.nodes[0].pods)]
        rows = [
            [
                n.node,
                *(f"{p} ({'Ready' if r else 'NotReady'})" if p else "none" for _, p, r in n.pods),
            ]
            for n in st.nodes
        ]
        out += "\n" + table(headers, rows)
    out += "\n"
    if st.namespaces:
        out += table(
            ["AMBIENT NAMESPACE", "PODS", "CAPTURED", "WAYPOINT"],
            [[n.name, str(n.pods), str(n.captured), n.waypoint or "None"] for n in st.namespaces],
        )
    else:
        out += "No ambient namespaces (label one istio.io/dataplane-mode=ambient).\n"
    return out


# ---- workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkloadRow:
    namespace: str
    name: str
    ips: tuple[str, ...]
    node: str
    waypoint: str  # "" for none
    protocol: str  # HBONE when captured by the node agent, else TCP
    identity: str
    config_protocol: str  # what the mesh config says ("" when the pod is not in it)
    status: str

    @property
    def pending(self) -> bool:
        """In the mesh by its labels, not captured yet."""
        return self.config_protocol == "HBONE" and self.protocol != "HBONE"

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "ips": list(self.ips),
            "node": self.node,
            "waypoint": self.waypoint or None,
            "protocol": self.protocol,
            "identity": self.identity,
            "configProtocol": self.config_protocol or None,
            "status": self.status,
        }


def waypoint_names(snap: Snapshot) -> dict[str, str]:
    """A waypoint's address (its Service's ClusterIP) -> "namespace/name"."""
    out: dict[str, str] = {}
    for svc in snap.of("services"):
        owner = labels(svc).get(GATEWAY_NAME_LABEL)
        if owner is None or owner != _name(svc):
            continue
        spec = _dict(svc.get("spec"))
        for ip in [spec.get("clusterIP"), *(spec.get("clusterIPs") or ())]:
            if isinstance(ip, str) and ip and ip != "None":
                out[ip] = f"{_namespace(svc)}/{owner}"
    return out


def waypoint_of(binding: Any, names: Mapping[str, str], namespace: str) -> str:
    """A computed binding ({"address"} or {"hostname"}) as the waypoint's name: `name` in the
    workload's own namespace, else `namespace/name`; "(missing)" when it is not deployed."""
    b = _dict(binding)
    if not b:
        return ""
    if isinstance(b.get("address"), str):
        key = str(names.get(b["address"], b["address"]))
        suffix = ""
    else:
        # "ns/name.ns.svc.<domain>": a waypoint not deployed (yet), refused by the tunnels
        host = str(b.get("hostname", ""))
        ns, _, rest = host.partition("/")
        key = f"{ns}/{rest.split('.', 1)[0]}"
        suffix = " (missing)"
    ns, _, name = key.rpartition("/")
    return (name if ns == namespace else key) + suffix


def workloads(snap: Snapshot, mesh: Mesh, namespace: str | None = None) -> list[WorkloadRow]:
    """Every pod (of `namespace`), as istioctl ztunnel-config workloads shows it."""
    computed = {
        (str(w.get("namespace")), str(w.get("name"))): w
        for w in mesh.computed.document.get("workloads", ())
        if isinstance(w, Mapping)
    }
    in_state = {(w.namespace, w.name) for w in mesh.state.workloads}
    names = waypoint_names(snap)
    td = snap.settings().trust_domain
    rows = []
    for pod in snap.of("pods"):
        ns, name = key_of(pod)
        if namespace is not None and ns != namespace:
            continue
        spec = _dict(pod.get("spec"))
        sa = str(spec.get("serviceAccountName") or "default")
        w = computed.get((ns, name)) if (ns, name) in in_state else None
        config_protocol = str(w.get("protocol", "")) if w is not None else ""
        is_waypoint = GATEWAY_NAME_LABEL in labels(pod) and config_protocol == "HBONE"
        phase = _dict(pod.get("status")).get("phase")
        rows.append(
            WorkloadRow(
                namespace=ns,
                name=name,
                ips=tuple(pod_ips(pod)),
                node=str(spec.get("nodeName") or ""),
                waypoint=waypoint_of(w.get("waypoint"), names, ns) if w is not None else "",
                protocol="HBONE" if annotated(pod) or is_waypoint else "TCP",
                identity=f"spiffe://{td}/ns/{ns}/sa/{sa}",
                config_protocol=config_protocol,
                status="Ready" if is_ready(pod) else str(phase or "Pending"),
            )
        )
    return sorted(rows, key=lambda r: (r.namespace, r.name))


def render_workloads(rows: Sequence[WorkloadRow]) -> str:
    if not rows:
        return "No workloads found.\n"
    out = table(
        ["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL", "IDENTITY"],
        [
            [
                r.namespace,
                r.name,
                ",".join(r.ips) or MISSING,
                r.node or MISSING,
                r.waypoint or "None",
                r.protocol,
                r.identity,
            ]
            for r in rows
        ],
    )
    pending = [f"{r.namespace}/{r.name}" for r in rows if r.pending]
    if pending:
        # In the mesh by their labels, but their node agent has not marked them captured.
        out += f"\nNot captured yet (no {REDIRECTION_ANNOTATION}=enabled):\n"
        out += "".join(f"  {p}\n" for p in pending)
    return out


# ---- services (the tunnels' view, reused) --------------------------------------------------------


def tunnel_dump(mesh: Mesh) -> dict[str, Any]:
    """The config dump every tunnel would answer with for this mesh config."""
    return mesh_json(mesh.state, mesh.policies)


# ---- policies ----------------------------------------------------------------------------------

ENFORCED = "Enforced"
FAIL_CLOSED = "FailClosed"
WAYPOINT = "Waypoint"
NOT_ENFORCED = "DryRun"


def _scope(p: Mapping[str, Any]) -> str:
    scope = str(p.get("scope") or MISSING)
    selector = _dict(_dict(p.get("selector")).get("matchLabels"))
    if selector:
        return f"{scope} ({','.join(f'{k}={v}' for k, v in sorted(selector.items()))})"
    return scope


def policies(mesh: Mesh, namespace: str | None = None) -> dict[str, Any]:
    """The AuthorizationPolicies and PeerAuthentications as the tunnels get them: each with
    its status (enforced, failed closed and why, a waypoint's, dry run)."""
    problems: dict[tuple[str, str, str], list[str]] = {}
    for p in mesh.problems:
        if p.kind in ("AuthorizationPolicy", "PeerAuthentication"):
            problems.setdefault((p.kind, p.namespace, p.name), []).append(p.message)
    dump = tunnel_dump(mesh)
    out = []
    for p in dump["policies"]:
        ns, name = str(p.get("namespace")), str(p.get("name"))
        if namespace is not None and ns != namespace:
            continue
        why = [*problems.get(("AuthorizationPolicy", ns, name), ())]
        if p.get("error") and not any(str(p["error"]) in w for w in why):
            why.insert(0, str(p["error"]))
        if why:
            state = FAIL_CLOSED
        elif p.get("targetRefs"):
            state = WAYPOINT
        elif p.get("dryRun"):
            state = NOT_ENFORCED
        else:
            state = ENFORCED
        out.append({**p, "status": state, "problems": why})
    peer = []
    for pa in dump["peerAuthentications"]:
        ns, name = str(pa.get("namespace")), str(pa.get("name"))
        if namespace is not None and ns != namespace:
            continue
        why = problems.get(("PeerAuthentication", ns, name), [])
        peer.append({**pa, "status": FAIL_CLOSED if why else ENFORCED, "problems": why})
    errors = [e for e in dump["policyErrors"] if namespace is None or f" {namespace}/" in e]
    return {"policies": out, "peerAuthentications": peer, "policyErrors": errors}


def render_policies(data: Mapping[str, Any]) -> str:
    pols = [p for p in data.get("policies", ()) if isinstance(p, Mapping)]
    if not pols:
        out = "No authorization policies found.\n"
    else:
        out = table(
            ["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE", "DRY-RUN", "STATUS"],
            sorted(
                [
                    str(p.get("namespace")),
                    str(p.get("name")),
                    str(p.get("action") or MISSING),
                    _scope(p),
                    "yes" if p.get("dryRun") else "no",
                    str(p.get("status")),
                ]
                for p in pols
            ),
        )
    peer = [p for p in data.get("peerAuthentications", ()) if isinstance(p, Mapping)]
    if peer:
        out += "\n" + table(
            ["NAMESPACE", "PEER AUTHENTICATION", "MODE", "STATUS"],
            sorted(
                [
                    str(p.get("namespace")),
                    str(p.get("name")),
                    str(p.get("mode") or MISSING),
                    str(p.get("status")),
                ]
                for p in peer
            ),
        )
    failed = [
        (f"{p.get('namespace')}/{p.get('name')}", w)
        for p in [*pols, *peer]
        for w in p.get("problems") or ()
    ]
    if failed:
        out += "\nFailed closed (denying every connection in their scope until fixed):\n"
        out += "".join(f"  {k}: {w}\n" for k, w in sorted(failed))
    warnings = [
        f"  {p.get('namespace')}/{p.get('name')}: {w}"
        for p in pols
        for w in p.get("warnings") or ()
    ]
    if warnings:
        out += "\nWarnings:\n" + "\n".join(warnings) + "\n"
    return out


# ---- explain -----------------------------------------------------------------------------------


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _pod_ref(ref: str, default_ns: str) -> tuple[str, str]:
    ns, sep, name = ref.partition("/")
    return (ns, name) if sep else (default_ns, ref)


def _pods(snap: Snapshot) -> dict[tuple[str, str], Obj]:
    return {key_of(p): p for p in snap.of("pods")}


def source_workload(snap: Snapshot, mesh: Mesh, ref: str, default_ns: str) -> Workload:
    """SRC: `namespace/pod`, a pod name (in `default_ns`), or a pod IP."""
    ip = _ip(ref)
    if ip is not None:
        found = [w for w in mesh.state.workloads if ip in w.ips]
        if not found:
            raise ViewError(f"no workload of the mesh config has IP {ip}")
        return found[0]
    ns, name = _pod_ref(ref, default_ns)
    for w in mesh.state.workloads:
        if w.namespace == ns and w.name == name:
            return w
    if (ns, name) in _pods(snap):
        raise ViewError(
            f"pod {ns}/{name} is not a workload of the mesh config (no IP yet, host network, "
            "or ended)"
        )
    raise ViewError(f"no pod {ns}/{name}")


def _first_container_port(pod: Obj) -> int | None:
    for c in _dict(pod.get("spec")).get("containers") or ():
        for p in _dict(c).get("ports") or ():
            port = _dict(p).get("containerPort")
            if isinstance(port, int):
                return port
    return None


def _service_port(svc: Obj) -> int | None:
    for p in _dict(svc.get("spec")).get("ports") or ():
        port = _dict(p).get("port")
        if isinstance(port, int):
            return port
    return None


def destination(snap: Snapshot, ref: str, default_ns: str, source_ns: str) -> str:
    """DST[:PORT] as the tunnel's explain takes it (`host or ip:port`). DST: `namespace/pod`,
    a pod name (in `default_ns`), an IP, or a service (`svc`, `svc.ns`, its FQDN, its
    ClusterIP). Without a port: the service's first port, or the pod's first container
    port."""
    host, port = ref, None
    if ref.startswith("["):
        close = ref.find("]")
        host, rest = ref[: close + 1], ref[close + 1 :]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif ref.count(":") == 1:
        h, _, p = ref.partition(":")
        if not p.isdigit():
            raise ViewError(f"destination {ref!r}: the port must be a number")
        host, port = h, int(p)
    pods = _pods(snap)
    services = {key_of(s): s for s in snap.of("services")}
    ip = _ip(host)
    pod: Obj | None = None
    svc: Obj | None = None
    if ip is not None:
        pod = next((p for p in pods.values() if str(ip) in pod_ips(p)), None)
        svc = next(
            (s for s in services.values() if str(ip) in _service_ips(s)),
            None,
        )
    elif "/" in host or ("." not in host and (default_ns, host) in pods):
        pod = pods.get(_pod_ref(host, default_ns))
        if pod is None:
            raise ViewError(f"no pod {'/'.join(_pod_ref(host, default_ns))}")
        ips = pod_ips(pod)
        if not ips:
            raise ViewError(f"pod {'/'.join(key_of(pod))} has no IP yet")
        host = f"[{ips[0]}]" if ":" in ips[0] else ips[0]
    else:
        name, _, rest = host.partition(".")
        svc = services.get((rest.split(".", 1)[0] if rest else source_ns, name))
    if port is None:
        port = _service_port(svc) if svc is not None else None
        if port is None and pod is not None:
            port = _first_container_port(pod)
        if port is None:
            raise ViewError(f"destination {ref!r}: give a port (DST:PORT)")
    return f"{host}:{port}"


def _service_ips(svc: Obj) -> list[str]:
    spec = _dict(svc.get("spec"))
    return [str(i) for i in [spec.get("clusterIP"), *(spec.get("clusterIPs") or ())] if i]


def explain(snap: Snapshot, mesh: Mesh, src: str, dst: str, default_ns: str) -> dict[str, Any]:
    """The tunnel's own `explain` on the computed mesh config, plus capture: whether the node
    agent has captured each end (what the config alone cannot say)."""
    source = source_workload(snap, mesh, src, default_ns)
    target = destination(snap, dst, default_ns, source.namespace)
    pods = _pods(snap)

    def captured(w: Workload) -> bool:
        pod = pods.get((w.namespace, w.name))
        return pod is not None and annotated(pod)

    def in_process(a: Workload, b: Workload) -> bool:
        # What the source node's tunnel does: it joins a pair it serves both ends of.
        return a.node == b.node and captured(b)

    try:
        doc = zx.explain(mesh.state, mesh.policies, f"{source.namespace}/{source.name}", target,
                         in_process)  # fmt: skip
    except ValueError as e:
        raise ViewError(str(e)) from None
    doc["destination"]["input"] = dst  # as the user wrote it ("via" says what it became)
    doc["capture"] = {"source": captured(source)}
    return doc


def waypoint_gateway(snap: Snapshot, mesh: Mesh, binding: str) -> tuple[str, str]:
    """The (namespace, name) of the waypoint a binding names as the tunnel prints it. On
    Kubernetes a waypoint's address is its Service's ClusterIP ("/10.96.0.30"), which
    `waypoint.explain.gateway_of` (made for pod addresses) does not know."""
    ip = _ip(binding.rsplit("/", 1)[-1].rsplit(":", 1)[0] if "[" not in binding else
             binding.split("[", 1)[1].split("]", 1)[0])  # fmt: skip
    key = waypoint_names(snap).get(str(ip)) if ip is not None else None
    if key is not None:
        ns, _, name = key.partition("/")
        return ns, name
    try:
        return wx.gateway_of(mesh.state, binding)
    except wx.ExplainError as e:
        raise ViewError(str(e)) from None


def default_authority(ref: str, doc: Mapping[str, Any]) -> str:
    """The Host an `--http` probe is sent with: the destination as written, with the port
    explain chose when it has none; a pod's address when it names a pod."""
    dst = _dict(doc.get("destination"))
    ip, port = str(dst.get("ip")), dst.get("port")
    if ref.startswith("["):  # [v6] or [v6]:port
        return ref if "]:" in ref else f"{ref}:{port}"
    if ref.count(":") > 1:  # a bare IPv6 address
        return f"[{ref}]:{port}"
    host, _, given = ref.partition(":")
    if dst.get("via") == "address" and _ip(host) is None:  # a pod, by name
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return f"{host}:{given or port}"


def render_explain_kube(doc: Mapping[str, Any]) -> str:
    text = render_explain(doc)
    src = _dict(doc.get("source"))
    enrolled = src.get("enrolled")
    captured = _dict(doc.get("capture")).get("source")
    if enrolled and captured:
        line = "the source is captured by its node agent"
    elif enrolled:
        line = (
            "the source is in the mesh by its labels but its node agent has not captured it "
            f"yet (no {REDIRECTION_ANNOTATION}=enabled): its traffic leaves without the tunnel"
        )
    else:
        line = "the source is not in the mesh (istio.io/dataplane-mode)"
    return text + f"Capture:      {line}\n"


# ---- waypoints ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaypointRow:
    namespace: str
    name: str
    waypoint_for: str
    address: str
    programmed: str  # True | False | Unknown (no status yet)
    reason: str
    message: str
    replicas: int
    ready_replicas: int
    deployment: bool

    @property
    def ready(self) -> bool:
        return self.programmed == "True" and self.deployment and self.ready_replicas > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "for": self.waypoint_for,
            "address": self.address or None,
            "programmed": self.programmed,
            "reason": self.reason,
            "message": self.message,
            "deployment": {
                "found": self.deployment,
                "replicas": self.replicas,
                "readyReplicas": self.ready_replicas,
            },
            "ready": self.ready,
        }


def is_waypoint(obj: Obj) -> bool:
    return _dict(obj.get("spec")).get("gatewayClassName") == WAYPOINT_CLASS


def waypoint_rows(gateways: Sequence[Obj], deployments: Sequence[Obj]) -> list[WaypointRow]:
    """Each waypoint Gateway with its Programmed condition (the control plane's) and its
    Deployment's readiness."""
    deps = {key_of(d): d for d in deployments}
    rows = []
    for g in gateways:
        if not is_waypoint(g):
            continue
        st = _dict(g.get("status"))
        cond = next(
            (_dict(c) for c in st.get("conditions") or () if _dict(c).get("type") == "Programmed"),
            None,
        )
        addresses = [_dict(a).get("value") for a in st.get("addresses") or ()]
        dep = deps.get(key_of(g))
        dspec, dst = _dict((dep or {}).get("spec")), _dict((dep or {}).get("status"))
        programmed = str(cond.get("status")) if cond is not None else "Unknown"
        reason = str(cond.get("reason", "")) if cond is not None else "Pending"
        message = (
            str(cond.get("message", ""))
            if cond is not None
            else "the control plane has not written a status (is istiod running?)"
        )
        if dep is None and programmed != "True":
            message = message or "no Deployment for it yet"
        rows.append(
            WaypointRow(
                namespace=_namespace(g),
                name=_name(g),
                waypoint_for=labels(g).get(gw.WAYPOINT_FOR_LABEL, gw.DEFAULT_WAYPOINT_FOR),
                address=next((str(a) for a in addresses if a), ""),
                programmed=programmed,
                reason=reason,
                message=message,
                replicas=_int(dspec.get("replicas")) if dep is not None else 0,
                ready_replicas=_int(dst.get("readyReplicas")),
                deployment=dep is not None,
            )
        )
    return sorted(rows, key=lambda r: (r.namespace, r.name))


def render_waypoint_list(rows: Sequence[WaypointRow], with_namespace: bool) -> str:
    if not rows:
        return "No waypoints found.\n"
    headers = ["NAME", "FOR", "ADDRESS", "PROGRAMMED", "READY"]
    out = []
    for r in rows:
        row = [
            r.name,
            r.waypoint_for,
            r.address or MISSING,
            r.programmed,
            f"{r.ready_replicas}/{r.replicas}" if r.deployment else MISSING,
        ]
        out.append([r.namespace, *row] if with_namespace else row)
    return table(["NAMESPACE", *headers] if with_namespace else headers, out)


def render_waypoint_status(rows: Sequence[WaypointRow]) -> str:
    return table(
        ["NAMESPACE", "NAME", "PROGRAMMED", "DEPLOYMENT", "REASON", "MESSAGE"],
        [
            [
                r.namespace,
                r.name,
                r.programmed,
                f"{r.ready_replicas}/{r.replicas} ready" if r.deployment else "none",
                r.reason or MISSING,
                r.message or MISSING,
            ]
            for r in rows
        ],
    )


def waypoint_resource(name: str, namespace: str, waypoint_for: str) -> dict[str, Any]:
    """The Gateway `istioctl waypoint apply` creates (class istio-waypoint, listener
    mesh/15008/HBONE)."""
    return gw.waypoint_resource(name, namespace, waypoint_for)
