"""`get pods` rendered from fixed data (golden tables), and its pure decisions."""

from __future__ import annotations

import json

import pytest
import yaml

from ambientctl import kubepods, podsview
from ambientctl.kubeviews import Snapshot
from ambientctl.podsview import PodRow

from .golden import check

NOW = 1_800_000_000.0
TD = "spiffe://cluster.local"

ROWS = [
    PodRow("travel", "frontend-0", True, "Running", "enrolled", "", 0, NOW - 3725, "node1",
           "10.244.1.11", "travel-node1-p1", f"{TD}/ns/travel/sa/frontend",
           labels={"app": "frontend", "version": "v1"}),
    PodRow("travel", "backend-0", False, "Killed (exit 137)", "enrolled", "", 0, NOW - 3725,
           "node2", "10.244.2.10", "travel-node2-p1", f"{TD}/ns/travel/sa/default",
           exit_code=137, labels={"app": "backend"}),
    PodRow("travel", "backend-1", True, "Running", "pending",
           "no tunnel connected (traffic blocked)", 2, NOW - 45, "node1", "10.244.1.10",
           "travel-node1-p2", f"{TD}/ns/travel/sa/default", labels={"app": "backend"}),
    PodRow("travel", "crashy-0", False, "CrashLoopBackOff", "enrolled", "", 5, NOW - 200,
           "node1", "10.244.1.12", "travel-node1-p3", f"{TD}/ns/travel/sa/default",
           exit_code=1, labels={}),
    PodRow("travel", "waypoint-0", True, "Running", "waypoint", "", None, NOW - 90000,
           "node1", "10.244.1.200", "travel-node1-w0", f"{TD}/ns/travel/sa/waypoint",
           labels={"gateway.networking.k8s.io/gateway-name": "waypoint"}),
    PodRow("legacy", "old-0", False, "Completed", "not-enrolled", "", 0, NOW - 600, "node2",
           "10.244.2.11", "travel-node2-p2", "", exit_code=0, labels={"app": "old"}),
]  # fmt: skip


def render(output: str, **kw: object) -> str:
    namespace = str(kw.pop("namespace", "travel"))
    all_ns = bool(kw.get("all_namespaces"))
    rows = [r for r in ROWS if all_ns or r.namespace == namespace]
    return podsview.render(rows, output, NOW, namespace=namespace, **kw)  # type: ignore[arg-type]


def test_table():
    check("pods", render("table"))


def test_describe():
    check("pod_describe", podsview.describe(ROWS[1], NOW))


def test_all_namespaces():
    check("pods_all_namespaces", render("table", all_namespaces=True))


def test_wide_with_labels():
    check("pods_wide_labels", render("wide", all_namespaces=True, show_labels=True))


def test_json():
    text = render("json", all_namespaces=True)
    check("pods_json", text)
    doc = json.loads(text)
    assert doc["kind"] == "List" and len(doc["items"]) == len(ROWS)
    killed = next(i for i in doc["items"] if i["metadata"]["name"] == "backend-0")
    assert killed["status"]["phase"] == "Failed"
    assert killed["status"]["containerStatuses"][0]["state"] == {
        "terminated": {"reason": "Killed", "exitCode": 137}
    }
    assert killed["status"]["mesh"]["netns"] == "travel-node2-p1"


def test_yaml_is_the_json_document():
    assert yaml.safe_load(render("yaml")) == json.loads(render("json"))


def test_one_pod_is_a_pod_document():
    doc = json.loads(podsview.render_one(ROWS[2], "json"))
    assert doc["kind"] == "Pod"
    assert doc["status"]["mesh"] == {
        "state": "pending",
        "reason": "no tunnel connected (traffic blocked)",
        "identity": f"{TD}/ns/travel/sa/default",
        "netns": "travel-node1-p2",
    }


def test_empty():
    assert render("table", namespace="nowhere") == "No resources found in nowhere namespace.\n"
    assert podsview.render([], "table", NOW, all_namespaces=True) == "No resources found.\n"
    assert json.loads(podsview.render([], "json", NOW))["items"] == []


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (119, "119s"), (120, "2m"), (187, "3m7s"), (600, "10m"), (10799, "179m"),
     (10800, "3h"), (3 * 3600 + 120, "3h2m"), (8 * 3600 + 60, "8h"), (47 * 3600, "47h"),
     (48 * 3600, "2d"), (3 * 86400 + 4 * 3600, "3d4h"), (40 * 86400, "40d"),
     (800 * 86400, "2y70d"), (-5, "0s")],
)  # fmt: skip
def test_age_as_kubectl(seconds: float, text: str):
    assert podsview.age(seconds) == text


def test_app_status():
    assert podsview.app_status(True, None) == ("Running", None)
    # The process is the truth: a stale record of an exit does not make a live app dead.
    assert podsview.app_status(True, {"running": False, "exitCode": 1}) == ("Running", None)
    assert podsview.app_status(False, None) == ("Unknown", None)
    killed = {"running": False, "exitCode": 137, "reason": "Killed"}
    assert podsview.app_status(False, killed) == ("Killed (exit 137)", 137)
    assert podsview.app_status(False, {"exitCode": 3, "reason": "Error"}) == ("Error (exit 3)", 3)
    assert podsview.app_status(False, {"exitCode": 0, "reason": "Completed"}) == ("Completed", 0)
    looping = {"exitCode": 1, "reason": "Error", "waitingRestart": True}
    assert podsview.app_status(False, looping) == ("CrashLoopBackOff", 1)
    assert podsview.app_status(False, {"reason": "StartError"}) == ("StartError", None)


def test_mesh_state():
    def state(**kw: object) -> tuple[str, str]:
        base: dict[str, object] = dict(
            mesh=True, waypoint=False, wanted=True, agent_running=True, agent_entry=None
        )
        base.update(kw)
        return podsview.mesh_state(**base)  # type: ignore[arg-type]

    assert state(mesh=False) == ("-", "")
    assert state(waypoint=True) == ("waypoint", "")
    assert state(agent_entry={"state": "enrolled", "reason": ""}) == ("enrolled", "")
    assert state(agent_entry={"state": "failed", "reason": "capture: boom"}) == (
        "failed",
        "capture: boom",
    )
    assert state(wanted=False) == ("not-enrolled", "")
    assert state(wanted=False, agent_entry={"state": "removing"}) == ("removing", "")
    assert state(agent_running=False) == ("pending", "node agent not running")
    assert state() == ("pending", "not yet seen by the node agent")


def _pod(name: str, ns: str, **extra: object) -> dict[str, object]:
    pod: dict[str, object] = {
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": "0f8c1f2e-1111-2222-3333-444455556666",
            "creationTimestamp": "2027-01-15T07:00:00Z",
            "labels": {"app": name},
        },
        "spec": {"nodeName": "n1", "serviceAccountName": "sa1"},
        "status": {
            "phase": "Running",
            "podIP": "10.244.1.5",
            "containerStatuses": [
                {"ready": True, "restartCount": 1, "state": {"running": {}},
                 "lastState": {"terminated": {"exitCode": 2}}}
            ],
        },
    }  # fmt: skip
    for k, v in extra.items():
        assert isinstance(pod[k], dict) and isinstance(v, dict)
        pod[k] = {**pod[k], **v}  # type: ignore[dict-item]
    return pod


def test_kube_rows():
    captured = _pod(
        "a", "mesh", metadata={**_pod("a", "mesh")["metadata"],  # type: ignore[dict-item]
                               "annotations": {"ambient.istio.io/redirection": "enabled"}}
    )  # fmt: skip
    waiting = _pod("b", "mesh")
    crashing = _pod(
        "c",
        "plain",
        status={
            "phase": "Running",
            "containerStatuses": [
                {"ready": False, "restartCount": 4,
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}}}
            ],
        },
    )  # fmt: skip
    snap = Snapshot(
        {
            "pods": [captured, waiting, crashing],
            "namespaces": [
                {"metadata": {"name": "mesh", "labels": {"istio.io/dataplane-mode": "ambient"}}},
                {"metadata": {"name": "plain"}},
            ],
        }
    )
    rows = kubepods.rows_of(snap, lambda name: name == "kpod-0f8c1f2e1111")
    a, b, c = rows
    assert (a.ready, a.status, a.mesh, a.restarts, a.exit_code) == (
        True,
        "Running",
        "enrolled",
        1,
        2,
    )
    assert a.identity == "spiffe://cluster.local/ns/mesh/sa/sa1"
    assert a.netns == "kpod-0f8c1f2e1111"
    assert a.created_at == NOW - 3600
    assert (b.mesh, b.mesh_reason) == ("pending", "not captured by the node agent yet")
    assert (c.ready, c.status, c.mesh, c.restarts, c.identity) == (
        False, "CrashLoopBackOff", "not-enrolled", 4, "",
    )  # fmt: skip
    check("pods_kube", podsview.render(rows, "wide", NOW, all_namespaces=True))
