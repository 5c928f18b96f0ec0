"""The admission webhook's HTTPS server on loopback (no API server): its certificate chains
to the mesh root and names 127.0.0.1, a review it cannot read gets a 400 that says why,
an oversized one a 413, and an answer echoes the review's uid in its own version."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import cast

from controlplane.admission import VALIDATE_PATH, AgentAdmissionServer, informer_pod_lookup
from controlplane.agentadmission import AgentPod
from controlplane.ca import CertificateAuthority
from kube.client import KubeClient
from kube.informer import Informer
from kube.kinds import POD


def _request(body: bytes, *, close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return (
        f"POST {VALIDATE_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{connection}\r\n"
    ).encode() + body


async def _post(port: int, ctx: ssl.SSLContext, body: bytes) -> tuple[int, bytes]:
    """One review on a connection of its own."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    writer.write(_request(body))
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status = int(raw.split(b" ", 2)[1])
    return status, raw.partition(b"\r\n\r\n")[2]


def _review(uid: str, version: str = "admission.k8s.io/v1", labels: str = "2") -> bytes:
    return json.dumps(
        {
            "apiVersion": version,
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "subResource": "status",
                "operation": "UPDATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:kubelet"},
                "oldObject": {"metadata": {"labels": {"a": "1"}}},
                "object": {"metadata": {"labels": {"a": labels}}},
            },
        }
    ).encode()


def test_the_server_answers_reviews_and_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    looked_up: list[AgentPod] = []

    async def lookup(pod: AgentPod) -> str | None:
        looked_up.append(pod)
        return "node1"

    async def scenario() -> None:
        server = AgentAdmissionServer(ca, {"istio-system/agent"}, lookup, port=0, host="127.0.0.1")
        await server.start()
        try:
            ctx = ssl.create_default_context(cadata=ca.roots_pem().decode())
            status, body = await _post(server.port, ctx, b"{not json")
            assert status == 400 and b"not JSON" in body
            status, body = await _post(server.port, ctx, b" " * (5 * 1024 * 1024))
            assert status == 413
            review = {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "request": {
                    "uid": "u-1",
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "subResource": "status",
                    "operation": "UPDATE",
                    "userInfo": {
                        "username": "system:serviceaccount:istio-system:agent",
                        "extra": {
                            "authentication.kubernetes.io/pod-name": ["agent-1"],
                            "authentication.kubernetes.io/pod-uid": ["uid-1"],
                        },
                    },
                    "oldObject": {
                        "metadata": {"labels": {"a": "1"}},
                        "spec": {"nodeName": "node1"},
                    },
                    "object": {"metadata": {"labels": {"a": "2"}}, "spec": {"nodeName": "node1"}},
                },
            }
            status, body = await _post(server.port, ctx, json.dumps(review).encode())
            answer = json.loads(body)
            assert status == 200
            assert answer["apiVersion"] == "admission.k8s.io/v1"
            assert answer["response"]["uid"] == "u-1"
            assert answer["response"]["allowed"] is False
            assert "metadata.labels[a]" in answer["response"]["status"]["message"]
            assert looked_up == [AgentPod("istio-system", "agent-1", "uid-1")]
            assert (server.reviews, server.refused) == (1, 1)
        finally:
            await server.close()

    asyncio.run(scenario())


class _NoApi:
    """A client that must not be called."""

    async def find(self, *args: object) -> None:
        raise AssertionError(f"the API server was asked: {args}")


def test_a_synced_informers_miss_is_a_miss_and_asks_the_api_server_nothing() -> None:
    """The webhook's port is open to every pod and a review names any pod it likes: once
    the informer has listed, its answer stands (no GET a stranger could make us repeat)."""
    pods = Informer(cast(KubeClient, _NoApi()), POD)
    pods.cache["istio-system/agent-1"] = {
        "metadata": {"name": "agent-1", "uid": "uid-1"},
        "spec": {"nodeName": "node1"},
    }
    pods.synced.set()
    lookup = informer_pod_lookup(cast(KubeClient, _NoApi()), pods)

    async def main() -> list[str | None]:
        return [
            await lookup(AgentPod("istio-system", "agent-1", "uid-1")),
            await lookup(AgentPod("istio-system", "agent-1", "other-uid")),
            await lookup(AgentPod("istio-system", "agent-2", "uid-2")),
        ]

    assert asyncio.run(main()) == ["node1", None, None]


def test_one_connection_carries_many_reviews(tmp_path: Path) -> None:
    """The API server calls the webhook on pod status writes all the time: it keeps its TLS
    connection and sends review after review on it, each answered in turn."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")

    async def lookup(pod: AgentPod) -> str | None:
        raise AssertionError("a kubelet's write is not judged")

    async def scenario() -> None:
        server = AgentAdmissionServer(ca, {"istio-system/agent"}, lookup, port=0, host="127.0.0.1")
        await server.start()
        try:
            ctx = ssl.create_default_context(cadata=ca.roots_pem().decode())
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
            try:
                versions = ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"] * 2
                for n, version in enumerate(versions):
                    writer.write(_request(_review(f"u-{n}", version), close=False))
                    async with asyncio.timeout(10):
                        head = await reader.readuntil(b"\r\n\r\n")
                        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                        answer = json.loads(await reader.readexactly(length))
                    assert b"Connection: keep-alive" in head
                    assert answer["apiVersion"] == version
                    assert answer["response"] == {"uid": f"u-{n}", "allowed": True}
            finally:
                writer.close()
            assert (server.connections, server.requests, server.reviews) == (1, 4, 4)
        finally:
            await server.close()

    asyncio.run(scenario())
