"""The hand-written xDS codec against the real protobuf runtime (the project's .proto files
compiled by protoc at test time): field numbers, both directions, strictness, fuzzing."""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.xds import convert
from meshcore.xds import messages as m
from meshcore.xds.wire import WireError
from tests.xds import pb
from tests.xds.states import demo_state


def test_workload_fields_by_number_match_the_reference() -> None:
    w = pb.workload()
    ref = w.Address(
        workload=w.Workload(
            uid="c//Pod/ns/a",
            name="a",
            namespace="ns",
            addresses=[ipaddress.ip_address("10.0.0.1").packed],
            network="net",
            tunnel_protocol=w.HBONE,
            trust_domain="td",
            service_account="sa",
            node="node1",
            canonical_name="cn",
            canonical_revision="v1",
            workload_type=w.POD,
            workload_name="wn",
            authorization_policies=["ns/p"],
            status=w.UNHEALTHY,
            cluster_id="c",
            waypoint=w.GatewayAddress(
                hostname=w.NamespacedHostname(namespace="ns", hostname="wp"), hbone_mtls_port=15009
            ),
        )
    )
    ref.workload.services["ns/svc"].ports.add(service_port=80, target_port=8080)
    ours = m.decode(m.Address, ref.SerializeToString())
    assert ours.service is None and ours.workload is not None
    x = ours.workload
    assert (x.uid, x.name, x.namespace, x.network, x.trust_domain, x.service_account) == (
        "c//Pod/ns/a",
        "a",
        "ns",
        "net",
        "td",
        "sa",
    )
    assert x.addresses == (bytes([10, 0, 0, 1]),)
    assert (x.tunnel_protocol, x.status, x.workload_type) == (1, 1, 2)
    assert (x.node, x.canonical_name, x.canonical_revision, x.workload_name) == (
        "node1",
        "cn",
        "v1",
        "wn",
    )
    assert x.authorization_policies == ("ns/p",) and x.cluster_id == "c"
    assert x.services == (m.ServicesEntry("ns/svc", m.PortList((m.Port(80, 8080),))),)
    assert x.waypoint == m.GatewayAddress(m.NamespacedHostname("ns", "wp"), None, 15009)


def test_delta_messages_by_number_match_the_reference() -> None:
    d = pb.discovery()
    req = d.DeltaDiscoveryRequest(
        type_url=m.ADDRESS_TYPE,
        resource_names_subscribe=["*"],
        resource_names_unsubscribe=["x"],
        response_nonce="n1",
    )
    req.node.id = "node-1"
    req.node.cluster = "c"
    req.initial_resource_versions["a"] = "v1"
    req.error_detail.code = 3
    req.error_detail.message = "bad"
    ours = m.decode(m.DeltaDiscoveryRequest, req.SerializeToString())
    assert ours == m.DeltaDiscoveryRequest(
        node=m.Node("node-1", "c"),
        type_url=m.ADDRESS_TYPE,
        resource_names_subscribe=("*",),
        resource_names_unsubscribe=("x",),
        initial_resource_versions=(m.VersionEntry("a", "v1"),),
        response_nonce="n1",
        error_detail=m.Status(3, "bad"),
    )
    resp = m.DeltaDiscoveryResponse(
        system_version_info="s",
        resources=(m.Resource("r", (), "v", m.Any_(m.ADDRESS_TYPE, b"\x0a\x00")),),
        type_url=m.ADDRESS_TYPE,
        removed_resources=("gone",),
        nonce="7",
    )
    ref = d.DeltaDiscoveryResponse.FromString(m.encode(resp))
    assert ref.system_version_info == "s" and ref.nonce == "7" and ref.type_url == m.ADDRESS_TYPE
    assert list(ref.removed_resources) == ["gone"]
    assert ref.resources[0].name == "r" and ref.resources[0].version == "v"
    assert ref.resources[0].resource.type_url == m.ADDRESS_TYPE
    assert ref.resources[0].resource.value == b"\x0a\x00"


def _reference_class(type_url: str) -> Any:
    return {
        m.ADDRESS_TYPE: pb.workload().Address,
        m.AUTHORIZATION_TYPE: pb.authorization().Authorization,
        m.L7_RESOURCE_TYPE: pb.ambient().L7Resource,
    }[type_url]


def test_every_demo_resource_survives_the_reference_runtime() -> None:
    """Ours -> protobuf parses it -> protobuf writes it -> ours reads the same message."""
    resources = convert.resources_of(demo_state())
    count = 0
    for type_url, named in resources.items():
        cls = _reference_class(type_url)
        ours_cls = {
            m.ADDRESS_TYPE: m.Address,
            m.AUTHORIZATION_TYPE: m.Authorization,
            m.L7_RESOURCE_TYPE: m.L7Resource,
        }[type_url]
        for body in named.values():
            ref = cls.FromString(body)
            assert ref.IsInitialized()
            again = ref.SerializeToString(deterministic=True)
            assert m.decode(ours_cls, again) == m.decode(ours_cls, body)
            count += 1
    assert count == 19


def test_authorization_rules_are_what_upstream_reads() -> None:
    named = convert.resources_of(demo_state())[m.AUTHORIZATION_TYPE]
    a = pb.authorization()
    ref = a.Authorization.FromString(named["istio-system/global"])
    assert (ref.name, ref.namespace, ref.scope, ref.action) == (
        "global",
        "istio-system",
        a.GLOBAL,
        a.ALLOW,
    )
    match = ref.rules[0].clauses[0].matches[0]
    assert list(match.destination_ports) == [80, 443]
    assert match.service_accounts[0].serviceAccount == "x"
    assert match.principals[0].WhichOneof("match_type") == "presence"
    assert match.not_principals[0].suffix == "/sa/bad"
    deny = a.Authorization.FromString(named["travel/deny-legacy"])
    assert deny.action == a.DENY and deny.scope == a.NAMESPACE
    nm = deny.rules[0].clauses[0].matches[0]
    assert nm.namespaces[0].exact == "legacy"
    assert (
        nm.not_source_ips[0].address == bytes([10, 0, 0, 1]) and nm.not_source_ips[0].length == 32
    )
    broken = a.Authorization.FromString(named["travel/broken"])
    assert len(broken.rules) == 1 and not broken.rules[0].clauses  # fail closed: matches all


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x0a", "truncated"),  # length missing
        (b"\x0a\x05ab", "truncated"),
        (b"\x00\x01", "field number 0"),
        (b"\x08\x01", "wire type 0"),  # workload (field 1) as a varint
        (b"\x0a\x03\xa2\x01\x80", "truncated"),
        (b"\x0a\x04\x0a\x02\xff\xfe", "UTF-8"),
        (b"\x7f", "invalid wire type"),  # field 15 (unknown), wire type 7
        (b"\xff" * 11, "varint"),
    ],
)
def test_malformed_input_is_one_clear_error(data: bytes, error: str) -> None:
    with pytest.raises(WireError, match=error):
        m.decode(m.Address, data)


def test_deep_nesting_is_refused() -> None:
    data = b""
    for _ in range(200):
        data = b"\x1b" + data + b"\x1c"  # groups of field 3 inside each other
    with pytest.raises(WireError, match="deeper"):
        m.decode(m.Address, data)


def test_oversized_input_is_refused() -> None:
    with pytest.raises(WireError, match="over the limit"):
        m.decode(m.L7Resource, b"\x00" * (m.MAX_MESSAGE_SIZE + 1))


def test_unknown_fields_are_skipped_and_packed_or_not_ports_both_read() -> None:
    unpacked = b"\x48\x50\x48\x51"  # destination_ports 80, 81 one by one
    packed = b"\x4a\x02\x50\x51"
    unknown = b"\xf8\x01\x07\xfa\x01\x01x\x9d\x01\x00\x00\x00\x00"
    assert m.decode(m.Match, unpacked + unknown) == m.Match(destination_ports=(80, 81))
    assert m.decode(m.Match, packed) == m.Match(destination_ports=(80, 81))
    with pytest.raises(WireError, match="uint32"):
        m.decode(m.Match, b"\x48\x80\x80\x80\x80\x10")


def test_encoding_refuses_values_the_schema_forbids() -> None:
    with pytest.raises(WireError, match="uint32"):
        m.encode(m.Port(service_port=-1))
    with pytest.raises(WireError, match="string"):
        m.encode(m.Node(id=3))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    for cls in (m.Address, m.Authorization, m.DeltaDiscoveryRequest, m.DeltaDiscoveryResponse):
        with contextlib.suppress(WireError):
            m.decode(cls, data)
        with contextlib.suppress(convert.ResourceError):
            convert.decode_resource(m.ADDRESS_TYPE, "x", data)


names = st.text(st.characters(codec="utf-8", categories=("L", "N", "P")), max_size=8)


@settings(max_examples=100, deadline=None)
@given(
    names,
    st.lists(names, max_size=3),
    st.dictionaries(names, names, max_size=3),
    st.none() | st.builds(m.Status, st.integers(-(2**31), 2**31 - 1), names),
)
def test_requests_agree_with_the_reference(type_url, subscribe, versions, status) -> None:
    ours = m.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=tuple(subscribe),
        initial_resource_versions=tuple(m.VersionEntry(k, v) for k, v in sorted(versions.items())),
        error_detail=status,
    )
    ref = pb.discovery().DeltaDiscoveryRequest.FromString(m.encode(ours))
    assert ref.type_url == type_url and list(ref.resource_names_subscribe) == subscribe
    assert dict(ref.initial_resource_versions) == versions
    assert ref.HasField("error_detail") == (status is not None)
    back = m.decode(m.DeltaDiscoveryRequest, ref.SerializeToString(deterministic=True))
    # A map's entries come in any order.
    assert {e.key: e.value for e in back.initial_resource_versions} == versions
    assert back.resource_names_subscribe == ours.resource_names_subscribe
    assert back.error_detail == ours.error_detail
