"""A cluster's policy resources as `kubectl apply` takes them: defaults, checks, identity. Pure.

Each document must be a resource as users write it (apiVersion, kind, metadata.name,
spec). A missing `metadata.namespace` is `default`, as kubectl fills it in (without it
the tunnel would read the policy as mesh-wide). Then each document is checked with the
tunnel's own parsers (`meshcore.policy.validate`): what a tunnel would refuse, replace with
a deny-all stand-in or read differently from what was written is refused here, before
anything is written. A batch is all or nothing.

The waypoints' resources (HTTPRoute, GRPCRoute, VirtualService, DestinationRule,
RequestAuthentication, Gateways of classes other than istio-waypoint) are checked by one
function, `validate_l7`, and kept verbatim for the waypoints; an AuthorizationPolicy with
`targetRefs` is both a policy (the tunnels' parsers) and checked by `validate_l7`. A Gateway of
class istio-waypoint is a waypoint (`localcluster.gateways`): the cluster runs it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from localcluster import gateways as gw
from meshcore.defaults import NAMESPACE as DEFAULT_NAMESPACE
from meshcore.policy.validate import ENFORCED_KINDS, check_resource
from meshcore.serviceentry import validate_service_entry
from waypoint.authn.parse import validate_request_authentication
from waypoint.authz.parse import validate_policy
from waypoint.routes.validate import validate_resource

MAX_POLICIES = 1000  # per cluster: real meshes have tens; each one costs every tunnel
MAX_RESOURCES = 1000  # L7 resources per cluster, for the same reason
# The kinds the waypoints read, with the API groups they may come from.
L7_KINDS: dict[str, tuple[str, ...]] = {
    "HTTPRoute": ("gateway.networking.k8s.io",),
    "GRPCRoute": ("gateway.networking.k8s.io",),
    "Gateway": ("gateway.networking.k8s.io",),
    "VirtualService": ("networking.istio.io",),
    "DestinationRule": ("networking.istio.io",),
    "RequestAuthentication": ("security.istio.io",),
    # Read by the tunnels (hosts, addresses) too: meshcore.serviceentry.
    "ServiceEntry": ("networking.istio.io",),
}
ALL_KINDS = (*ENFORCED_KINDS, *L7_KINDS)
# `kubectl delete authorizationpolicy ...` spellings of the kinds, lowercase.
KIND_NAMES = {k.lower(): k for k in ALL_KINDS}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

Key = tuple[str, str, str]  # (kind, namespace, name)


class PolicyError(ValueError):
    """Documents that cannot be applied (or deleted); the message names every problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems:\n  " + "\n  ".join(self.problems)
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class Resource:
    """One checked document, with its defaults filled in."""

    kind: str
    namespace: str
    name: str
    doc: Mapping[str, Any] = field(hash=False)
    warnings: tuple[str, ...] = ()

    @property
    def key(self) -> Key:
        return (self.kind, self.namespace, self.name)


def describe(key: Key) -> str:
    return f"{key[0]} {key[1]}/{key[2]}"


def with_defaults(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `doc` with kubectl's default namespace when it names none."""
    out = copy.deepcopy(dict(doc))
    meta = out.get("metadata")
    if isinstance(meta, dict) and not meta.get("namespace"):
        meta["namespace"] = DEFAULT_NAMESPACE
    return out


def _envelope_problem(doc: Any) -> str | None:
    if not isinstance(doc, Mapping):
        return f"expected a resource (a mapping), got {type(doc).__name__}"
    missing = [k for k in ("apiVersion", "kind", "metadata") if not doc.get(k)]
    if missing:
        return f"not a resource: {', '.join(missing)} not set (kubectl needs them too)"
    return None


def check_documents(docs: Sequence[Any], source: str) -> list[Resource]:
    """Every document checked, defaults filled in; raises PolicyError naming every problem
    (`source` names where the documents came from, e.g. the file)."""
    batch = check_batch(docs, source, l4_only=True)
    return batch.policies


def validate_l7(doc: Mapping[str, Any]) -> list[str]:
    """Every problem with one resource a waypoint reads (empty: acceptable). Structural
    checks: apiVersion of the kind's API group, kind, metadata (a DNS-label name; namespace
    as given, `default` when absent), spec a mapping; the waypoint's own parsers are the
    place for the spec's meaning, and this is the one function that calls them."""
    problems: list[str] = []
    kind = doc.get("kind")
    if kind not in L7_KINDS and not _is_targeted_policy(doc):
        return [f"kind {kind!r} is not one the waypoints read ({', '.join(L7_KINDS)})"]
    api = doc.get("apiVersion")
    groups = L7_KINDS.get(str(kind), ("security.istio.io",))
    group, slash, version = str(api).rpartition("/")
    if not isinstance(api, str) or not slash or group not in groups or not version:
        problems.append(
            f"apiVersion {api!r}: a {kind} is {' or '.join(g + '/<version>' for g in groups)}"
        )
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping):
        return [*problems, "metadata: expected a mapping with a name"]
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_SUBDOMAIN.match(name):
        problems.append(f"metadata.name {name!r}: expected a DNS name ([a-z0-9.-], max 253)")
    namespace = meta.get("namespace", DEFAULT_NAMESPACE)
    if not isinstance(namespace, str) or not _DNS_LABEL.match(namespace):
        problems.append(f"metadata.namespace {namespace!r}: expected a DNS label")
    if not isinstance(doc.get("spec"), Mapping):
        problems.append("spec: expected a mapping")
    if problems:
        return problems
    # The spec's meaning: the waypoint's own strict parsers, so what `apply` accepts is
    # exactly what a waypoint will enforce (a Gateway's shape is checked by gateways.py).
    full = dict(doc)
    full.setdefault("metadata", {})
    if "namespace" not in full["metadata"]:
        full["metadata"] = {**full["metadata"], "namespace": DEFAULT_NAMESPACE}
    if kind in ("HTTPRoute", "GRPCRoute", "VirtualService", "DestinationRule"):
        return validate_resource(full)
    if kind == "RequestAuthentication":
        return validate_request_authentication(full)
    if kind == "ServiceEntry":
        return validate_service_entry(full)
    if _is_targeted_policy(doc):
        return validate_policy(full)
    return []


def _is_targeted_policy(doc: Mapping[str, Any]) -> bool:
    spec = doc.get("spec")
    return (
        doc.get("kind") == "AuthorizationPolicy"
        and isinstance(spec, Mapping)
        and bool(spec.get("targetRefs") or spec.get("targetRef"))
    )


@dataclass(frozen=True, slots=True)
class Batch:
    """A checked batch split by where each document goes: the tunnels' policies, the
    waypoints' L7 resources, and waypoint Gateways (which the cluster runs)."""

    policies: list[Resource]
    resources: list[Resource]
    waypoints: list[gw.GatewaySpec]

    def lines(self) -> list[Key]:
        return [
            *(r.key for r in self.policies),
            *(r.key for r in self.resources),
            *((gw.GATEWAY_KIND, g.namespace, g.name) for g in self.waypoints),
        ]


def check_batch(docs: Sequence[Any], source: str, l4_only: bool = False) -> Batch:
    """Every document checked and sorted by kind; raises PolicyError naming every problem
    of the batch (all or nothing). `l4_only` accepts only the tunnels' kinds (the cluster
    file's `policies`)."""
    batch = Batch([], [], [])
    problems: list[str] = []
    first: dict[Key, int] = {}
    for i, raw in enumerate(docs):
        where = f"{source}[{i}]" if len(docs) > 1 else source
        problem = _envelope_problem(raw)
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        doc = with_defaults(raw)
        res: Resource | None = None
        if gw.is_waypoint_gateway(doc) and not l4_only:
            try:
                g = gw.parse_gateway(doc, where)
            except gw.GatewayError as e:
                problems.append(str(e))
                continue
            key: Key = (gw.GATEWAY_KIND, g.namespace, g.name)
        elif doc.get("kind") in L7_KINDS and not l4_only:
            errors = validate_l7(doc)
            if errors:
                problems += [f"{where}: {e}" for e in errors]
                continue
            meta = doc["metadata"]
            res = Resource(str(doc["kind"]), str(meta["namespace"]), str(meta["name"]), doc)
            key = res.key
        elif "kind" in doc and doc["kind"] not in ENFORCED_KINDS:
            tunnels = ", ".join(ENFORCED_KINDS)
            if l4_only and doc["kind"] in L7_KINDS:
                problems.append(
                    f"{where}: kind {doc['kind']!r} is not enforced by the tunnels ({tunnels}), "
                    "so not in a cluster file's policies: give it to `ambientctl apply -f`"
                )
            else:
                problems.append(
                    f"{where}: kind {doc['kind']!r} is not one this mesh reads: the tunnels "
                    f"enforce {tunnels}; the waypoints {', '.join(L7_KINDS)}"
                )
            continue
        else:
            check = check_resource(doc, path=where)
            errors = list(check.errors)
            if check.ok and _is_targeted_policy(doc):
                errors += [f"{where}: {e}" for e in validate_l7(doc)]
            if not check.ok or errors:
                problems += [f"{where}: {e}" if not e.startswith(where) else e for e in errors]
                continue
            res = Resource(check.kind, check.namespace, check.name, doc, check.warnings)
            key = res.key
        if key in first:
            problems.append(f"{where}: {describe(key)} is also document {first[key]}")
            continue
        first[key] = i
        if res is None:
            batch.waypoints.append(g)
        elif res.kind in ENFORCED_KINDS:
            batch.policies.append(res)
        else:
            batch.resources.append(res)
    if problems:
        raise PolicyError(problems)
    return batch


def key_of(doc: Mapping[str, Any]) -> Key:
    """(kind, namespace, name) of a stored (already checked) document."""
    meta = doc["metadata"]
    return (str(doc["kind"]), str(meta["namespace"]), str(meta["name"]))


def merge(
    current: Iterable[Mapping[str, Any]],
    new: Iterable[Resource],
    limit: int = MAX_POLICIES,
    what: str = "policies",
) -> list[dict[str, Any]]:
    """`current` with each of `new` created or replaced in place (apply's semantics)."""
    out = [dict(d) for d in current]
    index = {key_of(d): i for i, d in enumerate(out)}
    for res in new:
        if res.key in index:
            out[index[res.key]] = dict(res.doc)
        else:
            index[res.key] = len(out)
            out.append(dict(res.doc))
    if len(out) > limit:
        raise PolicyError([f"a cluster holds at most {limit} {what}; this would make {len(out)}"])
    return out


def remove(current: Iterable[Mapping[str, Any]], keys: Iterable[Key]) -> list[dict[str, Any]]:
    """`current` without `keys`; raises PolicyError naming each key that is not there (and
    then removes nothing)."""
    docs = [dict(d) for d in current]
    present = {key_of(d) for d in docs}
    wanted = list(dict.fromkeys(keys))
    missing = [k for k in wanted if k not in present]
    if missing:
        raise PolicyError([f"no {describe(k)}" for k in missing])
    gone = set(wanted)
    return [d for d in docs if key_of(d) not in gone]


def delete_keys(docs: Sequence[Any], source: str) -> list[Key]:
    """What `delete -f` removes: the kind, namespace (default `default`) and name of each
    document. Only those parts are read, as kubectl does."""
    keys: list[Key] = []
    problems: list[str] = []
    for i, raw in enumerate(docs):
        where = f"{source}[{i}]" if len(docs) > 1 else source
        problem = _envelope_problem(raw)
        meta = raw.get("metadata") if isinstance(raw, Mapping) else None
        if problem is None and not (isinstance(meta, Mapping) and meta.get("name")):
            problem = "metadata.name not set"
        if problem is None and raw["kind"] not in ALL_KINDS:
            problem = f"kind {raw['kind']!r} is not one this mesh holds ({', '.join(ALL_KINDS)})"
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        assert isinstance(meta, Mapping)
        keys.append(
            (str(raw["kind"]), str(meta.get("namespace") or DEFAULT_NAMESPACE), str(meta["name"]))
        )
    if problems:
        raise PolicyError(problems)
    return keys
