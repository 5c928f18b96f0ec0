"""MeshState <-> xDS resources: the round trip, resource names, and refusals."""

from __future__ import annotations

import dataclasses
import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.state import (
    AppProtocol,
    GatewayAddress,
    HealthStatus,
    MeshState,
    NetworkAddress,
    RawPolicy,
    Service,
    ServicePort,
    TunnelProtocol,
    Workload,
)
from meshcore.xds import convert
from meshcore.xds import messages as m
from tests.xds.states import demo_state


def round_trip(state: MeshState) -> MeshState:
    resources = convert.resources_of(state)
    items = [convert.decode_resource(t, n, b) for t, d in resources.items() for n, b in d.items()]
    return convert.build_state(items)


def test_demo_state_round_trips() -> None:
    state = demo_state()
    back = round_trip(state)
    assert back == convert.canonical(state)
    assert back.workloads and back.services and back.policies and back.l7_resources
    # Not merely equal as sets: every entry, field by field.
    by_uid = {w.uid: w for w in state.workloads}
    for w in back.workloads:
        assert w == by_uid[w.uid]


def test_resource_names_follow_upstream() -> None:
    resources = convert.resources_of(demo_state())
    addresses = resources[m.ADDRESS_TYPE]
    assert "travel//Pod/travel/frontend-0" in addresses  # workload: its uid
    assert "travel/pricing.travel.svc.cluster.local" in addresses  # service: ns/hostname
    assert set(resources[m.AUTHORIZATION_TYPE]) == {
        "travel/pricing-allow",
        "travel/deny-legacy",
        "istio-system/global",
        "travel/broken",
    }
    # Only the tunnel's L4 policies are Authorizations; the rest is ours, verbatim.
    assert set(resources[m.L7_RESOURCE_TYPE]) == {
        "AuthorizationPolicy/travel/post-denied",
        "PeerAuthentication/travel/strict",
        "HTTPRoute/travel/flights-canary",
    }


def test_an_upstream_authorization_without_our_extension_becomes_the_xds_form() -> None:
    named = convert.resources_of(demo_state())[m.AUTHORIZATION_TYPE]
    ours = m.decode(m.Authorization, named["istio-system/global"])
    bare = m.encode(dataclasses.replace(ours, extensions=()))
    raw = convert.decode_resource(m.AUTHORIZATION_TYPE, "istio-system/global", bare)
    assert isinstance(raw, RawPolicy)
    from meshcore.policy.parse import parse_policy

    original = parse_policy(demo_state().policy_by_key("istio-system/global"))  # type: ignore[arg-type]
    again = parse_policy(raw)
    assert again.rules == original.rules
    assert (again.action, again.scope) == (original.action, original.scope)


def _workload(**kw: object) -> Workload:
    base: dict[str, object] = dict(
        uid="c//Pod/ns/a",
        name="a",
        namespace="ns",
        service_account="sa",
        trust_domain="cluster.local",
        ips=(ipaddress.ip_address("10.0.0.1"),),
        network="",
        protocol=TunnelProtocol.HBONE,
        node="n1",
        canonical_name="a",
        canonical_revision="latest",
        workload_name="a",
        workload_type="pod",
        cluster_id="Kubernetes",
        status=HealthStatus.HEALTHY,
        waypoint=None,
        services=(),
    )
    base.update(kw)
    return Workload(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "workload",
    [
        _workload(),
        _workload(ips=(ipaddress.ip_address("fd00::1"), ipaddress.ip_address("10.1.1.1"))),
        _workload(protocol=TunnelProtocol.NONE, status=HealthStatus.UNHEALTHY),
        _workload(workload_type="statefulset", labels=(("app", "x"), ("v", "1"))),
        _workload(waypoint=GatewayAddress(hostname="ns/wp", hbone_port=15009, fail_open=True)),
        _workload(
            waypoint=GatewayAddress(address=NetworkAddress("net", ipaddress.ip_address("10.9.9.9")))
        ),
        _workload(services=(("ns/s.ns.svc", ((80, 8080), (443, 8443))),)),
        _workload(authorization_policies=("ns/p", "ns/q")),
    ],
)
def test_workload_round_trip_table(workload: Workload) -> None:
    state = MeshState.build([workload], [], [])
    assert round_trip(state) == state


@pytest.mark.parametrize(
    "ports",
    [
        (ServicePort(80, 8080),),
        (ServicePort(80, 8080, "http-web"),),
        (ServicePort(80, 8080, "tcp", AppProtocol.UNKNOWN),),
        (ServicePort(80, 8080, "", AppProtocol.GRPC), ServicePort(81, 81, "x", AppProtocol.TLS)),
    ],
)
def test_service_round_trip_table(ports: tuple[ServicePort, ...]) -> None:
    svc = Service(
        "s",
        "ns",
        "s.ns.svc",
        (NetworkAddress("", ipaddress.ip_address("10.96.0.1")),),
        ports,
        ("spiffe://cluster.local/ns/ns/sa/s",),
        GatewayAddress(hostname="ns/wp"),
    )
    state = MeshState.build([], [svc], [])
    assert round_trip(state) == state


label = st.text("abcxyz-.", min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text("abcdef", min_size=1, max_size=5),
            st.integers(1, 2**32 - 1),
            st.sampled_from(list(HealthStatus)),
            st.dictionaries(label, label, max_size=3),
            st.lists(st.tuples(st.integers(1, 65535), st.integers(1, 65535)), max_size=3),
        ),
        max_size=6,
        unique_by=lambda t: (t[0], t[1]),
    )
)
def test_random_workloads_round_trip(entries) -> None:
    seen_names: set[str] = set()
    seen_ips: set[int] = set()
    workloads = []
    for name, ip, status, labels, ports in entries:
        if name in seen_names or ip in seen_ips:
            continue
        seen_names.add(name)
        seen_ips.add(ip)
        workloads.append(
            _workload(
                uid=f"c//Pod/ns/{name}",
                name=name,
                ips=(ipaddress.IPv4Address(ip),),
                status=status,
                labels=tuple(sorted(labels.items())),
                services=(("ns/s", tuple(sorted(dict(ports).items()))),) if ports else (),
            )
        )
    state = convert.canonical(MeshState.build(workloads, [], []))
    assert round_trip(state) == state


@pytest.mark.parametrize(
    ("type_url", "name", "msg", "error"),
    [
        (m.ADDRESS_TYPE, "x", m.Address(), "neither a workload nor a service"),
        (m.ADDRESS_TYPE, "other", m.Address(workload=m.Workload(uid="a")), "differ"),
        (
            m.ADDRESS_TYPE,
            "a",
            m.Address(workload=m.Workload(uid="a", namespace="ns", addresses=(b"\x01\x02",))),
            "4 or 16 bytes",
        ),
        (
            m.ADDRESS_TYPE,
            "a",
            m.Address(workload=m.Workload(uid="a", namespace="ns", tunnel_protocol=2)),
            "tunnel_protocol",
        ),
        (m.ADDRESS_TYPE, "a", m.Address(workload=m.Workload(uid="a")), "SPIFFE"),
        (
            m.ADDRESS_TYPE,
            "ns/h",
            m.Address(service=m.Service(namespace="ns", hostname="h", ports=(m.Port(0, 1),))),
            "port",
        ),
        (
            m.AUTHORIZATION_TYPE,
            "ns/p",
            m.Authorization(name="p", namespace="ns", action=7),
            "action",
        ),
        (m.L7_RESOURCE_TYPE, "HTTPRoute/ns/r", m.L7Resource("HTTPRoute", "r", "ns", "{"), "JSON"),
        (m.L7_RESOURCE_TYPE, "HTTPRoute/ns/r", m.L7Resource("HTTPRoute", "q", "ns", "{}"), "holds"),
        ("type.googleapis.com/other", "x", m.L7Resource(), "unknown resource type"),
    ],
)
def test_bad_resources_are_refused_by_name(type_url, name, msg, error) -> None:
    with pytest.raises(convert.ResourceError, match=error):
        convert.decode_resource(type_url, name, m.encode(msg))


def test_policy_json_is_kept_verbatim() -> None:
    raw = RawPolicy.from_mapping("p", "ns", {"name": "p", "namespace": "ns", "action": "DENY"})
    state = MeshState.build([], [], [raw])
    back = round_trip(state)
    assert back.policies[0].spec_json == raw.spec_json
    assert json.loads(back.policies[0].spec_json)["action"] == "DENY"
