"""The mesh CA over Istio's gRPC API: `istio.v1.auth.IstioCertificateService/CreateCertificate`.

What istiod serves on 15012, for upstream's clients and ours: a request carries a CSR, a
lifetime and optional metadata (ImpersonatedIdentity), and the caller's Kubernetes
service-account token as `authorization: Bearer <jwt>`; the answer is the chain, leaf
first, one PEM per entry.

Invariants:
- Nothing is issued without the API server's word: the token is checked by a TokenReview
  for the audience "istio-ca" on every request, and a node proxy's right to another identity
  is decided from the API server's pods (an informer; a miss is checked again with a GET or
  a LIST, so a pod created a moment ago is not refused for a stale cache).
- The decision itself is `controlplane.ca_grpc_auth.decide`, pure; this module only gathers
  its facts, applies the per-node rate limit, signs, and answers.
- Requests are rate-limited per caller node (a workload without a known node: per service
  account). A node proxy's impersonation is charged as soon as its node is known, granted or
  not, so a proxy asking for identities it may not have cannot make the CA LIST pods freely.
- Every refusal is a gRPC error whose details say why, and is logged with the caller; a
  request that cannot be decoded is INVALID_ARGUMENT; a failure of the API server is
  UNAVAILABLE (the client retries); nothing a client sends crashes the server.
- Registered as a generic handler with our codec (no generated code), so the discovery
  service can share the same `grpc.aio.Server` and port through `add_to_server`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import structlog

from controlplane.ca import MAX_LEAF_TTL, CAError, CertificateAuthority, csr_identity, parse_csr
from controlplane.ca_grpc_auth import (
    CA_AUDIENCE,
    DEFAULT_TRUSTED_NODE_ACCOUNTS,
    DEFAULT_VALIDITY,
    MAX_VALIDITY,
    Caller,
    Code,
    Issue,
    NodeFacts,
    PodFacts,
    Policy,
    RateLimiter,
    Refusal,
    bearer_token,
    caller_from_review,
    decide,
    explain_rejected_token,
    needs_node_facts,
)
from controlplane.ca_grpc_tls import serving_certificate
from controlplane.grpc_limits import DEFAULT_GRPC_LIMITS, GrpcLimits, new_server
from kube.client import KubeApiError, KubeClient, Obj, load_kubeconfig
from kube.informer import Event, Informer
from kube.kinds import POD, TOKEN_REVIEW
from meshcore.defaults import TRUST_DOMAIN
from meshcore.identity import camessages as m
from meshcore.identity.spiffe import SpiffeId

log = structlog.get_logger("ca.grpc")

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = "CreateCertificate"
DEFAULT_PORT = 15012
# Issuance per caller node: a node starting 100 pods gets them at once, then 10 a second.
RATE_PER_S = 10.0
BURST = 100
# Requests served at once: GrpcLimits.max_concurrent_rpcs (controlplane/grpc_limits.py).
KUBE_TIMEOUT_S = 10.0

_GRPC_CODES = {code: getattr(grpc.StatusCode, code.value) for code in Code}


class CaGrpcError(Exception):
    """The gRPC CA cannot start as asked; the message says why."""


def _identity(data: bytes) -> bytes:
    return data


class KubeFacts:
    """The API server's view: TokenReviews, and the pods of each (node, service account)."""

    def __init__(self, client: KubeClient, audience: str = CA_AUDIENCE) -> None:
        self._client = client
        self._audience = audience
        self.pods = Informer(client, POD)
        # (node, namespace, service account) -> keys of running pods: the node authorizer's
        # index (upstream's "node+sa"), kept current by the informer's events.
        self._on_node: dict[tuple[str, str, str], set[str]] = {}
        self.pods.add_handler(self._index)

    def start(self) -> None:
        self.pods.start()

    async def stop(self) -> None:
        await self.pods.stop()

    def _index(self, ev: Event, key: str, old: Obj | None, new: Obj | None) -> None:
        if old is not None:
            self._unindex(key, PodFacts.of(old))
        if new is not None and ev is not Event.DELETED:
            facts = PodFacts.of(new)
            if facts.running_on_node:
                slot = (facts.node_name, facts.namespace, facts.service_account)
                self._on_node.setdefault(slot, set()).add(key)

    def _unindex(self, key: str, facts: PodFacts) -> None:
        slot = (facts.node_name, facts.namespace, facts.service_account)
        keys = self._on_node.get(slot)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._on_node[slot]

    async def review(self, token: str) -> Caller | Refusal:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self._audience]},
        }
        try:
            out = await self._client.create(TOKEN_REVIEW, body)
        except (KubeApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
            return Refusal(Code.UNAVAILABLE, f"cannot check the token with the API server: {e}")
        status = out.get("status") or {}
        caller = caller_from_review(status, self._audience)
        if isinstance(caller, Refusal) and status.get("authenticated") is not True:
            reason = explain_rejected_token(
                token,
                str(status.get("error") or "not authenticated"),
                self._audience,
                datetime.now(UTC),
            )
            return Refusal(Code.UNAUTHENTICATED, reason)
        return caller

    async def caller_pod(self, caller: Caller) -> PodFacts | None:
        """The pod the caller's token is bound to, None if it does not exist."""
        return await self._pod(caller.namespace, caller.pod_name)

    async def _pod(self, namespace: str, name: str) -> PodFacts | None:
        cached = self.pods.get(f"{namespace}/{name}")
        if cached is not None:
            return PodFacts.of(cached)
        # A pod the informer has not seen yet (or one that is gone).
        pod = await self._client.find(POD, name, namespace)
        return PodFacts.of(pod) if pod is not None else None

    async def identity_on_node(self, node: str, target: SpiffeId) -> bool:
        """Whether a pod running as `target` is on `node` (the index, else a LIST)."""
        if self._on_node.get((node, target.namespace, target.service_account)):
            return True
        listed = await self._client.list(
            POD, target.namespace, field_selector=f"spec.nodeName={node}"
        )
        for item in listed.get("items") or []:
            facts = PodFacts.of(item)
            if facts.service_account == target.service_account and facts.running_on_node:
                return True
        return False


class CaGrpcService:
    """CreateCertificate: gather facts, decide, rate-limit, sign. Share a server with
    `add_to_server`; `CaGrpcServer` runs it alone."""

    def __init__(
        self,
        ca: CertificateAuthority,
        facts: KubeFacts,
        policy: Policy | None = None,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ca = ca
        self._facts = facts
        self._policy = policy or Policy(ca.trust_domain)
        if self._policy.trust_domain != ca.trust_domain:
            raise CaGrpcError(
                f"policy trust domain {self._policy.trust_domain!r} is not the CA's "
                f"{ca.trust_domain!r}"
            )
        # `is None`, not `or`: an empty limiter has len 0 and would be replaced.
        self._limiter = limiter if limiter is not None else RateLimiter(RATE_PER_S, BURST)
        self._clock = clock
        self.issued = 0
        self.refused = 0

    def add_to_server(self, server: Any) -> None:
        """Register CreateCertificate on a `grpc.aio.Server` (which may serve others too)."""
        handler = grpc.unary_unary_rpc_method_handler(
            self._create, request_deserializer=_identity, response_serializer=_identity
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
        )

    async def _create(self, raw: bytes, context: Any) -> bytes:
        peer = context.peer()
        try:
            outcome = await self._handle(raw, context)
        except Exception as e:  # a bug or an unexpected API answer: refuse, keep serving
            log.exception("certificate request failed", peer=peer)
            outcome = Refusal(Code.UNAVAILABLE, f"the CA could not serve the request: {e!r}")
        if isinstance(outcome, bytes):
            return outcome
        self.refused += 1
        await context.abort(_GRPC_CODES[outcome.code], outcome.reason)
        raise AssertionError("context.abort returned")  # it raises; never reached

    async def _handle(self, raw: bytes, context: Any) -> bytes | Refusal:
        peer = context.peer()
        try:
            req = m.decode_request(raw)
        except m.CaMessageError as e:
            return self._refuse(Refusal(Code.INVALID_ARGUMENT, f"malformed request: {e}"), peer)
        token = bearer_token(context.invocation_metadata() or ())
        if isinstance(token, Refusal):
            return self._refuse(token, peer)
        caller = await self._facts.review(token)
        if isinstance(caller, Refusal):
            return self._refuse(caller, peer)
        try:
            csr_pem = req.csr.encode()
            asked: SpiffeId | str = csr_identity(parse_csr(csr_pem))
        except CAError as e:
            asked = str(e)
        node: NodeFacts | None = None
        charged = False
        if needs_node_facts(self._policy, caller, req.impersonated_identity):
            target = _parse_or_none(req.impersonated_identity)
            try:
                pod = await self._facts.caller_pod(caller)
                on_node = False
                if pod is not None and pod.node_name:
                    # Charged before the lookup that may LIST pods: a node proxy asking for
                    # identities it may not have costs the API server no more than one
                    # that gets them.
                    limited = self._charge(f"node/{pod.node_name}")
                    if limited is not None:
                        return self._refuse(limited, peer, caller)
                    charged = True
                    if target is not None:
                        on_node = await self._facts.identity_on_node(pod.node_name, target)
                node = NodeFacts(pod, on_node)
            except (KubeApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
                return self._refuse(
                    Refusal(Code.UNAVAILABLE, f"cannot look up the caller's node: {e}"),
                    peer,
                    caller,
                )
        decision = decide(
            self._policy, caller, asked, req.impersonated_identity, req.validity_duration, node
        )
        if isinstance(decision, Refusal):
            return self._refuse(decision, peer, caller)
        if not charged:
            limited = self._charge(f"node/{decision.node}" if decision.node else f"sa/{caller}")
            if limited is not None:
                return self._refuse(limited, peer, caller)
        return self._issue(decision, caller, csr_pem, peer)

    def _charge(self, key: str) -> Refusal | None:
        """One request against `key`'s bucket; the refusal if it is empty."""
        if self._limiter.allow(key, self._clock()):
            return None
        return Refusal(
            Code.RESOURCE_EXHAUSTED,
            f"rate limited: {key} asked for more than {self._limiter.burst:g} "
            f"certificates at once ({self._limiter.rate:g}/s after that); retry later",
        )

    def _issue(self, issue: Issue, caller: Caller, csr_pem: bytes, peer: str) -> bytes | Refusal:
        try:
            chain = self._ca.sign_csr(csr_pem, issue.identity, issue.validity)
        except CAError as e:
            return self._refuse(Refusal(Code.INVALID_ARGUMENT, str(e)), peer, caller)
        self.issued += 1
        log.info(
            "certificate issued",
            caller=str(caller),
            identity=str(issue.identity),
            node=issue.node or None,
            ttl_s=int(issue.validity.total_seconds()),
            peer=peer,
        )
        return m.encode_response(m.CertificateResponse(tuple(p.decode() for p in chain)))

    def _refuse(self, refusal: Refusal, peer: str, caller: Caller | None = None) -> Refusal:
        log.warning(
            "certificate refused",
            code=refusal.code.value,
            reason=refusal.reason,
            caller=str(caller) if caller else None,
            peer=peer,
        )
        return refusal


def _parse_or_none(uri: str) -> SpiffeId | None:
    try:
        return SpiffeId.parse(uri)
    except ValueError:
        return None


class CaGrpcServer:
    """The service on a `grpc.aio.Server` of its own (tests, and the standalone process)."""

    def __init__(
        self,
        service: CaGrpcService,
        ca: CertificateAuthority,
        limits: GrpcLimits = DEFAULT_GRPC_LIMITS,
    ) -> None:
        self.service = service
        self._limits = limits
        self._ca = ca
        self._server: Any = None

    async def start(self, address: str, ips: tuple[str, ...] = ("127.0.0.1",)) -> int:
        """Listen with TLS on `address` ("host:port", port 0 for any); returns the port."""
        server = new_server(self._limits)
        self.service.add_to_server(server)
        key_pem, chain_pem = serving_certificate(self._ca, ips=ips)
        creds = grpc.ssl_server_credentials([(key_pem, chain_pem)])
        try:
            port = int(server.add_secure_port(address, creds))
        except RuntimeError as e:
            raise CaGrpcError(f"cannot listen on {address}: {e}") from e
        if port == 0:
            raise CaGrpcError(f"cannot listen on {address}")
        await server.start()
        self._server = server
        log.info(
            "CA gRPC listening", address=address, port=port, trust_domain=self._ca.trust_domain
        )
        return port

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


# --- the standalone process ------------------------------------------------------------


def parse_accounts(values: list[str]) -> frozenset[tuple[str, str]]:
    out = set()
    for v in values:
        ns, _, sa = v.partition("/")
        if not ns or not sa or "/" in sa:
            raise CaGrpcError(f"trusted node account {v!r} is not <namespace>/<service account>")
        out.add((ns, sa))
    return frozenset(out)


def policy_and_limiter(args: argparse.Namespace) -> tuple[Policy, RateLimiter]:
    """The process's settings, checked before anything starts."""
    if not 60 <= args.max_cert_ttl_seconds <= MAX_LEAF_TTL.total_seconds():
        raise CaGrpcError(
            f"--max-cert-ttl-seconds {args.max_cert_ttl_seconds} is outside "
            f"60..{int(MAX_LEAF_TTL.total_seconds())}"
        )
    if not (args.rate_per_node > 0 and 1 <= args.burst_per_node <= 1_000_000):
        raise CaGrpcError("--rate-per-node must be positive and --burst-per-node 1..1000000")
    accounts = (
        parse_accounts(args.trusted_node_account)
        if args.trusted_node_account
        else DEFAULT_TRUSTED_NODE_ACCOUNTS
    )
    cap = timedelta(seconds=args.max_cert_ttl_seconds)
    policy = Policy(args.trust_domain, accounts, min(DEFAULT_VALIDITY, cap), cap)
    return policy, RateLimiter(args.rate_per_node, args.burst_per_node)


async def _serve(args: argparse.Namespace) -> None:
    policy, limiter = policy_and_limiter(args)
    ca = CertificateAuthority.load_or_create(Path(args.state_dir), args.trust_domain)
    async with KubeClient(load_kubeconfig(args.kubeconfig), timeout=KUBE_TIMEOUT_S) as client:
        facts = KubeFacts(client)
        facts.start()
        server = CaGrpcServer(CaGrpcService(ca, facts, policy, limiter), ca)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        port = await server.start(args.listen)
        print(f"listening on port {port}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()
            await facts.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane.ca_grpc",
        description="The mesh CA over Istio's gRPC API, authenticated by Kubernetes tokens.",
    )
    parser.add_argument("--state-dir", required=True, help="directory for ca/root-*.pem")
    parser.add_argument("--kubeconfig", required=True, help="credentials for the API server")
    parser.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", help="host:port")
    parser.add_argument("--trust-domain", default=TRUST_DOMAIN)
    parser.add_argument(
        "--trusted-node-account",
        action="append",
        default=[],
        help="namespace/serviceaccount of a node proxy (repeatable; default istio-system/ztunnel)",
    )
    parser.add_argument(
        "--max-cert-ttl-seconds",
        type=int,
        default=int(MAX_VALIDITY.total_seconds()),
        help="cap on a certificate's lifetime (60..604800; default 7 days)",
    )
    parser.add_argument("--rate-per-node", type=float, default=RATE_PER_S, help="requests/s")
    parser.add_argument("--burst-per-node", type=int, default=BURST, help="requests at once")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except (CAError, CaGrpcError) as e:
        print(f"ca_grpc: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
