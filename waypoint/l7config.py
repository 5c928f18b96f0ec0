"""The waypoint's L7 configuration, derived once per mesh-config snapshot (pure).

A config change builds a new `L7Config` from the new `MeshState`; requests in flight keep
the one they started with. Per destination service, the policies that apply (authorization
and JWT) are computed on first use and kept, since they depend only on the destination.
A resource that does not parse never breaks the rest: routes keep their status, policies
fail closed (they deny what they target), as the parsers decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.state import MeshState, Service
from waypoint.authn.parse import RequestAuthentication, load_request_authentication
from waypoint.authn.verify import JwtVerifier
from waypoint.authz.decide import DestinationRef, WaypointRef, applicable
from waypoint.authz.model import L7Policy
from waypoint.authz.parse import load_l7_policy
from waypoint.routes.table import RouteTable

ROUTE_KINDS = ("HTTPRoute", "GRPCRoute", "VirtualService", "DestinationRule", "ReferenceGrant")


def _targeted(doc: object) -> bool:
    """An AuthorizationPolicy the waypoint enforces: one with targetRef(s). Selector and
    namespace-wide policies are the tunnel's (L4) business."""
    if not isinstance(doc, dict):
        return False
    spec = doc.get("spec")
    return isinstance(spec, dict) and ("targetRefs" in spec or "targetRef" in spec)


@dataclass(slots=True)
class ForDestination:
    """What applies to requests for one destination service (or a pod: `None`)."""

    policies: tuple[L7Policy, ...]
    verifier: JwtVerifier


@dataclass(slots=True)
class L7Config:
    waypoint: WaypointRef
    routes: RouteTable
    policies: tuple[L7Policy, ...]
    authns: tuple[RequestAuthentication, ...]
    root_namespace: str = ROOT_NAMESPACE
    _per_destination: dict[str | None, ForDestination] = field(default_factory=dict)

    @classmethod
    def build(
        cls, state: MeshState, namespace: str, name: str, root_namespace: str = ROOT_NAMESPACE
    ) -> L7Config:
        documents = [r.document() for kind in ROUTE_KINDS for r in state.resources(kind)]
        routes = RouteTable.build(documents, state.services, gateway=(namespace, name))
        policies = tuple(
            load_l7_policy(doc, root_namespace)
            for doc in (r.document() for r in state.resources("AuthorizationPolicy"))
            if _targeted(doc)
        )
        authns = tuple(
            load_request_authentication(r.document(), root_namespace)
            for r in state.resources("RequestAuthentication")
        )
        return cls(WaypointRef(namespace, name), routes, policies, authns, root_namespace)

    def for_destination(self, service: Service | None) -> ForDestination:
        key = service.key if service is not None else None
        hit = self._per_destination.get(key)
        if hit is None:
            dest = DestinationRef(service.namespace, service.name) if service is not None else None
            policies = applicable(self.policies, self.waypoint, dest, self.root_namespace)
            authns = applicable(self.authns, self.waypoint, dest, self.root_namespace)
            hit = ForDestination(policies, JwtVerifier(authns))
            self._per_destination[key] = hit
        return hit

    @property
    def messages(self) -> tuple[str, ...]:
        return self.routes.messages
