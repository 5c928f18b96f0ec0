"""Outlier detection (DestinationRule outlierDetection), pure: time is an argument.

Per endpoint: consecutive 5xx answers (or consecutive gateway errors: 502, 503, 504 and
connection failures) reaching the limit eject it for baseEjectionTime x the times it has
been ejected; it comes back once that time has passed. At most maxEjectionPercent of the
endpoints are ejected at once (counting the one about to be). Each healthy `interval`
forgives one past ejection. An endpoint's state is `HostState` with its allowed steps in one
table.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from waypoint.routes.destinationrule import OutlierPolicy

# Envoy caps an ejection at max_ejection_time (300 s by default; Istio does not set it).
MAX_EJECTION_TIME = 300.0
GATEWAY_ERRORS = frozenset({502, 503, 504})


class HostState(enum.Enum):
    HEALTHY = "healthy"
    EJECTED = "ejected"


class HostEvent(enum.Enum):
    EJECT = "eject"
    RETURN = "return"


_STEPS: dict[tuple[HostState, HostEvent], HostState] = {
    (HostState.HEALTHY, HostEvent.EJECT): HostState.EJECTED,
    (HostState.EJECTED, HostEvent.RETURN): HostState.HEALTHY,
}


def step(state: HostState, event: HostEvent) -> HostState:
    try:
        return _STEPS[(state, event)]
    except KeyError:
        raise ValueError(f"an endpoint cannot {event.value} when {state.value}") from None


@dataclass(slots=True)
class _Host:
    state: HostState = HostState.HEALTHY
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    times_ejected: int = 0
    ejected_until: float = 0.0


class OutlierDetector:
    """The outlier state of one service's endpoints."""

    __slots__ = ("_hosts", "policy")

    def __init__(self, policy: OutlierPolicy, endpoints: Iterable[str] = ()) -> None:
        self.policy = policy
        self._hosts: dict[str, _Host] = {e: _Host() for e in endpoints}

    def set_endpoints(self, endpoints: Iterable[str]) -> None:
        """The current endpoints: new ones start healthy, gone ones are forgotten."""
        wanted = set(endpoints)
        self._hosts = {e: self._hosts.get(e) or _Host() for e in wanted}

    def record(self, endpoint: str, outcome: int | None, now: float) -> bool:
        """One answer from `endpoint`: an HTTP status, or None when it could not be reached.
        Returns True if this ejected it."""
        host = self._hosts.setdefault(endpoint, _Host())
        self._return_due(now)
        if outcome is not None and outcome < 500:
            host.consecutive_5xx = host.consecutive_gateway = 0
            return False
        host.consecutive_5xx += 1
        if outcome is None or outcome in GATEWAY_ERRORS:
            host.consecutive_gateway += 1
        else:
            host.consecutive_gateway = 0
        p = self.policy
        tripped = (p.consecutive_5xx > 0 and host.consecutive_5xx >= p.consecutive_5xx) or (
            p.consecutive_gateway_errors > 0
            and host.consecutive_gateway >= p.consecutive_gateway_errors
        )
        if not tripped or host.state is HostState.EJECTED or not self._may_eject():
            return False
        host.state = step(host.state, HostEvent.EJECT)
        host.times_ejected += 1
        host.ejected_until = now + min(
            p.base_ejection_time * host.times_ejected, max(MAX_EJECTION_TIME, p.base_ejection_time)
        )
        host.consecutive_5xx = host.consecutive_gateway = 0
        return True

    def _may_eject(self) -> bool:
        ejected = sum(1 for h in self._hosts.values() if h.state is HostState.EJECTED)
        return 100.0 * (ejected + 1) / len(self._hosts) <= self.policy.max_ejection_percent

    def _return_due(self, now: float) -> None:
        for host in self._hosts.values():
            if host.state is HostState.EJECTED and now >= host.ejected_until:
                host.state = step(host.state, HostEvent.RETURN)

    def sweep(self, now: float) -> None:
        """Every `interval`: endpoints whose time is up return; each healthy endpoint's count
        of past ejections goes down by one, so an endpoint that recovered is forgiven."""
        for host in self._hosts.values():
            if host.state is HostState.HEALTHY and host.times_ejected > 0:
                host.times_ejected -= 1
        self._return_due(now)

    def state(self, endpoint: str, now: float) -> HostState:
        self._return_due(now)
        host = self._hosts.get(endpoint)
        return host.state if host is not None else HostState.HEALTHY

    def healthy(self, endpoints: Iterable[str], now: float) -> list[str]:
        """`endpoints` without the ejected ones."""
        self._return_due(now)
        return [
            e
            for e in endpoints
            if (h := self._hosts.get(e)) is None or h.state is HostState.HEALTHY
        ]
