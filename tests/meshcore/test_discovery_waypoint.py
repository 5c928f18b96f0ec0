"""What the mesh config carries for waypoints: service port names and app protocols (and
Istio's rule for a port's protocol), `failOpen` on a waypoint address, the L7 resources
kept verbatim, and the lookup from a waypoint address to its endpoints."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.discovery import parse_local_config, parse_resource_entry
from meshcore.state import (
    AppProtocol,
    GatewayAddress,
    HealthStatus,
    MeshConfigError,
    NetworkAddress,
    RawResource,
    ServicePort,
    TunnelProtocol,
    WaypointEndpoint,
    parse_app_protocol,
    port_protocol,
)
from tests.support.mesh import ips, mesh_state, ports, serves, service, vips, workload

S = "services[0]"
MINIMAL_SERVICE = {"name": "svc", "namespace": "ns", "hostname": "svc.ns.svc.cluster.local"}


def doc(**top: Any) -> str:
    return yaml.safe_dump(top)


def one_service(**fields: Any) -> Any:
    return parse_local_config(doc(services=[{**MINIMAL_SERVICE, **fields}])).services[0]


def route(name: str = "web", namespace: str = "shop", kind: str = "HTTPRoute") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"parentRefs": [{"kind": "Service", "name": "web"}], "rules": []},
    }


# -- service ports ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param({80: 8080}, (ServicePort(80, 8080),), id="bare target port, as before"),
        pytest.param(
            {80: {"targetPort": 8080, "name": "http-web", "appProtocol": "http"}},
            (ServicePort(80, 8080, "http-web", AppProtocol.HTTP11),),
            id="mapping form with name and appProtocol",
        ),
        pytest.param(
            [{"port": 80, "targetPort": 8080, "name": "grpc"}, {"port": 5432}],
            (ServicePort(80, 8080, "grpc"), ServicePort(5432, 5432)),
            id="list form as Kubernetes writes it; targetPort defaults to the port",
        ),
        pytest.param(
            [{"port": 443, "targetPort": "8443", "appProtocol": "kubernetes.io/h2c"}],
            (ServicePort(443, 8443, "", AppProtocol.HTTP2),),
            id="Kubernetes appProtocol h2c",
        ),
        pytest.param(
            {81: {"targetPort": 81}, 80: {"targetPort": 80, "appProtocol": "GRPC"}},
            (ServicePort(80, 80, "", AppProtocol.GRPC), ServicePort(81, 81)),
            id="sorted by port; AppProtocol spelling",
        ),
    ],
)
def test_service_port_forms(value: Any, expected: tuple[ServicePort, ...]) -> None:
    assert one_service(ports=value).ports == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ports": [{"targetPort": 80}]}, f"{S}.ports[0].port: is required"),
        ({"ports": [{"port": 80, "nmae": "x"}]}, f"{S}.ports[0].nmae: unknown field"),
        ({"ports": {80: {"name": "http"}}}, f"{S}.ports[80].targetPort: is required"),
        ({"ports": {80: {"targetPort": 80, "port": 80}}}, f"{S}.ports[80].port: unknown field"),
        ({"ports": [{"port": 80}, {"port": 80}]}, f"{S}.ports[1]: port 80 is given twice"),
        ({"ports": [{"port": 80, "name": "HTTP"}]}, f"{S}.ports[0].name: 'HTTP' is not a port"),
        ({"ports": [{"port": 80, "name": "-http"}]}, f"{S}.ports[0].name: '-http' is not a port"),
        ({"ports": [{"port": 80, "name": ""}]}, f"{S}.ports[0].name: '' is not a port name"),
        ({"ports": [{"port": 80, "name": 7}]}, f"{S}.ports[0].name: expected a string"),
        (
            {"ports": [{"port": 80, "name": "web"}, {"port": 81, "name": "web"}]},
            f"{S}.ports[1].name: 'web' is also the name of port 80",
        ),
        (
            {"ports": [{"port": 80, "appProtocol": "h3"}]},
            f"{S}.ports[0].appProtocol: 'h3' is not one of UNKNOWN, HTTP11",
        ),
        ({"ports": [{"port": 80, "appProtocol": 1}]}, f"{S}.ports[0].appProtocol: expected a"),
        (
            {"ports": [{"port": 80, "targetPort": 0}]},
            f"{S}.ports[0].targetPort: port 0 is not in 1..65535",
        ),
        ({"ports": [80]}, f"{S}.ports[0]: expected a mapping, got a number"),
    ],
)
def test_service_port_errors_name_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(MeshConfigError) as err:
        one_service(**fields)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("HTTP11", AppProtocol.HTTP11),
        ("HTTP2", AppProtocol.HTTP2),
        ("GRPC", AppProtocol.GRPC),
        ("TCP", AppProtocol.TCP),
        ("TLS", AppProtocol.TLS),
        ("UNKNOWN", AppProtocol.UNKNOWN),
        ("http", AppProtocol.HTTP11),
        ("HTTP", AppProtocol.HTTP11),
        ("http2", AppProtocol.HTTP2),
        ("grpc", AppProtocol.GRPC),
        ("grpc-web", AppProtocol.HTTP11),
        ("tcp", AppProtocol.TCP),
        ("tls", AppProtocol.TLS),
        ("https", AppProtocol.TLS),
        ("mysql", AppProtocol.TCP),
        ("kubernetes.io/h2c", AppProtocol.HTTP2),
        ("kubernetes.io/ws", AppProtocol.HTTP11),
        ("kubernetes.io/wss", AppProtocol.TLS),
    ],
    ids=lambda v: str(v),
)
def test_app_protocol_spellings(value: str, expected: AppProtocol) -> None:
    assert parse_app_protocol(value) is expected


@pytest.mark.parametrize("value", ["", "h3", "http-web", "example.com/proto", "udp"])
def test_unknown_app_protocols_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="is not one of"):
        parse_app_protocol(value)


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        pytest.param(
            ServicePort(80, 80, "tcp-x", AppProtocol.HTTP2),
            AppProtocol.HTTP2,
            id="appProtocol beats the name",
        ),
        pytest.param(ServicePort(80, 80, "http"), AppProtocol.HTTP11, id="name http"),
        pytest.param(ServicePort(80, 80, "http-web"), AppProtocol.HTTP11, id="prefix http-"),
        pytest.param(ServicePort(80, 80, "http2-api"), AppProtocol.HTTP2, id="prefix http2-"),
        pytest.param(ServicePort(80, 80, "grpc-api"), AppProtocol.GRPC, id="prefix grpc-"),
        pytest.param(ServicePort(80, 80, "grpc-web"), AppProtocol.HTTP11, id="grpc-web"),
        pytest.param(ServicePort(80, 80, "tcp-db"), AppProtocol.TCP, id="prefix tcp-"),
        pytest.param(ServicePort(80, 80, "tls"), AppProtocol.TLS, id="name tls"),
        pytest.param(ServicePort(80, 80, "mysql"), AppProtocol.TCP, id="server-first: TCP"),
        pytest.param(ServicePort(80, 80, "httpx"), AppProtocol.UNKNOWN, id="httpx is not http"),
        pytest.param(ServicePort(80, 80, "web-http"), AppProtocol.UNKNOWN, id="suffix ignored"),
        pytest.param(ServicePort(80, 80), AppProtocol.UNKNOWN, id="nothing declared"),
    ],
)
def test_port_protocol_follows_istio(port: ServicePort, expected: AppProtocol) -> None:
    svc = service(ports=(port,))
    assert port_protocol(svc, 80) is expected
    assert port_protocol(svc, 81) is AppProtocol.UNKNOWN  # a port the service lacks


# -- failOpen ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"hostname": "ns/wp.ns.svc.cluster.local"}, False),
        ({"hostname": "ns/wp.ns.svc.cluster.local", "failOpen": False}, False),
        ({"hostname": "ns/wp.ns.svc.cluster.local", "failOpen": True}, True),
        ({"address": "/10.0.0.9", "failOpen": True}, True),
        ("ns/wp.ns.svc.cluster.local", False),
    ],
    ids=["default", "false", "true", "address form", "short form"],
)
def test_fail_open(value: Any, expected: bool) -> None:
    assert one_service(waypoint=value).waypoint.fail_open is expected
    entry = {"uid": "u", "name": "p", "namespace": "ns", "waypoint": value}
    state = parse_local_config(doc(workloads=[entry]))
    assert state.workloads[0].waypoint is not None
    assert state.workloads[0].waypoint.fail_open is expected


@pytest.mark.parametrize("value", ["yes", 1, "true", None])
def test_fail_open_must_be_a_boolean(value: Any) -> None:
    if value is None:  # null is the default
        assert not one_service(waypoint={"hostname": "a/b", "failOpen": None}).waypoint.fail_open
        return
    expected = r"services\[0\]\.waypoint\.failOpen: expected true or false"
    with pytest.raises(MeshConfigError, match=expected):
        one_service(waypoint={"hostname": "a/b", "failOpen": value})


# -- L7 resources -----------------------------------------------------------------------------


def test_l7_resources_are_kept_verbatim_under_resources_or_policies() -> None:
    vs = route("reviews", kind="VirtualService")
    vs["spec"] = {"anything": [1, 2.5, None, {"x": True}], "the tunnel": "does not read"}
    authz = {
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "l7", "namespace": "shop"},
        "spec": {"targetRefs": [{"kind": "Service", "name": "web"}], "action": "ALLOW"},
    }
    state = parse_local_config(
        doc(policies=[route(), authz], resources=[vs, route("api", kind="GRPCRoute")])
    )
    assert [r.key for r in state.resources("HTTPRoute")] == ["shop/web"]
    assert [r.key for r in state.resources("GRPCRoute")] == ["shop/api"]
    (got,) = state.resources("VirtualService")
    assert got.document() == vs
    got.document()["spec"] = "changed"  # a fresh copy each time
    assert got.document() == vs
    # Policies stay policies (the L4 engine reads them) and are also seen as resources.
    assert [p.key for p in state.policies] == ["shop/l7"]
    assert [r.document() for r in state.resources("AuthorizationPolicy")] == [authz]
    assert state.resources("DestinationRule") == ()
    assert len(state.l7_resources) == 3


@pytest.mark.parametrize(
    "kind",
    [
        "HTTPRoute",
        "GRPCRoute",
        "VirtualService",
        "DestinationRule",
        "RequestAuthentication",
        "Gateway",
    ],
)
def test_every_l7_kind_is_accepted(kind: str) -> None:
    state = parse_local_config(doc(resources=[route(kind=kind)]))
    assert state.resources(kind) == (
        RawResource.from_mapping(kind, "web", "shop", route(kind=kind)),
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (route(kind="TCPRouteX"), "resources[0].kind: 'TCPRouteX' is not one of DestinationRule"),
        ({"metadata": {"name": "x"}}, "resources[0].kind: is required"),
        ({**route(), "metadata": None}, "resources[0].metadata: expected a mapping"),
        ({**route(), "metadata": {"namespace": "a"}}, "resources[0].metadata.name: is required"),
        (
            {**route(), "metadata": {"name": "a/b"}},
            "resources[0].metadata.name: 'a/b' must not contain '/'",
        ),
        (
            {**route(), "metadata": {"name": "a", "namespace": "x/y"}},
            "resources[0].metadata.namespace: 'x/y' must contain no '/'",
        ),
        ({**route(), "spec": float("nan")}, "resources[0].spec: nan is not a finite number"),
        (
            route(kind="AuthorizationPolicy"),
            "resources[0].kind: 'AuthorizationPolicy' is not one of",
        ),
        ("HTTPRoute", "resources[0]: expected a mapping, got a string"),
    ],
)
def test_bad_resource_metadata_is_an_error_naming_the_field(entry: Any, message: str) -> None:
    with pytest.raises(MeshConfigError) as err:
        parse_local_config(doc(resources=[entry]))
    assert message in str(err.value)


def test_unknown_kind_among_policies_is_still_an_error() -> None:
    with pytest.raises(MeshConfigError, match=r"policies\[0\]\.kind: 'TLSRoute' is not one of"):
        parse_local_config(doc(policies=[route(kind="TLSRoute")]))


def test_two_resources_of_one_kind_and_key_are_refused() -> None:
    with pytest.raises(MeshConfigError, match="two HTTPRoute entries have the key 'shop/web'"):
        parse_local_config(doc(policies=[route()], resources=[route()]))
    # The same name in another kind is another resource.
    state = parse_local_config(doc(resources=[route(), route(kind="GRPCRoute")]))
    assert len(state.l7_resources) == 2


def test_resources_change_the_state() -> None:
    a = parse_local_config(doc(resources=[route()]))
    b = parse_local_config(doc(resources=[{**route(), "spec": {"rules": [{}]}}]))
    assert a != b and a == parse_local_config(doc(resources=[route()]))
    assert hash(a) == hash(parse_local_config(doc(resources=[route()])))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=60)
@given(_json)
def test_any_spec_with_good_metadata_is_kept_as_is(spec: Any) -> None:
    entry = {**route(), "spec": spec}
    raw = parse_resource_entry(entry, "resources[0]")
    assert raw.document() == entry


@settings(max_examples=60)
@given(st.dictionaries(st.sampled_from(["kind", "metadata", "spec", "x"]), _json, max_size=4))
def test_any_resource_entry_parses_or_raises_config_error(entry: dict[str, Any]) -> None:
    with contextlib.suppress(MeshConfigError):
        parse_resource_entry(entry, "resources[0]")


# -- waypoint endpoints -----------------------------------------------------------------------

WP_SVC = service(
    name="waypoint", namespace="shop", vips=vips("10.96.0.99"), ports=ports({15008: 15008})
)
WP_HOST = GatewayAddress(hostname="shop/waypoint.shop.svc.cluster.local")
WP_0 = workload(
    name="waypoint-0",
    namespace="shop",
    service_account="waypoint",
    ips=ips("10.244.1.99", "fd00::99"),
    services=serves((WP_SVC, {})),
)
WP_1 = replace(WP_0, uid="wp1", name="waypoint-1", ips=ips("10.244.2.99"))


@pytest.mark.parametrize(
    ("address", "workloads", "version", "expected"),
    [
        pytest.param(
            WP_HOST,
            (WP_0, WP_1),
            4,
            (("waypoint-0", "10.244.1.99", 15008), ("waypoint-1", "10.244.2.99", 15008)),
            id="hostname: every ready endpoint",
        ),
        pytest.param(
            WP_HOST,
            (WP_0,),
            6,
            (("waypoint-0", "fd00::99", 15008),),
            id="hostname: the caller's family",
        ),
        pytest.param(
            WP_HOST,
            (WP_1,),
            6,
            (("waypoint-1", "10.244.2.99", 15008),),
            id="hostname: a single-stack endpoint at its address",
        ),
        pytest.param(
            replace(WP_HOST, hbone_port=15009),
            (WP_0,),
            4,
            (("waypoint-0", "10.244.1.99", 15009),),
            id="another HBONE port",
        ),
        pytest.param(
            WP_HOST, (replace(WP_0, status=HealthStatus.UNHEALTHY),), 4, (), id="unhealthy: none"
        ),
        pytest.param(
            WP_HOST, (replace(WP_0, protocol=TunnelProtocol.NONE),), 4, (), id="no HBONE: none"
        ),
        pytest.param(GatewayAddress(hostname="shop/nope"), (WP_0,), 4, (), id="unknown host"),
        pytest.param(
            GatewayAddress(address=NetworkAddress("", ips("10.96.0.99")[0])),
            (WP_0,),
            4,
            (("waypoint-0", "10.244.1.99", 15008),),
            id="address: the service VIP",
        ),
        pytest.param(
            GatewayAddress(address=NetworkAddress("", ips("fd00::99")[0])),
            (WP_0,),
            4,
            (("waypoint-0", "fd00::99", 15008),),
            id="address: that workload IP",
        ),
        pytest.param(
            GatewayAddress(address=NetworkAddress("", ips("10.9.9.9")[0])),
            (WP_0,),
            4,
            (),
            id="address: unknown",
        ),
    ],
)
def test_waypoint_endpoints(
    address: GatewayAddress,
    workloads: tuple[Any, ...],
    version: int,
    expected: tuple[tuple[str, str, int], ...],
) -> None:
    state = mesh_state(workloads, [WP_SVC])
    got = state.waypoint_endpoints(address, version)
    assert all(isinstance(e, WaypointEndpoint) for e in got)
    assert tuple((e.workload.name, str(e.ip), e.hbone_port) for e in got) == expected


def test_waypoint_workloads_include_unready_ones() -> None:
    sick = replace(WP_1, status=HealthStatus.UNHEALTHY)
    state = mesh_state([WP_0, sick], [WP_SVC])
    assert [w.name for w in state.waypoint_workloads(WP_HOST)] == ["waypoint-0", "waypoint-1"]
