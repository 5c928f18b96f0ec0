"""The LOCAL_XDS_PATH document derived from a cluster spec (golden + table tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from localcluster.spec import parse_cluster
from localcluster.xds import canonical_name, canonical_revision, local_xds

CLUSTER = """
name: travel
nodes: [{name: node1}, {name: node2}]
namespaces:
  - {name: travel, labels: {istio.io/dataplane-mode: ambient}}
  - {name: legacy}
pods:
  - name: frontend-0
    namespace: travel
    serviceAccount: frontend
    labels: {app: frontend, version: v1}
    node: node1
    command: ["true"]
  - name: db
    namespace: legacy
    node: node2
    command: ["true"]
services:
  - name: frontend
    namespace: travel
    vip: 10.96.0.10
    selector: {app: frontend}
    ports: [{port: 80, targetPort: 8080, name: http}]
"""

GOLDEN = """
workloads:
  - uid: "travel//Pod/travel/frontend-0"
    name: frontend-0
    namespace: travel
    serviceAccount: frontend
    trustDomain: cluster.local
    workloadIps: ["10.244.1.10"]
    protocol: HBONE
    node: node1
    canonicalName: frontend
    canonicalRevision: v1
    workloadName: frontend
    workloadType: pod
    clusterId: travel
    status: Healthy
    services:
      "travel/frontend.travel.svc.cluster.local": {80: 8080}
    labels: {app: frontend, version: v1}
  - uid: "travel//Pod/legacy/db"
    name: db
    namespace: legacy
    serviceAccount: default
    trustDomain: cluster.local
    workloadIps: ["10.244.2.10"]
    protocol: TCP
    node: node2
    canonicalName: db
    canonicalRevision: latest
    workloadName: db
    workloadType: pod
    clusterId: travel
    status: Healthy
    services: {}
    labels: {}
services:
  - name: frontend
    namespace: travel
    hostname: frontend.travel.svc.cluster.local
    vips: ["/10.96.0.10"]
    ports: {80: {targetPort: 8080, name: http}}
    subjectAltNames: []
policies: []
"""


def test_golden():
    assert local_xds(parse_cluster(CLUSTER, Path("/"))) == yaml.safe_load(GOLDEN)


def test_round_trips_through_yaml_with_int_port_keys():
    doc = local_xds(parse_cluster(CLUSTER, Path("/")))
    again = yaml.safe_load(yaml.safe_dump(doc))
    assert again == doc
    assert again["services"][0]["ports"] == {80: {"targetPort": 8080, "name": "http"}}


def _pod(labels: str, name: str = "web-3"):
    text = f"""
name: c
nodes: [{{name: n1}}]
namespaces: [{{name: ns}}]
pods: [{{name: {name}, namespace: ns, node: n1, command: ["true"], labels: {labels}}}]
"""
    return parse_cluster(text, Path("/")).pods[0]


@pytest.mark.parametrize(
    ("labels", "name", "revision"),
    [
        ("{}", "web-3", "latest"),
        ("{app: shop}", "shop", "latest"),
        ("{app: shop, version: v2}", "shop", "v2"),
        (
            "{app: shop, version: v2, service.istio.io/canonical-name: store, "
            "service.istio.io/canonical-revision: r9}",
            "store",
            "r9",
        ),
    ],
)
def test_canonical_name_and_revision(labels, name, revision):
    pod = _pod(labels)
    assert canonical_name(pod) == name
    assert canonical_revision(pod) == revision


@pytest.mark.parametrize(
    ("pod_name", "workload"),
    [("web-3", "web"), ("web", "web"), ("web-v2", "web-v2"), ("a-1-2", "a-1")],
)
def test_workload_name_strips_one_trailing_ordinal(pod_name, workload):
    assert _pod("{}", pod_name).workload_name == workload


def test_opted_out_pod_in_ambient_namespace_is_tcp():
    text = CLUSTER.replace(
        "labels: {app: frontend, version: v1}",
        "labels: {app: frontend, version: v1, istio.io/dataplane-mode: none}",
    )
    doc = local_xds(parse_cluster(text, Path("/")))
    assert doc["workloads"][0]["protocol"] == "TCP"
