"""What `ambientctl routes` shows for each routing document: accepted or not, and why."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Condition:
    """A Kubernetes-style condition (`Accepted`, `ResolvedRefs`) with the Gateway API's
    reasons; `parent` names the parentRef it is about (routes report per parent)."""

    type: str
    status: bool
    reason: str
    message: str = ""
    parent: str | None = None


@dataclass(frozen=True, slots=True)
class ResourceStatus:
    kind: str
    namespace: str
    name: str
    conditions: tuple[Condition, ...]
    errors: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return not self.errors and all(c.status for c in self.conditions if c.type == "Accepted")
