"""`PolicyIndex`: every policy of one mesh snapshot, indexed for per-connection checks.

`PolicyIndex.build` parses all of a `MeshState`'s AuthorizationPolicies and
PeerAuthentications (a policy that does not parse is kept as a fail-closed stand-in) and
answers, per inbound connection, `evaluate(workload, request) -> Verdict`.

Scope (Istio's): a policy in the root namespace without selector applies mesh-wide;
elsewhere without selector to its namespace; with a selector to the matching workloads of
its namespace (of every namespace, from the root namespace); a control plane may also attach
policies to a workload by key. AUDIT and CUSTOM policies, and policies with `targetRef(s)`
(waypoint policies), are indexed for views but never affect the tunnel's verdict (istiod does
not send them to ztunnel). Evaluation order: see `Compiled.decide`.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.policy.compile import Compiled, compile_policies
from meshcore.policy.model import Policy, Request, Scope
from meshcore.policy.parse import parse_policy, salvage_policy
from meshcore.policy.peerauth import MtlsMode, PeerAuthentication, PeerAuthIndex, parse_or_salvage
from meshcore.policy.resource import Labels, selects
from meshcore.policy.verdict import Verdict
from meshcore.runtime.gcpause import collector_paused
from meshcore.state import MeshConfigError, MeshState, RawPolicy, Workload

_CACHE_LIMIT = 65536

# Parsed policies by entry: a config change rebuilds the index from the whole mesh config, but
# usually changes few entries, so a rebuild only parses those. Entries and policies are
# immutable values, so sharing them between snapshots is safe. Bounded: cleared when full.
_PARSED: dict[tuple[RawPolicy, str], Policy | MeshConfigError] = {}
_PARSED_LIMIT = 200_000


def _parse_cached(raw: RawPolicy, root_namespace: str) -> Policy:
    key = (raw, root_namespace)
    found = _PARSED.get(key)
    if found is None:
        try:
            found = parse_policy(raw, root_namespace)
        except MeshConfigError as exc:
            found = exc
        if len(_PARSED) >= _PARSED_LIMIT:
            _PARSED.clear()
        _PARSED[key] = found
    if isinstance(found, MeshConfigError):
        raise MeshConfigError(str(found))
    return found


def clear_parse_cache() -> None:
    """Forget memoized parses (for measuring a cold `PolicyIndex.build`)."""
    _PARSED.clear()


class PolicyIndex:
    """All policies of one mesh snapshot, indexed for per-connection checks.

    Immutable in meaning: a config change builds a new index. Lookups per workload are
    cached (keyed on the workload's uid, namespace, labels and attached policies).
    """

    def __init__(
        self,
        policies: Iterable[Policy],
        peer_authentications: Iterable[PeerAuthentication] = (),
        errors: Iterable[str] = (),
        root_namespace: str = ROOT_NAMESPACE,
    ) -> None:
        self.root_namespace = root_namespace
        self.policies: tuple[Policy, ...] = tuple(sorted(policies, key=lambda p: p.key))
        self.errors: tuple[str, ...] = tuple(errors)
        self.peer_auth = PeerAuthIndex(peer_authentications, root_namespace)
        self._by_key = {p.key: p for p in self.policies}
        self._global: list[Policy] = []
        self._namespace: dict[str, list[Policy]] = {}
        self._selector: dict[str, list[Policy]] = {}  # by the namespace they select in
        self._root_selector: list[Policy] = []
        for p in self.policies:
            root = p.namespace in (root_namespace, "")
            if p.scope is Scope.GLOBAL:
                self._global.append(p)
            elif p.scope is Scope.NAMESPACE:
                self._namespace.setdefault(p.namespace, []).append(p)
            elif p.selector:
                if root:
                    self._root_selector.append(p)
                else:
                    self._selector.setdefault(p.namespace, []).append(p)
            # A WORKLOAD_SELECTOR policy without selector applies only where attached.
        self._applicable: dict[tuple[str, str, Labels, tuple[str, ...]], tuple[Policy, ...]] = {}
        self._compiled_by_key: dict[tuple[str, str, Labels, tuple[str, ...]], Compiled] = {}
        self._compiled_by_id: dict[int, tuple[Workload, Compiled]] = {}
        self.warnings: tuple[str, ...] = (
            *(w for p in self.policies for w in (f"{p.key}: {x}" for x in p.warnings)),
            *self.peer_auth.warnings,
        )

    @classmethod
    def build(cls, state: MeshState, root_namespace: str = ROOT_NAMESPACE) -> PolicyIndex:
        """Parse every AuthorizationPolicy and PeerAuthentication of `state`.

        A policy that does not parse is kept as a fail-closed stand-in (it denies everything
        in its scope; a broken PeerAuthentication acts as STRICT) and listed in `errors`.
        """
        with collector_paused():
            return cls._build(state, root_namespace)

    @classmethod
    def _build(cls, state: MeshState, root_namespace: str) -> PolicyIndex:
        policies: list[Policy] = []
        peer: list[PeerAuthentication] = []
        errors: list[str] = []
        for raw in state.policies:
            if raw.kind == "PeerAuthentication":
                pa = parse_or_salvage(raw, root_namespace)
                if pa.error is not None:
                    errors.append(f"{pa.error}; it acts as STRICT until fixed")
                peer.append(pa)
                continue
            try:
                policies.append(_parse_cached(raw, root_namespace))
                continue
            except MeshConfigError as exc:
                message = str(exc)
            except Exception as exc:  # a parser bug must still fail closed
                message = f"AuthorizationPolicy {raw.key}: cannot be parsed: {exc!r}"
            stand_in = salvage_policy(raw, root_namespace, message)
            policies.append(stand_in)
            effect = (
                "it denies every connection in its scope until fixed"
                if stand_in.enforced and not stand_in.dry_run
                else "it is not enforced by the tunnel, so nothing else changes"
            )
            errors.append(f"{message}; {effect}")
        index = cls(policies, peer, errors, root_namespace)
        conflicts = [c for w in state.workloads if (c := index.peer_auth.conflict(w)) is not None]
        if conflicts:
            index.warnings = (*index.warnings, *conflicts)
        return index

    # -- scope ------------------------------------------------------------------------------------

    def applicable(self, workload: Workload) -> tuple[Policy, ...]:
        """Policies in scope for `workload`, ordered by key (including dry-run, AUDIT, ...)."""
        key = _workload_key(workload)
        found = self._applicable.get(key)
        if found is None:
            found = self._find_applicable(workload)
            if len(self._applicable) >= _CACHE_LIMIT:
                self._applicable.clear()
            self._applicable[key] = found
        return found

    def _find_applicable(self, workload: Workload) -> tuple[Policy, ...]:
        labels = dict(workload.labels)
        out: dict[str, Policy] = {p.key: p for p in self._global}
        for p in self._namespace.get(workload.namespace, ()):
            out[p.key] = p
        for p in chain(self._selector.get(workload.namespace, ()), self._root_selector):
            if selects(p.selector, labels):
                out[p.key] = p
        for attached in workload.authorization_policies:
            found = self._by_key.get(attached)
            if found is not None:
                out[found.key] = found
        return tuple(out[k] for k in sorted(out))

    def mtls_mode(self, workload: Workload, port: int) -> MtlsMode:
        """The effective PeerAuthentication mode for `port` of `workload` (never UNSET)."""
        return self.peer_auth.resolve(workload).for_port(port)[0]

    def peer_authentications_json(self) -> list[dict[str, Any]]:
        return self.peer_auth.to_json()

    def to_json(self) -> dict[str, Any]:
        return {
            "rootNamespace": self.root_namespace,
            "policies": [p.to_json() for p in self.policies],
            "peerAuthentications": self.peer_authentications_json(),
            "errors": list(self.errors),
            "warnings": list(self.warnings),
        }

    # -- evaluation ------------------------------------------------------------------------------

    def _compiled(self, workload: Workload) -> Compiled:
        # Fast path: the same Workload object as last time (the tunnel passes the ones of
        # its MeshState snapshot); the stored reference keeps the id from being reused.
        hit = self._compiled_by_id.get(id(workload))
        if hit is not None and hit[0] is workload:
            return hit[1]
        key = _workload_key(workload)
        compiled = self._compiled_by_key.get(key)
        if compiled is None:
            compiled = compile_policies(self.applicable(workload), self.peer_auth.resolve(workload))
            if len(self._compiled_by_key) >= _CACHE_LIMIT:
                self._compiled_by_key.clear()
            self._compiled_by_key[key] = compiled
        if len(self._compiled_by_id) >= _CACHE_LIMIT:
            self._compiled_by_id.clear()
        self._compiled_by_id[id(workload)] = (workload, compiled)
        return compiled

    def evaluate(self, workload: Workload, req: Request) -> Verdict:
        """Decide one inbound connection to `workload`; dry-run policies are reported."""
        return self._compiled(workload).decide(req)


def _workload_key(w: Workload) -> tuple[str, str, Labels, tuple[str, ...]]:
    return (w.uid, w.namespace, w.labels, w.authorization_policies)
