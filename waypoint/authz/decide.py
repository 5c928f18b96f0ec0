"""The one answer to "may this request go on?" at the waypoint. Pure: no I/O.

`applicable(policies, waypoint, service)` picks the policies that apply to a request: those
targeting this waypoint's Gateway (all its traffic), the `istio-waypoint` GatewayClass from
the root namespace (every waypoint), and those targeting the destination Service or
ServiceEntry. `authorize_request(policies, facts)` decides in Istio's order:

1. a policy that did not parse (or asked for CUSTOM) denies (fail closed);
2. any matching DENY rule denies;
3. with no ALLOW policy, the request is allowed;
4. a matching ALLOW rule allows; otherwise it is denied.

AUDIT policies never change the answer: the ones that match are listed in `audited`.
Dry-run policies (annotation `istio.io/dry-run: "true"`) are evaluated and reported in
`dry_run`, never enforced. The verdict flows to the proxy (403), the metrics
(`response_flags="RBAC"`... see `waypoint.telemetry.flags`) and the access log.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.policy.model import Action
from meshcore.policy.verdict import DryRunResult
from waypoint.authz.facts import RequestFacts
from waypoint.authz.model import (
    GATEWAY,
    GATEWAY_CLASS,
    SERVICE,
    SERVICE_ENTRY,
    WAYPOINT_CLASS,
    L7Policy,
    TargetRef,
)
from waypoint.http.message import Response, text_response

DENIED_STATUS = 403
DENIED_BODY = "RBAC: access denied"


@dataclass(frozen=True, slots=True)
class WaypointRef:
    """The waypoint's own Gateway."""

    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class DestinationRef:
    """The destination as a policy names it: a Service or a ServiceEntry."""

    namespace: str
    name: str
    kind: str = SERVICE  # or SERVICE_ENTRY


@dataclass(frozen=True, slots=True)
class L7Verdict:
    allowed: bool
    # "ns/name" of what decided: the matching DENY or ALLOW policy, or the invalid policy
    # that fails closed. None when no policy did (no ALLOW policy applies; or ALLOW
    # policies apply and none matched).
    policy: str | None
    rule: int | None  # the matching rule's index in that policy, as written
    action: Action | None
    reason: str  # one sentence, e.g. "denied by DENY policy shop/no-legacy rule 0"
    audited: tuple[str, ...] = ()  # matching AUDIT policies ("ns/name"), in order
    dry_run: tuple[DryRunResult, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "policy": self.policy,
            "rule": self.rule,
            "action": self.action.value if self.action is not None else None,
            "reason": self.reason,
            "audited": list(self.audited),
            "dryRun": [d.to_json() for d in self.dry_run],
        }


ALLOWED_NO_POLICY = L7Verdict(True, None, None, None, "allowed: no ALLOW policy applies")


class Targeted(Protocol):
    """What scoping reads of a policy (AuthorizationPolicy or RequestAuthentication)."""

    @property
    def namespace(self) -> str: ...
    @property
    def target_refs(self) -> tuple[TargetRef, ...]: ...
    @property
    def targets_unknown(self) -> bool: ...


def targets(
    policy: Targeted,
    waypoint: WaypointRef,
    destination: DestinationRef | None,
    root_namespace: str = ROOT_NAMESPACE,
) -> bool:
    """Whether `policy` applies to a request through `waypoint` to `destination`."""
    if policy.targets_unknown:
        return policy.namespace in (waypoint.namespace, root_namespace) or (
            destination is not None and policy.namespace == destination.namespace
        )
    for ref in policy.target_refs:
        if ref.kind == GATEWAY:
            if ref.name == waypoint.name and policy.namespace == waypoint.namespace:
                return True
        elif ref.kind == GATEWAY_CLASS:
            if ref.name == WAYPOINT_CLASS and policy.namespace == root_namespace:
                return True
        elif (
            ref.kind in (SERVICE, SERVICE_ENTRY)
            and destination is not None
            and (
                ref.kind == destination.kind
                and ref.name == destination.name
                and policy.namespace == destination.namespace
            )
        ):
            return True
    return False


T = TypeVar("T", bound=Targeted)


def applicable(
    policies: Iterable[T],
    waypoint: WaypointRef,
    destination: DestinationRef | None,
    root_namespace: str = ROOT_NAMESPACE,
) -> tuple[T, ...]:
    """The policies (AuthorizationPolicy or RequestAuthentication) that apply to requests
    through `waypoint` to `destination`, in the given order. Depends only on the
    destination, so the proxy may cache it per service."""
    return tuple(p for p in policies if targets(p, waypoint, destination, root_namespace))


def authorize_request(policies: Sequence[L7Policy], facts: RequestFacts) -> L7Verdict:
    """Decide one request against the policies that apply to it (see `applicable`)."""
    verdict: L7Verdict | None = None
    allow: list[L7Policy] = []
    audited: list[str] = []
    dry: list[DryRunResult] = []
    for p in policies:
        if p.dry_run:
            dry.append(_dry_run(p, facts))
            continue
        if p.error is not None:
            if verdict is None:
                verdict = L7Verdict(
                    False,
                    p.key,
                    None,
                    Action.DENY,
                    f"denied: policy {p.key} is invalid, so it denies every request it "
                    f"applies to (fail closed): {p.error}",
                )
            continue
        if p.action is Action.AUDIT:
            if p.matching_rule(facts) is not None:
                audited.append(p.key)
        elif p.action is Action.ALLOW:
            allow.append(p)
    if verdict is None:
        verdict = _deny_or_allow(policies, allow, facts)
    if audited or dry:
        return L7Verdict(
            verdict.allowed,
            verdict.policy,
            verdict.rule,
            verdict.action,
            verdict.reason,
            tuple(audited),
            tuple(dry),
        )
    return verdict


def _deny_or_allow(
    policies: Sequence[L7Policy], allow: list[L7Policy], facts: RequestFacts
) -> L7Verdict:
    for p in policies:
        if p.action is Action.DENY and not p.dry_run and p.error is None:
            rule = p.matching_rule(facts)
            if rule is not None:
                return L7Verdict(
                    False, p.key, rule, Action.DENY, f"denied by DENY policy {p.key} rule {rule}"
                )
    if not allow:
        return ALLOWED_NO_POLICY
    for p in allow:
        rule = p.matching_rule(facts)
        if rule is not None:
            return L7Verdict(
                True, p.key, rule, Action.ALLOW, f"allowed by ALLOW policy {p.key} rule {rule}"
            )
    keys = ", ".join(p.key for p in allow[:3]) + (", ..." if len(allow) > 3 else "")
    reason = f"denied: ALLOW policies apply ({keys}) but none matched"
    return L7Verdict(False, None, None, None, reason)


def _dry_run(p: L7Policy, facts: RequestFacts) -> DryRunResult:
    if p.error is not None:
        # A broken dry-run policy would deny everything if it were enforced.
        return DryRunResult(p.key, Action.DENY, True, None)
    rule = p.matching_rule(facts)
    return DryRunResult(p.key, p.action, rule is not None, rule)


def denied_response() -> Response:
    """What a client denied by policy gets: 403 `RBAC: access denied`, as Envoy answers."""
    return text_response(DENIED_STATUS, DENIED_BODY)
