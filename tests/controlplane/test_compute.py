"""The pure compute: Kubernetes objects -> the LOCAL_XDS document -> a MeshState (tables)."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from typing import Any

import pytest

from controlplane.compute import SERVICE_ENTRIES_IN_DOCUMENT, Inputs, build_state, compute, dump
from meshcore.policy.authz import authorize
from meshcore.policy.index import PolicyIndex
from meshcore.sockets import SocketAddr
from meshcore.state import MeshConfigError, TunnelProtocol
from tests.controlplane.kubeobjects import (
    authorization_policy,
    namespace,
    pod,
    service,
    waypoint_gateway,
)

HTTP = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]


def state_of(inputs: Inputs) -> Any:
    computed = compute(inputs)
    _, state, dropped = build_state(computed.document)
    assert dropped == []
    return computed, state


@pytest.mark.parametrize(
    ("ns_labels", "pod_labels", "extra", "expected"),
    [
        ({"istio.io/dataplane-mode": "ambient"}, {}, {}, "HBONE"),
        ({"istio.io/dataplane-mode": "ambient"}, {"istio.io/dataplane-mode": "none"}, {}, "TCP"),
        ({}, {"istio.io/dataplane-mode": "ambient"}, {}, "HBONE"),
        ({}, {}, {}, "TCP"),
        ({"istio.io/dataplane-mode": "ambient"}, {}, {"host_network": True}, None),
        ({"istio.io/dataplane-mode": "ambient"}, {}, {"phase": "Succeeded"}, None),
    ],
)
def test_enrolment_decides_the_protocol_and_some_pods_are_no_workload(
    ns_labels: dict[str, str],
    pod_labels: dict[str, str],
    extra: dict[str, Any],
    expected: str | None,
) -> None:
    inputs = Inputs(
        namespaces=[namespace("shop", **ns_labels)],
        pods=[pod("shop", "a-0", "10.1.0.5", pod_labels, **extra)],
    )
    _, state = state_of(inputs)
    if expected is None:
        assert state.workloads == ()
    else:
        (w,) = state.workloads
        assert w.protocol is TunnelProtocol(expected if expected == "HBONE" else "NONE")


def test_a_pod_without_an_ip_is_not_a_workload_yet() -> None:
    _, state = state_of(Inputs(pods=[pod("shop", "a-0", None)]))
    assert state.workloads == ()


def test_workload_fields_and_service_ports_with_a_named_target_port() -> None:
    ports = [
        {"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"},
        {"name": "grpc", "port": 9090, "targetPort": 9090},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]
    inputs = Inputs(
        namespaces=[namespace("shop", **{"istio.io/dataplane-mode": "ambient"})],
        pods=[
            pod(
                "shop",
                "api-0",
                "10.1.0.5",
                {"app": "api", "version": "v2"},
                sa="api",
                ports={"web": 8081},
            ),
            pod("shop", "api-1", "10.1.0.6", {"app": "api"}, ready=False, ports={"web": 8082}),
            pod("shop", "other-0", "10.1.0.7", {"app": "other"}),
        ],
        services=[service("shop", "api", "10.96.0.10", {"app": "api"}, ports)],
    )
    computed, state = state_of(inputs)
    svc = state.service_by_hostname("api.shop.svc.cluster.local")
    assert [str(v) for v in svc.vips] == ["/10.96.0.10"]
    assert [(p.port, p.target_port) for p in svc.ports] == [(80, 8081), (9090, 9090)]
    w0 = state.workload_by_uid("Kubernetes//Pod/shop/api-0")
    assert w0.service_account == "api"
    assert w0.canonical_name == "api" and w0.canonical_revision == "v2"
    assert w0.node == "node1"
    assert w0.status.value == "HEALTHY"
    assert dict(w0.services)["shop/api.shop.svc.cluster.local"] == ((80, 8081), (9090, 9090))
    w1 = state.workload_by_uid("Kubernetes//Pod/shop/api-1")
    assert w1.status.value == "UNHEALTHY"
    assert dict(w1.services)["shop/api.shop.svc.cluster.local"] == ((80, 8082), (9090, 9090))
    other = state.workload_by_uid("Kubernetes//Pod/shop/other-0")
    assert other.services == ()
    assert computed.problems == ()


def test_output_is_the_same_whatever_the_order_of_the_objects() -> None:
    pods = [pod("shop", f"p-{i}", f"10.1.0.{i + 2}", {"app": "x"}) for i in range(20)]
    services = [service("shop", f"s-{i}", f"10.96.0.{i + 2}", {"app": "x"}, HTTP) for i in range(5)]
    first = dump(compute(Inputs(pods=pods, services=services)).document)
    random.Random(4).shuffle(pods)
    random.Random(5).shuffle(services)
    assert dump(compute(Inputs(pods=pods, services=services)).document) == first


def test_two_pods_with_one_ip_keep_one_and_report_the_other() -> None:
    a = pod("shop", "a", "10.1.0.5")
    b = pod("shop", "b", "10.1.0.5")
    a["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"  # the leaving one yields
    computed, state = state_of(Inputs(pods=[a, b]))
    assert [w.name for w in state.workloads] == ["b"]
    assert [(p.kind, p.name) for p in computed.problems] == [("Pod", "a")]


def test_an_unknown_app_protocol_is_dropped_and_reported_not_fatal() -> None:
    ports = [{"name": "db", "port": 5432, "appProtocol": "example.com/custom"}]
    svc = service("shop", "db", "10.96.0.9", {"app": "db"}, ports)
    computed, state = state_of(Inputs(services=[svc]))
    assert state.service_by_hostname("db.shop.svc.cluster.local").ports[0].app_protocol is None
    assert "appProtocol ignored" in computed.problems[0].message


def test_services_without_a_selector_or_of_type_external_name_are_left_out() -> None:
    # Their traffic passes through to the virtual IP (the node's service proxy has their
    # endpoints); published without endpoints they would be refused to enrolled pods.
    kubernetes = service("default", "kubernetes", "10.96.0.1", None, HTTP)
    empty = service("default", "empty", "10.96.0.2", {}, HTTP)
    external = service("default", "ext", "10.96.0.3", {"app": "x"}, HTTP)
    external["spec"]["type"] = "ExternalName"
    kept = service("default", "web", "10.96.0.4", {"app": "web"}, HTTP)
    _, state = state_of(Inputs(services=[kubernetes, empty, external, kept]))
    assert [s.name for s in state.services] == ["web"]


def _waypoint_inputs(ns_labels: dict[str, str], **gw_labels: str) -> Inputs:
    wp_pod = pod(
        "shop",
        "waypoint-abc",
        "10.1.0.9",
        {"gateway.networking.k8s.io/gateway-name": "waypoint", "istio.io/dataplane-mode": "none"},
    )
    wp_svc = service(
        "shop",
        "waypoint",
        "10.96.0.99",
        {"gateway.networking.k8s.io/gateway-name": "waypoint"},
        [{"name": "mesh", "port": 15008}],
        {"gateway.networking.k8s.io/gateway-name": "waypoint"},
    )
    return Inputs(
        namespaces=[namespace("shop", **{"istio.io/dataplane-mode": "ambient", **ns_labels})],
        pods=[pod("shop", "api-0", "10.1.0.5", {"app": "api"}), wp_pod],
        services=[service("shop", "api", "10.96.0.10", {"app": "api"}, HTTP), wp_svc],
        gateways=[waypoint_gateway("shop", **gw_labels)],
    )


def test_namespace_label_binds_services_to_the_waypoint_service_clusterip() -> None:
    computed, state = state_of(_waypoint_inputs({"istio.io/use-waypoint": "waypoint"}))
    api = state.service_by_hostname("api.shop.svc.cluster.local")
    assert api.waypoint is not None and str(api.waypoint.address) == "/10.96.0.99"
    # The tunnels reach it through the waypoint's own pod, on 15008.
    (endpoint,) = state.waypoint_endpoints(api.waypoint)
    assert (endpoint.workload.name, str(endpoint.ip), endpoint.hbone_port) == (
        "waypoint-abc",
        "10.1.0.9",
        15008,
    )
    # The waypoint's own Service and pod are never bound; the pod speaks HBONE itself.
    assert state.service_by_hostname("waypoint.shop.svc.cluster.local").waypoint is None
    wp = state.workload_by_uid("Kubernetes//Pod/shop/waypoint-abc")
    assert wp.protocol is TunnelProtocol.HBONE and wp.waypoint is None
    # A waypoint for services (the default) leaves the namespace's workloads unbound.
    assert state.workload_by_uid("Kubernetes//Pod/shop/api-0").waypoint is None
    assert computed.problems == ()
    assert [g.key for g in computed.waypoints] == ["shop/waypoint"]


def test_workload_waypoint_binds_pods_too() -> None:
    _, state = state_of(
        _waypoint_inputs({"istio.io/use-waypoint": "waypoint"}, **{"istio.io/waypoint-for": "all"})
    )
    w = state.workload_by_uid("Kubernetes//Pod/shop/api-0")
    assert w.waypoint is not None and str(w.waypoint.address) == "/10.96.0.99"


def test_a_binding_to_a_missing_waypoint_fails_closed_and_is_reported() -> None:
    computed, state = state_of(_waypoint_inputs({"istio.io/use-waypoint": "elsewhere"}))
    api = state.service_by_hostname("api.shop.svc.cluster.local")
    assert api.waypoint is not None
    assert api.waypoint.hostname == "shop/elsewhere.shop.svc.cluster.local"
    assert state.service_by_hostname("elsewhere.shop.svc.cluster.local") is None
    assert any(p.kind == "Service" and "no usable waypoint" in p.message for p in computed.problems)


def _tenant_binding(allowed: dict[str, Any] | None, **tenant_labels: str) -> tuple[Any, Any]:
    """A service of namespace `tenant` bound to `shop`'s waypoint, whose listener has
    `allowed` as its allowedRoutes.namespaces."""
    inputs = _waypoint_inputs({})
    gateway = inputs.gateways[0]
    if allowed is not None:
        gateway["spec"]["listeners"][0]["allowedRoutes"] = {"namespaces": allowed}
    labels = {"istio.io/use-waypoint": "waypoint", "istio.io/use-waypoint-namespace": "shop"}
    tenant = namespace("tenant", **{"istio.io/dataplane-mode": "ambient", **tenant_labels})
    inputs = dataclasses.replace(
        inputs,
        namespaces=[*inputs.namespaces, tenant],
        services=[*inputs.services, service("tenant", "app", "10.96.0.20", {"app": "t"}, HTTP)],
    )
    inputs.services[-1]["metadata"]["labels"] = labels
    computed, state = state_of(inputs)
    return computed, state.service_by_hostname("app.tenant.svc.cluster.local").waypoint


@pytest.mark.parametrize(
    ("allowed", "tenant_labels", "bound"),
    [
        (None, {}, False),  # Same, by default: Istio's rule for a waypoint of another namespace
        ({"from": "Same"}, {}, False),
        ({"from": "All"}, {}, True),
        ({"from": "Selector", "selector": {"matchLabels": {"team": "t"}}}, {"team": "t"}, True),
        ({"from": "Selector", "selector": {"matchLabels": {"team": "t"}}}, {"team": "u"}, False),
        ({"from": "Selector", "selector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["tenant"]}]}},
         {}, True),
        ({"from": "Selector", "selector": {"matchExpressions": [
            {"key": "team", "operator": "DoesNotExist"}]}}, {"team": "t"}, False),
        ({"from": "Anyone"}, {}, False),  # not understood: its own namespace only
    ],
)  # fmt: skip
def test_another_namespace_binds_to_a_waypoint_only_where_its_listener_allows(
    allowed: dict[str, Any] | None, tenant_labels: dict[str, str], bound: bool
) -> None:
    computed, waypoint = _tenant_binding(allowed, **tenant_labels)
    if bound:
        assert waypoint is not None and str(waypoint.address) == "/10.96.0.99"
        assert not [p for p in computed.problems if p.namespace == "tenant"]
    else:
        assert waypoint is None  # not bound: its traffic goes to the pods directly (L4)
        (problem,) = [p for p in computed.problems if p.namespace == "tenant"]
        assert "does not take namespace tenant" in problem.message
    # The waypoint's own namespace binds whatever its listener says.
    _, state = state_of(_waypoint_inputs({"istio.io/use-waypoint": "waypoint"}))
    assert state.service_by_hostname("api.shop.svc.cluster.local").waypoint is not None


def test_a_bad_authorization_policy_is_reported_kept_and_denies() -> None:
    bad = authorization_policy(
        "shop",
        "broken",
        {
            "selector": {"matchLabels": {"app": "api"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": 7}}]}],
        },
    )
    inputs = Inputs(
        namespaces=[namespace("shop", **{"istio.io/dataplane-mode": "ambient"})],
        pods=[pod("shop", "api-0", "10.1.0.5", {"app": "api"})],
        authorization_policies=[bad],
    )
    computed, state = state_of(inputs)
    assert [(p.kind, p.name) for p in computed.problems] == [("AuthorizationPolicy", "broken")]
    assert [p.key for p in state.policies] == ["shop/broken"]
    w = state.workload_by_uid("Kubernetes//Pod/shop/api-0")
    verdict = authorize(
        PolicyIndex.build(state),
        w,
        None,
        ipaddress.ip_address("10.1.0.7"),
        SocketAddr(ipaddress.ip_address("10.1.0.5"), 8080),
    )
    assert not verdict.allowed


def test_l7_resources_are_kept_verbatim_without_server_bookkeeping() -> None:
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": "r",
            "namespace": "shop",
            "uid": "x",
            "resourceVersion": "9",
            "managedFields": [{}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
        },
        "spec": {"parentRefs": [{"kind": "Service", "group": "", "name": "api"}]},
        "status": {"parents": []},
    }
    _, state = state_of(Inputs(http_routes=[route]))
    (doc,) = [r.document() for r in state.resources("HTTPRoute")]
    assert doc == {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": route["spec"],
    }


def test_service_entries_are_kept_aside_until_the_mesh_config_carries_them() -> None:
    se = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "ext", "namespace": "shop"},
        "spec": {
            "hosts": ["a.example"],
            "resolution": "NONE",
            "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
        },
    }
    computed, state = state_of(Inputs(service_entries=[se]))
    if SERVICE_ENTRIES_IN_DOCUMENT:
        assert [r.name for r in state.resources("ServiceEntry")] == ["ext"]
        assert computed.service_entries == ()
    else:
        assert [e["metadata"]["name"] for e in computed.service_entries] == ["ext"]
        assert "resources" not in computed.document


def test_build_state_drops_only_the_entry_the_parser_refuses() -> None:
    good = {"uid": "u1", "name": "a", "namespace": "shop", "workloadIps": ["10.1.0.5"]}
    bad = {"uid": "u2", "name": "b", "namespace": "shop", "workloadIps": ["not-an-ip"]}
    doc, state, dropped = build_state({"workloads": [good, bad], "services": []})
    assert [w.uid for w in state.workloads] == ["u1"]
    assert doc["workloads"] == [good]
    assert [(p.kind, p.name) for p in dropped] == [("Pod", "b")]


def test_build_state_refuses_what_only_fails_in_combination() -> None:
    a = {"name": "a", "namespace": "s", "hostname": "a.s", "vips": ["/10.96.0.1"]}
    b = {"name": "b", "namespace": "s", "hostname": "b.s", "vips": ["/10.96.0.1"]}
    with pytest.raises(MeshConfigError, match="refused"):
        build_state({"services": [a, b]})


@pytest.mark.parametrize(
    "selector",
    [{"app": "a"}, {"app": "a", "tier": "web"}, {"tier": "web"}, {"app": "zzz"}, {}, None],
)
def test_the_pod_index_selects_exactly_what_a_scan_selects(
    selector: dict[str, str] | None,
) -> None:
    from controlplane.endpoints import PodIndex, selects

    pods = [
        pod("shop", "p1", "10.1.0.1", {"app": "a", "tier": "web"}),
        pod("shop", "p2", "10.1.0.2", {"app": "a"}),
        pod("shop", "p3", "10.1.0.3", {"app": "b", "tier": "web"}),
        pod("other", "p4", "10.1.0.4", {"app": "a", "tier": "web"}),
    ]
    svc = service("shop", "s", "10.96.0.1", selector, HTTP)
    assert PodIndex(pods).selected(svc) == [p for p in pods if selects(svc, p)]
