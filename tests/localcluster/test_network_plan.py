"""Pure planning: netns/interface names and the service DNAT rules text."""

from __future__ import annotations

from pathlib import Path

from localcluster.network import plan_layout, service_rules
from localcluster.spec import ClusterSpec, parse_cluster

from .cluster_factory import cluster_yaml


def spec(name: str = "abcdefghij") -> ClusterSpec:
    return parse_cluster(cluster_yaml(name), Path("/"))


def test_layout_names_and_addresses():
    layout = plan_layout(spec("demo"))
    assert layout.cluster_netns == "demo-c"
    assert [(n.netns, n.bridge_port, str(n.ip)) for n in layout.nodes] == [
        ("demo-node1", "vn1", "10.10.0.11"),
        ("demo-node2", "vn2", "10.10.0.12"),
    ]
    assert [(p.name, p.netns, p.host_ifname, str(p.ip), str(p.gateway)) for p in layout.pods] == [
        ("client-0", "demo-node1-p1", "vp1", "10.244.1.10", "10.244.1.1"),
        ("echo-0", "demo-node1-p2", "vp2", "10.244.1.11", "10.244.1.1"),
        ("echo-1", "demo-node2-p1", "vp1", "10.244.2.10", "10.244.2.1"),
    ]
    assert layout.pod("travel", "echo-1").netns_path == "/var/run/netns/demo-node2-p1"


def test_names_fit_kernel_limits_at_maximum_lengths():
    text = """
name: abcdefghij
nodes: [{name: abcdefghijklmno}]
namespaces: [{name: ns}]
pods:
""" + "".join(
        f'  - {{name: p{i}, namespace: ns, node: abcdefghijklmno, command: ["true"]}}\n'
        for i in range(200)
    )
    layout = plan_layout(parse_cluster(text, Path("/")))
    assert max(len(n) for n in layout.all_netns()) <= 40
    assert max(len(p.host_ifname) for p in layout.pods) <= 15
    assert len(set(layout.all_netns())) == len(layout.all_netns())


GOLDEN_NODE1 = """*nat
:AMB-SERVICES - [0:0]
:AMB-POSTROUTING - [0:0]
-A PREROUTING -j AMB-SERVICES
-A OUTPUT -j AMB-SERVICES
-A POSTROUTING -j AMB-POSTROUTING
-A AMB-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "travel/echo:80" \
-m statistic --mode random --probability 0.5000000000 -j DNAT --to-destination 10.244.1.11:8080
-A AMB-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "travel/echo:80" \
-j DNAT --to-destination 10.244.2.10:8080
-A AMB-POSTROUTING -s 10.244.1.0/24 -o cni0 -m conntrack --ctstate DNAT -j MASQUERADE
COMMIT
"""


def test_service_rules_golden():
    s = spec("demo")
    assert service_rules(s, s.nodes[0], install_jumps=True) == GOLDEN_NODE1


def test_update_rules_have_no_jumps():
    s = spec("demo")
    text = service_rules(s, s.nodes[1], install_jumps=False)
    assert "-A PREROUTING" not in text
    assert "-A OUTPUT" not in text
    assert "-s 10.244.2.0/24 -o cni0" in text


def test_three_endpoints_split_uniformly():
    text = (
        cluster_yaml("demo")
        + """
  - name: many
    namespace: travel
    selector: {app: many}
    ports: [{port: 81, targetPort: 9000}]
"""
    )
    text = text.replace("labels: {app: client}", "labels: {app: many}")
    text = text.replace("labels: {app: echo}", "labels: {app: many}")
    s = parse_cluster(text, Path("/"))
    rules = [r for r in service_rules(s, s.nodes[0], False).splitlines() if "--dport 81" in r]
    assert len(rules) == 3
    assert "--probability 0.3333333333" in rules[0]
    assert "--probability 0.5000000000" in rules[1]
    assert "statistic" not in rules[2]
