"""A running cluster's records, and the mesh config generated from them.

Records, under `<state>/mesh` (what a Kubernetes API server would store):
- `pods.json`: the pod source the node agents watch (namespaces and pods with labels);
- `policies.json`: the AuthorizationPolicy / PeerAuthentication resources in force;
- `resources.json`: the L7 resources in force (HTTPRoute, GRPCRoute, VirtualService,
  DestinationRule, RequestAuthentication, Gateways of other classes), for the waypoints;
- `gateways.json`: the waypoint Gateways, each with its placement (node, pod IP, VIP, slot);
- `services.json`: the labels of each Service (`istio.io/use-waypoint` binds it at runtime).

The mesh config the tunnels read (`xds.yaml`, LOCAL_XDS_PATH) is always generated whole
from the cluster file and these records, never edited in place. Every record is checked
before it is written (labels by the agents' parser, policies by the tunnels' parsers), so
the generated file never carries a document a tunnel refuses; and a bad hand edit of
`xds.yaml` is undone by the next change made through the records. Read-modify-write of the
records happens under `records_lock`, so two commands at once cannot lose a change.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from localcluster import appstatus
from localcluster import gateways as gw
from localcluster.network import NetworkLayout
from localcluster.spec import ClusterSpec, NamespaceSpec, PodSpec
from localcluster.xds import local_xds, workload_uid
from redirect.enrolment import PodInfo, pod_doc


@dataclass(frozen=True, slots=True)
class MeshPaths:
    root: Path

    @property
    def xds(self) -> Path:
        return self.root / "xds.yaml"

    @property
    def ca_socket(self) -> Path:
        return self.root / "ca.sock"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens.yaml"

    def token(self, node: str) -> Path:
        return self.root / f"token-{node}"

    @property
    def pods(self) -> Path:
        """The pod source every node agent watches (namespaces and pods with labels)."""
        return self.root / "pods.json"

    @property
    def policies(self) -> Path:
        """The policy resources in force (the record the mesh config's `policies` come from)."""
        return self.root / "policies.json"

    @property
    def resources(self) -> Path:
        """The L7 resources in force (the mesh config's `resources` come from it)."""
        return self.root / "resources.json"

    @property
    def gateways(self) -> Path:
        """The waypoint Gateways, with where each one runs."""
        return self.root / "gateways.json"

    @property
    def service_labels(self) -> Path:
        """Each Service's labels ("ns/name" -> labels), once one has been labelled."""
        return self.root / "services.json"

    @property
    def lock(self) -> Path:
        return self.root / "records.lock"

    def zds_socket(self, node: str) -> Path:
        return self.root / f"zds-{node}.sock"

    def agent_status(self, node: str) -> Path:
        return self.root / f"agent-{node}.json"

    @property
    def redirect_mode(self) -> Path:
        """The capture mode the cluster's agents run in (restarts keep it)."""
        return self.root / "redirect-mode"


def write_file(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)  # atomic: a watcher never sees half a file


@contextmanager
def records_lock(paths: MeshPaths) -> Iterator[None]:
    """Held across a read-modify-write of the records and the regenerated mesh config."""
    with open(paths.lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ---- the mesh config ----------------------------------------------------------------------


def write_mesh_config(
    spec: ClusterSpec,
    paths: MeshPaths,
    policies: Sequence[Mapping[str, Any]] | None = None,
    resources: Sequence[Mapping[str, Any]] = (),
    not_ready: frozenset[tuple[str, str]] = frozenset(),
) -> str:
    """Generate the mesh config from `spec` (with the labels and waypoints in force), the
    policies (default: the cluster file's), the L7 resources and the pods whose app is not
    running. Returns the SHA-256 of the bytes written: the digest a tunnel reports once it
    runs them."""
    doc = local_xds(spec, policies, resources, not_ready)
    data = yaml.safe_dump(doc, sort_keys=False).encode()
    write_file(paths.xds, data)
    return hashlib.sha256(data).hexdigest()


def config_digest(paths: MeshPaths) -> str | None:
    try:
        return hashlib.sha256(paths.xds.read_bytes()).hexdigest()
    except OSError:
        return None


# ---- policies -----------------------------------------------------------------------------


def read_policy_records(spec: ClusterSpec, paths: MeshPaths) -> list[dict[str, Any]]:
    """The policy resources in force; before any apply, the cluster file's."""
    try:
        doc = json.loads(paths.policies.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [json.loads(p) for p in spec.policies]
    if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
        raise ValueError(f"{paths.policies}: not a list of policy resources")
    return doc


def write_policy_records(paths: MeshPaths, docs: Sequence[Mapping[str, Any]]) -> None:
    write_file(paths.policies, json.dumps([dict(d) for d in docs], indent=1) + "\n")


def read_resource_records(paths: MeshPaths) -> list[dict[str, Any]]:
    """The L7 resources in force (none before the first apply)."""
    return _read_list(paths.resources, "L7 resources")


def write_resource_records(paths: MeshPaths, docs: Sequence[Mapping[str, Any]]) -> None:
    write_file(paths.resources, json.dumps([dict(d) for d in docs], indent=1) + "\n")


def _read_list(path: Path, what: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
        raise ValueError(f"{path}: not a list of {what}")
    return doc


# ---- waypoints and service labels ----------------------------------------------------------


def read_gateway_records(spec: ClusterSpec, paths: MeshPaths) -> list[gw.GatewaySpec]:
    """The waypoint Gateways in force; before any change, the cluster file's."""
    if not paths.gateways.exists():
        return list(spec.gateways)
    out = []
    for i, record in enumerate(_read_list(paths.gateways, "gateway records")):
        try:
            out.append(gw.from_record(record, f"{paths.gateways}[{i}]"))
        except gw.GatewayError as e:
            raise ValueError(str(e)) from None
    return out


def write_gateway_records(paths: MeshPaths, gateways: Sequence[gw.GatewaySpec]) -> None:
    records = [gw.to_record(g) for g in gw.sorted_gateways(gateways)]
    write_file(paths.gateways, json.dumps(records, indent=1) + "\n")


def read_service_labels(paths: MeshPaths) -> dict[str, dict[str, str]]:
    try:
        doc = json.loads(paths.service_labels.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"{paths.service_labels}: not a map of service labels")
    return {str(k): dict(v) for k, v in doc.items() if isinstance(v, dict)}


def write_service_labels(paths: MeshPaths, labels: Mapping[str, Mapping[str, str]]) -> None:
    doc = {k: dict(v) for k, v in sorted(labels.items())}
    write_file(paths.service_labels, json.dumps(doc, indent=1, sort_keys=True) + "\n")


# ---- the pod source (what the node agents watch) --------------------------------------------


def pod_info(spec: ClusterSpec, layout: NetworkLayout, pod: PodSpec) -> PodInfo:
    return PodInfo(
        uid=workload_uid(spec, pod),
        name=pod.name,
        namespace=pod.namespace,
        node=pod.node,
        service_account=pod.service_account,
        ip=pod.ip,
        netns=layout.pod(pod.namespace, pod.name).netns_path,
        labels=pod.labels,
    )


def pod_source_doc(spec: ClusterSpec, layout: NetworkLayout) -> dict[str, Any]:
    """The pod source document for the whole cluster (pure)."""
    return {
        "version": 1,
        "namespaces": {ns.name: {"labels": dict(ns.labels)} for ns in spec.namespaces},
        "pods": [pod_doc(pod_info(spec, layout, p)) for p in spec.pods],
    }


def write_pod_source(paths: MeshPaths, doc: dict[str, Any]) -> None:
    write_file(paths.pods, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def read_pod_source(paths: MeshPaths) -> dict[str, Any]:
    doc = json.loads(paths.pods.read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{paths.pods}: not a pod source document")
    return doc


def current_spec(spec: ClusterSpec, paths: MeshPaths) -> ClusterSpec:
    """The cluster file's spec with the labels and waypoints in force now (from the pod
    source file, the service labels and the gateway records)."""
    try:
        service_labels = read_service_labels(paths)
        gateways = tuple(read_gateway_records(spec, paths))
    except (OSError, ValueError):
        service_labels, gateways = {}, spec.gateways
    services = tuple(
        dataclasses.replace(s, labels=MappingProxyType(service_labels[f"{s.namespace}/{s.name}"]))
        if f"{s.namespace}/{s.name}" in service_labels
        else s
        for s in spec.services
    )
    spec = dataclasses.replace(spec, services=services, gateways=gateways)
    try:
        doc = read_pod_source(paths)
    except (OSError, ValueError):
        return spec
    ns_labels = {
        name: dict(entry.get("labels") or {})
        for name, entry in (doc.get("namespaces") or {}).items()
    }
    pod_labels = {
        (p["namespace"], p["name"]): dict(p.get("labels") or {}) for p in doc.get("pods") or []
    }
    namespaces = tuple(
        NamespaceSpec(ns.name, MappingProxyType(ns_labels.get(ns.name, dict(ns.labels))))
        for ns in spec.namespaces
    )
    pods = tuple(
        dataclasses.replace(
            p, labels=MappingProxyType(pod_labels.get((p.namespace, p.name), dict(p.labels)))
        )
        for p in spec.pods
    )
    return dataclasses.replace(spec, namespaces=namespaces, pods=pods)


def not_ready(paths: MeshPaths) -> frozenset[tuple[str, str]]:
    """The pods whose app is not running, by the pod supervisor's record (beside `mesh/`)."""
    return appstatus.not_ready(appstatus.read(paths.root.parent))


def regenerate(spec: ClusterSpec, paths: MeshPaths) -> str:
    """The mesh config from the records, whole; the caller holds `records_lock`."""
    return write_mesh_config(
        current_spec(spec, paths),
        paths,
        read_policy_records(spec, paths),
        read_resource_records(paths),
        not_ready(paths),
    )
