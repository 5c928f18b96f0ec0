"""The mesh computed from Kubernetes objects: the informers' caches -> the LOCAL_XDS document
(`meshcore.discovery` parses it to a `MeshState`, so the same validation applies). Pure: no I/O,
table-tested.

Invariants:
- the output is deterministic (sorted by namespace/name), so an unchanged cluster gives the
  same bytes and nothing is pushed;
- one bad object never stops the others: it is left out or kept as written, and reported
  as a `Problem` (its status, an Event or a log line says so);
- a bad object never widens what is in force. AuthorizationPolicy and PeerAuthentication go
  into `policies` verbatim even when they do not parse: the tunnels and waypoints then
  enforce their fail-closed stand-in (deny everything in the policy's scope), exactly as for
  the local file. A waypoint binding to a missing or unusable waypoint is still written as
  a hostname that resolves to nothing, so the tunnels refuse that traffic;
- if the document would still be refused as a whole (a rule the per-object checks do not
  foresee), the entries the parser refuses are dropped one by one and reported, and the rest
  is kept (`build_state`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controlplane import endpoints as ep
from controlplane.bindings import WAYPOINT_FOR_LABEL, UseWaypoint, accepts, use_waypoint
from controlplane.endpoints import Obj, Problem, key_of, labels, meta
from controlplane.waypoints import (
    GATEWAY_NAME_LABEL,
    MANAGED_LABEL,
    MANAGED_VALUE,
    WaypointGateway,
    is_waypoint_gateway,
    read_gateway,
)
from meshcore.defaults import HBONE_PORT, ROOT_NAMESPACE, TRUST_DOMAIN
from meshcore.discovery import parse_local_config
from meshcore.policy.validate import check_resource
from meshcore.state import MeshConfigError, MeshState
from waypoint.authn.parse import validate_request_authentication
from waypoint.authz.parse import validate_policy
from waypoint.routes.validate import validate_resource

DEFAULT_CLUSTER_ID = "Kubernetes"
DEFAULT_DOMAIN = "cluster.local"
RESOURCES_KEY = "resources"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute", "VirtualService", "DestinationRule")


def _document_takes_service_entries() -> bool:
    """Does the mesh config carry ServiceEntries (among `resources`) in this version of the
    mesh? Asked of the parser itself, once, with a minimal valid entry: until it does, the
    parser refuses the kind, and the entries are kept aside (`Computed.service_entries`)."""
    probe = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "probe", "namespace": "probe"},
        "spec": {
            "hosts": ["probe.example"],
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
            "resolution": "NONE",
        },
    }
    try:
        parse_local_config(json.dumps({RESOURCES_KEY: [probe]}))
    except MeshConfigError:
        return False
    return True


SERVICE_ENTRIES_IN_DOCUMENT = _document_takes_service_entries()


@dataclass(frozen=True, slots=True)
class Inputs:
    """The objects the compute reads, as the informers hold them (dicts)."""

    namespaces: Sequence[Obj] = ()
    pods: Sequence[Obj] = ()
    services: Sequence[Obj] = ()
    service_entries: Sequence[Obj] = ()
    authorization_policies: Sequence[Obj] = ()
    peer_authentications: Sequence[Obj] = ()
    request_authentications: Sequence[Obj] = ()
    gateways: Sequence[Obj] = ()
    http_routes: Sequence[Obj] = ()
    grpc_routes: Sequence[Obj] = ()
    destination_rules: Sequence[Obj] = ()
    virtual_services: Sequence[Obj] = ()
    cluster_id: str = DEFAULT_CLUSTER_ID
    trust_domain: str = TRUST_DOMAIN
    domain: str = DEFAULT_DOMAIN
    root_namespace: str = ROOT_NAMESPACE


@dataclass(frozen=True, slots=True)
class Computed:
    document: dict[str, Any]
    problems: tuple[Problem, ...]
    # ServiceEntries, verbatim, while the mesh config cannot carry them
    # (`SERVICE_ENTRIES_IN_DOCUMENT`); else they are among the document's `resources`.
    service_entries: tuple[dict[str, Any], ...] = ()
    waypoints: tuple[WaypointGateway, ...] = field(default=())


def clean(obj: Obj) -> dict[str, Any]:
    """The object as a user wrote it: apiVersion, kind, metadata (name, namespace, labels,
    annotations; not the server's bookkeeping or kubectl's last-applied copy) and spec."""
    m = meta(obj)
    out_meta: dict[str, Any] = {"name": m.get("name"), "namespace": m.get("namespace")}
    if isinstance(m.get("labels"), Mapping) and m["labels"]:
        out_meta["labels"] = dict(m["labels"])
    annotations = m.get("annotations")
    if isinstance(annotations, Mapping):
        kept = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
        if kept:
            out_meta["annotations"] = kept
    out: dict[str, Any] = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": out_meta,
    }
    if "spec" in obj:
        out["spec"] = obj["spec"]
    return out


class _Compute:
    def __init__(self, inputs: Inputs) -> None:
        self.inputs = inputs
        self.problems: list[Problem] = []
        self.ns_labels = {ep.name_of(n): labels(n) for n in inputs.namespaces}
        self.waypoints = {
            (g.namespace, g.name): g
            for g in (read_gateway(o) for o in inputs.gateways if is_waypoint_gateway(o))
        }
        for g in self.waypoints.values():
            if g.problem is not None:
                self.problems.append(Problem("Gateway", g.namespace, g.name, g.problem))
        # A waypoint's address is its own Service's ClusterIP.
        self.waypoint_vips: dict[tuple[str, str], str] = {}
        for svc in inputs.services:
            owner = labels(svc).get(GATEWAY_NAME_LABEL)
            key = key_of(svc)
            if owner == key[1] and key in self.waypoints:
                vips = ep.service_vips(svc)
                if vips:
                    self.waypoint_vips[key] = vips[0]

    def report(self, kind: str, obj: Obj, message: str) -> None:
        ns, name = key_of(obj)
        self.problems.append(Problem(kind, ns, name, message))

    # ---- waypoint bindings --------------------------------------------------------------

    def _address(self, ref: UseWaypoint, fail_open: bool) -> dict[str, Any]:
        vip = self.waypoint_vips.get((ref.namespace, ref.name))
        out: dict[str, Any]
        if vip is not None:
            out = {"address": vip, "hboneMtlsPort": HBONE_PORT}
        else:
            # Not deployed yet (or gone): a hostname no service has, so the tunnels refuse
            # the traffic rather than skip the waypoint.
            host = f"{ref.namespace}/{ref.name}.{ref.namespace}.svc.{self.inputs.domain}"
            out = {"hostname": host, "hboneMtlsPort": HBONE_PORT}
        if fail_open:
            out["failOpen"] = True
        return out

    def _bind(self, obj: Obj, source: str, traffic: str) -> dict[str, Any] | None:
        """The waypoint of a service (`source` "service") or pod ("pod"), or None."""
        ns = ep.namespace_of(obj)
        kind = "Service" if source == "service" else "Pod"
        ref = use_waypoint(labels(obj), self.ns_labels.get(ns, {}), ns, source)
        if ref is None:
            return None
        gw = self.waypoints.get((ref.namespace, ref.name))
        where = f"{ref.source} label {ref.namespace}/{ref.name}"
        if gw is None or gw.problem is not None:
            if traffic == "workload" and ref.source != "pod":
                # A namespace binding to a missing waypoint: a waypoint is for service
                # traffic by default, so its workloads are not bound (its services are).
                return None
            self.report(kind, obj, f"{where}: no usable waypoint; its traffic is refused")
            return self._address(ref, False)
        if not gw.allowed.allows(ref.namespace, ns, self.ns_labels.get(ns, {})):
            if ref.source == source or traffic == "service":
                self.report(
                    kind,
                    obj,
                    f"{where}: the waypoint does not take namespace {ns}: "
                    f"{gw.allowed.describe()}; not bound",
                )
            return None
        if not accepts(gw.waypoint_for, traffic):
            if ref.source == source:
                self.report(
                    kind,
                    obj,
                    f"{where}: the waypoint is for {gw.waypoint_for!r} traffic, not "
                    f"{traffic} traffic (label {WAYPOINT_FOR_LABEL}); not bound",
                )
            return None
        return self._address(ref, gw.fail_open)

    def _is_waypoint(self, obj: Obj) -> bool:
        """A waypoint's own pod or Service (also while its Gateway is being deleted)."""
        lb = labels(obj)
        owner = lb.get(GATEWAY_NAME_LABEL)
        if owner is None:
            return False
        return lb.get(MANAGED_LABEL) == MANAGED_VALUE or (
            (ep.namespace_of(obj), owner) in self.waypoints
        )

    # ---- workloads and services ---------------------------------------------------------

    def endpoints(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        pods, dropped = ep.unique_by_ip(self.inputs.pods)
        self.problems.extend(dropped)
        services = sorted(filter(ep.published, self.inputs.services), key=key_of)
        index = ep.PodIndex(pods)
        selected = {key_of(s): index.selected(s) for s in services}
        member_of: dict[tuple[str, str], list[Obj]] = {}
        for svc in services:
            for p in selected[key_of(svc)]:
                member_of.setdefault(key_of(p), []).append(svc)
        service_docs = []
        for svc in services:
            doc: dict[str, Any] = {
                "name": ep.name_of(svc),
                "namespace": ep.namespace_of(svc),
                "hostname": ep.hostname(svc, self.inputs.domain),
                "vips": ep.service_vips(svc),
                "ports": ep.service_ports(
                    svc, selected[key_of(svc)], functools.partial(self.report, "Service", svc)
                ),
                "subjectAltNames": [],
            }
            # A waypoint's own Service is never sent to a waypoint.
            waypoint = None if self._is_waypoint(svc) else self._bind(svc, "service", "service")
            if waypoint is not None:
                doc["waypoint"] = waypoint
            service_docs.append(doc)
        workload_docs = [self._workload(p, member_of.get(key_of(p), [])) for p in pods]
        return workload_docs, service_docs

    def _workload(self, pod: Obj, services: list[Obj]) -> dict[str, Any]:
        ns, name = key_of(pod)
        is_waypoint = self._is_waypoint(pod)
        hbone = is_waypoint or ep.enrolled(pod, self.ns_labels.get(ns, {}))
        sp = ep.spec(pod)
        own: dict[str, Any] = {}
        for svc in services:
            own[f"{ns}/{ep.hostname(svc, self.inputs.domain)}"] = ep.workload_ports(svc, pod)
        out: dict[str, Any] = {
            "uid": f"{self.inputs.cluster_id}//Pod/{ns}/{name}",
            "name": name,
            "namespace": ns,
            "serviceAccount": str(sp.get("serviceAccountName") or ep.DEFAULT_SERVICE_ACCOUNT),
            "trustDomain": self.inputs.trust_domain,
            "workloadIps": ep.pod_ips(pod),
            "protocol": "HBONE" if hbone else "TCP",
            "node": str(sp.get("nodeName") or ""),
            "canonicalName": ep.canonical_name(pod),
            "canonicalRevision": ep.canonical_revision(pod),
            "workloadName": ep.workload_name(pod),
            "workloadType": "pod",
            "clusterId": self.inputs.cluster_id,
            "status": "Healthy" if ep.is_ready(pod) else "Unhealthy",
            "services": own,
            "labels": labels(pod),
        }
        waypoint = None if is_waypoint else self._bind(pod, "pod", "workload")
        if waypoint is not None:
            out["waypoint"] = waypoint
        return out

    # ---- policies and L7 resources ------------------------------------------------------

    def policies(self) -> list[dict[str, Any]]:
        root = self.inputs.root_namespace
        out = []
        for kind, objs in (
            ("AuthorizationPolicy", self.inputs.authorization_policies),
            ("PeerAuthentication", self.inputs.peer_authentications),
        ):
            for obj in sorted(objs, key=key_of):
                doc = clean(obj)
                errors = list(check_resource(doc, root, "spec").errors)
                targeted = "targetRef" in ep.spec(obj) or "targetRefs" in ep.spec(obj)
                if kind == "AuthorizationPolicy" and targeted and not errors:
                    errors = validate_policy(doc, root, ep.namespace_of(obj))
                for e in errors:
                    self.report(kind, obj, f"{e}; enforced as deny-all in its scope")
                out.append(doc)  # kept even when bad: the data path enforces its stand-in
        return out

    def resources(self) -> list[dict[str, Any]]:
        root = self.inputs.root_namespace
        out = []
        groups: tuple[tuple[str, Sequence[Obj]], ...] = (
            ("HTTPRoute", self.inputs.http_routes),
            ("GRPCRoute", self.inputs.grpc_routes),
            ("VirtualService", self.inputs.virtual_services),
            ("DestinationRule", self.inputs.destination_rules),
            ("RequestAuthentication", self.inputs.request_authentications),
            ("Gateway", self.inputs.gateways),
        )
        for kind, objs in groups:
            for obj in sorted(objs, key=key_of):
                doc = clean(obj)
                if kind in ROUTE_KINDS:
                    errors = validate_resource(doc)
                elif kind == "RequestAuthentication":
                    errors = validate_request_authentication(doc, root, ep.namespace_of(obj))
                else:
                    errors = []
                for e in errors:
                    self.report(kind, obj, e)
                out.append(doc)  # the waypoint keeps what it can and reports the rest
        if SERVICE_ENTRIES_IN_DOCUMENT:
            out.extend(clean(o) for o in sorted(self.inputs.service_entries, key=key_of))
        return out


def compute(inputs: Inputs) -> Computed:
    """The LOCAL_XDS document for these objects, with what is wrong with them."""
    c = _Compute(inputs)
    workloads, services = c.endpoints()
    document: dict[str, Any] = {
        "workloads": workloads,
        "services": services,
        "policies": c.policies(),
    }
    resources = c.resources()
    if resources:
        document[RESOURCES_KEY] = resources
    entries: tuple[dict[str, Any], ...] = ()
    if not SERVICE_ENTRIES_IN_DOCUMENT:
        entries = tuple(clean(o) for o in sorted(inputs.service_entries, key=key_of))
    return Computed(
        document=document,
        problems=tuple(c.problems),
        service_entries=entries,
        waypoints=tuple(sorted(c.waypoints.values(), key=lambda g: g.key)),
    )


def dump(document: Mapping[str, Any]) -> str:
    """The document's bytes as written (JSON, which the tunnels parse much faster than YAML;
    sorted keys, so equal documents are equal text)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def _entry_problem(section: str, entry: Any, error: str) -> Problem:
    if section in ("workloads", "services"):
        kind = "Pod" if section == "workloads" else "Service"
        ns, name = str(entry.get("namespace", "")), str(entry.get("name", ""))
    else:
        m = entry.get("metadata") or {}
        kind = str(entry.get("kind", section))
        ns, name = str(m.get("namespace", "")), str(m.get("name", ""))
    return Problem(kind, ns, name, f"left out of the mesh config: {error}")


def build_state(document: dict[str, Any]) -> tuple[dict[str, Any], MeshState, list[Problem]]:
    """Parse the document as the tunnels will. If it is refused whole, drop each entry that
    is refused on its own (reported), then parse again: one bad object never stops the rest.
    Returns the document actually written, its state and the entries dropped."""
    built = build_written(document)
    return built.document, built.state, built.problems


@dataclass(frozen=True, slots=True)
class Built:
    document: dict[str, Any]  # what is written: the computed one, less entries refused alone
    text: str  # `dump(document)`, the bytes that were parsed (and are written as they are)
    state: MeshState
    problems: list[Problem]


def build_written(document: dict[str, Any]) -> Built:
    """`build_state`, keeping the text it parsed: at 10 000 pods that dump is 4 MB, and the
    control plane writes exactly it, so it is made once per round."""
    text = dump(document)
    try:
        return Built(document, text, parse_local_config(text), [])
    except MeshConfigError:
        pass
    problems: list[Problem] = []
    kept: dict[str, Any] = {}
    for section, entries in document.items():
        good = []
        for entry in entries:
            try:
                parse_local_config(dump({section: [entry]}))
                good.append(entry)
            except MeshConfigError as exc:
                problems.append(_entry_problem(section, entry, str(exc)))
        kept[section] = good
    text = dump(kept)
    try:
        return Built(kept, text, parse_local_config(text), problems)
    except MeshConfigError as exc:
        # Refused only in combination (e.g. two services claim one VIP): the caller keeps
        # the state in force and reports this.
        raise MeshConfigError(f"the computed mesh config is refused: {exc}") from exc
