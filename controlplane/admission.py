"""The control plane's admission webhook (HTTPS), as istiod serves its webhooks on 15017.

One route, `POST /validate/node-agent`: the API server sends an AdmissionReview for each
write to pods/status, and `agentadmission.decide` judges those of the node agents. The
node of an agent's own pod (its token's bound pod) is read from the controller's pod
informer, or, for a pod it has not seen yet, with a GET; the UID must match.

The serving certificate comes from the mesh CA and names the Service the webhook
configuration points at (istiod.<ns>.svc) and the addresses it is dialled by; it is made
again at half its lifetime. `publish_ca_bundle` writes the mesh root into the webhook
configuration the chart installed (istiod patches its webhooks' caBundle alike), since the
root exists only once the control plane has started.

A review that cannot be read gets a 400 that says why: the API server then applies the
configuration's failurePolicy, never an allow of ours.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import timedelta
from typing import Any

import aiohttp
import structlog

from controlplane.agentadmission import AgentPod, Decision, agent_pod, decide, is_agent_call
from controlplane.ca import CertificateAuthority
from controlplane.ca_grpc_tls import serving_certificate
from kube.client import KubeApiError, KubeClient, Obj
from kube.informer import Informer
from kube.kinds import POD, VALIDATING_WEBHOOK_CONFIGURATION
from meshcore.http1.server import NodeHttpServer, Request, Response, Routes
from meshcore.tls import load_chain_pem

log = structlog.get_logger(__name__)

ADMISSION_PORT = 15017  # istiod's webhook port
VALIDATE_PATH = "/validate/node-agent"
WEBHOOK_CONFIGURATION = "ambient-node-agent"  # the chart's ValidatingWebhookConfiguration
# An AdmissionReview holds the pod twice (old and new) and etcd takes objects up to 1.5 MiB.
MAX_REVIEW_BYTES = 4 * 1024 * 1024
SERVING_TTL = timedelta(days=1)
CA_BUNDLE_RECHECK_S = 60.0
# The API server calls the webhook on every pod status write it sends here: a connection
# carries many reviews, not a TLS handshake each. It is kept idle longer than the API
# server's client keeps an idle one (Go's transport: 90 s), so the client is the one that
# closes it and never sends a review into our close. A kept connection waiting is evictable
# like any slow one, so keeping it costs no one a slot.
KEEP_ALIVE_REQUESTS = 10_000
KEEP_ALIVE_IDLE_S = 120.0
_REVIEW_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")

PodLookup = Callable[[AgentPod], Awaitable[str | None]]


class ReviewError(ValueError):
    """An AdmissionReview we cannot judge; the message says what is wrong with it."""


def read_review(body: bytes) -> tuple[str, dict[str, Any]]:
    """(apiVersion, request) of an AdmissionReview, or ReviewError."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise ReviewError(f"the body is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "AdmissionReview":
        raise ReviewError("the body is not an AdmissionReview")
    version = doc.get("apiVersion")
    if version not in _REVIEW_VERSIONS:
        raise ReviewError(
            f"AdmissionReview apiVersion {version!r} is not one of {_REVIEW_VERSIONS}"
        )
    request = doc.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise ReviewError("the AdmissionReview has no request with a uid")
    return str(version), request


def review_answer(version: str, uid: str, decision: Decision) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": decision.allowed}
    if not decision.allowed:
        response["status"] = {"code": 403, "reason": "Forbidden", "message": decision.message}
    return {"apiVersion": version, "kind": "AdmissionReview", "response": response}


def informer_pod_lookup(client: KubeClient, pods: Informer | None) -> PodLookup:
    """The node of an agent's pod: from the informer once it has listed, else (before its
    first list, or without one) a GET; None when there is no such pod with that UID, or
    it has no node. The port is open to every pod of the cluster and a review names any
    pod it likes, so a synced informer's miss is a miss, never a GET a stranger could make
    us repeat against the API server (an agent's new pod is in the informer before the
    kubelet has its token; a refused mark is retried)."""

    async def lookup(pod: AgentPod) -> str | None:
        if pods is not None and pods.synced.is_set():
            obj: Obj | None = pods.get(f"{pod.namespace}/{pod.name}")
        else:
            obj = await client.find(POD, pod.name, pod.namespace)
        if obj is None or _uid(obj) != pod.uid:
            return None
        spec = obj.get("spec") or {}
        node = spec.get("nodeName") if isinstance(spec, dict) else None
        return node if isinstance(node, str) and node else None

    return lookup


def _uid(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("uid", ""))


class AgentAdmissionServer(NodeHttpServer):
    """HTTPS, `POST /validate/node-agent`, bounded like the control plane's other small
    servers (head, body, time, connections)."""

    def __init__(
        self,
        ca: CertificateAuthority,
        agents: Collection[str],
        lookup: PodLookup,
        *,
        port: int = ADMISSION_PORT,
        host: str = "0.0.0.0",
        dns_names: Sequence[str] = (),
        ips: Sequence[str] = ("127.0.0.1",),
        ttl: timedelta = SERVING_TTL,
    ) -> None:
        self._ca = ca
        self._dns_names = tuple(dns_names)
        self._ips = tuple(ips)
        self._ttl = ttl
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2  # the API server's Go client: 1.2 or 1.3
        self._tls_context = tls
        self._renew()
        super().__init__(
            port,
            host,
            max_body=MAX_REVIEW_BYTES,
            tls=tls,
            max_requests=KEEP_ALIVE_REQUESTS,
            idle_timeout=KEEP_ALIVE_IDLE_S,
        )
        self._agents = frozenset(agents)
        self._lookup = lookup
        self._renewal: asyncio.TimerHandle | None = None
        self.reviews = 0  # AdmissionReviews answered (tests, an operator's view)
        self.refused = 0  # of them, refused

    def _renew(self) -> None:
        key_pem, chain_pem = serving_certificate(
            self._ca, dns_names=self._dns_names, ips=self._ips, ttl=self._ttl
        )
        load_chain_pem(self._tls_context, chain_pem, key_pem)

    def _renew_later(self) -> None:
        self._renewal = asyncio.get_running_loop().call_later(
            self._ttl.total_seconds() / 2, self._renew_now
        )

    def _renew_now(self) -> None:
        self._renew()
        log.info("admission serving certificate renewed")
        self._renew_later()

    async def start(self) -> None:
        await super().start()
        self._renew_later()

    async def close(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        await super().close()

    def routes(self) -> Routes:
        return {VALIDATE_PATH: {"POST": self._validate}}

    async def _validate(self, request: Request) -> Response:
        try:
            version, review = read_review(request.body)
        except ReviewError as e:
            log.warning("admission review refused unread", error=str(e), peer=request.remote)
            return Response.text(f"{e}\n", 400)
        node: str | None = None
        if is_agent_call(review, self._agents):
            pod = agent_pod(review.get("userInfo") or {})
            node = await self._lookup(pod) if pod is not None else None
        decision = decide(review, self._agents, node)
        self.reviews += 1
        if not decision.allowed:
            self.refused += 1
            log.warning(
                "node agent write refused",
                user=(review.get("userInfo") or {}).get("username"),
                pod=f"{review.get('namespace')}/{review.get('name')}",
                reason=decision.message,
            )
        return Response.json(review_answer(version, str(review["uid"]), decision))


async def publish_ca_bundle(
    client: KubeClient, roots_pem: bytes, name: str = WEBHOOK_CONFIGURATION
) -> bool:
    """Write the mesh root as the caBundle of every webhook in the configuration `name`;
    False when it does not exist (the chart did not install it). A bundle already equal is
    not written again."""
    config = await client.find(VALIDATING_WEBHOOK_CONFIGURATION, name)
    if config is None:
        return False
    bundle = base64.b64encode(roots_pem).decode()
    webhooks = config.get("webhooks") or []
    if all((w.get("clientConfig") or {}).get("caBundle") == bundle for w in webhooks):
        return True
    for w in webhooks:
        w.setdefault("clientConfig", {})["caBundle"] = bundle
    # A strategic or JSON patch would need each webhook's index; a merge patch replaces the
    # list whole, so the resourceVersion guards against writing over a change made since.
    patch: dict[str, Any] = {
        "metadata": {"resourceVersion": config["metadata"]["resourceVersion"]},
        "webhooks": webhooks,
    }
    await client.patch(VALIDATING_WEBHOOK_CONFIGURATION, name, patch)
    return True


async def keep_ca_bundle(
    client: KubeClient,
    roots_pem: bytes,
    name: str = WEBHOOK_CONFIGURATION,
    recheck_s: float = CA_BUNDLE_RECHECK_S,
) -> None:
    """`publish_ca_bundle`, retried through API errors and conflicts, and checked again
    every `recheck_s`: a `helm upgrade` that re-applies the configuration, or anyone who
    edits it, gets the root written back (as istiod's webhook controller does). Runs until
    cancelled."""
    delay = 0.5
    missing_told = False
    while True:
        try:
            found = await publish_ca_bundle(client, roots_pem, name)
        except (KubeApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("admission caBundle not written yet", name=name, error=str(e))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            continue
        if not found and not missing_told:
            log.warning("admission webhook configuration not found", name=name)
        missing_told = not found
        delay = 0.5
        await asyncio.sleep(recheck_s)
