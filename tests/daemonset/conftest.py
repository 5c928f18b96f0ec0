"""The charts' renderings, shared by the chart tests: `helm template` once per (chart, value
set, Kubernetes version) in each test process."""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import pytest

from localcluster.kube import helm
from localcluster.kube.meshrbac import CHARTS_DIR

UNDER_CI = os.environ.get("CI", "").lower() == "true"
CHARTS = ("base", "controlplane", "node-agent", "tunnel")
NAMESPACE = "istio-system"
RELEASE = "mesh"
OLD_KUBE = "1.20.2"  # the project's API server: policy/v1beta1, no DaemonSet surge
NEW_KUBE = "1.30.0"
KUBE_VERSIONS = (OLD_KUBE, NEW_KUBE)

# The value sets every chart is linted, rendered and validated with (the ones that concern
# it: a chart without the value would only ignore it).
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "ebpf": {"redirectMode": "ebpf"},
    "no-dns-capture": {"dnsCapture": False},
    "custom-image": {"hub": "registry.example/team", "image": "mesh-x", "tag": "1.2.3-rc.1"},
    "resources": {
        "resources": {
            "requests": {"cpu": "250m", "memory": "96Mi"},
            "limits": {"cpu": "2", "memory": "1Gi"},
        },
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "podAnnotations": {"example.com/owner": "mesh-team"},
        "logLevel": "debug",
    },
}
ONLY_FOR = {"ebpf": {"node-agent"}, "no-dns-capture": {"node-agent", "tunnel"}}
CASES = [
    (chart, name) for chart in CHARTS for name in VALUE_SETS if chart in ONLY_FOR.get(name, CHARTS)
]


def chart_path(chart: str) -> str:
    return str(CHARTS_DIR / chart)


@functools.cache
def _rendered(chart: str, value_set: str, kube_version: str) -> tuple[dict[str, Any], ...]:
    return tuple(
        helm.template(
            chart_path(chart),
            RELEASE,
            NAMESPACE,
            values=VALUE_SETS[value_set],
            kube_version=kube_version,
        )
    )


def render(chart: str, value_set: str = "defaults", kube_version: str = NEW_KUBE) -> list[Any]:
    """The objects `chart` renders (copies: a test may change them)."""
    return copy.deepcopy(list(_rendered(chart, value_set, kube_version)))


@pytest.fixture(scope="session")
def helm_present() -> None:
    """Helm is a listed program (scripts/helm-fetch.sh): missing under CI is a failure."""
    try:
        helm.helm_binary()
    except helm.HelmError as e:
        if UNDER_CI:
            pytest.fail(str(e))
        pytest.skip(str(e))
