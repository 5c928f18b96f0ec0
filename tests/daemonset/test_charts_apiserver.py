"""The charts against the real API server (v1.20.2): the base chart installed first (its
CRDs), then every chart rendered with the server's own capabilities and every object sent as
a server-side dry run (validation, defaulting, admission), then installed and uninstalled
for real with helm. No kubelet runs here: the workloads' pods are not started."""

from __future__ import annotations

import secrets
import subprocess

import pytest

from localcluster.kube import helm
from localcluster.kube.apiserver import KubeControlPlane, kubectl
from tests.daemonset.conftest import chart_path

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("helm_present")]


def run_kubectl(cp: KubeControlPlane, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [kubectl(), "--kubeconfig", str(cp.kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def gateway_class_exists(cp: KubeControlPlane) -> bool:
    crd = "customresourcedefinition/gatewayclasses.gateway.networking.k8s.io"
    if not run_kubectl(cp, "get", crd, "-o", "name", "--ignore-not-found").strip():
        return False
    out = run_kubectl(cp, "get", "gatewayclasses", "-o", "name", "--ignore-not-found")
    return "istio-waypoint" in out


def test_the_api_server_accepts_and_installs_every_chart(kube_cp):
    cp = kube_cp
    suffix = secrets.token_hex(3)
    ns = f"mesh-{suffix}"
    kc = cp.kubeconfig
    run_kubectl(cp, "create", "namespace", ns)
    installed: list[str] = []
    try:
        # CRDs first. Another test of the session may have made the waypoint class (the
        # control plane installs it out of a cluster): helm would refuse to take it over.
        class_values = {"waypointClass": not gateway_class_exists(cp)}
        helm.install(chart_path("base"), f"base-{suffix}", ns, kc, values=class_values)
        installed.append(f"base-{suffix}")
        assert gateway_class_exists(cp)

        variants = [
            ("controlplane", "controlPlaneNamespace=" + ns),
            ("node-agent", "redirectMode=iptables"),
            ("node-agent", "redirectMode=ebpf"),  # privileged, the node's bpffs and sources
            ("tunnel", "controlPlaneNamespace=" + ns),
        ]
        for chart, value in variants:
            # `--validate`: rendered with the server's discovery (1.20: no policy/v1, no
            # DaemonSet surge) and checked against its OpenAPI schema.
            text = helm.run(
                [
                    "template",
                    f"{chart}-{suffix}",
                    chart_path(chart),
                    "--namespace",
                    ns,
                    "--kubeconfig",
                    str(kc),
                    "--validate",
                    "--set",
                    value,
                ]
            )
            objs = helm.parse_documents(text)
            for obj in objs:
                if obj["kind"] == "PodDisruptionBudget":
                    assert obj["apiVersion"] == "policy/v1beta1"
                if obj["kind"] == "DaemonSet" and obj["metadata"]["name"] == "ztunnel":
                    assert obj["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 1}
            out = run_kubectl(cp, "apply", "--dry-run=server", "-f", "-", stdin=text)
            accepted = [ln for ln in out.splitlines() if ln.endswith("(server dry run)")]
            assert len(accepted) == len(objs), out

        # helm's own dry run against the server: nothing is created.
        shown = helm.install(chart_path("tunnel"), f"dry-{suffix}", ns, kc, dry_run="server")
        assert "kind: DaemonSet" in shown
        assert not run_kubectl(cp, "get", "daemonsets", "-n", ns, "-o", "name").strip()

        for chart in ("controlplane", "node-agent", "tunnel"):
            release = f"{chart}-{suffix}"
            # The node-agent webhook off: this API server cannot reach a Service (see
            # meshchart.local_values); its objects were checked by the dry run above.
            sets = [f"controlPlaneNamespace={ns}"]
            if chart == "controlplane":
                sets.append("nodeAgentAdmission.enabled=false")
            helm.install(chart_path(chart), release, ns, kc, set=sets)
            installed.append(release)
        names = run_kubectl(cp, "get", "deployments,daemonsets,services", "-n", ns, "-o", "name")
        assert sorted(names.split()) == sorted(
            [
                "deployment.apps/istiod",
                "daemonset.apps/ambient-node-agent",
                "daemonset.apps/ztunnel",
                "service/istiod",
            ]
        )
        assert run_kubectl(cp, "get", "clusterrole", "istiod", "ambient-node-agent", "-o", "name")
        # An upgrade to another tag changes the tunnel's image, and nothing else is needed.
        helm.upgrade(
            chart_path("tunnel"),
            f"tunnel-{suffix}",
            ns,
            kc,
            set=[f"controlPlaneNamespace={ns}", "tag=0.13.0-next"],
        )
        image = run_kubectl(
            cp,
            "get",
            "daemonset",
            "ztunnel",
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        )
        assert image == "ambient-mesh/mesh:0.13.0-next"
    finally:
        for release in reversed(installed):
            helm.uninstall(release, ns, kc)
        installed.clear()
        run_kubectl(cp, "delete", "namespace", ns, "--wait=false")
    # helm uninstall removed what it installed (CRDs stay, as Helm does with crds/).
    left = run_kubectl(cp, "get", "clusterroles", "-o", "name")
    assert "clusterrole.rbac.authorization.k8s.io/istiod" not in left.split()
    assert "clusterrole.rbac.authorization.k8s.io/ambient-node-agent" not in left.split()
    run_kubectl(cp, "get", "crd", "gatewayclasses.gateway.networking.k8s.io")
