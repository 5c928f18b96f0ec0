"""What the Kubernetes end-to-end tests share: kubectl, pods and their readiness, and the
waypoint a user adds to the travel demo (a Gateway and an HTTPRoute sending flights to v2)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from localcluster.kube import cluster as kcluster
from localcluster.kube.apiserver import kubectl
from tests.localcluster.kube.test_kubelet import http_get

T = TypeVar("T")


def wait_for(get: Callable[[], T | None], within: float, what: str) -> T:
    deadline = time.monotonic() + within
    while True:
        got = get()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.1)


def kc(c: kcluster.KubeCluster, *args: str, timeout: float = 60) -> str:
    out = subprocess.run(
        [kubectl(), "--kubeconfig", str(c.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out.stdout


def pods(c: kcluster.KubeCluster, ns: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["-n", ns, "get", "pods", "-o", "json"] + (["-l", selector] if selector else [])
    return list(json.loads(kc(c, *args))["items"])


def ready(p: dict[str, Any]) -> bool:
    conds = (p.get("status") or {}).get("conditions") or []
    return any(x.get("type") == "Ready" and x.get("status") == "True" for x in conds)


WAYPOINT_DOCS: list[dict[str, Any]] = [
    {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "travel"},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    },
    {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "flights-to-v2", "namespace": "travel"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "flights", "port": 80}],
            "rules": [{"backendRefs": [{"name": "flights-v2", "port": 80}]}],
        },
    },
]


def apply_waypoint(c: kcluster.KubeCluster) -> None:
    """The Gateway and the route applied with kubectl, and the namespace using the waypoint."""
    f = Path(c.state.dir) / "waypoint.json"
    f.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": WAYPOINT_DOCS}))
    kc(c, "apply", "-f", str(f))
    kc(c, "label", "namespace", "travel", "istio.io/use-waypoint=waypoint")


def programmed_gateway(c: kcluster.KubeCluster) -> dict[str, Any] | None:
    gw = json.loads(kc(c, "-n", "travel", "get", "gateway", "waypoint", "-o", "json"))
    conds = {x["type"]: x["status"] for x in (gw.get("status") or {}).get("conditions", [])}
    return gw if conds.get("Programmed") == "True" else None


def routed_to_v2(answer: dict[str, Any] | None) -> dict[str, Any] | None:
    """A booking whose flights hop was served by flights-v2, else None."""
    if answer is None:
        return None
    flights = [h for h in answer["chain"] if h["service"].startswith("flights")]
    return answer if flights and flights[0]["served_by"].startswith("flights-v2") else None


def booking(c: kcluster.KubeCluster, client_netns: str) -> Callable[[], dict[str, Any] | None]:
    """A booking through the travel frontend's Service from a pod's netns: its answer, or
    None while there is none."""
    svc = json.loads(kc(c, "-n", "travel", "get", "svc", "frontend", "-o", "json"))
    vip = svc["spec"]["clusterIP"]

    def book() -> dict[str, Any] | None:
        try:
            status, body = http_get(client_netns, vip, 80, "/book?from=AMS&to=LIS")
        except OSError:
            return None
        return json.loads(body) if status == 200 else None

    return book
