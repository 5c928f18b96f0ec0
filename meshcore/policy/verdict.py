"""The one answer to "may this connection reach this workload?". Pure: no I/O.

`authorize` returns a `Verdict`; the proxies act on it (401 or reset when denied), the
metrics count it (`response_flags="DENY"`), the access log and the policy re-check name
the policy and rule behind it, and `explain` shows it, so all of them tell the same story.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshcore.policy.model import Action
from meshcore.policy.peerauth import MtlsMode


@dataclass(frozen=True, slots=True)
class DryRunResult:
    """What a dry-run policy would have done; reported, never enforced."""

    policy: str  # "ns/name"
    action: Action
    matched: bool
    rule: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "action": self.action.value,
            "matched": self.matched,
            "rule": self.rule,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    # "ns/name" of what decided: the matching AuthorizationPolicy, the invalid policy that
    # fails closed, or the PeerAuthentication that requires mTLS. None when no policy did
    # (allowed because no ALLOW policy applies; denied because ALLOW policies apply but
    # none matched).
    policy: str | None
    rule: int | None  # index of the matching rule in that policy, as the user wrote it
    action: Action | None
    reason: str  # one human sentence, e.g. "denied by DENY policy shop/no-legacy rule 0"
    # The effective PeerAuthentication mode of the destination port.
    mtls: MtlsMode = MtlsMode.PERMISSIVE
    dry_run: tuple[DryRunResult, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "policy": self.policy,
            "rule": self.rule,
            "action": self.action.value if self.action is not None else None,
            "reason": self.reason,
            "mtls": self.mtls.value,
            "dryRun": [d.to_json() for d in self.dry_run],
        }


def policy_ref(policy: str | None, rule: int | None) -> str | None:
    """How the access logs (the tunnel's and the waypoint's) name what decided: `ns/name`,
    and `#rule` when a rule matched; None when no policy did."""
    if policy is None:
        return None
    return policy if rule is None else f"{policy}#{rule}"


# What an authorizer that enforces nothing answers (tests, and a tunnel without policy).
ALLOW_ALL = Verdict(True, None, None, None, "allowed: no policy is enforced here")
