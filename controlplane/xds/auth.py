"""`SubscriberAuth`: every discovery stream authenticated before anything is sent to it.

istiod's rule for 15012: a proxy proves who it is with a mesh client certificate or a
Kubernetes service-account token (`authorization: Bearer`, TokenReview for istio-ca). The
decisions are `controlplane.xds.subscribers` (pure); this module does the one I/O, the
TokenReview, through the same `KubeFacts.review` the gRPC CA uses, and bounds its cost:

- an answer is cached per token (a proxy that reconnects is not reviewed again, and a
  flood repeating one bad token costs one review);
- a review the cache cannot answer is charged, before it is made, to the peer's address
  and to the whole server (`RateLimiter`, the CA's token buckets): a flood of distinct bad
  tokens makes at most `overall_burst` reviews at once and `overall_rate` a second, and
  one host at most its own share; past it the stream is refused RESOURCE_EXHAUSTED without
  asking the API server, and the proxy retries with its backoff.

Which ways are enabled is the operator's explicit choice (`python -m controlplane.xds`,
`python -m controlplane`); `allow_unauthenticated` exists for loopback tests and must be
asked for by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from controlplane.ca_grpc_auth import (
    DEFAULT_TRUSTED_NODE_ACCOUNTS,
    Caller,
    Code,
    RateLimiter,
    Refusal,
    bearer_token,
)
from controlplane.ca_server import node_of_token
from controlplane.xds.subscribers import (
    ReviewCache,
    Subscriber,
    Via,
    account_subscriber,
    certificate_subscriber,
    node_token_subscriber,
    peer_source,
    refusal,
    token_key,
)

log = structlog.get_logger("xds.auth")

# TokenReviews not answered by the cache: per peer address, and for the whole server.
PER_SOURCE_RATE, PER_SOURCE_BURST = 5.0, 20
OVERALL_RATE, OVERALL_BURST = 50.0, 100


class TokenReviewer(Protocol):
    """`controlplane.ca_grpc.KubeFacts` (the API server's TokenReview for istio-ca)."""

    async def review(self, token: str) -> Caller | Refusal: ...


class SubscriberAuth:
    def __init__(
        self,
        trust_domain: str,
        *,
        reviewer: TokenReviewer | None = None,
        node_tokens: Mapping[str, str] | None = None,
        allow_unauthenticated: bool = False,
        per_source: RateLimiter | None = None,
        overall: RateLimiter | None = None,
        cache: ReviewCache | None = None,
        clock: Callable[[], float] = time.monotonic,
        tunnel_accounts: frozenset[tuple[str, str]] = DEFAULT_TRUSTED_NODE_ACCOUNTS,
    ) -> None:
        self.trust_domain = trust_domain
        # The service accounts that subscribe as any node's tunnel (`subscribers.authorize`):
        # the same the gRPC CA trusts to ask for its pods' certificates.
        self.tunnel_accounts = tunnel_accounts
        self._reviewer = reviewer
        self._node_tokens = dict(node_tokens or {})
        self.allow_unauthenticated = allow_unauthenticated
        # `is None`, not `or`: an empty limiter has len 0 and would be replaced.
        self._per_source = (
            per_source if per_source is not None else RateLimiter(PER_SOURCE_RATE, PER_SOURCE_BURST)
        )
        self._overall = overall if overall is not None else RateLimiter(OVERALL_RATE, OVERALL_BURST)
        self._cache = cache if cache is not None else ReviewCache()
        self._clock = clock
        self.reviews = 0  # TokenReviews made (cache misses within the rate)
        self.limited = 0  # streams refused because the review rate was spent
        # Told the uid of each deleted pod, after its tokens are forgotten: the server
        # re-checks the open streams those tokens opened.
        self.pod_listeners: list[Callable[[str], None]] = []

    def pod_deleted(self, uid: str) -> None:
        """Pod `uid` is gone: its bound tokens open no new stream from now on (the API
        server refuses them; the cache must not answer for it), and the streams they opened
        are told to check again."""
        dropped = self._cache.forget_pod(uid, self._clock())
        if dropped:
            log.info("cached tokens of a deleted pod forgotten", pod_uid=uid, tokens=dropped)
        for tell in self.pod_listeners:
            tell(uid)

    async def recheck(
        self, metadata: Iterable[tuple[Any, Any]], peer: str, pod_uid: str = ""
    ) -> Refusal | None:
        """An open stream's service-account token judged again, as a new stream's would be
        (the cache, else a TokenReview within the same rates). The UNAUTHENTICATED refusal
        if it no longer holds; None if it holds, or if it cannot be judged now (the API
        server unreachable, the review rate spent): an outage of the API server does not
        cut the mesh off its configuration, and the next check asks again. `pod_uid`: the
        pod the token was bound to when the stream opened; seen deleted, that decides
        without asking anyone."""
        if self._reviewer is None:
            return None
        if pod_uid and self._cache.pod_gone(pod_uid, self._clock()):
            return Refusal(
                Code.UNAUTHENTICATED, f"the pod this token is bound to (uid {pod_uid}) was deleted"
            )
        token = bearer_token(metadata)
        if isinstance(token, Refusal):
            return None  # not a token stream: nothing to judge again
        answer = await self._review(token, peer)
        if isinstance(answer, Refusal) and answer.code is Code.UNAUTHENTICATED:
            return answer
        return None

    @classmethod
    def unauthenticated(cls, trust_domain: str) -> SubscriberAuth:
        """Every subscriber served, as `unauthenticated`: loopback tests only, by name."""
        return cls(trust_domain, allow_unauthenticated=True)

    def describe(self, client_cert_required: bool = False) -> str:
        """The ways enabled, for the server's start-up line."""
        ways = ["mesh client certificate"] if client_cert_required else []
        if self._node_tokens:
            ways.append(f"node tokens ({len(self._node_tokens)})")
        if self._reviewer is not None:
            ways.append("service account tokens (TokenReview, audience istio-ca)")
        if self.allow_unauthenticated:
            ways.append("UNAUTHENTICATED subscribers allowed")
        return ", ".join(ways) or "none"

    async def authenticate(
        self,
        metadata: Iterable[tuple[Any, Any]],
        auth_context: Mapping[str, Sequence[bytes]],
        peer: str,
    ) -> Subscriber | Refusal:
        reasons: list[str] = []
        by_cert = certificate_subscriber(auth_context, self.trust_domain)
        if isinstance(by_cert, Subscriber):
            return by_cert
        reasons.append(by_cert)
        token = bearer_token(metadata)
        if isinstance(token, Refusal):
            reasons.append(token.reason)
        else:
            by_token = await self._token(token, peer, reasons)
            if by_token is not None:
                return by_token  # a subscriber, or a refusal that ends the search
        if self.allow_unauthenticated:
            return Subscriber(Via.UNAUTHENTICATED, peer)
        return refusal(reasons)

    async def _token(
        self, token: str, peer: str, reasons: list[str]
    ) -> Subscriber | Refusal | None:
        """The subscriber `token` proves; else None with the reasons appended, or the
        refusal that is not about the token itself (the rate spent, the API server down)."""
        if self._node_tokens:
            by_node = node_token_subscriber(node_of_token(self._node_tokens, token))
            if isinstance(by_node, Subscriber):
                return by_node
            reasons.append(by_node)
        if self._reviewer is None:
            if not self._node_tokens:
                reasons.append("tokens are not accepted here")
            return None
        answer = await self._review(token, peer)
        if isinstance(answer, Caller):
            return account_subscriber(answer)
        if answer.code is not Code.UNAUTHENTICATED:
            return answer
        reasons.append(answer.reason)
        return None

    async def _review(self, token: str, peer: str) -> Caller | Refusal:
        key = token_key(token)
        now = self._clock()
        cached = self._cache.get(key, now)
        if cached is not None:
            return cached
        source = peer_source(peer)
        # Both buckets are charged before the API server is asked: what a flood of fresh
        # tokens costs it is bounded whether or not they turn out valid.
        if not self._per_source.allow(source, now) or not self._overall.allow("*", now):
            self.limited += 1
            return Refusal(
                Code.RESOURCE_EXHAUSTED,
                f"too many new tokens to review from {source} (or from everyone); retry later",
            )
        self.reviews += 1
        assert self._reviewer is not None
        answer = await self._reviewer.review(token)
        now = self._clock()
        if isinstance(answer, Caller) and self._cache.pod_gone(answer.pod_uid, now):
            # The API server caches its own yes for a while (10 s): a token whose pod we
            # saw deleted is refused here at once, not after that.
            answer = Refusal(
                Code.UNAUTHENTICATED,
                f"the pod this token is bound to ({answer.namespace}/{answer.pod_name}) "
                "was deleted",
            )
        self._cache.put(key, answer, now)
        return answer
