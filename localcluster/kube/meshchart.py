"""The mesh installed on a Kubernetes-mode local cluster with its Helm charts, as a user
installs it on any cluster: `base` (CRDs), `controlplane` (istiod), `node-agent` and `tunnel`
(DaemonSets), in namespace istio-system, from the image in the local store.

The local kubelet runs the control plane, the node agents and the tunnels from the image's
file system (`scripts/image-build.sh` puts it in the store); `install` refuses to start
without it, naming the command that builds it. Pure parts: the release list and the
rollout decision (`rollout_problems`); the rest runs helm and waits on the API server.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.admission import VALIDATE_PATH
from localcluster.kube import helm, images
from localcluster.kube.hostside import admission_url_file

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CHARTS = PROJECT_ROOT / "daemonset" / "charts"
NAMESPACE = "istio-system"
HUB = "ambient-mesh"
IMAGE = "mesh"
HELM_TIMEOUT_S = 300.0


class MeshChartError(RuntimeError):
    """A chart could not be installed, upgraded or removed; says which and why."""


@dataclass(frozen=True, slots=True)
class Release:
    name: str  # the Helm release
    chart: str  # the directory under daemonset/charts


# In install order (CRDs first).
RELEASES = (
    Release("mesh-base", "base"),
    Release("mesh-controlplane", "controlplane"),
    Release("mesh-node-agent", "node-agent"),
    Release("mesh-tunnel", "tunnel"),
)


# What the local cluster sets beside the charts' defaults. Its API server runs in the root
# network namespace, which never routes to the cluster's addresses (pods and Service IPs
# live in namespaces of their own): it could not call a webhook at istiod's Service, and
# the call would go toward the machine's default route. The kubelet's host side forwards
# a loopback port to istiod's pods instead and writes its URL beside the kubeconfig; the
# webhook is registered with that URL, and stays off without it.
ADMISSION_URL_WAIT_S = 30.0


def local_values(kubeconfig: Path) -> dict[str, dict[str, Any]]:
    url_file = admission_url_file(kubeconfig)
    deadline = time.monotonic() + ADMISSION_URL_WAIT_S
    while not url_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the host side writes it once it serves, just after the nodes are up
    try:
        base = url_file.read_text(encoding="utf-8").strip()
    except OSError:
        base = ""
    admission: dict[str, Any] = (
        {"enabled": True, "url": base + VALIDATE_PATH} if base else {"enabled": False}
    )
    return {"controlplane": {"nodeAgentAdmission": admission}}


def chart_version(chart: str = "tunnel") -> str:
    """The charts' appVersion: the image tag they default to."""
    for line in (CHARTS / chart / "Chart.yaml").read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "appVersion":
            return value.strip().strip("\"'")
    raise MeshChartError(f"{CHARTS / chart / 'Chart.yaml'} has no appVersion")


def image_ref(tag: str) -> str:
    return f"{HUB}/{IMAGE}:{tag}"


def require_image(tag: str) -> images.ImageBundle:
    bundle = images.lookup(image_ref(tag))
    if bundle is None:
        raise MeshChartError(
            f"image {image_ref(tag)} is not in the local image store ({images.store_root()}); "
            f"build it with `make image` (scripts/image-build.sh --tag {tag})"
        )
    return bundle


def install(
    kubeconfig: Path,
    tag: str | None = None,
    namespace: str = NAMESPACE,
    extra: Mapping[str, Mapping[str, str]] = {},
) -> str:
    """Install the four releases in order; returns the image tag used."""
    tag = tag or chart_version()
    require_image(tag)
    local = local_values(kubeconfig)
    for r in RELEASES:
        values = {"hub": HUB, "tag": tag, **local.get(r.chart, {}), **extra.get(r.chart, {})}
        if r.chart == "base":
            values = dict(extra.get("base", {}))
        try:
            helm.install(
                CHARTS / r.chart,
                r.name,
                namespace,
                kubeconfig,
                values,
                create_namespace=True,
                timeout=HELM_TIMEOUT_S,
            )
        except helm.HelmError as e:
            raise MeshChartError(f"helm install {r.name}: {e}") from None
    return tag


def upgrade(
    kubeconfig: Path,
    chart: str,
    tag: str,
    namespace: str = NAMESPACE,
    extra: Mapping[str, str] = {},
) -> None:
    require_image(tag)
    r = next(r for r in RELEASES if r.chart == chart)
    values = {"hub": HUB, "tag": tag, **local_values(kubeconfig).get(chart, {}), **extra}
    try:
        helm.upgrade(
            CHARTS / r.chart, r.name, namespace, kubeconfig, values, timeout=HELM_TIMEOUT_S
        )
    except helm.HelmError as e:
        raise MeshChartError(f"helm upgrade {r.name}: {e}") from None


# The node agents go first: each releases its node's pods (capture rules, annotation)
# while the tunnels still run to finish what they carry; then the tunnels, the control
# plane, and base (whose CRDs helm leaves in place, as for every chart).
UNINSTALL_ORDER = ("node-agent", "tunnel", "controlplane", "base")


def uninstall(kubeconfig: Path, namespace: str = NAMESPACE) -> None:
    errors = []
    by_chart = {r.chart: r for r in RELEASES}
    for r in (by_chart[c] for c in UNINSTALL_ORDER):
        try:
            helm.uninstall(r.name, namespace, kubeconfig, wait=True, timeout=120)
        except helm.HelmError as e:
            errors.append(f"helm uninstall {r.name}: {e}")
    if errors:
        raise MeshChartError("; ".join(errors))


def _kubectl_json(kubectl: str, kubeconfig: Path, *args: str) -> Any:
    out = subprocess.run(
        [kubectl, "--kubeconfig", str(kubeconfig), *args, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)


def rollout_problems(
    deployments: Sequence[Mapping[str, Any]], daemonsets: Sequence[Mapping[str, Any]], nodes: int
) -> list[str]:
    """What is not rolled out yet (pure): istiod's ready replicas, and per DaemonSet one
    ready and up-to-date pod on every node."""
    problems = []
    by_name = {d["metadata"]["name"]: d for d in deployments}
    istiod = by_name.get("istiod")
    if istiod is None:
        problems.append("Deployment istiod not found")
    else:
        st = istiod.get("status") or {}
        want = (istiod.get("spec") or {}).get("replicas", 1)
        if st.get("readyReplicas", 0) < want or st.get("updatedReplicas", 0) < want:
            problems.append(f"istiod: {st.get('readyReplicas', 0)}/{want} ready")
    ds_names = {d["metadata"]["name"]: d for d in daemonsets}
    for name in ("ztunnel", "ambient-node-agent"):
        ds = ds_names.get(name)
        if ds is None:
            problems.append(f"DaemonSet {name} not found")
            continue
        st = ds.get("status") or {}
        gen_ok = st.get("observedGeneration", 0) >= (ds["metadata"].get("generation") or 0)
        ready_n, updated = st.get("numberReady", 0), st.get("updatedNumberScheduled", 0)
        if not gen_ok or ready_n < nodes or updated < nodes or st.get("numberUnavailable"):
            problems.append(f"{name}: {ready_n}/{nodes} ready, {updated} up to date")
    return problems


def wait_rolled_out(
    kubectl: str, kubeconfig: Path, nodes: int, namespace: str = NAMESPACE, timeout: float = 180.0
) -> None:
    deadline = time.monotonic() + timeout
    problems = ["not checked"]
    while time.monotonic() < deadline:
        deps = _kubectl_json(kubectl, kubeconfig, "-n", namespace, "get", "deployments")
        dss = _kubectl_json(kubectl, kubeconfig, "-n", namespace, "get", "daemonsets")
        if deps is not None and dss is not None:
            problems = rollout_problems(deps["items"], dss["items"], nodes)
            if not problems:
                return
        time.sleep(0.5)
    raise MeshChartError(f"the mesh did not roll out in {timeout:g} s: {'; '.join(problems)}")
