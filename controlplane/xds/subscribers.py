"""Who a discovery subscriber is, from what it presented: pure decisions, no I/O.

A subscriber proves itself with one of (tried in this order, the first that holds wins):
- a client certificate from the mesh CA, on a listener that requires one (grpc verified
  the chain against the mesh roots during the handshake; here its one SPIFFE URI SAN must
  be in the trust domain);
- a node token of the local cluster's CA (`controlplane.ca_server`'s tokens file), compared
  in constant time;
- a Kubernetes service-account token, accepted by a TokenReview for the audience istio-ca
  (the I/O is `controlplane.ca_grpc.KubeFacts.review`, as the gRPC CA does it).
When none holds, the refusal names what each way found missing or wrong, so a client
operator reads what to fix. The TokenReview answers are cached briefly per token (a
reconnecting proxy costs the API server nothing), bounded in size and time.

Then, once its first request names its node (`node.id`), what the subscriber may be
(`authorize`), as istiod checks a proxy's identity against the namespace it claims: a
service account of the tunnels (istio-system/ztunnel) subscribes as any node's tunnel;
any other identity only as a proxy of its own namespace (Istio's node id
`type~ip~name.namespace~namespace.svc.cluster.local`, which the waypoint sends). A node
token stands for a whole node (its tunnel and its waypoints), as on the CA socket.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from controlplane.ca_grpc_auth import Caller, Code, Refusal
from meshcore.identity.spiffe import IdentityError, SpiffeId

# grpc's auth-context property holding each SAN of a verified peer certificate.
SAN_PROPERTY = "x509_subject_alternative_name"
# A TokenReview's answer is reused for this long: a token the API server revokes still
# opens streams for at most this long, the price of not asking per stream. (A token bound
# to a pod is forgotten at once when the pod is deleted: ReviewCache.forget_pod.)
ACCEPTED_TTL = 60.0
# A refused token is remembered for less: a flood repeating one bad token costs one review.
REFUSED_TTL = 10.0
MAX_CACHED = 10_000
# How long a deleted pod's uid is remembered: past the API server's own cache of a token's
# yes (10 s by default), after which it refuses such a token itself.
GONE_TTL = 120.0


class Via(Enum):
    CERTIFICATE = "certificate"
    NODE_TOKEN = "node token"
    SERVICE_ACCOUNT_TOKEN = "service account token"
    # Only where the operator asked for it (`--allow-unauthenticated`), never by default.
    UNAUTHENTICATED = "unauthenticated"


@dataclass(frozen=True, slots=True)
class Subscriber:
    via: Via
    who: str  # a SPIFFE id, node/<name>, <namespace>/<service account>, or the peer
    # The service account proven (a certificate's or a token's); empty for the others.
    namespace: str = ""
    account: str = ""
    # The pod a service-account token is bound to (its deletion revokes the token).
    pod_uid: str = ""

    def __str__(self) -> str:
        return f"{self.who} ({self.via.value})"


def certificate_subscriber(
    auth_context: Mapping[str, Sequence[bytes]], trust_domain: str
) -> Subscriber | str:
    """The subscriber a verified client certificate names, or why there is none.

    Only certificates grpc verified reach the auth context (the listener requests one only
    when it requires and verifies it), so the identity is read, not checked again."""
    sans = [v.decode("utf-8", "replace") for v in auth_context.get(SAN_PROPERTY, ())]
    if not auth_context.get("x509_pem_cert") and not sans:
        return "no client certificate"
    uris = [s for s in sans if "://" in s]
    if len(uris) != 1:
        return f"the client certificate carries {len(uris)} URI SANs, not exactly one"
    try:
        identity = SpiffeId.parse(uris[0])
    except IdentityError as e:
        return f"the client certificate's URI SAN is not a SPIFFE id: {e}"
    if identity.trust_domain != trust_domain:
        return (
            f"the client certificate's identity {identity} is outside trust domain {trust_domain!r}"
        )
    return Subscriber(Via.CERTIFICATE, str(identity), identity.namespace, identity.service_account)


def node_token_subscriber(node: str | None) -> Subscriber | str:
    """`controlplane.ca_server.node_of_token`'s answer as a subscriber, or why not."""
    if node is None:
        return "the token is not a node token of this cluster"
    return Subscriber(Via.NODE_TOKEN, f"node/{node}")


def account_subscriber(caller: Caller) -> Subscriber:
    return Subscriber(
        Via.SERVICE_ACCOUNT_TOKEN,
        str(caller),
        caller.namespace,
        caller.service_account,
        caller.pod_uid,
    )


def proxy_namespace(node_id: str) -> str | None:
    """The namespace an Istio-style node id claims (`type~ip~name.namespace~domain`), or
    None for an id of another shape (a tunnel names its node)."""
    parts = node_id.split("~")
    if len(parts) != 4 or not parts[0] or "." not in parts[2]:
        return None
    namespace = parts[2].rsplit(".", 1)[1]
    return namespace or None


def authorize(
    subscriber: Subscriber, node_id: str, tunnel_accounts: frozenset[tuple[str, str]]
) -> Refusal | None:
    """May `subscriber` subscribe as `node_id`? None if so, else PERMISSION_DENIED naming
    what it proved and what it claimed."""
    if subscriber.via in (Via.NODE_TOKEN, Via.UNAUTHENTICATED):
        return None  # a node's own credential; or no authentication, as the operator chose
    if not node_id:
        return Refusal(
            Code.PERMISSION_DENIED,
            f"xDS subscriber {subscriber}: its first request names no node (node.id)",
        )
    if (subscriber.namespace, subscriber.account) in tunnel_accounts:
        return None
    claimed = proxy_namespace(node_id)
    if claimed == subscriber.namespace:
        return None
    tunnels = ", ".join(sorted(f"{ns}/{sa}" for ns, sa in tunnel_accounts)) or "none"
    said = (
        f"claims namespace {claimed!r}"
        if claimed is not None
        else f"names no namespace (a tunnel's node id; the tunnels' accounts are {tunnels})"
    )
    return Refusal(
        Code.PERMISSION_DENIED,
        f"xDS subscriber {subscriber} may subscribe only as a proxy of namespace "
        f"{subscriber.namespace!r}; node id {node_id!r} {said}",
    )


def refusal(reasons: Sequence[str]) -> Refusal:
    """UNAUTHENTICATED with every way's reason, in the order they were tried."""
    said = "; ".join(r.removeprefix("unauthenticated: ") for r in reasons) or "no credential"
    return Refusal(Code.UNAUTHENTICATED, f"unauthenticated xDS subscriber: {said}")


def token_key(token: str) -> str:
    """The cache's key for a token: its digest, so the cache holds no usable credential."""
    return hashlib.sha256(token.encode()).hexdigest()


class ReviewCache:
    """TokenReview answers by token digest: accepted ones for `accepted_ttl` seconds,
    refused ones (UNAUTHENTICATED only: an unreachable API server decides nothing) for
    `refused_ttl`. At most `max_entries`, the oldest dropped first. Time is passed in.

    An accepted token bound to a pod is forgotten as soon as that pod is deleted
    (`forget_pod`), and the pod is remembered as gone for `gone_ttl` (`pod_gone`): the API
    server keeps saying yes to such a token for a few seconds (its own cache), so an answer
    naming a gone pod must not be trusted either."""

    def __init__(
        self,
        accepted_ttl: float = ACCEPTED_TTL,
        refused_ttl: float = REFUSED_TTL,
        max_entries: int = MAX_CACHED,
        gone_ttl: float = GONE_TTL,
    ) -> None:
        self.accepted_ttl, self.refused_ttl, self.max_entries = (
            accepted_ttl,
            refused_ttl,
            max_entries,
        )
        self.gone_ttl = gone_ttl
        self._gone: OrderedDict[str, float] = OrderedDict()  # deleted pod uid -> until
        self._entries: OrderedDict[str, tuple[float, Caller | Refusal]] = OrderedDict()
        self._by_pod: dict[str, set[str]] = {}  # pod uid -> keys of tokens bound to it

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> Caller | Refusal | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        until, answer = entry
        if now >= until:
            self._drop(key)
            return None
        return answer

    def put(self, key: str, answer: Caller | Refusal, now: float) -> None:
        if isinstance(answer, Refusal) and answer.code is not Code.UNAUTHENTICATED:
            return
        ttl = self.accepted_ttl if isinstance(answer, Caller) else self.refused_ttl
        self._drop(key)
        self._entries[key] = (now + ttl, answer)
        if isinstance(answer, Caller) and answer.pod_uid:
            self._by_pod.setdefault(answer.pod_uid, set()).add(key)
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))

    def forget_pod(self, uid: str, now: float) -> int:
        """Pod `uid` was deleted: drop the answers for tokens bound to it, and remember it
        as gone for `gone_ttl`. How many answers were dropped."""
        self._gone.pop(uid, None)
        self._gone[uid] = now + self.gone_ttl
        while self._gone and (
            len(self._gone) > self.max_entries or next(iter(self._gone.values())) <= now
        ):
            self._gone.popitem(last=False)
        keys = self._by_pod.pop(uid, set())
        for key in keys:
            self._entries.pop(key, None)
        return len(keys)

    def pod_gone(self, uid: str, now: float) -> bool:
        """Whether pod `uid` was seen deleted (within `gone_ttl`)."""
        until = self._gone.get(uid) if uid else None
        return until is not None and now < until

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and isinstance(entry[1], Caller) and entry[1].pod_uid:
            keys = self._by_pod.get(entry[1].pod_uid)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_pod[entry[1].pod_uid]


def peer_source(peer: str) -> str:
    """The rate limiter's key for a gRPC peer ("ipv4:1.2.3.4:5678" -> "ipv4:1.2.3.4"): its
    address without the port, so one host opening many connections shares one bucket. A
    unix socket's peers all share "unix:" (the file's mode says who reaches it)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        host, _, port = peer.rpartition(":")
        return host if port.isdigit() else peer
    return peer.split(":", 1)[0] + ":" if ":" in peer else peer
