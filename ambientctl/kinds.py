"""The kinds `get`, `describe` and `delete` take, with kubectl's spellings: the kind,
its plural, its short names. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from localcluster.policies import ALL_KINDS


@dataclass(frozen=True, slots=True)
class KindInfo:
    kind: str  # as in a resource's `kind:` (or our name for what is not a resource)
    plural: str
    short: tuple[str, ...]
    namespaced: bool = True

    @property
    def is_document(self) -> bool:
        """A resource applied as YAML and kept in the mesh config (so `delete` takes it)."""
        return self.kind in ALL_KINDS

    def names(self) -> tuple[str, ...]:
        return (self.kind.lower(), self.plural, *self.short)


KINDS: tuple[KindInfo, ...] = (
    KindInfo("AuthorizationPolicy", "authorizationpolicies", ("ap",)),
    KindInfo("PeerAuthentication", "peerauthentications", ("pa",)),
    KindInfo("RequestAuthentication", "requestauthentications", ("ra",)),
    KindInfo("HTTPRoute", "httproutes", ("hr",)),
    KindInfo("GRPCRoute", "grpcroutes", ()),
    KindInfo("VirtualService", "virtualservices", ("vs",)),
    KindInfo("DestinationRule", "destinationrules", ("dr",)),
    KindInfo("ServiceEntry", "serviceentries", ("se",)),
    KindInfo("Gateway", "gateways", ("gw",)),
    KindInfo("Service", "services", ("svc",)),
    KindInfo("Namespace", "namespaces", ("ns",), namespaced=False),
    KindInfo("Node", "nodes", ("no",), namespaced=False),
    KindInfo("Workload", "workloads", ("wl",)),
    KindInfo("Waypoint", "waypoints", ("wp",)),
    KindInfo("Pod", "pods", ("po",)),
    KindInfo("Cluster", "clusters", (), namespaced=False),
)
_BY_NAME = {n: k for k in KINDS for n in k.names()}


class UnknownKind(ValueError):
    pass


def resolve(word: str) -> KindInfo:
    """The kind a word names (any case; `ap`, `authorizationpolicy`, `authorizationpolicies`),
    or UnknownKind listing the spellings known."""
    kind = _BY_NAME.get(word.lower())
    if kind is None:
        raise UnknownKind(f"unknown resource type {word!r}; known: {', '.join(all_names())}")
    return kind


def all_names() -> list[str]:
    """Each kind's plural with its short names: for help texts and completion."""
    return [k.plural + (f" ({', '.join(k.short)})" if k.short else "") for k in KINDS]


def spellings() -> list[str]:
    """Every word `resolve` takes (completion offers them)."""
    return sorted(_BY_NAME)
