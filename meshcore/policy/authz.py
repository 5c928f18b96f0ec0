"""The inbound authorization decision, in one function shared by the data path and `explain`.

PeerAuthentication first (a STRICT workload refuses plaintext), then AuthorizationPolicy.
Pure: the policy index is an immutable snapshot, so the same inputs give the same answer
whether a connection is being accepted, re-checked after a policy change, or explained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.peerauth import MtlsMode
from meshcore.policy.rbac import PolicyIndex, Request, Verdict
from meshcore.sockets import SocketAddr
from meshcore.state import IPAddress, Workload


@dataclass(frozen=True, slots=True)
class AuthzResult:
    allowed: bool
    reason: str
    mtls: MtlsMode
    verdict: Verdict | None  # None when PeerAuthentication decided before any policy

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = (
            self.verdict.to_json()
            if self.verdict is not None
            else {"policy": None, "rule": None, "action": None, "dryRun": []}
        )
        out["allowed"] = self.allowed
        out["reason"] = self.reason
        return out


def authorize(
    policies: PolicyIndex,
    workload: Workload,
    peer: SpiffeId | None,
    client_ip: IPAddress,
    target: SocketAddr,
) -> AuthzResult:
    mode = policies.mtls_mode(workload, target.port)
    if peer is None and mode is MtlsMode.STRICT:
        return AuthzResult(
            False,
            f"plaintext refused: mTLS mode is STRICT for {workload.namespace}/{workload.name} "
            f"port {target.port} (PeerAuthentication)",
            mode,
            None,
        )
    verdict = policies.evaluate(workload, Request(client_ip, peer, target.ip, target.port))
    return AuthzResult(verdict.allowed, verdict.reason, mode, verdict)
