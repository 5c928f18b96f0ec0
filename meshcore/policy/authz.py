"""The inbound authorization decision, in one function shared by every caller.

The proxies (on accept), the re-check of open connections after a policy change, and
`explain` all call `authorize`, so they cannot disagree. PeerAuthentication first (a STRICT
port refuses plaintext), then AuthorizationPolicy; the answer is one `Verdict`. Pure: the
policy index is an immutable snapshot, so the same inputs give the same answer.
"""

from __future__ import annotations

from meshcore.identity.spiffe import SpiffeId
from meshcore.policy.index import PolicyIndex
from meshcore.policy.model import Request
from meshcore.policy.verdict import Verdict
from meshcore.sockets import SocketAddr
from meshcore.state import IPAddress, Workload


def authorize(
    policies: PolicyIndex,
    workload: Workload,
    peer: SpiffeId | None,
    client_ip: IPAddress,
    target: SocketAddr,
) -> Verdict:
    """May a client at `client_ip`, proving `peer` (None: plaintext), reach `target` (the
    app's address and port) in `workload`?"""
    return policies.evaluate(workload, Request(client_ip, peer, target.ip, target.port))
