"""Custom resources are stored as written (their schemas keep spec verbatim), so the compute
and the statuses must take any JSON in a spec without raising: one bad object never stops
the others."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from controlplane import status as st
from controlplane.compute import Inputs, build_state, compute
from controlplane.waypoints import read_gateway
from tests.controlplane.kubeobjects import namespace, pod, service

json_values = hs.recursive(
    hs.none() | hs.booleans() | hs.integers(-5, 70000) | hs.text(max_size=8),
    lambda inner: (
        hs.lists(inner, max_size=3)
        | hs.dictionaries(
            hs.sampled_from(
                [
                    "parentRefs",
                    "rules",
                    "selector",
                    "action",
                    "listeners",
                    "name",
                    "port",
                    "kind",
                    "hosts",
                    "gatewayClassName",
                    "matchLabels",
                    "from",
                    "targetRefs",
                    "jwtRules",
                    "http",
                    "host",
                    "mtls",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)

KINDS = {
    "authorization_policies": ("security.istio.io/v1", "AuthorizationPolicy"),
    "peer_authentications": ("security.istio.io/v1", "PeerAuthentication"),
    "request_authentications": ("security.istio.io/v1", "RequestAuthentication"),
    "gateways": ("gateway.networking.k8s.io/v1", "Gateway"),
    "http_routes": ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    "grpc_routes": ("gateway.networking.k8s.io/v1", "GRPCRoute"),
    "destination_rules": ("networking.istio.io/v1", "DestinationRule"),
    "virtual_services": ("networking.istio.io/v1", "VirtualService"),
    "service_entries": ("networking.istio.io/v1", "ServiceEntry"),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=hs.sampled_from(sorted(KINDS)), spec=json_values, waypoint_class=hs.booleans())
def test_any_spec_of_a_custom_resource_is_computed_without_raising(
    field: str, spec: Any, waypoint_class: bool
) -> None:
    api_version, kind = KINDS[field]
    if waypoint_class and isinstance(spec, dict):
        spec = {**spec, "gatewayClassName": "istio-waypoint"}
    obj = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": "x", "namespace": "shop", "generation": 1},
        "spec": spec,
    }
    good = [pod("shop", "a", "10.1.0.5", {"app": "a"})]
    svc = [service("shop", "a", "10.96.0.5", {"app": "a"}, [{"port": 80}])]
    extra: dict[str, Any] = {field: [obj]}
    computed = compute(Inputs(namespaces=[namespace("shop")], pods=good, services=svc, **extra))
    _, state, _ = build_state(computed.document)
    assert [w.name for w in state.workloads] == ["a"]  # the others are untouched
    conditions = st.route_conditions(state, [("shop", "x")])
    st.route_status(obj, conditions.get((kind, "shop", "x"), ()), None, "t")
    st.istio_status(obj, computed.problems, None, "t")
    if kind == "Gateway":
        st.gateway_status(read_gateway(obj), None, "h", 0, None, "t")
