"""Cluster file parsing, validation and addressing (pure)."""

from __future__ import annotations

import contextlib
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from localcluster.spec import (
    ClusterSpec,
    SpecError,
    load_cluster,
    node_gateway,
    node_ip,
    node_pod_cidr,
    parse_cluster,
)

BASE = Path("/srv/cluster")

TRAVEL = """
name: travel
nodes:
  - name: node1
  - name: node2
namespaces:
  - name: travel
    labels: {istio.io/dataplane-mode: ambient}
  - name: legacy
pods:
  - name: frontend-0
    namespace: travel
    serviceAccount: frontend
    labels: {app: frontend, version: v1}
    node: node1
    command: ["{python}", "travel/frontend.py", "--port", "8080"]
    env: {GREETING: hi}
  - name: backend-0
    namespace: travel
    labels: {app: backend}
    node: node2
    command: ["{python}", "-c", "pass"]
  - name: backend-1
    namespace: travel
    labels: {app: backend}
    node: node1
    ip: 10.244.1.10
    command: ["true"]
  - name: optout-0
    namespace: travel
    labels: {app: optout, istio.io/dataplane-mode: none}
    node: node2
    command: ["true"]
  - name: old-0
    namespace: legacy
    labels: {app: backend}
    node: node2
    command: ["true"]
services:
  - name: frontend
    namespace: travel
    vip: 10.96.0.10
    selector: {app: frontend}
    ports: [{port: 80, targetPort: 8080, name: http}]
  - name: back-end
    namespace: travel
    selector: {app: backend}
    ports: [{port: 9090}, {port: 9091, targetPort: 19091}]
"""


def travel() -> ClusterSpec:
    return parse_cluster(TRAVEL, BASE)


def test_defaults_and_resolution():
    spec = travel()
    assert spec.name == "travel"
    assert spec.trust_domain == "cluster.local"
    fe = spec.pod("travel", "frontend-0")
    assert fe.service_account == "frontend"
    assert spec.pod("travel", "backend-0").service_account == "default"
    assert fe.command == (sys.executable, "travel/frontend.py", "--port", "8080")
    assert spec.base_dir == BASE


def test_node_addressing():
    spec = travel()
    n1, n2 = spec.nodes
    assert (n1.index, n1.ip, n1.pod_cidr, n1.gateway) == (
        1,
        IPv4Address("10.10.0.11"),
        IPv4Network("10.244.1.0/24"),
        IPv4Address("10.244.1.1"),
    )
    assert (n2.ip, n2.pod_cidr, n2.gateway) == (
        IPv4Address("10.10.0.12"),
        IPv4Network("10.244.2.0/24"),
        IPv4Address("10.244.2.1"),
    )
    assert node_ip(7) == IPv4Address("10.10.0.17")
    assert node_pod_cidr(7) == IPv4Network("10.244.7.0/24")
    assert node_gateway(7) == IPv4Address("10.244.7.1")


def test_pod_ips_in_file_order_skipping_explicit_ones():
    spec = travel()
    ips = {p.name: str(p.ip) for p in spec.pods}
    # node1: backend-1 claims .10 explicitly, so frontend-0 (first in file) gets .11.
    assert ips == {
        "frontend-0": "10.244.1.11",
        "backend-1": "10.244.1.10",
        "backend-0": "10.244.2.10",
        "optout-0": "10.244.2.11",
        "old-0": "10.244.2.12",
    }


def test_service_vips_allocated_skipping_explicit():
    spec = travel()
    assert spec.service("travel", "frontend").vip == IPv4Address("10.96.0.10")
    assert spec.service("travel", "back-end").vip == IPv4Address("10.96.0.11")
    ports = spec.service("travel", "back-end").ports
    assert [(p.port, p.target_port) for p in ports] == [(9090, 9090), (9091, 19091)]


def test_enrolled():
    spec = travel()
    assert spec.pod("travel", "frontend-0").enrolled(spec)
    assert not spec.pod("travel", "optout-0").enrolled(spec)
    assert not spec.pod("legacy", "old-0").enrolled(spec)


def test_endpoints_stay_in_namespace():
    spec = travel()
    eps = spec.endpoints(spec.service("travel", "back-end"))
    assert [p.name for p in eps] == ["backend-0", "backend-1"]


def test_spec_is_hashable_and_immutable():
    spec = travel()
    pod = spec.pods[0]
    assert hash(pod) == hash(spec.pods[0])
    with pytest.raises(TypeError):
        pod.labels["app"] = "x"  # type: ignore[index]


def test_load_cluster_uses_file_directory(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(TRAVEL)
    assert load_cluster(p).base_dir == tmp_path.resolve()
    with pytest.raises(SpecError, match="cannot read cluster file"):
        load_cluster(tmp_path / "missing.yaml")


def _mutate(path: tuple[object, ...], value: object) -> str:
    doc = yaml.safe_load(TRAVEL)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return yaml.safe_dump(doc)


_DELETE = object()

INVALID = [
    (("name",), "Travel", "cluster name"),
    (("name",), "a-very-long-name", "cluster name"),
    (("name",), _DELETE, "cluster file: name: is required"),
    (("nodes",), [], "at least one entry under 'nodes'"),
    (("nodes", 1, "name"), "node1", "duplicate node name"),
    (("nodes", 0, "name"), "node_1", "node name"),
    (("namespaces", 1, "name"), "travel", "duplicate namespace"),
    (("pods", 0, "node"), "node9", "unknown node 'node9'"),
    (("pods", 0, "namespace"), "nowhere", "namespace 'nowhere' is not listed"),
    (("pods", 0, "ip"), "10.244.2.50", "not a usable pod address of node node1"),
    (("pods", 0, "ip"), "10.244.1.1", "not a usable pod address"),
    (("pods", 0, "ip"), "10.244.1.10", "ip 10.244.1.10 is already used by pod travel/frontend-0"),
    (("pods", 0, "ip"), "10.244.1.300", "is not an IP address"),
    (("pods", 0, "ip"), 42, "expected an IP address string, got a number 42"),
    (("pods", 0, "command"), _DELETE, "command: is required"),
    (("pods", 0, "command"), [], "non-empty list of strings"),
    (("pods", 0, "command"), "python x.py", "non-empty list of strings"),
    (("pods", 0, "labels"), {"version": 1}, "quote numbers"),
    (("pods", 0, "nmae"), "x", "nmae: unknown field"),
    (("pods", 1, "name"), "frontend-0", "duplicate pod travel/frontend-0"),
    (("services", 0, "vip"), "10.97.0.1", "must be a host address in 10.96.0.0/16"),
    (("services", 1, "vip"), "10.96.0.10", "already used by service travel/frontend"),
    (("services", 0, "ports"), [], "at least one entry"),
    (("services", 0, "ports"), [{"port": 0}], "port 0 is not in 1..65535"),
    (("services", 0, "ports"), [{"port": 80}, {"port": 80}], "duplicate service port 80"),
    (("services", 0, "ports"), [{"targetPort": 80}], "port: is required"),
    (("services", 0, "namespace"), "nowhere", "not listed under 'namespaces'"),
]


@pytest.mark.parametrize(("path", "value", "message"), INVALID)
def test_invalid_cluster_files(path, value, message):
    with pytest.raises(SpecError, match=message):
        parse_cluster(_mutate(path, value), BASE)


@pytest.mark.parametrize("text", ["", "- a list", "name: [unclosed", "42"])
def test_not_a_cluster_document(text):
    with pytest.raises(SpecError):
        parse_cluster(text, BASE)


# Anything YAML can express either parses or raises SpecError: never another exception.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.text(max_size=12),
    st.sampled_from(["node1", "travel", "10.244.1.20", "10.96.0.99", "{python}"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "namespace",
                    "node",
                    "ip",
                    "vip",
                    "ports",
                    "port",
                    "labels",
                    "command",
                    "selector",
                    "targetPort",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(
    section=st.sampled_from(["nodes", "namespaces", "pods", "services"]),
    index=st.integers(0, 1),
    key=st.sampled_from(
        [
            "name",
            "namespace",
            "node",
            "ip",
            "vip",
            "ports",
            "labels",
            "command",
            "selector",
            "env",
            "serviceAccount",
        ]
    ),
    value=_values,
)
def test_fuzzed_fields_parse_or_raise_spec_error(section, index, key, value):
    doc = yaml.safe_load(TRAVEL)
    doc[section][index][key] = value
    with contextlib.suppress(SpecError):
        parse_cluster(yaml.safe_dump(doc), BASE)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=30))
def test_allocated_pod_ips_are_unique_and_inside_node_cidr(placement):
    pods = "\n".join(
        f'  - {{name: p{i}, namespace: ns, node: n{n}, command: ["true"]}}'
        for i, n in enumerate(placement)
    )
    text = (
        f"name: c\nnodes: [{{name: n1}}, {{name: n2}}, {{name: n3}}]\n"
        f"namespaces: [{{name: ns}}]\npods:\n{pods}\n"
    )
    spec = parse_cluster(text, BASE)
    ips = [p.ip for p in spec.pods]
    assert len(set(ips)) == len(ips)
    for p in spec.pods:
        assert p.ip in spec.node(p.node).pod_cidr
        assert int(p.ip) & 0xFF >= 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: a\nname: b\nnodes: [{name: n1}]\n", "found duplicate key 'name'"),
        ("name: [\n", "cluster file is not valid YAML"),
        ("name: !!python/object:os.system {}\n", "cluster file is not valid YAML"),
    ],
    ids=["duplicate key", "broken", "python object"],
)
def test_a_cluster_file_is_read_strictly(text: str, message: str):
    """As the mesh config: a key given twice is refused, not silently the last one."""
    with pytest.raises(SpecError, match=message):
        parse_cluster(text, Path("."))
