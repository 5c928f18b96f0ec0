"""PeerAuthentication: which inbound connections must be mTLS. Pure: no I/O.

Entry shapes: see `meshcore.policy.resource` (the Istio resource, or a flat entry).

PeerAuthentication semantics (Istio's, as istiod resolves them for ambient):
- `spec: {selector: {matchLabels}, mtls: {mode}, portLevelMtls: {"8080": {mode}}}`; mode is
  UNSET (inherit), STRICT, PERMISSIVE or DISABLE. Port-level modes need a selector.
- Levels, most specific first: a selector policy in the workload's namespace (its port-level
  mode for the port, then its own mode), the namespace-wide policy, the mesh-wide policy (no
  selector, in the root namespace), then PERMISSIVE. UNSET at any level inherits from the next.
- In ambient, DISABLE behaves like PERMISSIVE for inbound: plaintext is accepted.
- Several policies at one level: istiod takes the oldest; entries here carry no creation
  time, so the first by name wins and the index says so in `warnings`.

Deviations, both toward refusing plaintext (fail closed):
- A selector policy in the root namespace applies to workloads of the root namespace (as in
  sidecar mode); istiod's ambient conversion ignores it.
- A PeerAuthentication that does not parse acts as STRICT at its level (its selector when
  that part parses, else namespace- or mesh-wide), and wins any tie at that level.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from meshcore.defaults import ROOT_NAMESPACE
from meshcore.policy.resource import Labels, parse_selector, reader_for, selects, unwrap
from meshcore.reader import Reader, join
from meshcore.state import MeshConfigError, RawPolicy, Workload

# -- PeerAuthentication ---------------------------------------------------------------------------


class MtlsMode(enum.Enum):
    UNSET = "UNSET"  # inherit from the next level; never the answer of a lookup
    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"
    DISABLE = "DISABLE"

    @property
    def accepts_plaintext(self) -> bool:
        # Ambient has no plaintext-only inbound mode: DISABLE accepts mTLS and plaintext,
        # exactly like PERMISSIVE.
        return self is not MtlsMode.STRICT


_PA_SPEC_KEYS = ("selector", "mtls", "portLevelMtls")
_PA_FLAT_KEYS = ("name", "namespace", *_PA_SPEC_KEYS)


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    name: str
    namespace: str
    selector: Labels
    mode: MtlsMode
    port_modes: tuple[tuple[int, MtlsMode], ...]  # sorted by port
    warnings: tuple[str, ...] = ()
    # Set on the stand-in for an entry that did not parse: it acts as STRICT.
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def port_mode(self, port: int) -> MtlsMode:
        for p, mode in self.port_modes:
            if p == port:
                return mode
        return MtlsMode.UNSET

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "selector": {"matchLabels": dict(self.selector)} if self.selector else None,
            "mode": self.mode.value,
            "portLevelMtls": {str(p): m.value for p, m in self.port_modes},
            "warnings": list(self.warnings),
        }
        if self.error is not None:
            out["error"] = self.error
        return out


def _parse_mode(where: Reader, value: Any, path: str) -> MtlsMode:
    body = where.mapping(value, path)
    where.check_keys(body, ("mode",), path)
    mode = body.get("mode")
    if mode is None:
        return MtlsMode.UNSET
    if not isinstance(mode, str) or mode not in MtlsMode.__members__:
        where.fail(
            join(path, "mode"),
            f"expected one of {', '.join(MtlsMode.__members__)}, got {mode!r}",
        )
    return MtlsMode[mode]


def parse_peer_authentication(
    raw: RawPolicy, root_namespace: str = ROOT_NAMESPACE
) -> PeerAuthentication:
    """Parse and validate one PeerAuthentication. Raises MeshConfigError naming the field."""
    where = reader_for("PeerAuthentication", raw.key)
    if raw.kind != "PeerAuthentication":
        where.fail("kind", f"is a {raw.kind}, not a PeerAuthentication")
    env = unwrap(raw, where, "PeerAuthentication")
    body = env.body
    where.check_keys(body, _PA_SPEC_KEYS if env.resource else _PA_FLAT_KEYS, env.body_path)
    selector = parse_selector(where, body.get("selector"), join(env.body_path, "selector"))
    mode = _parse_mode(where, body.get("mtls"), join(env.body_path, "mtls"))
    ports_path = join(env.body_path, "portLevelMtls")
    port_modes: dict[int, MtlsMode] = {}
    raw_ports = body.get("portLevelMtls")
    if raw_ports is not None:
        for text, value in where.mapping(raw_ports, ports_path).items():
            port = where.port(text, f"{ports_path}.{text}")
            if port in port_modes:
                where.fail(f"{ports_path}.{text}", f"port {port} is listed twice")
            port_modes[port] = _parse_mode(where, value, f"{ports_path}.{text}")
        if not port_modes:
            where.fail(ports_path, "if given, it must list at least one port")
        if not selector:
            where.fail(
                ports_path, "a namespace- or mesh-wide PeerAuthentication cannot set port modes"
            )
    warnings: list[str] = []
    if selector and raw.namespace in (root_namespace, ""):
        warnings.append(
            "a selector in the root namespace selects workloads of the root namespace only"
        )
    return PeerAuthentication(
        raw.name,
        raw.namespace,
        selector,
        mode,
        tuple(sorted(port_modes.items())),
        tuple(warnings),
    )


def _salvage(raw: RawPolicy, error: str) -> PeerAuthentication:
    """The fail-closed stand-in for a PeerAuthentication that did not parse: STRICT, with
    the selector if that part of the entry parses (else it is namespace- or mesh-wide)."""
    selector: Labels = ()
    try:
        where = reader_for("PeerAuthentication", raw.key)
        env = unwrap(raw, where, "PeerAuthentication")
        selector = parse_selector(where, env.body.get("selector"), "selector")
    except MeshConfigError:
        pass
    return PeerAuthentication(raw.name, raw.namespace, selector, MtlsMode.STRICT, (), (), error)


def parse_or_salvage(raw: RawPolicy, root_namespace: str) -> PeerAuthentication:
    try:
        return parse_peer_authentication(raw, root_namespace)
    except MeshConfigError as exc:
        return _salvage(raw, str(exc))
    except Exception as exc:  # a parser bug must still fail closed
        return _salvage(raw, f"PeerAuthentication {raw.key}: cannot be parsed: {exc!r}")


@dataclass(frozen=True, slots=True)
class MtlsDecision:
    """The resolved mTLS requirement for one workload, per port."""

    mode: MtlsMode  # for ports without a port-level mode
    policy: str | None  # key of the PeerAuthentication that set `mode`; None = default
    ports: tuple[tuple[int, MtlsMode, str], ...] = ()  # port-level overrides and their policy

    def for_port(self, port: int) -> tuple[MtlsMode, str | None]:
        for p, mode, key in self.ports:
            if p == port:
                return mode, key
        return self.mode, self.policy


_PERMISSIVE_DEFAULT = MtlsDecision(MtlsMode.PERMISSIVE, None)


def _tie_order(pa: PeerAuthentication) -> tuple[bool, str]:
    # A broken entry first (fail closed), then by name: there is no creation time to go by.
    return (pa.error is None, pa.name)


class PeerAuthIndex:
    """PeerAuthentications indexed by level, resolving a workload's mTLS mode."""

    def __init__(
        self, policies: Iterable[PeerAuthentication], root_namespace: str = ROOT_NAMESPACE
    ) -> None:
        self.root_namespace = root_namespace
        self.policies = tuple(sorted(policies, key=lambda p: p.key))
        mesh: list[PeerAuthentication] = []
        namespace: dict[str, list[PeerAuthentication]] = {}
        selector: dict[str, list[PeerAuthentication]] = {}
        for pa in self.policies:
            root = pa.namespace in (root_namespace, "")
            # Selector policies in the root namespace select root-namespace workloads;
            # "" (no namespace given) is read as the root namespace.
            ns = root_namespace if root else pa.namespace
            if pa.selector:
                selector.setdefault(ns, []).append(pa)
            elif root:
                mesh.append(pa)
            else:
                namespace.setdefault(ns, []).append(pa)
        warnings: list[str] = []
        self._mesh = self._pick(mesh, "mesh-wide", warnings)
        self._namespace = {
            ns: self._pick(pas, f"namespace-wide in {ns}", warnings)
            for ns, pas in namespace.items()
        }
        self._selector = {ns: sorted(pas, key=_tie_order) for ns, pas in selector.items()}
        self.warnings = tuple(warnings)
        self._cache: dict[tuple[str, Labels], MtlsDecision] = {}

    @staticmethod
    def _pick(
        pas: list[PeerAuthentication], level: str, warnings: list[str]
    ) -> PeerAuthentication | None:
        if not pas:
            return None
        ordered = sorted(pas, key=_tie_order)
        if len(ordered) > 1:
            warnings.append(
                f"{len(ordered)} {level} PeerAuthentications "
                f"({', '.join(p.key for p in ordered)}); using {ordered[0].key}"
            )
        return ordered[0]

    def selecting(self, workload: Workload) -> tuple[PeerAuthentication, ...]:
        """The selector policies that select `workload`, the one in force first."""
        labels = dict(workload.labels)
        ns = self.root_namespace if workload.namespace == "" else workload.namespace
        return tuple(p for p in self._selector.get(ns, ()) if selects(p.selector, labels))

    def conflict(self, workload: Workload) -> str | None:
        """A warning when several selector policies select `workload`."""
        chosen = self.selecting(workload)
        if len(chosen) < 2:
            return None
        return (
            f"workload {workload.uid} is selected by {len(chosen)} PeerAuthentications "
            f"({', '.join(p.key for p in chosen)}); using {chosen[0].key}"
        )

    def resolve(self, workload: Workload) -> MtlsDecision:
        cache_key = (workload.namespace, workload.labels)
        found = self._cache.get(cache_key)
        if found is not None:
            return found
        decision = self._resolve(workload)
        self._cache[cache_key] = decision
        return decision

    def _resolve(self, workload: Workload) -> MtlsDecision:
        mode, key = MtlsMode.PERMISSIVE, None
        # Least specific first; a more specific level overrides unless it is UNSET.
        ns = self._namespace.get(workload.namespace)
        for pa in (self._mesh, ns):
            if pa is not None and pa.mode is not MtlsMode.UNSET:
                mode, key = pa.mode, pa.key
        chosen = self.selecting(workload)
        if not chosen:
            return MtlsDecision(mode, key) if key is not None else _PERMISSIVE_DEFAULT
        pa = chosen[0]
        if pa.mode is not MtlsMode.UNSET:
            mode, key = pa.mode, pa.key
        ports = tuple(
            (port, port_mode, pa.key)
            for port, port_mode in pa.port_modes
            if port_mode is not MtlsMode.UNSET
        )
        return MtlsDecision(mode, key, ports)

    def to_json(self) -> list[dict[str, Any]]:
        return [pa.to_json() for pa in self.policies]
