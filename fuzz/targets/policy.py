"""The policy parsers (meshcore.policy): AuthorizationPolicy in its three forms and
PeerAuthentication, from one YAML or JSON document.

Contract: `parse_policy_entry` and `parse_policy` raise MeshConfigError and nothing else;
`parse_or_salvage` never raises (a policy that does not parse fails closed).
"""

from __future__ import annotations

import contextlib

from fuzz.targets import samples
from meshcore.discovery import parse_policy_entry
from meshcore.policy.parse import parse_policy
from meshcore.policy.peerauth import parse_or_salvage
from meshcore.reader import load_document
from meshcore.state import MeshConfigError


def test_one_input(data: bytes) -> None:
    try:
        doc = load_document(data.decode("utf-8", "replace"), MeshConfigError)
        raw = parse_policy_entry(doc, "policies[0]")
    except MeshConfigError:
        return
    if raw.kind == "PeerAuthentication":
        parse_or_salvage(raw, "istio-system")
        return
    with contextlib.suppress(MeshConfigError):
        parse_policy(raw, "istio-system")


def seeds() -> dict[str, bytes]:
    return {f"policy-{i}": samples.text(p) for i, p in enumerate(samples.POLICIES)}
