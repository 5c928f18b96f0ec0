"""The mesh components' API rights, as the charts grant them: read from each chart's
`files/rbac.yaml` (the one place they are written; the chart's templates render them into its
ClusterRole and Role), and asked whether they allow one API call.

The charts are read from the source checkout (`daemonset/charts`, not part of the installed
package). Pure apart from reading the file: tests compare these rules with the calls the code makes
(and with what an API server's audit log records), so a right the code does not need, or a
call the chart does not allow, shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHARTS_DIR = Path(__file__).resolve().parents[2] / "daemonset" / "charts"
# The charts that grant API rights; the tunnel talks only to istiod and has none.
CHARTS_WITH_RBAC = ("controlplane", "node-agent")


@dataclass(frozen=True, slots=True)
class Rule:
    """One PolicyRule: these verbs on these resources ("pods", "pods/status") of these
    groups ("" is the core group), limited to `resource_names` when any are given."""

    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    resource_names: tuple[str, ...] = ()

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Rule:
        def strings(key: str) -> tuple[str, ...]:
            value = raw.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"rule {dict(raw)}: {key} must be a list of strings")
            return tuple(value)

        unknown = set(raw) - {"apiGroups", "resources", "verbs", "resourceNames"}
        if unknown:
            raise ValueError(f"rule {dict(raw)}: unknown keys {sorted(unknown)}")
        return cls(
            strings("apiGroups"), strings("resources"), strings("verbs"), strings("resourceNames")
        )

    def allows(self, verb: str, group: str, resource: str, name: str | None = None) -> bool:
        """As RBAC decides it: `*` matches any verb, group or resource; a rule with names
        allows only a request for one of those names (never a list, watch or create)."""

        def has(items: tuple[str, ...], item: str) -> bool:
            return "*" in items or item in items

        if not (has(self.verbs, verb) and has(self.api_groups, group)):
            return False
        if not has(self.resources, resource):
            return False
        return not self.resource_names or (name is not None and name in self.resource_names)

    def grants(self) -> set[tuple[str, str, str, str | None]]:
        """Every (verb, group, resource, name or None) this rule names."""
        names: tuple[str | None, ...] = self.resource_names or (None,)
        return {
            (v, g, r, n)
            for v in self.verbs
            for g in self.api_groups
            for r in self.resources
            for n in names
        }


def rules_of(raw: Iterable[Mapping[str, Any]] | None) -> tuple[Rule, ...]:
    return tuple(Rule.of(r) for r in raw or ())


@dataclass(frozen=True, slots=True)
class ComponentRbac:
    """A component's ClusterRole rules and its Role rules (in its own namespace)."""

    cluster: tuple[Rule, ...]
    namespaced: tuple[Rule, ...]

    def allows(
        self,
        verb: str,
        group: str,
        resource: str,
        *,
        namespace: str | None,
        home: str,
        name: str | None = None,
    ) -> bool:
        """Whether the component, installed in namespace `home`, may make this call
        (`namespace` None: a cluster-scoped object or a request across all namespaces)."""
        if any(r.allows(verb, group, resource, name) for r in self.cluster):
            return True
        return namespace == home and any(
            r.allows(verb, group, resource, name) for r in self.namespaced
        )


def parse(text: str) -> ComponentRbac:
    doc = yaml.safe_load(text) or {}
    if not isinstance(doc, dict) or set(doc) - {"clusterRules", "namespaceRules"}:
        raise ValueError("an RBAC file holds clusterRules and namespaceRules, nothing else")
    return ComponentRbac(rules_of(doc.get("clusterRules")), rules_of(doc.get("namespaceRules")))


def load(chart: str, charts_dir: Path = CHARTS_DIR) -> ComponentRbac:
    """The rules `chart` grants (its files/rbac.yaml)."""
    return parse((charts_dir / chart / "files" / "rbac.yaml").read_text(encoding="utf-8"))
