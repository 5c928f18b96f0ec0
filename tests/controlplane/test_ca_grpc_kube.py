"""The gRPC CA against the real API server, called by grpcio's client with protoc's messages.

Two Nodes, a tunnel pod on each (service account ztunnel, trusted as a node proxy), app pods
bound to nodes with spec.nodeName (nothing runs them: the API server's view is what counts).
Tokens come from the TokenRequest API, bound to pods, except the expired one, which is
signed with the API server's own service-account key (the same token unexpired is accepted,
so the refusal is the expiry's). The server runs in a thread with its own event loop; the
client calls are blocking, as a real client's are.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from cryptography import x509

from controlplane.ca import CLOCK_SKEW, CertificateAuthority
from controlplane.ca_grpc import METHOD, SERVICE, CaGrpcServer, CaGrpcService, KubeFacts
from controlplane.ca_grpc_auth import Policy, RateLimiter
from kube.client import KubeClient, load_kubeconfig
from localcluster.kube.apiserver import KubeControlPlane
from meshcore.identity import camessages as m
from meshcore.identity.certs import CertificateError, CertificateManager, new_key_and_csr
from meshcore.identity.certworker_client import CertWorkerClient
from meshcore.identity.istio_ca import CaGrpcSettings, IstioCAClient
from meshcore.identity.spiffe import SpiffeId
from tests.controlplane.ca_grpc_pb import compiled
from tests.support.kubetokens import api_ok, signed_token
from tests.support.netns import throwaway_netns
from tests.support.ports import free_port

pytestmark = pytest.mark.kube

TD = "cluster.local"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Env:
    cp: KubeControlPlane
    ca: CertificateAuthority
    port: int
    pb: ModuleType
    stub: Any
    channel: Any
    zt: str  # the tunnels' namespace
    app: str  # the apps' namespace
    node_a: str
    node_b: str
    service: CaGrpcService
    loop: asyncio.AbstractEventLoop

    def pod(self, ns: str, name: str, sa: str, node: str) -> dict[str, Any]:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": sa,
                "nodeName": node,
                "automountServiceAccountToken": False,
                "containers": [{"name": "c", "image": "pause"}],
            },
        }
        out: dict[str, Any] = api_ok(self.cp, "POST", f"/api/v1/namespaces/{ns}/pods", body)
        return out

    def token(
        self, ns: str, sa: str, pod: str | None = None, audiences: tuple[str, ...] = ("istio-ca",)
    ) -> str:
        spec: dict[str, Any] = {"audiences": list(audiences), "expirationSeconds": 600}
        if pod is not None:
            uid = api_ok(self.cp, "GET", f"/api/v1/namespaces/{ns}/pods/{pod}")["metadata"]["uid"]
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid}
        path = f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"
        return str(api_ok(self.cp, "POST", path, {"spec": spec})["status"]["token"])

    def ask(
        self, token: str | None, identity: SpiffeId, impersonate: SpiffeId | None = None
    ) -> list[str]:
        csr = new_key_and_csr(identity)[1].decode()
        req = self.pb.IstioCertificateRequest(csr=csr, validity_duration=3600)
        if impersonate is not None:
            req.metadata.fields[m.IMPERSONATED_IDENTITY].string_value = str(impersonate)
        md = [("authorization", f"Bearer {token}")] if token is not None else []
        return list(self.stub.CreateCertificate(req, metadata=md, timeout=15).cert_chain)

    def refused(
        self, token: str | None, identity: SpiffeId, impersonate: SpiffeId | None = None
    ) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as e:
            self.ask(token, identity, impersonate)
        return e.value


@pytest.fixture(scope="module")
def env(kube_cp: KubeControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    cp = kube_cp
    tag = secrets.token_hex(3)
    zt, app = f"cag-zt-{tag}", f"cag-app-{tag}"
    node_a, node_b = f"cag-{tag}-a", f"cag-{tag}-b"
    for ns in (zt, app):
        api_ok(cp, "POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    for node in (node_a, node_b):
        api_ok(cp, "POST", "/api/v1/nodes", {"metadata": {"name": node}})
    for ns, sa in ((zt, "ztunnel"), (app, "alice"), (app, "bob"), (app, "carol")):
        api_ok(cp, "POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": sa}})
    pb, pb_grpc = compiled(Path(tmp_path_factory.mktemp("ca_pb")))
    ca = CertificateAuthority.create(TD)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ca-grpc-loop", daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    async def start() -> tuple[KubeClient, KubeFacts, CaGrpcServer, int]:
        client = KubeClient(load_kubeconfig(cp.kubeconfig))
        facts = KubeFacts(client)
        facts.start()
        await asyncio.wait_for(facts.pods.synced.wait(), 15)
        policy = Policy(TD, frozenset({(zt, "ztunnel")}))
        server = CaGrpcServer(
            CaGrpcService(ca, facts, policy, RateLimiter(rate_per_s=0.5, burst=12)), ca
        )
        port = await server.start("127.0.0.1:0")
        return client, facts, server, port

    client, facts, server, port = run(start())
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=ca.roots_pem())
    )
    e = Env(
        cp, ca, port, pb, pb_grpc.IstioCertificateServiceStub(channel), channel, zt, app,
        node_a, node_b, server.service, loop,
    )  # fmt: skip
    e.pod(zt, "ztunnel-a", "ztunnel", node_a)
    e.pod(zt, "ztunnel-b", "ztunnel", node_b)
    e.pod(app, "alice-1", "alice", node_a)
    e.pod(app, "bob-1", "bob", node_b)
    try:
        yield e
    finally:
        channel.close()

        async def stop() -> None:
            await server.stop()
            await facts.stop()
            await client.close()

        run(stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        for ns in (zt, app):
            cp.request("DELETE", f"/api/v1/namespaces/{ns}")
        for node in (node_a, node_b):
            cp.request("DELETE", f"/api/v1/nodes/{node}")


def _leaf_uri(chain: list[str]) -> str:
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


def _id(ns: str, sa: str) -> SpiffeId:
    return SpiffeId(TD, ns, sa)


def _assert_refused(err: grpc.RpcError, code: grpc.StatusCode, words: str) -> None:
    assert err.code() == code, (err.code(), err.details())
    assert words in (err.details() or ""), err.details()


def test_a_workload_gets_a_certificate_for_its_own_identity(env: Env) -> None:
    alice = _id(env.app, "alice")
    chain = env.ask(env.token(env.app, "alice", "alice-1"), alice)
    assert _leaf_uri(chain) == str(alice)
    assert chain[-1].encode() == env.ca.roots_pem()  # leaf first, root last, one PEM each
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    # As asked, plus the back-dated clock-skew allowance (notBefore is 2 minutes early).
    assert lifetime.total_seconds() == 3600 + CLOCK_SKEW.total_seconds()
    # A token bound to no pod authenticates a workload just as well.
    assert _leaf_uri(env.ask(env.token(env.app, "alice"), alice)) == str(alice)


def test_a_tunnel_gets_the_certificate_of_a_pod_on_its_node(env: Env) -> None:
    alice = _id(env.app, "alice")
    chain = env.ask(env.token(env.zt, "ztunnel", "ztunnel-a"), alice, impersonate=alice)
    assert _leaf_uri(chain) == str(alice)


def test_a_pod_the_informer_has_not_seen_yet_is_found_by_asking_again(env: Env) -> None:
    # Created and asked for at once: the informer's event may not have arrived, so the
    # authorizer's miss must be checked against the API server before refusing.
    carol = _id(env.app, "carol")
    env.pod(env.app, f"carol-{secrets.token_hex(2)}", "carol", env.node_a)
    chain = env.ask(env.token(env.zt, "ztunnel", "ztunnel-a"), carol, impersonate=carol)
    assert _leaf_uri(chain) == str(carol)


def test_another_nodes_tunnel_is_refused_a_pod_on_this_node(env: Env) -> None:
    alice = _id(env.app, "alice")  # alice-1 runs on node A only
    err = env.refused(env.token(env.zt, "ztunnel", "ztunnel-b"), alice, impersonate=alice)
    _assert_refused(err, grpc.StatusCode.PERMISSION_DENIED, "no such pod on your node")
    assert env.node_b in (err.details() or "")


def test_a_workload_that_is_not_a_node_proxy_cannot_impersonate(env: Env) -> None:
    bob = _id(env.app, "bob")
    err = env.refused(env.token(env.app, "alice", "alice-1"), bob, impersonate=bob)
    _assert_refused(err, grpc.StatusCode.PERMISSION_DENIED, "not a node proxy")


def test_a_csr_for_another_identity_is_refused(env: Env) -> None:
    err = env.refused(env.token(env.app, "alice", "alice-1"), _id(env.app, "bob"))
    _assert_refused(err, grpc.StatusCode.PERMISSION_DENIED, "CSR identity mismatch")


def test_no_token_is_refused(env: Env) -> None:
    err = env.refused(None, _id(env.app, "alice"))
    _assert_refused(err, grpc.StatusCode.UNAUTHENTICATED, "no token")


def test_a_token_for_another_audience_is_refused(env: Env) -> None:
    token = env.token(env.app, "alice", "alice-1", audiences=("https://kubernetes.default.svc",))
    err = env.refused(token, _id(env.app, "alice"))
    _assert_refused(err, grpc.StatusCode.UNAUTHENTICATED, "wrong audience")


def _signed_token(env: Env, exp_offset: float) -> str:
    return signed_token(env.cp, env.app, "alice", exp_offset)


def test_an_expired_token_is_refused(env: Env) -> None:
    alice = _id(env.app, "alice")
    # The same token, unexpired, is accepted: what is refused below is the expiry alone.
    assert _leaf_uri(env.ask(_signed_token(env, 600), alice)) == str(alice)
    err = env.refused(_signed_token(env, -60), alice)
    _assert_refused(err, grpc.StatusCode.UNAUTHENTICATED, "expired")


def test_a_forged_token_is_refused(env: Env) -> None:
    err = env.refused("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", _id(env.app, "alice"))
    _assert_refused(err, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")


def test_malformed_requests_never_crash_the_server(env: Env) -> None:
    raw = env.channel.unary_unary(f"/{SERVICE}/{METHOD}")
    token = env.token(env.app, "alice", "alice-1")
    md = [("authorization", f"Bearer {token}")]
    for garbage in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x1a\x02\x0a\x00" + b"\x0f"):
        with pytest.raises(grpc.RpcError) as e:
            raw(garbage, metadata=md, timeout=10)
        _assert_refused(e.value, grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
    # A well-formed message whose CSR is not one.
    with pytest.raises(grpc.RpcError) as e:
        raw(m.encode_request(m.CertificateRequest("not a csr", 60)), metadata=md, timeout=10)
    _assert_refused(e.value, grpc.StatusCode.INVALID_ARGUMENT, "invalid CSR")
    # A non-string ImpersonatedIdentity.
    req = env.pb.IstioCertificateRequest(csr="x")
    req.metadata.fields[m.IMPERSONATED_IDENTITY].bool_value = True
    with pytest.raises(grpc.RpcError) as e:
        raw(req.SerializeToString(), metadata=md, timeout=10)
    _assert_refused(e.value, grpc.StatusCode.INVALID_ARGUMENT, "must be a string")
    # And the server still serves.
    alice = _id(env.app, "alice")
    assert _leaf_uri(env.ask(token, alice)) == str(alice)


def test_issuance_is_rate_limited_per_node(env: Env) -> None:
    # A node of its own, so the other tests' requests do not share its bucket (burst 12).
    tag = secrets.token_hex(2)
    node = f"{env.node_a}-rl{tag}"
    api_ok(env.cp, "POST", "/api/v1/nodes", {"metadata": {"name": node}})
    try:
        env.pod(env.zt, f"ztunnel-rl{tag}", "ztunnel", node)
        env.pod(env.app, f"bob-rl{tag}", "bob", node)
        token = env.token(env.zt, "ztunnel", f"ztunnel-rl{tag}")
        bob = _id(env.app, "bob")
        codes = []
        for _ in range(14):
            try:
                env.ask(token, bob, impersonate=bob)
                codes.append("ok")
            except grpc.RpcError as e:
                codes.append(e.code().name)
                last = e
        assert codes.count("ok") >= 12 and "RESOURCE_EXHAUSTED" in codes, codes
        assert f"node/{node}" in (last.details() or "")
        # Refused requests count too, and before any LIST of pods: asking for an identity
        # that is not on the node is held back the same way.
        nobody = _id(env.app, "nobody")
        err = env.refused(token, nobody, impersonate=nobody)
        _assert_refused(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limited")
        # Another node is not held back by this one.
        alice = _id(env.app, "alice")
        env.ask(env.token(env.zt, "ztunnel", "ztunnel-a"), alice, impersonate=alice)
    finally:
        env.cp.request("DELETE", f"/api/v1/nodes/{node}")


# ---- the client side: the certificate worker asks, the manager keeps the result --------


def _client_files(env: Env, tmp: Path, pod: str) -> CaGrpcSettings:
    (tmp / "root-cert.pem").write_bytes(env.ca.roots_pem())
    (tmp / "istio-token").write_text(env.token(env.zt, "ztunnel", pod))
    return CaGrpcSettings(f"127.0.0.1:{env.port}", tmp / "root-cert.pem", tmp / "istio-token")


def test_the_tunnels_client_gets_its_pods_certificates_through_the_worker(
    env: Env, tmp_path: Path
) -> None:
    settings = _client_files(env, tmp_path, "ztunnel-a")
    alice, bob = _id(env.app, "alice"), _id(env.app, "bob")

    async def main() -> None:
        worker = CertWorkerClient()
        mgr = CertificateManager(IstioCAClient(settings, worker), timedelta(hours=1), crypto=worker)
        try:
            cert = await mgr.get(alice)
            assert cert.identity == alice and cert.roots_pem == env.ca.roots_pem()
            assert (
                timedelta(minutes=59)
                < cert.not_after - cert.not_before
                <= timedelta(hours=1) + CLOCK_SKEW
            )
            # bob runs on node B only: the CA's reason reaches the caller.
            with pytest.raises(CertificateError, match="no such pod on your node"):
                await mgr.get(bob)
            assert worker.started >= 1  # the call was made by a worker process
        finally:
            await mgr.close()

    asyncio.run(main())


def test_the_client_says_why_it_cannot_ask(env: Env, tmp_path: Path) -> None:
    settings = _client_files(env, tmp_path, "ztunnel-a")
    alice = _id(env.app, "alice")
    csr = new_key_and_csr(alice)[1]

    async def sign(s: CaGrpcSettings) -> str:
        worker = CertWorkerClient()
        try:
            await IstioCAClient(s, worker, timeout=3).sign(csr, timedelta(hours=1))
        except CertificateError as e:
            return str(e)
        finally:
            await worker.close()
        raise AssertionError("signed")

    other_root = CertificateAuthority.create(TD).roots_pem()
    (tmp_path / "other-root.pem").write_bytes(other_root)
    cases = [
        (replace(settings, token_path=tmp_path / "absent"), "cannot read the CA token"),
        (replace(settings, root_cert=tmp_path / "absent"), "cannot read the CA root"),
        # A server whose certificate the given root did not sign is not spoken to.
        (replace(settings, root_cert=tmp_path / "other-root.pem"), "cannot reach the CA"),
        (replace(settings, address=f"127.0.0.1:{free_port()}"), "cannot reach the CA"),
    ]
    for s, words in cases:
        assert words in asyncio.run(sign(s))


# ---- the tunnel process ------------------------------------------------------------------


def _config_dump(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config_dump", timeout=2) as r:
            out: dict[str, Any] = json.loads(r.read())
            return out
    except OSError:
        return None


@pytest.mark.netns
def test_the_tunnel_process_gets_its_pods_certificates_from_the_grpc_ca(
    env: Env, tmp_path: Path
) -> None:
    settings = _client_files(env, tmp_path, "ztunnel-a")
    alice = _id(env.app, "alice")
    xds = {
        "workloads": [
            {
                "uid": "u-alice",
                "name": "alice-1",
                "namespace": env.app,
                "serviceAccount": "alice",
                "workloadIps": ["10.250.0.5"],
                "protocol": "HBONE",
                "node": env.node_a,
            }
        ],
        "services": [],
    }
    (tmp_path / "xds.yaml").write_text(json.dumps(xds))
    admin = free_port()
    with throwaway_netns("cagrpc") as pod_netns:
        (tmp_path / "enrol.yaml").write_text(
            json.dumps({"pods": [{"uid": "u-alice", "netns": pod_netns}]})
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "ztunnel"],
            cwd=ROOT,
            env={
                **os.environ,
                "NODE_NAME": env.node_a,
                "LOCAL_XDS_PATH": str(tmp_path / "xds.yaml"),
                "ENROLMENT_PATH": str(tmp_path / "enrol.yaml"),
                "CA_ADDRESS": settings.address,
                "CA_ROOT_CERT": str(settings.root_cert),
                "CA_TOKEN_PATH": str(settings.token_path),
                "TRUST_DOMAIN": TD,
                "ADMIN_PORT": str(admin),
                "METRICS_PORT": str(free_port()),
                "READINESS_PORT": str(free_port()),
            },
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "ztunnel.log", "wb"),  # noqa: SIM115
        )
        try:
            deadline = time.monotonic() + 30
            held: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "ztunnel.log").read_text()[-2000:]
                dump = _config_dump(admin)
                held = [
                    c for c in (dump or {}).get("certificates", []) if c.get("state") == "valid"
                ]
                if held:
                    break
                time.sleep(0.2)
            assert [c["identity"] for c in held] == [str(alice)], (
                tmp_path / "ztunnel.log"
            ).read_text()[-2000:]
            # The call was the worker's: the tunnel process never mapped grpcio's core.
            assert "cygrpc" not in Path(f"/proc/{proc.pid}/maps").read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_the_standalone_process_serves_with_the_stored_root(env: Env, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "controlplane.ca_grpc",
            "--state-dir", str(tmp_path),
            "--kubeconfig", str(env.cp.kubeconfig),
            "--listen", "127.0.0.1:0",
            "--trusted-node-account", f"{env.zt}/ztunnel",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for _ in range(20):  # log lines come first, on the same stdout
            line = proc.stdout.readline()
            if not line or line.startswith("listening on port "):
                break
        assert line.startswith("listening on port "), line
        port = int(line.split()[-1])
        root = CertificateAuthority.load_or_create(tmp_path, TD)  # the root it created
        (tmp_path / "root.pem").write_bytes(root.roots_pem())
        (tmp_path / "token").write_text(env.token(env.zt, "ztunnel", "ztunnel-a"))
        settings = CaGrpcSettings(f"127.0.0.1:{port}", tmp_path / "root.pem", tmp_path / "token")
        alice = _id(env.app, "alice")

        async def ask() -> list[bytes]:
            worker = CertWorkerClient()
            try:
                csr = new_key_and_csr(alice)[1]
                return await IstioCAClient(settings, worker).sign(csr, timedelta(hours=1))
            finally:
                await worker.close()

        chain = asyncio.run(ask())
        assert _leaf_uri([c.decode() for c in chain]) == str(alice)
        assert chain[-1] == root.roots_pem()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
