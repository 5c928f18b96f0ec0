"""The mesh charts' rollout decision and release list (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from localcluster.kube import meshchart
from localcluster.kube.hostside import admission_target, admission_url_file
from localcluster.kube.meshchart import RELEASES, UNINSTALL_ORDER, chart_version, rollout_problems
from localcluster.kube.proxyplan import listed_endpoints


def _deploy(ready: int, updated: int | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "istiod"},
        "spec": {"replicas": 1},
        "status": {
            "readyReplicas": ready,
            "updatedReplicas": ready if updated is None else updated,
        },
    }


def _ds(
    name: str, ready: int, updated: int, generation: int = 2, observed: int = 2
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "generation": generation},
        "status": {
            "numberReady": ready,
            "updatedNumberScheduled": updated,
            "observedGeneration": observed,
        },
    }


def test_rolled_out_only_when_every_node_runs_the_current_pods() -> None:
    good = [_ds("ztunnel", 2, 2), _ds("ambient-node-agent", 2, 2)]
    assert rollout_problems([_deploy(1)], good, nodes=2) == []
    assert rollout_problems([], good, 2) == ["Deployment istiod not found"]
    assert rollout_problems([_deploy(0)], good, 2) == ["istiod: 0/1 ready"]
    # An upgrade in flight: ready, but not all updated; or the new template not yet seen.
    assert rollout_problems([_deploy(1)], [_ds("ztunnel", 2, 1), good[1]], 2) == [
        "ztunnel: 2/2 ready, 1 up to date"
    ]
    assert rollout_problems([_deploy(1)], [_ds("ztunnel", 2, 2, 3, 2), good[1]], 2) == [
        "ztunnel: 2/2 ready, 2 up to date"
    ]
    assert rollout_problems([_deploy(1)], good[:1], 2) == ["DaemonSet ambient-node-agent not found"]


def test_releases_install_crds_first_and_remove_agents_first() -> None:
    assert [r.chart for r in RELEASES] == ["base", "controlplane", "node-agent", "tunnel"]
    assert UNINSTALL_ORDER[0] == "node-agent"
    assert sorted(UNINSTALL_ORDER) == sorted(r.chart for r in RELEASES)
    assert chart_version() == "0.13.0"


def test_the_webhook_is_registered_at_the_host_sides_url_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local API server cannot reach a Service: istiod's node-agent webhook is
    registered by the URL the kubelet's host side forwards, and is off without one."""
    kubeconfig = tmp_path / "kubeconfig"
    monkeypatch.setattr(meshchart, "ADMISSION_URL_WAIT_S", 0.0)
    off = meshchart.local_values(kubeconfig)
    assert off == {"controlplane": {"nodeAgentAdmission": {"enabled": False}}}
    url = "https://127.0.0.1:40000/validate/node-agent"
    admission_url_file(kubeconfig).write_text("https://127.0.0.1:40000\n")
    on = meshchart.local_values(kubeconfig)["controlplane"]["nodeAgentAdmission"]
    assert on == {"enabled": True, "url": url}


def test_a_ready_istiod_address_serving_the_webhook_port() -> None:
    endpoints = {
        "metadata": {"namespace": "istio-system", "name": "istiod"},
        "subsets": [
            {"addresses": [{"ip": "10.1.0.4"}], "ports": [{"name": "grpc-xds", "port": 15012}]},
            {
                "addresses": [{"ip": "10.1.0.5"}],
                "notReadyAddresses": [{"ip": "10.1.0.6"}],
                "ports": [{"name": "https-webhook", "port": 15017}],
            },
        ],
    }
    assert admission_target([listed_endpoints(endpoints)]) == ("10.1.0.5", 15017)
    other = {**endpoints, "metadata": {"namespace": "apps", "name": "istiod"}}
    assert admission_target([listed_endpoints(other)]) is None
    not_ready = {
        "metadata": {"namespace": "istio-system", "name": "istiod"},
        "subsets": [
            {
                "notReadyAddresses": [{"ip": "x"}],
                "ports": [{"name": "https-webhook", "port": 15017}],
            }
        ],
    }
    assert admission_target([listed_endpoints(not_ready)]) is None
    assert admission_target([]) is None
