"""demo/travel-cluster.yaml: parses, places pods as the demo expects, runs existing scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.demo.apps import DEMO_DIR

CLUSTER_FILE = DEMO_DIR / "travel-cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    doc = yaml.safe_load(CLUSTER_FILE.read_text())
    assert isinstance(doc, dict)
    return doc


def pods(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in cluster["pods"]}


def test_pods_are_spread_over_both_nodes(cluster: dict[str, Any]) -> None:
    assert cluster["name"] == "travel"
    assert [n["name"] for n in cluster["nodes"]] == ["node1", "node2"]
    placement = {name: (p["namespace"], p["node"]) for name, p in pods(cluster).items()}
    assert placement == {
        "frontend-0": ("travel", "node1"),
        "flights-0": ("travel", "node2"),
        "flights-1": ("travel", "node1"),
        "pricing-0": ("travel", "node2"),
        "flights-v2-0": ("travel", "node2"),
        "pricing-1": ("travel", "node1"),
        "legacy-client": ("legacy", "node1"),
    }


def test_only_the_travel_namespace_is_in_the_mesh(cluster: dict[str, Any]) -> None:
    labels = {ns["name"]: ns.get("labels", {}) for ns in cluster["namespaces"]}
    assert labels["travel"] == {"istio.io/dataplane-mode": "ambient"}
    assert "istio.io/dataplane-mode" not in labels["legacy"]


def test_every_pod_command_runs_an_existing_script(cluster: dict[str, Any]) -> None:
    for pod in cluster["pods"]:
        command = pod["command"]
        assert command[0] == "{python}", pod["name"]
        script = DEMO_DIR / command[1]
        assert script.is_file(), f"{pod['name']} runs missing {script}"
        assert script.parent == DEMO_DIR / "travel"


def test_app_pods_run_the_script_named_by_their_app_label(cluster: dict[str, Any]) -> None:
    for pod in cluster["pods"]:
        if pod["namespace"] != "travel" or pod["name"] == "pricing-1":
            continue
        assert Path(pod["command"][1]).stem == pod["labels"]["app"]
        assert pod["serviceAccount"] == pod["labels"]["app"]
        assert pod["command"][2:] == ["--port", "8080"]


def test_the_flaky_replica_stays_out_of_pricing_until_relabeled(cluster: dict[str, Any]) -> None:
    # The L4 part runs without retries: the flaky replica must not serve it. The L7 act
    # relabels it app=pricing, and it then runs pricing's script with pricing's identity.
    flaky = pods(cluster)["pricing-1"]
    assert flaky["labels"]["app"] != "pricing"
    assert flaky["serviceAccount"] == "pricing"
    assert flaky["command"][1:] == ["travel/pricing.py", "--port", "8080", "--fail-every", "3"]


def test_each_flights_version_has_its_own_service(cluster: dict[str, Any]) -> None:
    services = {s["name"]: s for s in cluster["services"]}
    for version in ("v1", "v2"):
        selector = services[f"flights-{version}"]["selector"]
        assert selector == {"app": "flights", "version": version}
    versions = sorted(p["labels"]["version"] for p in cluster["pods"]
                      if p.get("labels", {}).get("app") == "flights")  # fmt: skip
    assert versions == ["v1", "v1", "v2"]


def test_every_service_selects_pods_on_the_apps_port(cluster: dict[str, Any]) -> None:
    services = {s["name"]: s for s in cluster["services"]}
    assert set(services) == {"frontend", "flights", "pricing", "flights-v1", "flights-v2"}
    for name, svc in services.items():
        selected = [
            p["name"]
            for p in cluster["pods"]
            if p["namespace"] == svc["namespace"]
            and all(p.get("labels", {}).get(k) == v for k, v in svc["selector"].items())
        ]
        assert selected, f"service {name} selects no pod"
        assert svc["ports"] == [{"port": 80, "targetPort": 8080, "name": "http"}]
    assert len([p for p in cluster["pods"] if p.get("labels", {}).get("app") == "flights"]) == 3


def test_the_apps_find_every_service_they_call(cluster: dict[str, Any]) -> None:
    # frontend reads FLIGHTS_*, flights reads PRICING_*: both must be services in `travel`.
    names = {s["name"] for s in cluster["services"] if s["namespace"] == "travel"}
    assert {"flights", "pricing"} <= names


def test_the_cluster_parser_accepts_the_file() -> None:
    spec_module = pytest.importorskip("localcluster.spec")
    spec = spec_module.load_cluster(CLUSTER_FILE)
    assert len(spec.pods) == 7
