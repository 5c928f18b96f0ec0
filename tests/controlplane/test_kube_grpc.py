"""`python -m controlplane --grpc-listen`: the state computed from the real API server reaches
a proxy's xDS client, a namespace label change follows it, and the CA answers on the same
TLS port (istiod's 15012 shape), over a unix socket as the local cluster's tunnels use it."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from controlplane.ca import CertificateAuthority
from controlplane.xds.tls import server_identity
from kube import kinds
from kube.client import KubeClient, load_kubeconfig
from localcluster.kube.apiserver import KubeControlPlane
from meshcore.defaults import TRUST_DOMAIN
from meshcore.state import MeshState, TunnelProtocol
from meshcore.xds import messages as m
from meshcore.xds.client import XdsClient, XdsTarget
from meshcore.xds.convert import RESOURCE_TYPES
from meshcore.xds.grpc import client_context
from tests.controlplane.test_kube_controlplane import ensure_node, running_pod, until

pytestmark = pytest.mark.kube


def _is(get: Callable[[], TunnelProtocol | None], want: TunnelProtocol) -> Callable[[], bool]:
    return lambda: get() == want


async def _scenario(cp: KubeControlPlane, sock: Path, state_dir: Path) -> list[float]:
    ns = "grpc-" + secrets.token_hex(3)
    uid = f"Kubernetes//Pod/{ns}/api-0"
    async with KubeClient(load_kubeconfig(cp.kubeconfig)) as c:
        await c.create(kinds.NAMESPACE, {"metadata": {"name": ns}})
        await ensure_node(c)
        await running_pod(c, ns, "api-0", "10.244.12.10", {"app": "api"})

        roots = CertificateAuthority.load_or_create(state_dir, TRUST_DOMAIN).roots_pem()
        target = XdsTarget.parse(
            f"unix:{sock}", client_context(roots), server_identity(TRUST_DOMAIN)
        )
        # A subscriber authenticates as the tunnels do: a service-account token for istio-ca.
        await c.create(kinds.SERVICE_ACCOUNT, {"metadata": {"name": "ztunnel"}}, ns)
        status, raw = cp.request(
            "POST",
            f"/api/v1/namespaces/{ns}/serviceaccounts/ztunnel/token",
            {"spec": {"audiences": ["istio-ca"], "expirationSeconds": 600}},
        )
        assert status == 201, raw[:300]
        token = json.loads(raw)["status"]["token"]
        states: list[MeshState] = []
        client = XdsClient(
            target,
            # A proxy of the account's own namespace: all a non-tunnel account may be.
            m.Node(id=f"router~10.0.0.9~grpc-node.{ns}~{ns}.svc.cluster.local"),
            states.append,
            RESOURCE_TYPES,
            credentials=lambda: (("authorization", f"Bearer {token}"),),
        )
        await until(sock.exists, within=30, what="the control plane's socket")
        try:
            await client.start(wait=30)

            def protocol() -> TunnelProtocol | None:
                w = client.current.workload_by_uid(uid) if client.current else None
                return w.protocol if w else None

            await until(lambda: protocol() == TunnelProtocol.NONE, within=15, what="pod via xDS")
            # Enrol the namespace: the workload turns HBONE at the client. Each round is timed
            # from the label write to the client holding the new state (reported, not asserted).
            took = []
            for value in ("ambient", None, "ambient"):
                want = TunnelProtocol.HBONE if value else TunnelProtocol.NONE
                t0 = time.monotonic()
                await c.patch(
                    kinds.NAMESPACE,
                    ns,
                    {"metadata": {"labels": {"istio.io/dataplane-mode": value}}},
                )
                await until(_is(protocol, want), within=10, what=f"{want} via xDS")
                took.append(time.monotonic() - t0)
        finally:
            await client.close()
        await c.delete(kinds.NAMESPACE, ns)
        return took


def test_the_computed_state_is_pushed_over_xds_and_follows_a_label(
    kube_cp: KubeControlPlane, tmp_path: Path
) -> None:
    sock = tmp_path / "istiod.sock"
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane",
            "--kubeconfig",
            str(kube_cp.kubeconfig),
            "--mesh-out",
            str(tmp_path / "mesh.json"),
            "--no-waypoints",
            "--state-dir",
            str(state_dir),
            "--grpc-listen",
            f"unix:{sock}",
            "--grpc-listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        took = asyncio.run(_scenario(kube_cp, sock, state_dir))
        print(f"label change -> xDS client: {[round(t * 1000) for t in took]} ms")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert '"event": "grpc listening"' in output and '"services": "xds,ca"' in output


def test_grpc_listen_needs_the_ca_state(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "controlplane",
            "--mesh-out",
            str(tmp_path / "m.json"),
            "--grpc-listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "--state-dir" in r.stderr
