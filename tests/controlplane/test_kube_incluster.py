"""`python -m controlplane --in-cluster` on the real API server: the CA root is kept in the
Secret istio-ca-secret (created once, reused by a restart), the root certificate reaches every
namespace as istio-ca-root-cert and heals when removed or edited, /ready answers once the
first config is pushed, and 15012's certificate names istiod in its own namespace."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from cryptography import x509

from controlplane.incluster import CA_SECRET, ROOT_CERT_KEY, ROOT_CONFIGMAP, ca_from_secret
from kube import kinds
from kube.client import KubeApiError, KubeClient, load_kubeconfig
from localcluster.kube.apiserver import KubeControlPlane
from meshcore.defaults import TRUST_DOMAIN
from tests.controlplane.test_kube_controlplane import until, until_async
from tests.support.ports import free_port

pytestmark = pytest.mark.kube


def _start(cp: KubeControlPlane, ns: str, grpc: int, ready: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane",
            "--in-cluster",
            "--kubeconfig",
            str(cp.kubeconfig),
            "--no-waypoints",
            "--grpc-listen",
            f"127.0.0.1:{grpc}",
            "--readiness-port",
            str(ready),
        ],
        env={**os.environ, "POD_NAMESPACE": ns},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _peer_dns_names(port: int, root_pem: str) -> list[str]:
    ctx = ssl.create_default_context(cadata=root_pem)
    ctx.check_hostname = False  # the names are what is being checked
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


async def _configmap(c: KubeClient, ns: str) -> str | None:
    try:
        cm = await c.get(kinds.CONFIG_MAP, ROOT_CONFIGMAP, ns)
    except KubeApiError as e:
        if e.status == 404:
            return None
        raise
    return str((cm.get("data") or {}).get(ROOT_CERT_KEY))


async def _scenario(cp: KubeControlPlane, ns: str, grpc: int, ready: int) -> str:
    async with KubeClient(load_kubeconfig(cp.kubeconfig)) as c:
        await until(lambda: _ready(ready), within=30, what="/ready 200")
        secret = await c.get(kinds.SECRET, CA_SECRET, ns)
        root = ca_from_secret(secret, TRUST_DOMAIN).roots_pem().decode()
        assert f"istiod.{ns}.svc" in _peer_dns_names(grpc, root)

        async def everywhere(names: list[str]) -> bool:
            return all([await _configmap(c, n) == root for n in names])

        other = "tenant-" + secrets.token_hex(3)
        await c.create(kinds.NAMESPACE, {"metadata": {"name": other}})
        await until_async(lambda: everywhere([ns, other, "default"]), 15, "root in namespaces")
        # Removed or edited by hand: put back.
        await c.delete(kinds.CONFIG_MAP, ROOT_CONFIGMAP, other)
        await until_async(lambda: everywhere([other]), 15, "deleted copy restored")
        cm = await c.get(kinds.CONFIG_MAP, ROOT_CONFIGMAP, other)
        cm["data"] = {ROOT_CERT_KEY: "not the root"}
        await c.replace(kinds.CONFIG_MAP, cm, other)
        await until_async(lambda: everywhere([other]), 15, "edited copy restored")
        await c.delete(kinds.NAMESPACE, other)
        return root


def test_in_cluster_ca_secret_root_configmaps_and_readiness(kube_cp: KubeControlPlane) -> None:
    ns = "mesh-" + secrets.token_hex(3)

    async def make_ns() -> None:
        async with KubeClient(load_kubeconfig(kube_cp.kubeconfig)) as c:
            await c.create(kinds.NAMESPACE, {"metadata": {"name": ns}})

    asyncio.run(make_ns())
    grpc, ready = free_port(), free_port()
    proc = _start(kube_cp, ns, grpc, ready)
    try:
        root = asyncio.run(_scenario(kube_cp, ns, grpc, ready))
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    assert '"event": "mesh CA root created"' in out

    # A restart (an upgrade, a second replica) keeps the root: nothing issued goes stale.
    proc = _start(kube_cp, ns, grpc, ready)
    try:

        async def same_root() -> None:
            async with KubeClient(load_kubeconfig(kube_cp.kubeconfig)) as c:
                await until(lambda: _ready(ready), within=30, what="/ready after restart")
                assert await _configmap(c, ns) == root
                secret = await c.get(kinds.SECRET, CA_SECRET, ns)
                assert ca_from_secret(secret, TRUST_DOMAIN).roots_pem().decode() == root
                await c.delete(kinds.NAMESPACE, ns)

        asyncio.run(same_root())
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    assert "mesh CA root created" not in out


def test_a_broken_ca_secret_stops_the_control_plane(kube_cp: KubeControlPlane) -> None:
    ns = "mesh-" + secrets.token_hex(3)

    async def setup() -> None:
        async with KubeClient(load_kubeconfig(kube_cp.kubeconfig)) as c:
            await c.create(kinds.NAMESPACE, {"metadata": {"name": ns}})
            secret = {"metadata": {"name": CA_SECRET}, "data": {"ca-cert.pem": "eA=="}}
            await c.create(kinds.SECRET, secret, ns)

    asyncio.run(setup())
    proc = _start(kube_cp, ns, free_port(), free_port())
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out
    assert "has no ca-key.pem" in out
