"""The control plane's admission webhook for the node agent, called by the real API server.

The node agent holds `patch` on pods/status (its mark, as istio-cni's); RBAC alone lets
that token change any pod's labels, annotations and status anywhere in the cluster
(`tests/redirect/test_agent_rights_kube.py` pins it). With the webhook registered, its
writes through pods/status may change only the redirection annotation, and only on pods
of its own node: the node of the pod its token is bound to.

The webhook server runs here on loopback (`AgentAdmissionServer`, the control plane's own,
with a certificate from a mesh CA), registered by URL in a ValidatingWebhookConfiguration
whose caBundle the control plane's `publish_ca_bundle` writes, and selecting only this
test's namespace, so the session's shared API server is otherwise untouched.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controlplane.admission import (
    VALIDATE_PATH,
    AgentAdmissionServer,
    informer_pod_lookup,
    keep_ca_bundle,
    publish_ca_bundle,
)
from controlplane.ca import CertificateAuthority
from kube.client import KubeClient, KubeConfig
from localcluster.kube.apiserver import KubeControlPlane
from meshcore.defaults import REDIRECTION_ANNOTATION, REDIRECTION_ENABLED
from redirect.enrolment import PodInfo
from tests.support.agentrights import AGENT_ACCOUNT, Rights, agent_rights, mark_as_agent
from tests.support.kubetokens import api_ok

pytestmark = pytest.mark.kube

WEBHOOKS = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
OTHER_NODE = "admission-other-node"


@dataclass
class Webhook:
    rights: Rights
    server: AgentAdmissionServer
    loop: asyncio.AbstractEventLoop
    name: str
    client: KubeClient
    roots_pem: bytes

    def stop_server(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)

    def status_patch(self, pod: str, body: object, token: str) -> tuple[int, str]:
        path = f"/api/v1/namespaces/{self.rights.ns}/pods/{pod}/status"
        status, raw = self.rights.cp.request("PATCH", path, body, token=token)
        return status, raw.decode(errors="replace")


def _serve(server: AgentAdmissionServer, loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_until_complete(server.start())
    loop.run_forever()


@pytest.fixture
def webhook(kube_cp: KubeControlPlane, tmp_path: Path) -> Iterator[Webhook]:
    suffix = secrets.token_hex(3)
    selector = {f"agentadmission-{suffix}": "1"}
    gen: Generator[Rights, None, None] = agent_rights(kube_cp, labels=selector)
    rights = next(gen)
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    admin = KubeConfig(
        server=kube_cp.server, token=kube_cp.admin_token, ca_file=str(kube_cp.ca_path)
    )
    loop = asyncio.new_event_loop()
    client = KubeClient(admin)
    server = AgentAdmissionServer(
        ca,
        {f"{rights.ns}/{AGENT_ACCOUNT}"},
        informer_pod_lookup(client, None),
        port=0,
        host="127.0.0.1",
    )
    thread = threading.Thread(target=_serve, args=(server, loop), daemon=True)
    thread.start()
    name = f"agentadmission-{suffix}"
    try:
        deadline = time.monotonic() + 10
        while server.port == 0:
            assert time.monotonic() < deadline, "the webhook server never listened"
            time.sleep(0.05)
        config = {
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "node-agent.ambient.mesh",
                    "clientConfig": {"url": f"https://127.0.0.1:{server.port}{VALIDATE_PATH}"},
                    "rules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["UPDATE"],
                            "resources": ["pods/status"],
                        }
                    ],
                    "namespaceSelector": {"matchLabels": selector},
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1", "v1beta1"],
                    "timeoutSeconds": 5,
                }
            ],
        }
        api_ok(kube_cp, "POST", WEBHOOKS, config)
        # The control plane's own code writes the mesh root as the caBundle.
        published = asyncio.run_coroutine_threadsafe(
            publish_ca_bundle(client, ca.roots_pem(), name), loop
        ).result(30)
        assert published
        yield Webhook(rights, server, loop, name, client, ca.roots_pem())
    finally:
        kube_cp.request("DELETE", f"{WEBHOOKS}/{name}")
        if server.port:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        asyncio.run_coroutine_threadsafe(client.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        gen.close()


def _until(check: Any, timeout: float = 20) -> Any:
    """`check()` until it returns something true (the API server picks up a new webhook
    configuration and binding a moment after they are written)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def _agent_pod(rights: Rights) -> str:
    """The agent's own pod on `rights.node`, and a token bound to it."""
    uid = rights.create_pod("ambient-node-agent-abcde", account=AGENT_ACCOUNT)
    return rights.bound_token("ambient-node-agent-abcde", uid)


def test_the_agent_marks_only_its_own_nodes_pods_and_changes_nothing_else(
    webhook: Webhook,
) -> None:
    rights = webhook.rights
    token = _agent_pod(rights)
    mine = PodInfo(
        uid=rights.create_pod("mine"), name="mine", namespace=rights.ns, node=rights.node
    )
    rights.create_pod("theirs", node=OTHER_NODE)

    # The webhook is consulted (its refusal comes back), once the API server has the
    # configuration and the binding.
    def refused_elsewhere() -> str:
        status, body = webhook.status_patch(
            "theirs", {"metadata": {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}}, token
        )
        return body if status == 403 and "admission webhook" in body else ""

    body = _until(refused_elsewhere)
    assert body, "the API server never called the webhook"
    assert rights.node in body and OTHER_NODE in body
    assert REDIRECTION_ANNOTATION not in (rights.pod("theirs")["metadata"].get("annotations") or {})

    # The agent's own code marks and unmarks a pod of its node through the webhook.
    assert asyncio.run(mark_as_agent(rights, mine, True, token)), "the mark was never applied"
    annotations = rights.pod("mine")["metadata"].get("annotations") or {}
    assert annotations.get(REDIRECTION_ANNOTATION) == REDIRECTION_ENABLED
    assert asyncio.run(mark_as_agent(rights, mine, False, token)), "the mark was never removed"
    assert REDIRECTION_ANNOTATION not in (rights.pod("mine")["metadata"].get("annotations") or {})

    # Labels, other annotations, the status (podIP) and an odd mark value: refused, on its
    # own node's pod too, and nothing written.
    before = rights.pod("mine")
    for patch, named in (
        ({"metadata": {"labels": {"app": "relabelled"}}}, "metadata.labels[app]"),
        ({"metadata": {"annotations": {"team": "x"}}}, "metadata.annotations[team]"),
        ({"status": {"podIP": "10.9.9.9"}}, "status"),
        ({"metadata": {"annotations": {REDIRECTION_ANNOTATION: "off"}}}, "'off'"),
    ):
        status, body = webhook.status_patch("mine", patch, token)
        assert status == 403 and named in body, (patch, status, body[:400])
    after = rights.pod("mine")
    assert after["metadata"]["labels"] == before["metadata"]["labels"]
    assert after["metadata"].get("annotations") == before["metadata"].get("annotations")
    assert after.get("status", {}).get("podIP") == before.get("status", {}).get("podIP")
    assert webhook.server.refused >= 5
    # The API server kept its TLS connection for the reviews that followed, rather than a
    # handshake per status write.
    assert webhook.server.connections < webhook.server.reviews, (
        webhook.server.connections,
        webhook.server.reviews,
    )


def test_a_token_bound_to_no_pod_marks_nothing(webhook: Webhook) -> None:
    """The chart's rights with a token that names no pod (a legacy secret token, or one a
    compromised node requested for itself) say no node: refused."""
    rights = webhook.rights
    rights.create_pod("web")
    mark = {"metadata": {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}}

    def refused() -> str:
        status, body = webhook.status_patch("web", mark, rights.token)
        return body if status == 403 and "admission webhook" in body else ""

    body = _until(refused)
    assert "not bound" in body, body[:400]
    assert REDIRECTION_ANNOTATION not in (rights.pod("web")["metadata"].get("annotations") or {})


def test_kubelets_and_others_are_not_judged(webhook: Webhook) -> None:
    """Only the node agents' writes are judged: another caller's status write (here the
    cluster admin, as a kubelet or controller would) goes through, labels and all."""
    rights = webhook.rights
    token = _agent_pod(rights)
    rights.create_pod("svc", node=OTHER_NODE)
    mark = {"metadata": {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}}
    assert _until(lambda: webhook.status_patch("svc", mark, token)[0] == 403)
    path = f"/api/v1/namespaces/{rights.ns}/pods/svc/status"
    relabel = {"metadata": {"labels": {"app": "moved"}}, "status": {"message": "probe"}}
    api_ok(rights.cp, "PATCH", path, relabel)
    pod = rights.pod("svc")
    assert pod["metadata"]["labels"] == {"app": "moved"}
    assert pod["status"]["message"] == "probe"


def test_with_the_webhook_down_the_agent_writes_nothing(webhook: Webhook) -> None:
    """failurePolicy Fail: while the control plane cannot answer, the agent's write is
    refused (its mark waits and is retried), never let through unjudged."""
    rights = webhook.rights
    token = _agent_pod(rights)
    rights.create_pod("late")
    mark = {"metadata": {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}}
    other = rights.create_pod("probe", node=OTHER_NODE)
    assert other
    # The configuration is in effect (a refusal from the webhook itself) ...
    assert _until(lambda: webhook.status_patch("probe", mark, token)[0] == 403)
    webhook.stop_server()
    # ... and with nobody answering, the call fails instead of passing.
    status, body = webhook.status_patch("late", mark, token)
    assert status >= 400 and "failed calling webhook" in body, (status, body[:400])
    assert REDIRECTION_ANNOTATION not in (rights.pod("late")["metadata"].get("annotations") or {})
    assert json.loads(body).get("kind") == "Status"


def test_a_ca_bundle_wiped_by_a_reapply_is_written_back(webhook: Webhook) -> None:
    """A `helm upgrade` re-applies the configuration as the chart renders it, without the
    caBundle: the control plane's keeper writes the root back at its next check."""
    path = f"{WEBHOOKS}/{webhook.name}"
    keeper = asyncio.run_coroutine_threadsafe(
        keep_ca_bundle(webhook.client, webhook.roots_pem, webhook.name, recheck_s=0.2),
        webhook.loop,
    )
    try:
        config = api_ok(webhook.rights.cp, "GET", path)
        (hook,) = config["webhooks"]
        assert hook["clientConfig"].get("caBundle")
        del hook["clientConfig"]["caBundle"]
        status, raw = webhook.rights.cp.request("PUT", path, config)
        assert status == 200, raw[:300]
        # (What was stored by the PUT, before the keeper's next check.)
        assert "caBundle" not in json.loads(raw)["webhooks"][0]["clientConfig"]
        assert _until(
            lambda: api_ok(webhook.rights.cp, "GET", path)["webhooks"][0]["clientConfig"].get(
                "caBundle"
            )
        ), "the caBundle was never written back"
    finally:
        keeper.cancel()
