"""The local config parser (every field, default and error path) and the file watcher."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from meshcore.discovery import LocalConfigWatcher, parse_local_config
from meshcore.identity.spiffe import SpiffeId
from meshcore.state import (
    GatewayAddress,
    HealthStatus,
    MeshConfigError,
    MeshState,
    NetworkAddress,
    ServicePort,
    TunnelProtocol,
)
from tests.support.aio import Loop, wait_until

FULL = """
workloads:
  - uid: "travel//Pod/travel/frontend-0"
    name: frontend-0
    namespace: travel
    serviceAccount: frontend
    trustDomain: example.org
    workloadIps: ["10.244.1.10", "fd00::10"]
    protocol: HBONE
    node: node1
    canonicalName: frontend
    canonicalRevision: v1
    workloadName: frontend
    workloadType: deployment
    clusterId: travel
    status: Unhealthy
    network: net1
    waypoint: null
    services:
      "travel/frontend.travel.svc.cluster.local": {80: 8080, "443": "8443"}
services:
  - name: frontend
    namespace: travel
    hostname: frontend.travel.svc.cluster.local
    vips: ["/10.96.0.10", "net1/fd00:96::10"]
    ports: {80: 8080, 443: 8443}
    subjectAltNames: ["spiffe://example.org/ns/travel/sa/frontend"]
    waypoint: null
policies:
  - name: allow-frontend
    namespace: travel
    action: ALLOW
    rules: [{from: [{principals: ["*"]}]}]
"""

MINIMAL_WORKLOAD = {"uid": "u1", "name": "pod-0", "namespace": "ns"}
MINIMAL_SERVICE = {"name": "svc", "namespace": "ns", "hostname": "svc.ns.svc.cluster.local"}


def doc(**top: Any) -> str:
    return yaml.safe_dump(top)


def one_workload(**fields: Any):
    entry = {**MINIMAL_WORKLOAD, **fields}
    return parse_local_config(doc(workloads=[entry])).workloads[0]


def one_service(**fields: Any):
    entry = {**MINIMAL_SERVICE, **fields}
    return parse_local_config(doc(services=[entry])).services[0]


# -- valid documents ---------------------------------------------------------------------------


def test_full_document_sets_every_field():
    state = parse_local_config(FULL)
    (w,) = state.workloads
    assert w.uid == "travel//Pod/travel/frontend-0"
    assert w.name == "frontend-0"
    assert w.namespace == "travel"
    assert w.service_account == "frontend"
    assert w.trust_domain == "example.org"
    assert w.ips == (IPv4Address("10.244.1.10"), IPv6Address("fd00::10"))
    assert w.protocol is TunnelProtocol.HBONE
    assert w.node == "node1"
    assert w.canonical_name == "frontend"
    assert w.canonical_revision == "v1"
    assert w.workload_name == "frontend"
    assert w.workload_type == "deployment"
    assert w.cluster_id == "travel"
    assert w.status is HealthStatus.UNHEALTHY
    assert w.network == "net1"
    assert w.waypoint is None
    assert w.services == (("travel/frontend.travel.svc.cluster.local", ((80, 8080), (443, 8443))),)
    assert w.identity == SpiffeId("example.org", "travel", "frontend")

    (s,) = state.services
    assert (s.name, s.namespace, s.hostname) == (
        "frontend",
        "travel",
        "frontend.travel.svc.cluster.local",
    )
    assert s.vips == (
        NetworkAddress("", IPv4Address("10.96.0.10")),
        NetworkAddress("net1", IPv6Address("fd00:96::10")),
    )
    assert s.ports == (ServicePort(80, 8080), ServicePort(443, 8443))
    assert s.subject_alt_names == ("spiffe://example.org/ns/travel/sa/frontend",)
    assert s.waypoint is None

    (p,) = state.policies
    assert (p.name, p.namespace) == ("allow-frontend", "travel")
    assert p.spec() == {
        "name": "allow-frontend",
        "namespace": "travel",
        "action": "ALLOW",
        "rules": [{"from": [{"principals": ["*"]}]}],
    }

    assert state.workload_by_ip("net1", IPv6Address("fd00::10")) is w
    assert state.service_by_vip("", IPv4Address("10.96.0.10")) is s
    assert state.endpoints(s) == (w,)


def test_missing_optional_workload_fields_take_their_defaults():
    w = one_workload()
    assert w.service_account == "default"
    assert w.trust_domain == "cluster.local"
    assert w.protocol is TunnelProtocol.NONE
    assert w.network == ""
    assert w.status is HealthStatus.HEALTHY
    assert w.canonical_name == "pod-0"
    assert w.canonical_revision == "latest"
    assert w.workload_name == "pod-0"
    assert w.workload_type == "pod"
    assert w.cluster_id == "Kubernetes"
    assert w.node == ""
    assert w.ips == ()
    assert w.services == ()
    assert w.waypoint is None
    assert str(w.identity) == "spiffe://cluster.local/ns/ns/sa/default"


def test_explicit_nulls_take_defaults_too():
    w = one_workload(serviceAccount=None, protocol=None, workloadIps=None, services=None)
    assert (w.service_account, w.protocol, w.ips, w.services) == (
        "default",
        TunnelProtocol.NONE,
        (),
        (),
    )


def test_missing_optional_service_fields_take_their_defaults():
    s = one_service()
    assert (s.vips, s.ports, s.subject_alt_names, s.waypoint) == ((), (), (), None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("TCP", TunnelProtocol.NONE),
        ("NONE", TunnelProtocol.NONE),
        ("HBONE", TunnelProtocol.HBONE),
        ("hbone", TunnelProtocol.HBONE),
    ],
)
def test_protocol_spellings(value, expected):
    assert one_workload(protocol=value).protocol is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Healthy", HealthStatus.HEALTHY),
        ("Unhealthy", HealthStatus.UNHEALTHY),
        ("UNHEALTHY", HealthStatus.UNHEALTHY),
    ],
)
def test_status_spellings(value, expected):
    assert one_workload(status=value).status is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("travel/waypoint", GatewayAddress(hostname="travel/waypoint")),
        ({"hostname": "travel/wp"}, GatewayAddress(hostname="travel/wp")),
        (
            {"hostname": "travel/wp", "hboneMtlsPort": 15009},
            GatewayAddress(hostname="travel/wp", hbone_port=15009),
        ),
        (
            {"address": "/10.0.0.9"},
            GatewayAddress(address=NetworkAddress("", IPv4Address("10.0.0.9"))),
        ),
    ],
)
def test_waypoint_forms(value, expected):
    assert one_workload(waypoint=value).waypoint == expected
    assert one_service(waypoint=value).waypoint == expected


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "{}", "---\n", "null"])
def test_empty_documents_are_an_empty_state(text):
    assert parse_local_config(text) == MeshState.empty()


def test_empty_lists_and_nulls_at_top_level():
    assert parse_local_config("workloads: []\nservices:\npolicies: []\n") == MeshState.empty()


def test_port_keys_as_strings_or_ints_mean_the_same():
    a = one_service(ports={80: 8080})
    b = one_service(ports={"80": "8080"})
    assert a.ports == b.ports == (ServicePort(80, 8080),)


def test_json_documents_parse_like_yaml():
    as_json = json.dumps(yaml.safe_load(FULL))
    assert parse_local_config(as_json) == parse_local_config(FULL)


def test_flow_style_yaml_that_is_not_json_still_parses():
    state = parse_local_config("{workloads: [{uid: u, name: n, namespace: ns}]}")
    assert state.workloads[0].uid == "u"


def test_policy_without_namespace_is_global():
    state = parse_local_config(doc(policies=[{"name": "deny-all", "action": "DENY"}]))
    assert state.policies_in_namespace("")[0].name == "deny-all"


# -- errors ------------------------------------------------------------------------------------

W = "workloads[0]"
S = "services[0]"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"uid": None}, f"{W}.uid: is required"),
        ({"uid": ""}, f"{W}.uid: must not be empty"),
        ({"uid": 5}, f"{W}.uid: expected a string, got a number"),
        ({"name": None}, f"{W}.name: is required"),
        ({"namespace": None}, f"{W}.namespace: is required"),
        ({"namespace": "a/b"}, f"{W}.namespace: 'a/b' must not contain '/'"),
        ({"serviceAccount": ""}, f"{W}.serviceAccount: must not be empty"),
        ({"trustDomain": "x/y"}, f"{W}.trustDomain: 'x/y' must not contain '/'"),
        ({"workloadIps": ["10.1.1"]}, f"{W}.workloadIps[0]: '10.1.1' is not an IP address"),
        ({"workloadIps": "10.0.0.1"}, f"{W}.workloadIps: expected a list, got a string"),
        ({"workloadIps": [10]}, f"{W}.workloadIps[0]: expected an IP address string, got a number"),
        (
            {"workloadIps": ["10.0.0.1", "10.0.0.1"]},
            f"{W}.workloadIps[1]: 10.0.0.1 is listed twice",
        ),
        ({"protocol": "UDP"}, f"{W}.protocol: 'UDP' is not one of HBONE, NONE, TCP"),
        ({"status": "Sick"}, f"{W}.status: 'Sick' is not one of HEALTHY, UNHEALTHY"),
        ({"node": ["n"]}, f"{W}.node: expected a string, got a list"),
        ({"network": 1}, f"{W}.network: expected a string, got a number"),
        ({"canonicalName": 1}, f"{W}.canonicalName: expected a string"),
        ({"canonicalRevision": 2}, f"{W}.canonicalRevision: expected a string"),
        ({"workloadName": True}, f"{W}.workloadName: expected a string"),
        ({"workloadType": {}}, f"{W}.workloadType: expected a string"),
        ({"clusterId": 3.5}, f"{W}.clusterId: expected a string"),
        ({"services": ["a/b"]}, f"{W}.services: expected a mapping, got a list"),
        ({"services": {"nohost": {80: 80}}}, "service key must be 'namespace/hostname'"),
        ({"services": {"a/b": [80]}}, f"{W}.services['a/b']: expected a mapping, got a list"),
        ({"services": {"a/b": {0: 80}}}, f"{W}.services['a/b'][0]: port 0 is not in 1..65535"),
        (
            {"services": {"a/b": {80: 65536}}},
            f"{W}.services['a/b'][80]: port 65536 is not in 1..65535",
        ),
        ({"services": {"a/b": {"http": 80}}}, "'http' is not a port number"),
        ({"services": {"a/b": {80: True}}}, "True is not a port number"),
        ({"services": {"a/b": {"80": 1, 80: 2}}}, "port 80 is given twice"),
        ({"waypoint": "nons"}, f"{W}.waypoint.hostname: 'nons' is not of the form"),
        ({"waypoint": {}}, f"{W}.waypoint: give exactly one of"),
        ({"waypoint": {"host": "a/b"}}, f"{W}.waypoint.host: unknown field"),
        ({"waypoint": {"address": "10.0.0.1"}}, "is not of the form '<network>/<ip>'"),
        ({"waypoint": {"hostname": "a/b", "hboneMtlsPort": 0}}, "port 0 is not in 1..65535"),
        ({"waypoint": 7}, f"{W}.waypoint: expected a mapping, got a number"),
        ({"serviceAcount": "x"}, f"{W}.serviceAcount: unknown field"),
    ],
)
def test_workload_errors(fields, message):
    entry = {**MINIMAL_WORKLOAD, **fields}
    entry = {k: v for k, v in entry.items() if v is not None or k not in MINIMAL_WORKLOAD}
    with pytest.raises(MeshConfigError) as err:
        parse_local_config(doc(workloads=[entry]))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": None}, f"{S}.name: is required"),
        ({"namespace": None}, f"{S}.namespace: is required"),
        ({"hostname": None}, f"{S}.hostname: is required"),
        ({"hostname": "a/b"}, f"{S}.hostname: 'a/b' must not contain '/'"),
        ({"vips": ["10.96.0.1"]}, f"{S}.vips[0]: '10.96.0.1' is not of the form '<network>/<ip>'"),
        ({"vips": ["/10.96.0"]}, f"{S}.vips[0]: '10.96.0' is not an IP address"),
        ({"vips": ["a/b/10.0.0.1"]}, f"{S}.vips[0]: 'a/b/10.0.0.1' is not of the form"),
        ({"vips": ["/10.0.0.1", "/10.0.0.1"]}, f"{S}.vips[1]: /10.0.0.1 is listed twice"),
        ({"vips": {"/10.0.0.1": 1}}, f"{S}.vips: expected a list, got a mapping"),
        ({"ports": [80]}, f"{S}.ports[0]: expected a mapping, got a number"),
        ({"ports": {80: 0}}, f"{S}.ports[80]: port 0 is not in 1..65535"),
        ({"ports": {-1: 80}}, f"{S}.ports[-1]: port -1 is not in 1..65535"),
        ({"ports": {"99999": 80}}, "port 99999 is not in 1..65535"),
        ({"ports": {"²": 80}}, "'²' is not a port number"),
        ({"subjectAltNames": [1]}, f"{S}.subjectAltNames[0]: expected a non-empty string"),
        ({"subjectAltNames": "x"}, f"{S}.subjectAltNames: expected a list, got a string"),
        ({"waypoint": {"address": "/nope"}}, f"{S}.waypoint.address: 'nope' is not an IP"),
        ({"selector": {}}, f"{S}.selector: unknown field"),
    ],
)
def test_service_errors(fields, message):
    entry = {**MINIMAL_SERVICE, **fields}
    entry = {k: v for k, v in entry.items() if v is not None}
    with pytest.raises(MeshConfigError) as err:
        parse_local_config(doc(services=[entry]))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "config: expected a mapping, got a list"),
        ("just a string", "config: expected a mapping, got a string"),
        ("42", "config: expected a mapping, got a number"),
        ("workload: []", "config.workload: unknown field"),
        ("workloads: {}", "workloads: expected a list, got a mapping"),
        ("workloads: [5]", "workloads[0]: expected a mapping, got a number"),
        ("services: [[]]", "services[0]: expected a mapping, got a list"),
        ("policies: [x]", "policies[0]: expected a mapping, got a string"),
        ("policies: [{action: ALLOW}]", "policies[0].name: is required"),
        ("policies: [{name: p, namespace: a/b}]", "policies[0].namespace: 'a/b' must contain"),
        ("policies: [{name: p, when: 2001-01-01}]", "date values are not supported"),
        ("policies: [{name: p, x: .nan}]", "is not a finite number"),
        ("policies: [{name: p, x: {1: a}}]", "key 1 must be a string"),
        ("policies: [{name: p}, {name: p}]", "two AuthorizationPolicy entries have the key '/p'"),
        ("workloads: [\n", "not valid YAML"),
        ("a: 1\na: 2\n", "found duplicate key 'a'"),
        ('{"workloads": [], "workloads": []}', "not valid JSON: found duplicate key 'workloads'"),
        ("[" * 100_000, "not valid YAML"),
        ('{"a":' * 100_000, "not valid"),
        ("x: 2001-13-45", "not valid YAML"),
        ("x: !!python/object:os.system {}", "not valid YAML"),
    ],
)
def test_document_errors(text, message):
    with pytest.raises(MeshConfigError) as err:
        parse_local_config(text)
    assert message in str(err.value)


def test_duplicates_across_entries_are_refused():
    a = {**MINIMAL_WORKLOAD, "workloadIps": ["10.0.0.1"]}
    b = {**MINIMAL_WORKLOAD, "uid": "u2", "workloadIps": ["10.0.0.1"]}
    with pytest.raises(MeshConfigError, match=r"workloads 'u1' and 'u2' both claim IP 10\.0\.0\.1"):
        parse_local_config(doc(workloads=[a, b]))


def test_alias_bomb_in_a_policy_is_refused_quickly():
    # Nine levels of ten-fold aliases: tiny as text, 10**10 values if expanded.
    anchors = ["    k0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    anchors += [f"    k{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    text = "policies:\n  - name: bomb\n" + "\n".join(anchors) + "\n"
    started = time.monotonic()
    with pytest.raises(MeshConfigError, match="policy is too large"):
        parse_local_config(text)
    assert time.monotonic() - started < 5


def test_recursive_alias_is_refused():
    with pytest.raises(MeshConfigError):
        parse_local_config("policies:\n  - &p {name: p, self: *p}\n")


# -- fuzzing -----------------------------------------------------------------------------------


def _parse_or_config_error(text: str) -> None:
    try:
        state = parse_local_config(text)
    except MeshConfigError as exc:
        message = str(exc)
        assert message, "every rejection must say what is wrong"
        return
    assert isinstance(state, MeshState)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_only_ever_raises_config_error(text):
    _parse_or_config_error(text)


_KEYS = sorted(
    {
        "workloads",
        "services",
        "policies",
        "uid",
        "name",
        "namespace",
        "workloadIps",
        "vips",
        "ports",
        "protocol",
        "status",
        "waypoint",
        "hostname",
        "address",
        "hboneMtlsPort",
        "subjectAltNames",
        "serviceAccount",
    }
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["10.0.0.1", "/10.96.0.1", "a/b", "HBONE", "TCP", "Healthy", "80", "fd00::1"]),
)
_yamlish = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(_KEYS), st.text(max_size=6), st.integers(0, 70000)),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_yamlish)
def test_arbitrary_yaml_structures_only_ever_raise_config_error(value):
    _parse_or_config_error(yaml.safe_dump(value))


def _mutations(base: dict[str, Any]) -> st.SearchStrategy[str]:
    def mutate(pair: tuple[str, Any]) -> str:
        key, value = pair
        d = copy.deepcopy(base)
        d["workloads"][0][key] = value
        return yaml.safe_dump(d)

    return st.tuples(st.sampled_from(sorted(base["workloads"][0])), _yamlish).map(mutate)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations(yaml.safe_load(FULL)))
def test_one_bad_field_in_a_valid_document_only_ever_raises_config_error(text):
    _parse_or_config_error(text)


# -- watcher -----------------------------------------------------------------------------------

GOOD_A = doc(workloads=[{**MINIMAL_WORKLOAD, "workloadIps": ["10.0.0.1"]}])
GOOD_B = doc(workloads=[{**MINIMAL_WORKLOAD, "workloadIps": ["10.0.0.2"]}])
BAD = "workloads: [{uid: u1, name: pod-0, namespace: ns, workloadIps: ['10.1.1']}]\n"
INTERVAL = 0.02


def _ip_of(state: MeshState) -> str:
    return str(state.workloads[0].ips[0])


async def until_polled(predicate: Callable[[], bool]) -> None:
    await wait_until(predicate, "the watcher's next poll to see it", interval=INTERVAL)


async def watching(
    aio: Loop, path: Path, on_update: Callable[[MeshState], None]
) -> LocalConfigWatcher:
    """A started watcher of `path`, closed when the test ends."""
    w = aio.closing(LocalConfigWatcher(path, on_update, interval=INTERVAL))
    await w.start()
    return w


def _bump_mtime(path: Path) -> None:
    # Filesystems with coarse timestamps could hide two writes in one tick; step it forward.
    st_ = path.stat()
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))


def test_watcher_applies_a_change(aio, tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD_A)
    seen: list[MeshState] = []

    async def main() -> None:
        w = await watching(aio, path, seen.append)
        assert _ip_of(w.current) == "10.0.0.1"
        assert len(seen) == 1
        path.write_text(GOOD_B)
        _bump_mtime(path)
        await until_polled(lambda: len(seen) == 2)
        assert _ip_of(seen[-1]) == "10.0.0.2"
        assert w.current is seen[-1]

    aio.run(main)


def test_watcher_keeps_the_last_good_state_on_a_bad_edit_and_logs_it(aio, tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD_A)
    seen: list[MeshState] = []

    async def main() -> None:
        w = await watching(aio, path, seen.append)
        with capture_logs() as logs:
            path.write_text(BAD)
            _bump_mtime(path)
            await until_polled(lambda: any(e["event"] == "config_rejected" for e in logs))
            # Several more polls of the same bad file: logged once, state unchanged.
            await asyncio.sleep(INTERVAL * 5)
        rejected = [e for e in logs if e["event"] == "config_rejected"]
        assert len(rejected) == 1
        assert (
            "workloads[0].workloadIps[0]: '10.1.1' is not an IP address" in (rejected[0]["error"])
        )
        assert rejected[0]["log_level"] == "error"
        assert len(seen) == 1
        assert _ip_of(w.current) == "10.0.0.1"
        # A later good edit is applied again.
        path.write_text(GOOD_B)
        _bump_mtime(path)
        await until_polled(lambda: len(seen) == 2)
        assert _ip_of(w.current) == "10.0.0.2"

    aio.run(main)


def test_watcher_sees_an_atomic_replace(aio, tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD_A)
    seen: list[MeshState] = []

    async def main() -> None:
        w = await watching(aio, path, seen.append)
        tmp = tmp_path / "mesh.yaml.tmp"
        tmp.write_text(GOOD_B)
        # Keep mtime and size equal to the old file: only the inode tells them apart.
        old = path.stat()
        os.utime(tmp, ns=(old.st_atime_ns, old.st_mtime_ns))
        assert tmp.stat().st_size == old.st_size
        os.replace(tmp, path)
        await until_polled(lambda: len(seen) == 2)
        assert _ip_of(w.current) == "10.0.0.2"

    aio.run(main)


def test_watcher_ignores_touch_and_survives_a_missing_file(aio, tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD_A)
    seen: list[MeshState] = []

    async def main() -> None:
        w = await watching(aio, path, seen.append)
        with capture_logs() as logs:
            _bump_mtime(path)
            assert await w.check_now() is False
            path.unlink()
            await until_polled(lambda: any(e["event"] == "config_missing" for e in logs))
            assert _ip_of(w.current) == "10.0.0.1"
            path.write_text(GOOD_B)
            await until_polled(lambda: len(seen) == 2)
        assert _ip_of(w.current) == "10.0.0.2"
        assert len(seen) == 2

    aio.run(main)


def test_watcher_reverting_a_bad_edit_restores_without_a_new_update(aio, tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD_A)
    seen: list[MeshState] = []

    async def main() -> None:
        w = await watching(aio, path, seen.append)
        path.write_text(BAD)
        _bump_mtime(path)
        assert await w.check_now() is False
        path.write_text(GOOD_A)
        _bump_mtime(path)
        assert await w.check_now() is False
        assert len(seen) == 1

    aio.run(main)


def test_watcher_survives_a_failing_callback(aio, tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD_A)
    calls: list[MeshState] = []

    def on_update(state: MeshState) -> None:
        calls.append(state)
        if len(calls) == 2:
            raise RuntimeError("consumer broke")

    async def main() -> None:
        w = await watching(aio, path, on_update)
        with capture_logs() as logs:
            path.write_text(GOOD_B)
            _bump_mtime(path)
            await until_polled(lambda: len(calls) == 2)
            await until_polled(
                lambda: any(e["event"] == "config_update_callback_failed" for e in logs)
            )
        path.write_text(GOOD_A)
        _bump_mtime(path)
        await until_polled(lambda: len(calls) == 3)
        assert _ip_of(w.current) == "10.0.0.1"

    aio.run(main)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read local config"), (BAD, "'10.1.1' is not an IP address")],
)
def test_watcher_first_load_failure_is_a_config_error(aio, tmp_path, content, message):
    path = tmp_path / "mesh.yaml"
    if content is not None:
        path.write_text(content)
    seen: list[MeshState] = []

    async def main() -> None:
        w = LocalConfigWatcher(path, seen.append, interval=INTERVAL)
        with pytest.raises(MeshConfigError) as err:
            await w.start()
        assert message in str(err.value)
        assert str(path) in str(err.value)
        await w.close()  # closing a watcher that never started is fine

    aio.run(main)
    assert seen == []


def test_watcher_rejects_non_utf8(aio, tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_bytes(b"workloads: [\xff]\n")

    async def main() -> None:
        with pytest.raises(MeshConfigError, match="not UTF-8"):
            await LocalConfigWatcher(path, lambda s: None).start()

    aio.run(main)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_watcher_status_names_the_config_in_force_and_a_refused_newer_one(aio, tmp_path):
    """A writer can tell when its file is in force, or that it was refused and why."""
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD_A)
    good_a = _sha256(path)

    async def main() -> None:
        w = await watching(aio, path, lambda s: None)
        assert w.status.to_json() == {"digest": good_a, "rejected": None}
        path.write_text(BAD)
        _bump_mtime(path)
        bad = _sha256(path)
        await w.check_now()
        status = w.status.to_json()
        assert status["digest"] == good_a  # the last good config stays in force
        assert status["rejected"]["digest"] == bad
        assert "'10.1.1' is not an IP address" in status["rejected"]["error"]
        # A new good file clears the refusal and is named as the one in force.
        path.write_text(GOOD_B)
        _bump_mtime(path)
        await w.check_now()
        in_force = _sha256(path)
        assert w.status.to_json() == {"digest": in_force, "rejected": None}
        # Refused again, then restored to the content in force: no refusal left either.
        path.write_text(BAD)
        _bump_mtime(path)
        await w.check_now()
        assert w.status.rejected_digest == bad
        path.write_text(GOOD_B)
        _bump_mtime(path)
        await w.check_now()
        assert w.status.to_json() == {"digest": in_force, "rejected": None}

    aio.run(main)


def test_a_policy_kind_that_is_a_mapping_is_a_config_error():
    # Found by fuzz/targets/l7config.py: the L7-kind lookup hashed the kind (TypeError).
    with pytest.raises(MeshConfigError, match=r"policies\[0\]\.kind: expected a string"):
        parse_local_config(doc(policies=[{"kind": {"a": 1}, "name": "x"}]))
