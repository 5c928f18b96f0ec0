"""Checking one policy entry exactly as a tunnel would read it, before anyone writes it. Pure.

`check_resource(entry)` runs the tunnel's own parsers on one entry of the mesh config's
`policies` list: the discovery entry parser (`meshcore.discovery.parse_policy_entry`: kind,
name, namespace), then `parse.parse_policy` or `peerauth.parse_peer_authentication`.

A tunnel must keep running whatever it is given, so it is lenient where a writer must not
be: an entry of another kind makes it refuse the whole file (the last good config stays),
and a policy that does not parse is kept as a stand-in that denies everything in its scope.
Here every one of those is an error naming the field, so a tool can refuse before writing.

One check the parsers do not make: a `*` inside a principal or namespace value (`a*b`).
Istio matches `*` only as the whole value, a prefix (`a*`) or a suffix (`*b`), and reads
anything else literally, so such a value never matches what its author meant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.discovery import parse_policy_entry
from meshcore.policy.parse import parse_policy
from meshcore.policy.peerauth import parse_peer_authentication
from meshcore.state import MeshConfigError

__all__ = ["ENFORCED_KINDS", "ResourceCheck", "check_resource"]

# The kinds the tunnel enforces; every other kind makes it refuse the whole config file.
ENFORCED_KINDS = ("AuthorizationPolicy", "PeerAuthentication")

# Source fields and `when` keys whose values are Istio string matches (`*` allowed only
# as the whole value, its first or its last character).
_WILDCARD_FIELDS = ("principals", "notPrincipals", "namespaces", "notNamespaces")
_WILDCARD_WHEN_KEYS = ("source.principal", "source.namespace")


@dataclass(frozen=True, slots=True)
class ResourceCheck:
    """The outcome for one entry: what it is, and why it would be refused (if at all)."""

    kind: str
    namespace: str
    name: str
    errors: tuple[str, ...]
    warnings: tuple[str, ...] = ()  # accepted, but not enforced as written (e.g. L7 fields)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def key(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def _identity(entry: Any) -> tuple[str, str, str]:
    """(kind, namespace, name) as far as they can be read, for messages about a bad entry."""
    if not isinstance(entry, Mapping):
        return "?", "?", "?"
    meta = entry.get("metadata") if ("kind" in entry or "metadata" in entry) else entry
    if not isinstance(meta, Mapping):
        meta = {}
    kind = entry.get("kind", "AuthorizationPolicy")
    return str(kind), str(meta.get("namespace", "")), str(meta.get("name", "?"))


def check_resource(
    entry: Any, root_namespace: str = ROOT_NAMESPACE, path: str = "policy"
) -> ResourceCheck:
    """Would a tunnel enforce `entry` exactly as written? `path` prefixes the messages."""
    kind, namespace, name = _identity(entry)
    if isinstance(entry, Mapping) and "kind" in entry and entry["kind"] not in ENFORCED_KINDS:
        return ResourceCheck(
            kind,
            namespace,
            name,
            (
                f"{path}: kind {entry['kind']!r} is not enforced by this mesh; it enforces "
                f"{' and '.join(ENFORCED_KINDS)} (security.istio.io)",
            ),
        )
    try:
        raw = parse_policy_entry(entry, path)
        if raw.kind == "PeerAuthentication":
            warnings = parse_peer_authentication(raw, root_namespace).warnings
        else:
            warnings = parse_policy(raw, root_namespace).warnings
    except MeshConfigError as e:
        return ResourceCheck(kind, namespace, name, (str(e),))
    errors = tuple(f"{raw.kind} {raw.key}: {e}" for e in _wildcard_errors(entry, raw.kind))
    return ResourceCheck(raw.kind, raw.namespace, raw.name, errors, tuple(warnings))


def _wildcard_errors(entry: Mapping[str, Any], kind: str) -> list[str]:
    """Values with `*` in the middle, in the Istio rule form (the parser accepted the
    structure, so only the shapes it accepts are walked)."""
    if kind != "AuthorizationPolicy":
        return []
    resource = "kind" in entry or "metadata" in entry
    body = entry.get("spec") if resource else entry
    base = "spec" if resource else ""
    if not isinstance(body, Mapping) or not isinstance(body.get("rules"), list):
        return []
    out: list[str] = []
    for i, rule in enumerate(body["rules"]):
        if not isinstance(rule, Mapping):
            continue  # ztunnel's nested form: explicit match kinds, no `*` notation
        rpath = f"{base}.rules[{i}]".lstrip(".")
        for j, src in enumerate(rule.get("from") or []):
            source = src.get("source") if isinstance(src, Mapping) else None
            if not isinstance(source, Mapping):
                continue
            for field in _WILDCARD_FIELDS:
                out += _bad_wildcards(source.get(field), f"{rpath}.from[{j}].source.{field}")
        for j, cond in enumerate(rule.get("when") or []):
            if not isinstance(cond, Mapping) or cond.get("key") not in _WILDCARD_WHEN_KEYS:
                continue
            for field in ("values", "notValues"):
                out += _bad_wildcards(cond.get(field), f"{rpath}.when[{j}].{field}")
    return out


def _bad_wildcards(values: Any, path: str) -> list[str]:
    out = []
    for k, value in enumerate(values if isinstance(values, list) else []):
        if isinstance(value, str) and not _valid_wildcard(value):
            out.append(
                f"{path}[{k}]: {value!r}: '*' may only be the whole value, its first character "
                "(suffix match) or its last (prefix match); elsewhere it is read literally "
                "and never matches"
            )
    return out


def _valid_wildcard(value: str) -> bool:
    stars = value.count("*")
    return stars == 0 or value == "*" or (stars == 1 and (value[0] == "*" or value[-1] == "*"))
