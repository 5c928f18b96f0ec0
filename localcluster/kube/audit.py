"""What each service account really asked the API server, from its audit log, set against the
RBAC rules it was granted (pure).

The API server writes one JSON event per request (`--audit-log-path`, policy level
Metadata). `calls(events, user)` reduces a user's events to the distinct (API group,
resource[/subresource], verb, namespace) it used; `allowed(rules, call)` is RBAC's own
matching for one call; `unused(rules, calls)` names every (group, resource, verb) a rule
grants that no call used, which is how a test shows a role holds the least rights the
component uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
"""


@dataclass(frozen=True, slots=True, order=True)
class Call:
    group: str  # "" for the core group
    resource: str  # "pods", or "pods/status" with a subresource
    verb: str
    namespace: str  # "" for cluster-scoped requests and all-namespace lists/watches
    denied: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """One PolicyRule of a (Cluster)Role; `namespace` is the Role's ("" for a ClusterRole)."""

    groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    names: tuple[str, ...] = ()
    namespace: str = ""


def parse_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # a line cut by a rotation: nothing to learn from it
        # A watch is logged at ResponseStarted and completes only when it ends: both count.
        if isinstance(ev, dict) and ev.get("stage") in ("ResponseComplete", "ResponseStarted"):
            out.append(ev)
    return out


def received_at(ev: Mapping[str, Any]) -> datetime | None:
    raw = ev.get("requestReceivedTimestamp")
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None


def calls(
    events: Iterable[Mapping[str, Any]],
    user: str,
    before: datetime | None = None,
    not_by: str = "",
) -> set[Call]:
    """The resource requests `user` made (non-resource URLs such as /version are left out:
    every authenticated user may read them); with `before`, only those received before it;
    with `not_by`, none whose User-Agent is that (a test's own probes with the user's token)."""
    out = set()
    for ev in events:
        if (ev.get("user") or {}).get("username") != user:
            continue
        if not_by and ev.get("userAgent") == not_by:
            continue
        if before is not None:
            at = received_at(ev)
            if at is None or at >= before:
                continue
        ref = ev.get("objectRef")
        if not isinstance(ref, Mapping) or not ref.get("resource"):
            continue
        resource = str(ref["resource"])
        if ref.get("subresource"):
            resource += "/" + str(ref["subresource"])
        code = (ev.get("responseStatus") or {}).get("code", 0)
        out.add(
            Call(
                str(ref.get("apiGroup", "")),
                resource,
                str(ev.get("verb", "")),
                str(ref.get("namespace", "")),
                denied=code == 403,
            )
        )
    return out


def rules_of(
    objects: Sequence[Mapping[str, Any]], service_account: str, namespace: str
) -> list[Rule]:
    """The rules bound to a service account by the (Cluster)Roles and bindings among
    `objects` (rendered chart output)."""
    roles: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for o in objects:
        if o.get("kind") in ("ClusterRole", "Role"):
            md = o.get("metadata") or {}
            key = (str(o["kind"]), str(md.get("namespace", "")), str(md.get("name", "")))
            roles[key] = list(o.get("rules") or [])
    out: list[Rule] = []
    for o in objects:
        if o.get("kind") not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        subjects = o.get("subjects") or []
        if not any(
            s.get("kind") == "ServiceAccount"
            and s.get("name") == service_account
            and s.get("namespace", namespace) == namespace
            for s in subjects
        ):
            continue
        ref = o.get("roleRef") or {}
        binding_ns = str((o.get("metadata") or {}).get("namespace", ""))
        role_ns = binding_ns if ref.get("kind") == "Role" else ""
        scope = binding_ns if o.get("kind") == "RoleBinding" else ""
        for r in roles.get((str(ref.get("kind")), role_ns, str(ref.get("name"))), []):
            out.append(
                Rule(
                    tuple(r.get("apiGroups") or ()),
                    tuple(r.get("resources") or ()),
                    tuple(r.get("verbs") or ()),
                    tuple(r.get("resourceNames") or ()),
                    scope,
                )
            )
    return out


def _matches(values: tuple[str, ...], value: str) -> bool:
    return "*" in values or value in values


def allowed(rules: Iterable[Rule], call: Call) -> bool:
    """RBAC's answer for a call (resourceNames are not checked: the audit's Metadata level
    names the object, but lists and creates have none to check against)."""
    for r in rules:
        if r.namespace and r.namespace != call.namespace:
            continue
        if (
            _matches(r.groups, call.group)
            and _matches(r.resources, call.resource)
            and _matches(r.verbs, call.verb)
        ):
            return True
    return False


def unused(rules: Iterable[Rule], used: Iterable[Call]) -> list[tuple[str, str, str]]:
    """Every (group, resource, verb) some rule grants that no call used."""
    seen = {(c.group, c.resource, c.verb) for c in used if not c.denied}
    out = []
    for r in rules:
        for g in r.groups:
            for res in r.resources:
                for v in r.verbs:
                    if (g, res, v) not in seen:
                        out.append((g, res, v))
    return sorted(set(out))
