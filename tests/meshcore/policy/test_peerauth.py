"""PeerAuthentication: parsing and mTLS mode precedence (meshcore.policy.peerauth, through
PolicyIndex)."""

from __future__ import annotations

import json
from ipaddress import ip_address
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.index import PolicyIndex
from meshcore.policy.model import Request
from meshcore.policy.peerauth import MtlsMode, PeerAuthentication, parse_peer_authentication
from meshcore.state import MeshConfigError, MeshState, RawPolicy, Workload
from tests.meshcore.policy.test_rbac import workload as rbac_workload
from tests.support.mesh import peer_authentication

ROOT = ROOT_NAMESPACE
NS = "app"
WEB = {"app": "web"}
WEB_IP = ip_address("10.1.0.1")
CLIENT_IP = ip_address("10.0.0.5")
CLIENT = SpiffeId("cluster.local", "client", "client")


def workload(
    ns: str = NS, labels: dict[str, str] | None = None, uid: str = "w1", ip: str = "10.1.0.1"
) -> Workload:
    return rbac_workload(ns, labels, uid=uid, ip=ip)


def pa(name: str, spec: Any, ns: str = NS) -> RawPolicy:
    return peer_authentication(name, spec, ns)


def mode(m: str | None) -> dict[str, Any]:
    return {} if m is None else {"mtls": {"mode": m}}


def mesh(m: str | None) -> RawPolicy:
    return pa("mesh", mode(m), ns=ROOT)


def namespace(m: str | None) -> RawPolicy:
    return pa("ns", mode(m))


def selector(m: str | None, ports: dict[str, str] | None = None) -> RawPolicy:
    spec: dict[str, Any] = {"selector": {"matchLabels": WEB}, **mode(m)}
    if ports:
        spec["portLevelMtls"] = {p: {"mode": v} for p, v in ports.items()}
    return pa("web", spec)


def build(*raws: RawPolicy, workloads: tuple[Workload, ...] = ()) -> PolicyIndex:
    return PolicyIndex.build(MeshState.build(workloads, (), raws), ROOT)


S, P, D, U = "STRICT", "PERMISSIVE", "DISABLE", "UNSET"

# (id, policies, expected mode of the web workload on port 8080, and on port 9090)
PRECEDENCE: list[tuple[str, list[RawPolicy], str, str]] = [
    ("nothing: permissive", [], P, P),
    ("mesh strict", [mesh(S)], S, S),
    ("mesh permissive", [mesh(P)], P, P),
    ("mesh unset", [mesh(U)], P, P),
    ("mesh without mtls", [mesh(None)], P, P),
    ("namespace beats mesh", [mesh(S), namespace(P)], P, P),
    ("namespace strict", [mesh(P), namespace(S)], S, S),
    ("namespace unset inherits mesh", [mesh(S), namespace(U)], S, S),
    ("selector beats namespace", [namespace(S), selector(P)], P, P),
    ("selector strict over permissive namespace", [namespace(P), selector(S)], S, S),
    ("selector unset inherits namespace", [namespace(S), selector(U)], S, S),
    ("selector unset inherits mesh", [mesh(S), selector(None)], S, S),
    ("selector disable", [mesh(S), selector(D)], D, D),
    ("port level beats selector", [selector(S, {"8080": P})], P, S),
    ("port level strict", [mesh(P), selector(P, {"8080": S})], S, P),
    ("port level disable", [namespace(S), selector(S, {"8080": D})], D, S),
    ("port level unset inherits selector", [selector(S, {"8080": U})], S, S),
    (
        "port level unset inherits namespace",
        [namespace(S), selector(U, {"8080": U, "9090": P})],
        S,
        P,
    ),
    ("port level over unset selector over mesh", [mesh(S), selector(None, {"9090": P})], S, P),
    ("all levels", [mesh(P), namespace(S), selector(P, {"9090": S})], P, S),
]


PRECEDENCE_PARAMS = [pytest.param(r, a, b, id=i) for i, r, a, b in PRECEDENCE]


@pytest.mark.parametrize(("raws", "port_8080", "port_9090"), PRECEDENCE_PARAMS)
def test_precedence(raws: list[RawPolicy], port_8080: str, port_9090: str):
    index = build(*raws)
    web = workload(labels=WEB)
    assert index.mtls_mode(web, 8080) is MtlsMode[port_8080]
    assert index.mtls_mode(web, 9090) is MtlsMode[port_9090]
    assert index.errors == ()


@pytest.mark.parametrize(("raws", "port_8080", "port_9090"), PRECEDENCE_PARAMS)
def test_the_verdict_carries_the_ports_mode(raws: list[RawPolicy], port_8080: str, port_9090: str):
    """What `authorize` answers names the same mode `mtls_mode` resolves, port by port, and a
    plaintext client is refused exactly where that mode is STRICT."""
    index = build(*raws)
    web = workload(labels=WEB)
    for port, expected in ((8080, port_8080), (9090, port_9090)):
        tls = index.evaluate(web, Request(CLIENT_IP, CLIENT, WEB_IP, port))
        plain = index.evaluate(web, Request(CLIENT_IP, None, WEB_IP, port))
        assert (tls.mtls, plain.mtls) == (MtlsMode[expected], MtlsMode[expected])
        assert tls.allowed
        assert plain.allowed is (expected != S)


def test_strict_refuses_plaintext_before_a_broken_policy_is_consulted():
    broken = RawPolicy.from_mapping(
        "typo", NS, {"kind": "AuthorizationPolicy", "metadata": {}, "spec": {"action": "ALOW"}}
    )
    index = build(namespace(S), broken)
    plain = index.evaluate(workload(), Request(CLIENT_IP, None, WEB_IP, 8080))
    assert (plain.allowed, plain.policy, plain.mtls) == (False, "app/ns", MtlsMode.STRICT)
    assert "requires mTLS (STRICT)" in plain.reason
    tls = index.evaluate(workload(), Request(CLIENT_IP, CLIENT, WEB_IP, 8080))
    assert (tls.allowed, tls.policy) == (False, "app/typo")
    assert "invalid" in tls.reason


def test_selector_policy_does_not_apply_to_other_workloads_or_namespaces():
    index = build(mesh(P), selector(S, {"8080": S}))
    assert index.mtls_mode(workload(labels={"app": "db"}), 8080) is MtlsMode.PERMISSIVE
    assert index.mtls_mode(workload(ns="other", labels=WEB), 8080) is MtlsMode.PERMISSIVE
    assert index.mtls_mode(workload(labels={**WEB, "v": "2"}), 8080) is MtlsMode.STRICT


def test_namespace_policy_is_per_namespace():
    index = build(namespace(S))
    assert index.mtls_mode(workload(), 80) is MtlsMode.STRICT
    assert index.mtls_mode(workload(ns="other"), 80) is MtlsMode.PERMISSIVE


def test_root_namespace_selector_applies_to_root_workloads_only():
    raw = pa("root-web", {"selector": {"matchLabels": WEB}, "mtls": {"mode": "STRICT"}}, ns=ROOT)
    index = build(raw)
    assert index.mtls_mode(workload(ns=ROOT, labels=WEB), 80) is MtlsMode.STRICT
    assert index.mtls_mode(workload(labels=WEB), 80) is MtlsMode.PERMISSIVE
    assert parse_peer_authentication(raw, ROOT).warnings == (
        "a selector in the root namespace selects workloads of the root namespace only",
    )


def test_flat_entry_without_namespace_is_mesh_wide():
    raw = RawPolicy.from_mapping(
        "m", "", {"name": "m", "mtls": {"mode": "STRICT"}}, kind="PeerAuthentication"
    )
    assert build(raw).mtls_mode(workload(ns="anything"), 80) is MtlsMode.STRICT


@pytest.mark.parametrize(
    ("m", "plaintext_ok"),
    [(MtlsMode.STRICT, False), (MtlsMode.PERMISSIVE, True), (MtlsMode.DISABLE, True)],
)
def test_disable_accepts_plaintext_like_permissive(m: MtlsMode, plaintext_ok: bool):
    assert m.accepts_plaintext is plaintext_ok


def test_several_selector_policies_pick_by_name_and_warn():
    a = pa("a-strict", {"selector": {"matchLabels": WEB}, "mtls": {"mode": "STRICT"}})
    b = pa(
        "b-permissive",
        {"selector": {"matchLabels": {"tier": "front"}}, "mtls": {"mode": "PERMISSIVE"}},
    )
    both = workload(labels={**WEB, "tier": "front"}, uid="both")
    index = build(b, a, workloads=(both,))
    assert index.mtls_mode(both, 80) is MtlsMode.STRICT
    assert index.warnings == (
        "workload both is selected by 2 PeerAuthentications (app/a-strict, app/b-permissive); "
        "using app/a-strict",
    )


def test_several_namespace_policies_pick_by_name_and_warn():
    index = build(
        pa("z", mode(S)), pa("a", mode(P)), pa("m1", mode(S), ns=ROOT), pa("m0", mode(P), ns=ROOT)
    )
    assert index.mtls_mode(workload(), 80) is MtlsMode.PERMISSIVE
    assert index.mtls_mode(workload(ns="other"), 80) is MtlsMode.PERMISSIVE
    assert set(index.warnings) == {
        f"2 mesh-wide PeerAuthentications ({ROOT}/m0, {ROOT}/m1); using {ROOT}/m0",
        "2 namespace-wide in app PeerAuthentications (app/a, app/z); using app/a",
    }


# -- malformed and broken --------------------------------------------------------------------------

MALFORMED: list[tuple[str, RawPolicy, str]] = [
    (
        "unknown spec key",
        pa("p", {"mtl": {}}),
        "spec.mtl: unknown field (expected one of mtls, portLevelMtls, selector)",
    ),
    (
        "bad mode",
        pa("p", {"mtls": {"mode": "ON"}}),
        "spec.mtls.mode: expected one of UNSET, STRICT, PERMISSIVE, DISABLE, got 'ON'",
    ),
    ("mode not a string", pa("p", {"mtls": {"mode": True}}), "spec.mtls.mode: expected one of"),
    (
        "mtls not a mapping",
        pa("p", {"mtls": "STRICT"}),
        "spec.mtls: expected a mapping, got a string",
    ),
    ("unknown mtls key", pa("p", {"mtls": {"mod": "STRICT"}}), "spec.mtls.mod: unknown field"),
    (
        "port levels without selector",
        pa("p", {"portLevelMtls": {"80": {"mode": "STRICT"}}}),
        "a namespace- or mesh-wide PeerAuthentication cannot set port modes",
    ),
    (
        "empty port levels",
        pa("p", {"selector": {"matchLabels": WEB}, "portLevelMtls": {}}),
        "spec.portLevelMtls: if given, it must list at least one port",
    ),
    (
        "port not a number",
        pa("p", {"selector": {"matchLabels": WEB}, "portLevelMtls": {"http": {"mode": "STRICT"}}}),
        "spec.portLevelMtls.http: 'http' is not a port number",
    ),
    (
        "port zero",
        pa("p", {"selector": {"matchLabels": WEB}, "portLevelMtls": {"0": {"mode": "STRICT"}}}),
        "spec.portLevelMtls.0: port 0 is not in 1..65535",
    ),
    (
        "port twice",
        pa("p", {"selector": {"matchLabels": WEB}, "portLevelMtls": {"80": {}, "080": {}}}),
        "port 80 is listed twice",
    ),
    (
        "bad port mode",
        pa("p", {"selector": {"matchLabels": WEB}, "portLevelMtls": {"80": {"mode": "X"}}}),
        "spec.portLevelMtls.80.mode: expected one of",
    ),
    (
        "selector labels",
        pa("p", {"selector": {"matchLabels": {"a": 1}}}),
        "spec.selector.matchLabels.a: label value must be a string",
    ),
    (
        "wrong kind",
        RawPolicy.from_mapping("p", NS, {"name": "p"}),
        "is a AuthorizationPolicy, not a PeerAuthentication",
    ),
]


@pytest.mark.parametrize(("raw", "message"), [pytest.param(r, m, id=i) for i, r, m in MALFORMED])
def test_malformed_is_a_clear_config_error(raw: RawPolicy, message: str):
    with pytest.raises(MeshConfigError) as info:
        parse_peer_authentication(raw, ROOT)
    assert str(info.value).startswith("PeerAuthentication app/p: ")
    assert message in str(info.value)


def test_broken_peer_authentication_is_strict_at_its_level():
    broken = pa("typo", {"selector": {"matchLabels": WEB}, "mtls": {"mode": "STRICTT"}})
    index = build(namespace(P), broken)
    assert index.errors == (
        "PeerAuthentication app/typo: spec.mtls.mode: expected one of UNSET, STRICT, PERMISSIVE, "
        "DISABLE, got 'STRICTT'; it acts as STRICT until fixed",
    )
    assert index.mtls_mode(workload(labels=WEB), 80) is MtlsMode.STRICT  # its selector parsed
    assert index.mtls_mode(workload(labels={"app": "db"}), 80) is MtlsMode.PERMISSIVE


def test_broken_peer_authentication_with_unreadable_selector_covers_the_namespace():
    index = build(pa("typo", {"selector": {"matchLabel": WEB}, "mtls": {"mode": "PERMISSIVE"}}))
    assert index.mtls_mode(workload(labels={"app": "db"}), 80) is MtlsMode.STRICT
    assert index.mtls_mode(workload(ns="other"), 80) is MtlsMode.PERMISSIVE


def test_broken_peer_authentication_wins_a_tie():
    index = build(pa("a", mode(P)), pa("b", {"mtls": "oops"}))
    assert index.mtls_mode(workload(), 80) is MtlsMode.STRICT


# -- dumps -----------------------------------------------------------------------------------------


def test_peer_authentications_json():
    index = build(selector(S, {"9090": P, "8080": U}), mesh(P))
    assert index.peer_authentications_json() == [
        {
            "name": "web",
            "namespace": "app",
            "selector": {"matchLabels": WEB},
            "mode": "STRICT",
            "portLevelMtls": {"8080": "UNSET", "9090": "PERMISSIVE"},
            "warnings": [],
        },
        {
            "name": "mesh",
            "namespace": ROOT,
            "selector": None,
            "mode": "PERMISSIVE",
            "portLevelMtls": {},
            "warnings": [],
        },
    ]


def test_parsed_value():
    parsed = parse_peer_authentication(selector(P, {"8080": S}), ROOT)
    assert parsed == PeerAuthentication(
        "web", NS, (("app", "web"),), MtlsMode.PERMISSIVE, ((8080, MtlsMode.STRICT),)
    )
    assert parsed.port_mode(8080) is MtlsMode.STRICT
    assert parsed.port_mode(1) is MtlsMode.UNSET


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(["STRICT", "80", "x", "", "PERMISSIVE"]),
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["mtls", "mode", "selector", "matchLabels", "portLevelMtls", "80", "x"]
            ),
            c,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(spec=JSONISH, resource=st.booleans())
def test_arbitrary_specs_parse_or_raise_config_error(spec: Any, resource: bool):
    raw = pa("p", spec) if resource else RawPolicy("p", NS, json.dumps(spec), "PeerAuthentication")
    error = None
    try:
        parsed = parse_peer_authentication(raw, ROOT)
    except MeshConfigError as exc:
        error = str(exc)
    if error is not None:
        assert error.startswith("PeerAuthentication app/p")
        return
    json.dumps(parsed.to_json())
    assert build(raw).mtls_mode(workload(labels=WEB), 80) is not MtlsMode.UNSET
