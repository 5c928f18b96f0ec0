"""`ambientctl use --kubeconfig` then `get` with no flags, against the real API server:
the mesh's resources in the same tables as a local cluster's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from pathlib import Path

import pytest

from ambientctl import cli
from controlplane.install import install_crds
from kube import kinds
from kube.client import KubeApiError, KubeClient, load_kubeconfig
from localcluster.kube.apiserver import KubeControlPlane
from tests.controlplane.kubeobjects import authorization_policy, http_route

pytestmark = pytest.mark.kube


def test_get_uses_the_current_kubernetes_cluster(
    kube_cp: KubeControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = f"shape-{secrets.token_hex(3)}"

    def ctl(*argv: str) -> tuple[int, str, str]:
        rc = cli.main(["--state-root", str(tmp_path), *argv])
        out, err = capsys.readouterr()
        return rc, out, err

    async def setup(c: KubeClient) -> None:
        await install_crds(c)
        await c.create(kinds.NAMESPACE, {"metadata": {"name": ns, "labels": {"team": "a"}}})
        deny = {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]}
        await c.create(kinds.AUTHORIZATION_POLICY, authorization_policy(ns, "deny-x", deny), ns)
        await c.create(kinds.HTTP_ROUTE, http_route(ns, "web", "web", "web"), ns)

    async def cleanup(c: KubeClient) -> None:
        with contextlib.suppress(KubeApiError):
            await c.delete(kinds.NAMESPACE, ns)

    async def on_api(work: object) -> None:
        async with KubeClient(load_kubeconfig(kube_cp.kubeconfig)) as c:
            await work(c)  # type: ignore[operator]

    asyncio.run(on_api(setup))
    try:
        rc, out, _ = ctl("use", "--kubeconfig", str(kube_cp.kubeconfig), "-n", ns)
        assert rc == 0 and out.endswith(f", namespace {ns}\n")
        rc, out, err = ctl("get", "ap")
        assert (rc, out) == (0, "NAME     ACTION   SELECTOR\ndeny-x   DENY     <none>\n"), err
        rc, out, _ = ctl("get", "hr", "web", "-o", "json")
        assert rc == 0 and json.loads(out)["spec"]["parentRefs"][0]["name"] == "web"
        rc, out, _ = ctl("get", "hr", "-A", "-o", "wide")
        (row,) = [line.split() for line in out.splitlines()[1:] if line.startswith(ns)]
        assert row[:3] == [ns, "web", "Service/web"] and row[-1] == "1"
        rc, out, _ = ctl("get", "ns", ns, "--show-labels")
        assert rc == 0 and "team=a" in out.splitlines()[1]
        rc, _, err = ctl("get", "ap", "nope")
        assert rc == 1 and f"no AuthorizationPolicy {ns}/nope" in err
        rc, _, err = ctl("get", "nodes")
        assert rc == 2 and "kubectl get nodes" in err
    finally:
        asyncio.run(on_api(cleanup))
