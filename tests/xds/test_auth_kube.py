"""istiod's 15012 (`python -m controlplane --grpc-listen`) authenticates xDS subscribers by
their service-account token, reviewed by the real API server for the audience istio-ca,
exactly as the gRPC CA on the same port does: a valid token is served; none, a token for
another audience, an expired one and a forged one are refused UNAUTHENTICATED, saying why,
before any resource is sent.

Tokens come from the TokenRequest API, except the expired one, signed with the API server's
own service-account key (the same token unexpired is served, so the refusal is the expiry's).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from controlplane.ca import CertificateAuthority
from controlplane.xds.tls import server_identity
from localcluster.kube.apiserver import KubeControlPlane
from meshcore.defaults import TRUST_DOMAIN
from meshcore.xds import messages as m
from meshcore.xds.client import XdsClient, XdsTarget
from meshcore.xds.convert import RESOURCE_TYPES
from meshcore.xds.credentials import token_credentials
from meshcore.xds.grpc import GrpcClosed, client_context
from tests.support.kubetokens import api_ok, signed_token
from tests.support.ports import free_port
from tests.xds.test_auth import end_of, first_answer, open_stream
from tests.xds.test_tunnel_process import ROOT

pytestmark = pytest.mark.kube

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]


@dataclass
class Env:
    cp: KubeControlPlane
    port: int
    roots: bytes
    ns: str

    def token(self, audiences: tuple[str, ...] = ("istio-ca",)) -> str:
        spec = {"audiences": list(audiences), "expirationSeconds": 600}
        path = f"/api/v1/namespaces/{self.ns}/serviceaccounts/ztunnel/token"
        return str(api_ok(self.cp, "POST", path, {"spec": spec})["status"]["token"])

    def signed_token(self, exp_offset: float) -> str:
        """A token as the API server makes them, signed with its own key."""
        return signed_token(self.cp, self.ns, "ztunnel", exp_offset)

    @property
    def proxy_node(self) -> str:
        """A node id this namespace's accounts may subscribe as: a proxy of the namespace."""
        return f"router~10.0.0.9~wp.{self.ns}~{self.ns}.svc.cluster.local"

    async def answer(self, token: str | None) -> GrpcClosed | bytes:
        """How the ADS call ends for `token`: the first message, or the call's status."""
        return await first_answer(self.port, self.roots, token, node=self.proxy_node)

    def refused(self, token: str | None) -> str:
        got = asyncio.run(self.answer(token))
        assert isinstance(got, GrpcClosed), "a resource was sent to a refused subscriber"
        assert got.status == UNAUTHENTICATED, got
        return got.message


@pytest.fixture(scope="module")
def env(kube_cp: KubeControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("xdsauth")
    ns = "xdsauth-" + secrets.token_hex(3)
    api_ok(kube_cp, "POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    sa = {"metadata": {"name": "ztunnel"}}
    api_ok(kube_cp, "POST", f"/api/v1/namespaces/{ns}/serviceaccounts", sa)
    state_dir = work / "state"
    state_dir.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane", "--kubeconfig", str(kube_cp.kubeconfig),
         "--mesh-out", str(work / "mesh.json"), "--no-waypoints", "--state-dir", str(state_dir),
         "--grpc-listen", f"127.0.0.1:{port}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        roots = CertificateAuthority.load_or_create(state_dir, TRUST_DOMAIN).roots_pem()
        deadline = time.monotonic() + 60
        while not (work / "mesh.json").exists():
            assert proc.poll() is None, "the control plane exited"
            assert time.monotonic() < deadline, "no first mesh config in 60 s"
            time.sleep(0.1)
        yield Env(kube_cp, port, roots, ns)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        kube_cp.request("DELETE", f"/api/v1/namespaces/{ns}")


def test_a_service_account_token_for_istio_ca_is_served(env: Env, tmp_path: Path) -> None:
    token_file = tmp_path / "istio-token"
    token_file.write_text(env.token())

    async def main() -> None:
        ctx = client_context(env.roots)
        target = XdsTarget("127.0.0.1", env.port, ctx, server_identity(TRUST_DOMAIN))
        client = XdsClient(
            target,
            m.Node(id=env.proxy_node),
            lambda _s: None,
            RESOURCE_TYPES,
            credentials=token_credentials(token_file),
        )
        try:
            await client.start(wait=30)
            assert client.responses >= len(RESOURCE_TYPES)
        finally:
            await client.close()

    asyncio.run(main())


def test_no_token_is_refused(env: Env) -> None:
    assert "no token" in env.refused(None)


def test_a_token_for_another_audience_is_refused(env: Env) -> None:
    reason = env.refused(env.token(audiences=("https://kubernetes.default.svc",)))
    assert "wrong audience" in reason, reason


def test_an_expired_token_is_refused(env: Env) -> None:
    # The same token, unexpired, is served: what is refused below is the expiry alone.
    assert isinstance(asyncio.run(env.answer(env.signed_token(600))), bytes)
    reason = env.refused(env.signed_token(-60))
    assert "expired" in reason, reason


def test_a_forged_token_is_refused(env: Env) -> None:
    reason = env.refused("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")
    assert "the API server rejected the token" in reason or "unauthenticated" in reason, reason


def bound_token(env: Env) -> tuple[str, str]:
    """A new pod's name, and a token for istio-ca bound to it."""
    pod = {
        "metadata": {"name": "bound-" + secrets.token_hex(3)},
        "spec": {
            "serviceAccountName": "ztunnel",
            "automountServiceAccountToken": False,
            "containers": [{"name": "app", "image": "app"}],
        },
    }
    made = api_ok(env.cp, "POST", f"/api/v1/namespaces/{env.ns}/pods", pod)
    name, uid = made["metadata"]["name"], made["metadata"]["uid"]
    spec = {
        "audiences": ["istio-ca"],
        "expirationSeconds": 600,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid},
    }
    path = f"/api/v1/namespaces/{env.ns}/serviceaccounts/ztunnel/token"
    return name, str(api_ok(env.cp, "POST", path, {"spec": spec})["status"]["token"])


def test_a_token_bound_to_a_deleted_pod_opens_no_stream_from_then_on(env: Env) -> None:
    """The API server refuses a pod-bound token once its pod is deleted; the control plane
    forgets its cached answer for that token when it sees the deletion, instead of serving
    it for the rest of the cache's minute."""
    name, token = bound_token(env)
    assert isinstance(asyncio.run(env.answer(token)), bytes)  # served, and now cached
    api_ok(env.cp, "DELETE", f"/api/v1/namespaces/{env.ns}/pods/{name}?gracePeriodSeconds=0")
    deadline = time.monotonic() + 20  # well inside the cache's 60 s
    while True:
        got = asyncio.run(env.answer(token))
        if isinstance(got, GrpcClosed):
            assert got.status == UNAUTHENTICATED, got
            break
        assert time.monotonic() < deadline, "the deleted pod's token was still served"
        time.sleep(0.5)


def test_the_open_stream_of_a_token_bound_to_a_deleted_pod_ends_at_once(env: Env) -> None:
    """A stream opened with a pod-bound token, and served, ends UNAUTHENTICATED when the
    pod is deleted: not at its next periodic check (a minute), and although the API server
    itself still accepts the token for a few seconds."""
    name, token = bound_token(env)

    async def main() -> GrpcClosed | None:
        stream = await open_stream(env.port, env.roots, token, node=env.proxy_node)
        try:
            assert isinstance(await stream.recv(), bytes)  # served
            path = f"/api/v1/namespaces/{env.ns}/pods/{name}?gracePeriodSeconds=0"
            await asyncio.to_thread(api_ok, env.cp, "DELETE", path)
            return await end_of(stream, 20)
        finally:
            await stream.close()

    ended = asyncio.run(main())
    assert ended is not None, "the stream of a deleted pod's token ran on"
    assert ended.status == UNAUTHENTICATED and "was deleted" in ended.message, ended


def test_the_standalone_server_reviews_tokens_with_its_kubeconfig(env: Env, tmp_path: Path) -> None:
    """`python -m controlplane.xds --kubeconfig`: the same TokenReview outside istiod."""
    from tests.xds.states import demo_document

    config = tmp_path / "xds.json"
    config.write_text(json.dumps(demo_document()))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.xds", "--config", str(config),
         "--state-dir", str(tmp_path), "--listen", f"127.0.0.1:{port}",
         "--kubeconfig", str(env.cp.kubeconfig)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        root = tmp_path / "ca" / "root-cert.pem"
        deadline = time.monotonic() + 30
        standalone = Env(env.cp, port, b"", env.ns)
        while True:
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not answer in 30 s"
            if root.exists():
                standalone.roots = root.read_bytes()
                try:
                    got = asyncio.run(standalone.answer(env.token()))
                except OSError:
                    time.sleep(0.2)
                    continue
                break
            time.sleep(0.1)
        assert isinstance(got, bytes), got
        assert "no token" in standalone.refused(None)
        assert "wrong audience" in standalone.refused(
            env.token(audiences=("https://kubernetes.default.svc",))
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
