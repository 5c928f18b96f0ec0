"""The travel demo's manifests applied with kubectl: every pod Ready, a booking via VIPs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import nsutil
from kube.podnetns import netns_name
from localcluster.kube.apiserver import kubectl

from .conftest import DEMO, KubeNodes, pod_ready, wait_for
from .test_kubelet import http_get

pytestmark = [pytest.mark.kube, pytest.mark.netns, pytest.mark.slow]

MANIFESTS = DEMO / "kubernetes"
DEPLOYMENTS = {"frontend": 1, "flights": 2, "pricing": 1, "flights-v2": 1, "pricing-flaky": 1}


def test_travel_manifests_run_and_book_through_service_vips(kube_nodes: KubeNodes) -> None:
    k = kube_nodes
    k.namespaces += ["travel", "legacy"]  # the manifests' own: removed after the test
    out = subprocess.run(
        [kubectl(), "--kubeconfig", str(k.cp.kubeconfig), "apply", "-f", str(MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "deployment.apps/frontend created" in out.stdout

    want = sum(DEPLOYMENTS.values())

    def all_ready() -> list[dict[str, Any]]:
        pods = k.pods("travel")
        legacy = k.pods("legacy")
        ready = [p for p in pods if pod_ready(p)]
        return pods if len(ready) == want and len(pods) == want and legacy else []

    pods = wait_for(all_ready, 120, f"{want} Ready travel pods", k.kubelet_log)
    ips = [p["status"]["podIP"] for p in pods]
    assert len(set(ips)) == want
    vip = k.api("GET", "/api/v1/namespaces/travel/services/frontend")["spec"]["clusterIP"]
    legacy = wait_for(
        lambda: [p for p in k.pods("legacy") if p.get("status", {}).get("phase") == "Running"],
        60,
        "the legacy client running",
        k.kubelet_log,
    )
    client_netns = nsutil.netns_path(netns_name(legacy[0]["metadata"]["uid"]))

    def booked() -> dict[str, Any] | None:
        try:
            status, body = http_get(client_netns, vip, 80, "/book?from=AMS&to=LIS")
        except OSError:
            return None
        return json.loads(body) if status == 200 else None

    answer = wait_for(booked, 30, "a booking through the frontend VIP", k.kubelet_log)
    chain = answer["chain"]
    assert [h["service"] for h in chain] == ["frontend", "flights", "pricing"]
    names = {p["metadata"]["name"] for p in pods}
    assert all(h["served_by"] in names for h in chain)
    assert {h["node"] for h in chain} <= {n.name for n in k.spec.nodes}
    assert Path(MANIFESTS / "travel.yaml").is_file()
