"""MeshState: building, duplicate detection, O(1) lookups, endpoints."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace
from ipaddress import IPv4Address, IPv6Address

import pytest

from meshcore.identity.spiffe import SpiffeId
from meshcore.state import (
    GatewayAddress,
    MeshConfigError,
    MeshState,
    NetworkAddress,
    RawPolicy,
    Service,
    ServicePort,
    Workload,
)
from tests.support.mesh import ips, service, vips, workload
from tests.support.mesh import ports as service_ports

SVC_KEY = "travel/frontend.travel.svc.cluster.local"


def wl(
    uid: str, *addrs: str, node: str = "node1", network: str = "", services=(), **kw
) -> Workload:
    return workload(
        uid=uid,
        name=uid.rsplit("/", 1)[-1],
        namespace="travel",
        service_account="frontend",
        ips=ips(*addrs),
        network=network,
        node=node,
        canonical_name="frontend",
        canonical_revision="v1",
        workload_name="frontend",
        workload_type="pod",
        services=tuple(services),
        **kw,
    )


def svc(name: str, *addrs: str, namespace: str = "travel", ports=((80, 8080),)) -> Service:
    return service(
        name=name, namespace=namespace, vips=vips(*addrs), ports=service_ports(dict(ports))
    )


def test_lookups_find_entries_by_every_index():
    a = wl("a", "10.0.0.1", "fd00::1", services=[(SVC_KEY, ((80, 9090),))])
    b = wl("b", "10.0.0.2", node="node2", network="net2")
    s = svc("frontend", "10.96.0.10")
    p = RawPolicy.from_mapping("allow", "travel", {"name": "allow", "action": "ALLOW"})
    state = MeshState.build([a, b], [s], [p])

    assert state.workload_by_uid("a") is a
    assert state.workload_by_uid("missing") is None
    assert state.workload_by_ip("", IPv4Address("10.0.0.1")) is a
    assert state.workload_by_ip("", IPv6Address("fd00::1")) is a
    assert state.workload_by_ip("net2", IPv4Address("10.0.0.2")) is b
    # Same IP on another network is another address.
    assert state.workload_by_ip("", IPv4Address("10.0.0.2")) is None
    assert state.service_by_vip("", IPv4Address("10.96.0.10")) is s
    assert state.service_by_vip("other", IPv4Address("10.96.0.10")) is None
    assert state.service_by_hostname("frontend.travel.svc.cluster.local") is s
    assert state.service_by_hostname("nope") is None
    assert state.service_by_key(SVC_KEY) is s
    assert state.workloads_on_node("node1") == (a,)
    assert state.workloads_on_node("node2") == (b,)
    assert state.workloads_on_node("node3") == ()
    assert state.workloads_with_identity(SpiffeId("cluster.local", "travel", "frontend")) == (a, b)
    assert state.policy_by_key("travel/allow") is p
    assert state.policies_in_namespace("travel") == (p,)
    assert state.policies_in_namespace("") == ()
    assert state.workloads == (a, b)
    assert state.services == (s,)
    assert state.policies == (p,)


def test_endpoints_are_the_workloads_naming_the_service_in_uid_order():
    s = svc("frontend", "10.96.0.10")
    other = svc("pricing", "10.96.0.11")
    z = wl("z", "10.0.0.3", services=[(SVC_KEY, ())])
    a = wl("a", "10.0.0.1", services=[(SVC_KEY, ())])
    unrelated = wl("m", "10.0.0.2")
    state = MeshState.build([z, unrelated, a], [s, other], [])
    assert state.endpoints(s) == (a, z)
    assert state.endpoints(other) == ()


def test_a_derived_value_is_made_once_per_snapshot_and_key():
    made: list[str] = []

    def make(name: str) -> str:
        made.append(name)
        return name.upper()

    state, other = MeshState.empty(), MeshState.empty()
    assert state.derived(("k", 1), lambda: make("a")) == "A"
    assert state.derived(("k", 1), lambda: make("b")) == "A"  # kept: not made again
    assert state.derived(("k", 2), lambda: make("c")) == "C"
    assert other.derived(("k", 1), lambda: make("d")) == "D"  # another snapshot's own
    assert made == ["a", "c", "d"]
    # A snapshot made from another does not inherit its values (they may not hold for it).
    changed = replace(state, _workloads=(wl("a", "10.0.0.1"),))
    assert changed.derived(("k", 1), lambda: make("e")) == "E"
    assert made == ["a", "c", "d", "e"]


def test_a_services_ports_are_its_own_and_those_its_endpoints_map():
    s = svc("frontend", "10.96.0.10", ports=((80, 8080), (443, 8443)))
    other = svc("pricing", "10.96.0.11")
    a = wl("a", "10.0.0.1", services=[(SVC_KEY, ((80, 9080), (9000, 9000)))])
    b = wl("b", "10.0.0.2", services=[(SVC_KEY, ())])
    state = MeshState.build([a, b], [s, other], [])
    assert state.service_ports(s) == {80, 443, 9000}
    assert state.service_ports(other) == {80}


def test_empty_state_has_nothing():
    state = MeshState.empty()
    assert state.workloads == ()
    assert state.services == ()
    assert state.policies == ()
    assert state.workload_by_ip("", IPv4Address("10.0.0.1")) is None
    assert state == MeshState.build([], [], [])


@pytest.mark.parametrize(
    ("workloads", "services", "policies", "message"),
    [
        ([wl("a", "10.0.0.1"), wl("a", "10.0.0.2")], [], [], "two workloads have uid 'a'"),
        (
            [wl("a", "10.0.0.1"), wl("b", "10.0.0.1")],
            [],
            [],
            "workloads 'a' and 'b' both claim IP 10.0.0.1 on network ''",
        ),
        (
            [],
            [svc("x", "10.96.0.1"), svc("y", "10.96.0.1")],
            [],
            "services 'travel/x.travel.svc.cluster.local' and 'travel/y.travel.svc.cluster.local'"
            " both claim VIP 10.96.0.1",
        ),
        ([], [svc("x", "10.96.0.1"), svc("x", "10.96.0.2")], [], "two services have the key"),
        (
            [],
            [],
            [RawPolicy("p", "ns", "{}"), RawPolicy("p", "ns", '{"a":1}')],
            "two AuthorizationPolicy entries have the key 'ns/p'",
        ),
    ],
)
def test_duplicates_are_refused_naming_both(workloads, services, policies, message):
    with pytest.raises(MeshConfigError) as err:
        MeshState.build(workloads, services, policies)
    assert message in str(err.value)


def test_same_ip_on_different_networks_is_allowed():
    a = wl("a", "10.0.0.1", network="n1")
    b = wl("b", "10.0.0.1", network="n2")
    state = MeshState.build([a, b], [], [])
    assert state.workload_by_ip("n1", IPv4Address("10.0.0.1")) is a
    assert state.workload_by_ip("n2", IPv4Address("10.0.0.1")) is b


def test_same_hostname_in_two_services_is_refused():
    a = svc("x", "10.96.0.1")
    b = replace(svc("y", "10.96.0.2", namespace="other"), hostname=a.hostname)
    with pytest.raises(MeshConfigError, match="both use hostname"):
        MeshState.build([], [a, b], [])


def test_workload_identity_and_target_port():
    a = wl("a", "10.0.0.1", services=[(SVC_KEY, ((80, 9090), (443, 8443)))])
    assert a.identity == SpiffeId("cluster.local", "travel", "frontend")
    assert str(a.identity) == "spiffe://cluster.local/ns/travel/sa/frontend"
    assert a.target_port(SVC_KEY, 80) == 9090
    assert a.target_port(SVC_KEY, 443) == 8443
    assert a.target_port(SVC_KEY, 81) is None
    assert a.target_port("travel/other", 80) is None
    assert a.addresses == (NetworkAddress("", IPv4Address("10.0.0.1")),)


def test_service_key_and_target_port():
    s = svc("frontend", "10.96.0.10", ports=((80, 8080), (9000, 9000)))
    assert s.key == SVC_KEY
    assert s.target_port(80) == 8080
    assert s.target_port(9000) == 9000
    assert s.target_port(81) is None


def test_domain_values_are_frozen_and_hashable():
    a = wl("a", "10.0.0.1", services=[(SVC_KEY, ((80, 9090),))])
    with pytest.raises(FrozenInstanceError):
        a.uid = "b"  # type: ignore[misc]
    assert hash(a) == hash(wl("a", "10.0.0.1", services=[(SVC_KEY, ((80, 9090),))]))
    assert {svc("x", "10.96.0.1")} == {svc("x", "10.96.0.1")}
    state = MeshState.build([a], [], [])
    with pytest.raises(FrozenInstanceError):
        state._workloads = ()  # type: ignore[misc]


@pytest.mark.parametrize(("port", "target"), [(0, 80), (80, 0), (65536, 80), (80, 70000)])
def test_service_port_range_is_checked(port, target):
    with pytest.raises(MeshConfigError, match=r"not in 1\.\.65535"):
        ServicePort(port, target)


def test_gateway_address_needs_exactly_one_destination():
    addr = NetworkAddress("", IPv4Address("10.0.0.9"))
    assert GatewayAddress(hostname="travel/waypoint").hbone_port == 15008
    assert GatewayAddress(address=addr, hbone_port=15009).address == addr
    with pytest.raises(MeshConfigError, match="exactly one"):
        GatewayAddress()
    with pytest.raises(MeshConfigError, match="exactly one"):
        GatewayAddress(hostname="travel/w", address=addr)
    with pytest.raises(MeshConfigError, match="namespace/hostname"):
        GatewayAddress(hostname="waypoint")
    with pytest.raises(MeshConfigError, match="hboneMtlsPort"):
        GatewayAddress(hostname="travel/w", hbone_port=0)


def test_raw_policy_is_canonical_and_lossless():
    p1 = RawPolicy.from_mapping("p", "ns", {"b": [1, 2], "a": {"y": 1, "x": None}})
    p2 = RawPolicy.from_mapping("p", "ns", {"a": {"x": None, "y": 1}, "b": [1, 2]})
    assert p1 == p2
    assert hash(p1) == hash(p2)
    assert p1.spec() == {"a": {"x": None, "y": 1}, "b": [1, 2]}
    p1.spec()["a"] = "mutated"
    assert p1.spec()["a"] == {"x": None, "y": 1}
    with pytest.raises(MeshConfigError, match="not plain JSON"):
        RawPolicy.from_mapping("p", "ns", {"x": float("nan")})


def test_building_20k_workloads_indexes_every_one():
    # Speed at scale is the benchmark's (benchmarks/state_load.py); here, that every index
    # holds what it should at a size no hand-written case reaches.
    n = 20_000
    shared = ((SVC_KEY, ((80, 8080),)),)
    base = wl("x", services=shared)
    workloads = [
        replace(
            base,
            uid=f"u{i}",
            ips=(IPv4Address(0x0A000000 + i),),
            node=f"node{i % 50}",
        )
        for i in range(n)
    ]
    s = svc("frontend", "10.96.0.10")
    state = MeshState.build(workloads, [s], [])
    assert len(state.endpoints(s)) == n
    assert len(state.workloads_on_node("node7")) == n // 50
    found = state.workload_by_ip("", IPv4Address(0x0A000000 + 12345))
    assert found is not None
    assert found.uid == "u12345"


def test_knows_address_is_any_workloads_address_in_any_network() -> None:
    a = workload(name="a", namespace="ns", ips=ips("10.1.0.5"))
    b = replace(workload(name="b", namespace="ns", ips=ips("fd00::7")), network="east")
    state = MeshState.build([a, b], [], [])
    assert state.knows_address("10.1.0.5")
    assert state.knows_address("::ffff:10.1.0.5")  # as a dual-stack socket reports it
    assert state.knows_address("fd00::7")
    assert not state.knows_address("10.1.0.6")
    assert not state.knows_address("not an address")
    assert not state.knows_address("")


def test_a_sources_group_is_its_workloads_node_or_its_address() -> None:
    a = replace(workload(name="a", namespace="ns", ips=ips("10.1.0.5")), node="n1")
    b = replace(workload(name="b", namespace="ns", ips=ips("10.1.0.6")), node="n1")
    vm = replace(workload(name="vm", namespace="ns", ips=ips("10.9.0.1")), node="")
    state = MeshState.build([a, b, vm], [], [])
    assert state.source_group("10.1.0.5") == state.source_group("10.1.0.6") == "node/n1"
    assert state.source_group("::ffff:10.1.0.5") == "node/n1"
    assert state.source_group("10.9.0.1") == "addr/10.9.0.1"
    assert state.source_group("10.9.0.2") is None
    assert state.source_group("junk") is None
