"""Who may get which certificate from the gRPC CA: pure decisions over facts looked up elsewhere.

The facts come from the API server (`controlplane.ca_grpc` does the I/O): the caller's
TokenReview, and, for a node proxy asking for another identity, the caller's own pod and
whether a pod with the asked-for identity runs on that pod's node. Everything here is a
function of those facts, so the rules are tested as tables.

The rules (istiod's `CreateCertificate` and its node authorizer, with reasons that say why):
- The caller is a Kubernetes service account, proven by a token the API server accepted for
  the audience "istio-ca"; its identity is spiffe://<trust domain>/ns/<ns>/sa/<sa>.
- By default the certificate is for that identity. With metadata ImpersonatedIdentity, only
  a trusted node proxy (default istio-system/ztunnel) may ask for another identity, and only
  one that a pod on the proxy's own node runs as. The node is the one of the pod the
  proxy's token is bound to, and that pod must still be the same (UID) and run as the proxy.
- The CSR's one URI SAN must be exactly the identity granted.
- The lifetime asked for is capped; zero or negative means the default.
- Every refusal carries a gRPC status code and a reason naming what to fix.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from meshcore.identity.spiffe import IdentityError, SpiffeId

CA_AUDIENCE = "istio-ca"
SA_PREFIX = "system:serviceaccount:"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
DEFAULT_TRUSTED_NODE_ACCOUNTS = frozenset({("istio-system", "ztunnel")})
DEFAULT_VALIDITY = timedelta(hours=24)
# The CA signs at most 7 days (controlplane.ca.MAX_LEAF_TTL); a request for more is capped.
MAX_VALIDITY = timedelta(days=7)
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


class Code(Enum):
    """The gRPC status of a refusal (names as in `grpc.StatusCode`)."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class Refusal:
    code: Code
    reason: str


@dataclass(frozen=True, slots=True)
class Policy:
    trust_domain: str
    trusted_node_accounts: frozenset[tuple[str, str]] = DEFAULT_TRUSTED_NODE_ACCOUNTS
    default_validity: timedelta = DEFAULT_VALIDITY
    max_validity: timedelta = MAX_VALIDITY


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated service account; pod_* are set when its token is bound to a pod."""

    namespace: str
    service_account: str
    pod_name: str = ""
    pod_uid: str = ""

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"


@dataclass(frozen=True, slots=True)
class PodFacts:
    """What the authorizer reads of a Pod object."""

    namespace: str
    name: str
    uid: str
    service_account: str
    node_name: str
    phase: str = ""

    @classmethod
    def of(cls, pod: Mapping[str, Any]) -> PodFacts:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        return cls(
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name") or ""),
            uid=str(meta.get("uid") or ""),
            # serviceAccountName is defaulted by the API server; "default" if absent anyway
            service_account=str(spec.get("serviceAccountName") or "default"),
            node_name=str(spec.get("nodeName") or ""),
            phase=str((pod.get("status") or {}).get("phase") or ""),
        )

    @property
    def running_on_node(self) -> bool:
        """Scheduled and not finished: a pod whose identity its node may need."""
        return bool(self.node_name) and self.phase not in FINISHED_PHASES


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """Looked up for a node proxy that asks for another identity."""

    caller_pod: PodFacts | None  # None: the pod its token names does not exist
    identity_on_node: bool  # a pod running as the asked-for identity is on caller_pod's node


@dataclass(frozen=True, slots=True)
class Issue:
    identity: SpiffeId
    validity: timedelta
    node: str  # the caller's node when known (node proxies), else ""


Decision = Issue | Refusal


# ---- authentication: the TokenReview's answer -----------------------------------------


def caller_from_review(status: Mapping[str, Any], audience: str = CA_AUDIENCE) -> Caller | Refusal:
    """The caller a TokenReview status names, or why it does not authenticate one."""
    if status.get("authenticated") is not True:
        error = str(status.get("error") or "the token is not valid")
        return Refusal(Code.UNAUTHENTICATED, f"unauthenticated: {error}")
    audiences = status.get("audiences")
    # The API server returns the audiences it validated the token for; when it does, ours
    # must be among them (a server that ignores spec.audiences would otherwise pass any).
    if isinstance(audiences, list) and audience not in audiences:
        return Refusal(
            Code.UNAUTHENTICATED,
            f"unauthenticated: wrong audience: the token is valid for {audiences}, "
            f"not {audience!r}; request it with audience {audience!r}",
        )
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    if not username.startswith(SA_PREFIX):
        return Refusal(
            Code.UNAUTHENTICATED,
            f"unauthenticated: {username!r} is not a service account; "
            "present a Kubernetes service-account token",
        )
    ns, _, sa = username[len(SA_PREFIX) :].partition(":")
    if not ns or not sa or ":" in sa:
        return Refusal(Code.UNAUTHENTICATED, f"unauthenticated: malformed user name {username!r}")
    extra = user.get("extra") or {}
    return Caller(
        ns, sa, first_value(extra.get(EXTRA_POD_NAME)), first_value(extra.get(EXTRA_POD_UID))
    )


def bearer_token(metadata: Iterable[tuple[Any, Any]]) -> str | Refusal:
    """The token of `authorization: Bearer <token>`, or why there is none."""
    values = [str(v) for k, v in metadata if str(k).lower() == "authorization"]
    if not values:
        return Refusal(
            Code.UNAUTHENTICATED,
            "unauthenticated: no token: send 'authorization: Bearer <service account token>'",
        )
    if len(values) > 1:
        return Refusal(Code.UNAUTHENTICATED, "unauthenticated: more than one authorization header")
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return Refusal(
            Code.UNAUTHENTICATED,
            "unauthenticated: the authorization header is not 'Bearer <token>'",
        )
    return token


def explain_rejected_token(token: str, api_error: str, audience: str, now: datetime) -> str:
    """Why the API server refused `token`, in words an operator can act on.

    Reads the token's claims WITHOUT verifying them, only to word a refusal the API server
    already made (an expired token, one for another audience); it never accepts anything."""
    claims = _unverified_claims(token)
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool) and exp <= now.timestamp():
        when = datetime.fromtimestamp(exp, UTC).isoformat()
        return (
            f"unauthenticated: the token expired at {when}; request a fresh one "
            f"(API server: {api_error})"
        )
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else None
    if auds is not None and audience not in auds:
        return (
            f"unauthenticated: wrong audience: the token is for {auds}, not {audience!r}; "
            f"request it with audience {audience!r} (API server: {api_error})"
        )
    return f"unauthenticated: the API server rejected the token: {api_error}"


def _unverified_claims(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def first_value(value: object) -> str:
    """The first string of a userInfo `extra` entry (a list of strings), or ""."""
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0]
    return ""


# ---- authorization ---------------------------------------------------------------------


def needs_node_facts(policy: Policy, caller: Caller, impersonated: str) -> bool:
    """Whether `decide` will need `NodeFacts` (so the I/O looks them up only then)."""
    return (
        bool(impersonated)
        and (caller.namespace, caller.service_account) in policy.trusted_node_accounts
        and bool(caller.pod_name)
    )


def decide(
    policy: Policy,
    caller: Caller,
    csr_identity: SpiffeId | str,
    impersonated: str,
    requested_seconds: int,
    node: NodeFacts | None,
) -> Decision:
    """Issue or refuse. `csr_identity` is the CSR's URI SAN, or why the CSR is unreadable."""
    own = caller.identity(policy.trust_domain)
    granted, node_name = own, ""
    if impersonated:
        target = _impersonation_target(policy, caller, impersonated)
        if isinstance(target, Refusal):
            return target
        if target != own:  # asking for one's own identity needs no node check
            on_node = _check_node(caller, target, node)
            if isinstance(on_node, Refusal):
                return on_node
            node_name = on_node
        elif node is not None and node.caller_pod is not None:
            node_name = node.caller_pod.node_name
        granted = target
    if isinstance(csr_identity, str):
        return Refusal(Code.INVALID_ARGUMENT, f"invalid CSR: {csr_identity}")
    if csr_identity != granted:
        return Refusal(
            Code.PERMISSION_DENIED,
            f"CSR identity mismatch: the CSR asks for {csr_identity}, but this caller "
            f"({caller}) may be issued only {granted}",
        )
    return Issue(granted, validity(policy, requested_seconds), node_name)


def validity(policy: Policy, requested_seconds: int) -> timedelta:
    """The lifetime to issue: the default for zero or less, capped at the maximum."""
    if requested_seconds <= 0:
        return min(policy.default_validity, policy.max_validity)
    return min(timedelta(seconds=min(requested_seconds, 10**9)), policy.max_validity)


def _impersonation_target(policy: Policy, caller: Caller, impersonated: str) -> SpiffeId | Refusal:
    if (caller.namespace, caller.service_account) not in policy.trusted_node_accounts:
        trusted = ", ".join(f"{ns}/{sa}" for ns, sa in sorted(policy.trusted_node_accounts))
        return Refusal(
            Code.PERMISSION_DENIED,
            f"not a node proxy: {caller} may not request another identity "
            f"({impersonated}); only {trusted or 'no service account'} may",
        )
    try:
        target = SpiffeId.parse(impersonated)
    except IdentityError as e:
        return Refusal(Code.INVALID_ARGUMENT, f"invalid ImpersonatedIdentity: {e}")
    if target.trust_domain != policy.trust_domain:
        return Refusal(
            Code.PERMISSION_DENIED,
            f"ImpersonatedIdentity {target} is outside trust domain {policy.trust_domain!r}",
        )
    return target


def _check_node(caller: Caller, target: SpiffeId, node: NodeFacts | None) -> str | Refusal:
    """The caller's node if a pod running as `target` is on it, else why not."""
    if not caller.pod_name:
        return Refusal(
            Code.PERMISSION_DENIED,
            f"node proxy {caller}'s token is not bound to a pod, so its node is unknown; "
            "use a token requested with boundObjectRef to the proxy's pod",
        )
    if node is None:  # the I/O layer did not look: fail closed
        return Refusal(Code.UNAVAILABLE, "cannot decide: the caller's node was not looked up")
    pod = node.caller_pod
    where = f"{caller.namespace}/{caller.pod_name}"
    if pod is None:
        return Refusal(
            Code.PERMISSION_DENIED, f"node proxy {caller}'s pod {where} no longer exists"
        )
    if caller.pod_uid and pod.uid != caller.pod_uid:
        return Refusal(
            Code.PERMISSION_DENIED,
            f"node proxy pod {where} was replaced (UID {pod.uid}, token for {caller.pod_uid}); "
            "request a fresh token",
        )
    if pod.service_account != caller.service_account:
        return Refusal(
            Code.PERMISSION_DENIED,
            f"node proxy pod {where} runs as {pod.service_account}, not {caller.service_account}",
        )
    if not pod.node_name:
        return Refusal(Code.PERMISSION_DENIED, f"node proxy pod {where} is not on a node")
    if not node.identity_on_node:
        return Refusal(
            Code.PERMISSION_DENIED,
            f"no such pod on your node: no pod running as {target.namespace}/"
            f"{target.service_account} is on node {pod.node_name!r}",
        )
    return pod.node_name


# ---- rate limit ------------------------------------------------------------------------


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets per key (a caller's node), at most `max_keys` of them.

    Time is passed in. When the table is full, the buckets that have refilled completely are
    dropped first (they hold no state worth keeping); if none has, the oldest is dropped, so
    memory stays bounded whatever the keys."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 10_000) -> None:
        if rate_per_s <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate, burst and max_keys must be positive")
        self.rate, self.burst, self.max_keys = rate_per_s, float(burst), max_keys
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, now: float) -> bool:
        bucket = self._buckets.pop(key, None)  # re-inserted last: dict order is recency
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._evict(now)
            bucket = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + max(0.0, now - bucket.at) * self.rate)
        bucket.at = now
        self._buckets[key] = bucket
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _evict(self, now: float) -> None:
        full = [
            k for k, b in self._buckets.items() if b.tokens + (now - b.at) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) >= self.max_keys:
            del self._buckets[next(iter(self._buckets))]
