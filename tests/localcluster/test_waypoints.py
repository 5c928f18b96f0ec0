"""Waypoints in the local cluster, pure parts: Gateways, placement, bindings, ports, L7 checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from localcluster import gateways as gw
from localcluster.policies import PolicyError, check_batch, validate_l7
from localcluster.spec import ClusterSpec, SpecError, parse_cluster, place_gateway
from localcluster.xds import binding_problems, local_xds, service_binding, workload_binding

BASE = """
name: wp
nodes: [{name: n1}, {name: n2}]
namespaces:
  - {name: shop, labels: {istio.io/dataplane-mode: ambient}}
  - {name: infra}
pods:
  - {name: web-0, namespace: shop, node: n1, labels: {app: web}, command: ["true"]}
services:
  - name: web
    namespace: shop
    selector: {app: web}
    ports: [{port: 80, targetPort: 8080, name: http-web, appProtocol: HTTP}]
"""


def gateway(
    name: str = "waypoint", ns: str = "shop", allowed: Any = None, **meta: Any
) -> dict[str, Any]:
    doc = gw.waypoint_resource(name, ns)
    doc["metadata"].update(meta)
    if allowed is not None:  # the listener's allowedRoutes.namespaces
        doc["spec"]["listeners"][0]["allowedRoutes"] = {"namespaces": allowed}
    return doc


ALL = {"from": "All"}


def spec_with(*gateways: dict[str, Any], extra: str = "") -> ClusterSpec:
    import yaml

    doc = yaml.safe_load(BASE + extra)
    doc["gateways"] = list(gateways)
    return parse_cluster(yaml.safe_dump(doc), Path("/"))


def relabel(
    spec: ClusterSpec,
    ns: dict[str, str] | None = None,
    svc: dict[str, str] | None = None,
    pod: dict[str, str] | None = None,
) -> ClusterSpec:
    base = {"istio.io/dataplane-mode": "ambient"}
    namespaces = tuple(
        dataclasses.replace(n, labels=MappingProxyType({**base, **(ns or {})}))
        if n.name == "shop"
        else n
        for n in spec.namespaces
    )
    services = tuple(
        dataclasses.replace(s, labels=MappingProxyType(svc or {})) for s in spec.services
    )
    pods = tuple(
        dataclasses.replace(p, labels=MappingProxyType({"app": "web", **(pod or {})}))
        for p in spec.pods
    )
    return dataclasses.replace(spec, namespaces=namespaces, services=services, pods=pods)


UW, UWN = "istio.io/use-waypoint", "istio.io/use-waypoint-namespace"
FOR = gw.WAYPOINT_FOR_LABEL


# (id, gateways, ns labels, service labels, pod labels, service -> , workload -> , problem)
BINDINGS = [
    ("no labels", [gateway()], {}, {}, {}, None, None, None),
    ("namespace label binds the service", [gateway()], {UW: "waypoint"}, {}, {},
     "shop/waypoint", None, None),
    ("namespace label, waypoint for all: both", [gateway(labels={FOR: "all"})],
     {UW: "waypoint"}, {}, {}, "shop/waypoint", "shop/waypoint", None),
    ("namespace label, waypoint for workload: the pod only",
     [gateway(labels={FOR: "workload"})], {UW: "waypoint"}, {}, {}, None, "shop/waypoint",
     "not service traffic"),
    ("service label beats the namespace's", [gateway(), gateway("other")],
     {UW: "waypoint"}, {UW: "other"}, {}, "shop/other", None, None),
    ("service none opts out of the namespace's", [gateway()], {UW: "waypoint"},
     {UW: "none"}, {}, None, None, None),
    ("namespace none binds nothing", [gateway()], {UW: "none"}, {}, {}, None, None, None),
    ("pod label needs workload or all", [gateway()], {}, {}, {UW: "waypoint"}, None, None,
     "not workload traffic"),
    ("pod label, waypoint for workload", [gateway(labels={FOR: "workload"})], {}, {},
     {UW: "waypoint"}, None, "shop/waypoint", None),
    ("pod none beats a namespace binding", [gateway(labels={FOR: "all"})], {UW: "waypoint"},
     {}, {UW: "none"}, "shop/waypoint", None, None),
    ("use-waypoint-namespace", [gateway("shared", "infra", ALL)], {},
     {UW: "shared", UWN: "infra"}, {}, "infra/shared", None, None),
    ("namespace's use-waypoint-namespace",
     [gateway("shared", "infra", ALL, labels={FOR: "all"})],
     {UW: "shared", UWN: "infra"}, {}, {}, "infra/shared", "infra/shared", None),
    ("another namespace's waypoint takes its own namespace only by default",
     [gateway("shared", "infra", labels={FOR: "all"})], {UW: "shared", UWN: "infra"}, {},
     {UW: "shared", UWN: "infra"}, None, None, "does not take namespace shop"),
    ("a selector naming the namespace",
     [gateway("shared", "infra", {"from": "Selector", "selector": {
         "matchLabels": {"kubernetes.io/metadata.name": "shop"}}})],
     {}, {UW: "shared", UWN: "infra"}, {}, "infra/shared", None, None),
    ("a selector by label that the namespace lacks",
     [gateway("shared", "infra", {"from": "Selector", "selector": {"matchExpressions": [
         {"key": "team", "operator": "In", "values": ["infra"]}]}})],
     {}, {UW: "shared", UWN: "infra"}, {}, None, None, "selector does not select"),
    ("a selector by label that the namespace has",
     [gateway("shared", "infra", {"from": "Selector", "selector": {"matchExpressions": [
         {"key": "team", "operator": "In", "values": ["infra", "shop"]}]}})],
     {"team": "shop"}, {UW: "shared", UWN: "infra"}, {}, "infra/shared", None, None),
    ("Same is the namespace's own", [gateway(allowed={"from": "Same"})], {UW: "waypoint"}, {},
     {}, "shop/waypoint", None, None),
    ("missing gateway: service still bound (fail closed)", [], {}, {UW: "ghost"}, {},
     "shop/ghost", None, "no waypoint shop/ghost"),
    ("missing gateway: pod still bound (fail closed)", [], {}, {}, {UW: "ghost"}, None,
     "shop/ghost", "no waypoint shop/ghost"),
    ("missing gateway by namespace: services only", [], {UW: "ghost"}, {}, {}, "shop/ghost",
     None, "no waypoint shop/ghost"),
    ("waypoint for none takes nothing", [gateway(labels={FOR: "none"})], {UW: "waypoint"}, {},
     {}, None, None, "not service traffic"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("gateways", "ns", "svc", "pod", "svc_to", "pod_to", "problem"),
    [b[1:] for b in BINDINGS],
    ids=[b[0] for b in BINDINGS],
)
def test_bindings(
    gateways: list[dict[str, Any]],
    ns: dict[str, str],
    svc: dict[str, str],
    pod: dict[str, str],
    svc_to: str | None,
    pod_to: str | None,
    problem: str | None,
) -> None:
    spec = relabel(spec_with(*gateways), ns, svc, pod)
    s = service_binding(spec, spec.service("shop", "web"))
    w = workload_binding(spec, spec.pod("shop", "web-0"))

    def to(b: Any) -> str | None:
        return None if b.waypoint is None else f"{b.waypoint.namespace}/{b.waypoint.name}"

    assert (to(s), to(w)) == (svc_to, pod_to)
    problems = binding_problems(spec)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("allowed", "message"),
    [
        ({"from": "Everyone"}, "is not Same, All or Selector"),
        ({"from": "Selector"}, "needs a selector"),
        (
            {
                "from": "Selector",
                "selector": {"matchExpressions": [{"key": "a", "operator": "Is"}]},
            },
            "operator 'Is'",
        ),
        (
            {
                "from": "Selector",
                "selector": {"matchExpressions": [{"key": "a", "operator": "In"}]},
            },
            "In takes values",
        ),
        ({"from": "Selector", "selector": {"matchLabels": {"a": 1}}}, "strings to strings"),
        ("All", "must be a mapping"),
    ],
)
def test_a_gateway_with_allowed_routes_not_understood_is_refused(
    allowed: Any, message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        spec_with(gateway(allowed=allowed))


def test_the_mesh_config_carries_bindings_the_waypoint_and_its_service() -> None:
    spec = relabel(
        spec_with(gateway(annotations={gw.FAIL_OPEN_ANNOTATION: "true"})), ns={UW: "waypoint"}
    )
    doc = local_xds(spec)
    web = next(s for s in doc["services"] if s["name"] == "web")
    assert web["waypoint"] == {
        "hostname": "shop/waypoint.shop.svc.cluster.local",
        "hboneMtlsPort": 15008,
        "failOpen": True,
    }
    assert web["ports"] == {80: {"targetPort": 8080, "name": "http-web", "appProtocol": "HTTP"}}
    wp_svc = next(s for s in doc["services"] if s["name"] == "waypoint")
    assert wp_svc["ports"] == {15008: 15008} and "waypoint" not in wp_svc
    wp = next(w for w in doc["workloads"] if w["name"] == "waypoint-0")
    assert wp["protocol"] == "HBONE"  # reached over HBONE, though never captured
    assert wp["serviceAccount"] == "waypoint"
    assert wp["labels"]["istio.io/dataplane-mode"] == "none"
    assert "waypoint" not in wp  # a namespace binding never binds the waypoint itself
    assert wp["services"] == {"shop/waypoint.shop.svc.cluster.local": {15008: 15008}}
    assert [r["kind"] for r in doc["resources"]] == ["Gateway"]


def test_without_waypoints_or_details_the_document_reads_as_before() -> None:
    doc = local_xds(
        parse_cluster(BASE.replace(", name: http-web, appProtocol: HTTP", ""), Path("/"))
    )
    assert "resources" not in doc
    assert doc["services"][0]["ports"] == {80: 8080}
    assert all("waypoint" not in s for s in doc["services"])


def test_placement_is_after_pods_and_services_and_recorded_slots_stay() -> None:
    spec = spec_with(gateway(), gateway("b"))
    a, b = spec.gateways
    assert a.placed() == gw.Placement("n1", a.placed().ip, a.placed().vip, 1)
    assert str(a.placed().ip) == "10.244.1.11" and str(b.placed().ip) == "10.244.1.12"
    assert str(a.placed().vip) == "10.96.0.11" and b.placed().slot == 2
    # Deleting the first keeps the second where it was; a new one takes the free slot.
    left = dataclasses.replace(spec, gateways=(b,))
    c = place_gateway(left, gw.parse_gateway(gateway("c"), "x"), "n1")
    assert c.placed().slot == 1 and c.placed().ip not in (b.placed().ip,)
    on_n2 = place_gateway(left, gw.parse_gateway(gateway("d"), "x"), "n2")
    assert (on_n2.placed().node, str(on_n2.placed().ip)) == ("n2", "10.244.2.10")
    with pytest.raises(SpecError, match="no node 'n9'"):
        place_gateway(left, gw.parse_gateway(gateway("e"), "x"), "n9")


def test_records_round_trip() -> None:
    (g,) = spec_with(gateway(labels={FOR: "all"})).gateways
    assert gw.from_record(gw.to_record(g), "r") == g


BAD_GATEWAYS = [
    ("wrong class", {"spec": {"gatewayClassName": "istio", "listeners": [gw.HBONE_LISTENER]}},
     "is not 'istio-waypoint'"),
    ("no listener", {"spec": {"gatewayClassName": "istio-waypoint", "listeners": []}},
     "exactly one listener"),
    ("wrong port", {"spec": {"gatewayClassName": "istio-waypoint",
                             "listeners": [{**gw.HBONE_LISTENER, "port": 80}]}},
     "listeners[0].port: 80 must be 15008"),
    ("unknown field", {"spec": {"gatewayClassName": "istio-waypoint",
                                "listeners": [gw.HBONE_LISTENER], "addresses": []}},
     "unknown field(s) addresses"),
    ("bad waypoint-for", {"metadata": {"name": "w", "labels": {FOR: "pods"}}},
     "'pods' is not one of"),
    ("bad fail-open", {"metadata": {"name": "w", "annotations": {gw.FAIL_OPEN_ANNOTATION: "yes"}}},
     'must be "true" or "false"'),
    ("bad name", {"metadata": {"name": "Way_Point"}}, "must be a DNS label"),
    ("bad apiVersion", {"apiVersion": "v1"}, "'v1' is not one of"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"), [b[1:] for b in BAD_GATEWAYS], ids=[b[0] for b in BAD_GATEWAYS]
)
def test_bad_gateways_are_refused_by_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(gw.GatewayError) as e:
        gw.parse_gateway({**gateway(), **change}, "g")
    assert message in str(e.value)


def test_gateway_defaults_and_status() -> None:
    g = gw.parse_gateway({**gateway(), "status": {"addresses": []}}, "g")
    assert (g.namespace, g.waypoint_for, g.fail_open) == ("shop", "service", False)
    assert "status" not in g.resource()
    placed = dataclasses.replace(g, placement=gw.Placement("n1", *_ips(), 1))
    st = gw.status(placed, gw.Readiness(False, "NotRunning", "the process is not running"))
    assert st["addresses"][0] == {"type": "IPAddress", "value": "10.96.0.20"}
    assert gw.condition(st, "Accepted")["status"] == "True"  # type: ignore[index]
    programmed = gw.condition(st, "Programmed")
    assert programmed is not None and (programmed["status"], programmed["reason"]) == (
        "False",
        "NotRunning",
    )
    nameless = gw.parse_gateway({**gateway(), "metadata": {"name": "w"}}, "g")
    assert nameless.namespace == "default"


def _ips() -> tuple[Any, Any]:
    from ipaddress import IPv4Address

    return IPv4Address("10.244.1.30"), IPv4Address("10.96.0.20")


GW_NOPE = (
    "{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway,"
    " metadata: {name: w, namespace: nope}, spec: {gatewayClassName: istio-waypoint,"
    " listeners: [{name: mesh, port: 15008, protocol: HBONE}]}}"
)
SPEC_ERRORS = [
    ("gateway in an unknown namespace", f"gateways: [{GW_NOPE}]",
     "no namespace 'nope'"),
    ("port name not a DNS label", "ports: [{port: 80, name: HTTP_web}]", "port name 'HTTP_web'"),
    ("duplicate port name", "ports: [{port: 80, name: web}, {port: 81, name: web}]",
     "duplicate port name 'web'"),
    ("unknown appProtocol", "ports: [{port: 80, appProtocol: gopher}]", "'gopher' is not one of"),
    ("node named like a waypoint netns", "nodes: [{name: n1-w1}]", "reserved"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fragment", "message"), [e[1:] for e in SPEC_ERRORS], ids=[e[0] for e in SPEC_ERRORS]
)
def test_spec_errors(fragment: str, message: str) -> None:
    base = "name: wp\nnodes: [{name: n1}]\nnamespaces: [{name: shop}]\n"
    if fragment.startswith("ports"):
        text = base + f"services: [{{name: s, namespace: shop, {fragment}}}]\n"
    elif fragment.startswith("nodes"):
        text = base.replace("nodes: [{name: n1}]", fragment)
    else:
        text = base + fragment + "\n"
    with pytest.raises(SpecError) as e:
        parse_cluster(text, Path("/"))
    assert message in str(e.value)


@pytest.mark.parametrize(
    "protocol", ["http", "HTTP", "grpc", "HTTP2", "kubernetes.io/h2c", "tcp", "TLS"]
)
def test_app_protocols_the_mesh_config_reads(protocol: str) -> None:
    text = BASE.replace("appProtocol: HTTP", f"appProtocol: {protocol}")
    assert parse_cluster(text, Path("/")).services[0].ports[0].app_protocol == protocol


def route(kind: str = "HTTPRoute", **over: Any) -> dict[str, Any]:
    groups = {"VirtualService": "networking.istio.io", "DestinationRule": "networking.istio.io",
              "RequestAuthentication": "security.istio.io"}  # fmt: skip
    api = groups.get(kind, "gateway.networking.k8s.io") + "/v1"
    specs = {
        "VirtualService": {
            "hosts": ["web"],
            "http": [{"route": [{"destination": {"host": "web"}}]}],
        },
        "DestinationRule": {"host": "web", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
    }
    spec = specs.get(kind, {"parentRefs": [{"kind": "Service", "name": "web"}]})
    doc = {"apiVersion": api, "kind": kind, "metadata": {"name": "r", "namespace": "shop"},
           "spec": spec}  # fmt: skip
    doc.update(over)
    return doc


L7 = [
    ("httproute ok", route(), []),
    ("virtualservice ok", route("VirtualService"), []),
    ("destinationrule ok", route("DestinationRule"), []),
    # The spec's meaning is the waypoint's parsers' (what apply accepts is what runs).
    ("httproute bad match", route(spec={"parentRefs": [{"kind": "Service", "name": "web"}],
     "rules": [{"matches": [{"path": {"type": "Regex", "value": "/a"}}]}]}),
     ["spec.rules[0].matches[0].path.type"]),
    ("virtualservice typo", route("VirtualService", spec={"hosts": ["web"], "htp": []}),
     ["spec.htp"]),
    ("wrong group", route(apiVersion="networking.istio.io/v1"), ["a HTTPRoute is"]),
    ("spec a list", route(spec=[]), ["spec: expected a mapping"]),
    ("bad name", route(metadata={"name": "R!"}), ["metadata.name 'R!'"]),
    ("bad namespace", route(metadata={"name": "r", "namespace": "A B"}),
     ["metadata.namespace 'A B'"]),
    ("unknown kind", route("TCPIngress"), ["kind 'TCPIngress' is not one the waypoints read"]),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "problems"), [x[1:] for x in L7], ids=[x[0] for x in L7])
def test_validate_l7(doc: dict[str, Any], problems: list[str]) -> None:
    got = validate_l7(doc)
    assert len(got) == len(problems) and all(p in g for p, g in zip(problems, got, strict=True))


def test_a_batch_is_sorted_by_kind_and_refused_whole() -> None:
    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "p", "namespace": "shop"},
              "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                       "name": "waypoint"}], "action": "ALLOW",
                       "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}}  # fmt: skip
    batch = check_batch([route(), gateway(), policy, route("DestinationRule")], "f")
    assert [r.kind for r in batch.resources] == ["HTTPRoute", "DestinationRule"]
    assert [g.name for g in batch.waypoints] == ["waypoint"]
    assert [r.kind for r in batch.policies] == ["AuthorizationPolicy"]
    with pytest.raises(PolicyError) as e:
        check_batch(
            [
                route(),
                route(spec=None),
                {**gateway(), "spec": {"gatewayClassName": "istio-waypoint"}},
            ],
            "f",
        )
    assert len(e.value.problems) == 2
    with pytest.raises(PolicyError, match="is also document 0"):
        check_batch([route(), route()], "f")
