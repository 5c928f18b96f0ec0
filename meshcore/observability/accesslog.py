"""One access-log line per proxied connection, written when it ends.

`ConnectionLog` is the connection-result guard: whatever path a connection takes, exactly
one line is written, with a default outcome if no path recorded one.

It holds references (addresses, workloads, identities) and renders the line's strings only
when the connection ends: a tunnel keeps one of these per open connection, and a dict of
preformatted strings would cost more than the connection's own state.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import structlog

from meshcore.observability import logging as meshlog
from meshcore.policy.verdict import policy_ref

if TYPE_CHECKING:
    from meshcore.policy.verdict import Verdict
    from meshcore.state import Service, Workload

log = structlog.get_logger("access")


_bound = meshlog.BoundOnce(log)


class Direction(enum.Enum):
    """Which way a proxied connection goes, as the access log and the table say it."""

    OUTBOUND = "outbound"  # from an enrolled pod's app, captured on 15001
    INBOUND = "inbound"  # into an enrolled pod: HBONE on 15008, in process, or plaintext
    # The connection table tells plaintext clients (15006) apart from mesh ones; the
    # access log calls them inbound, as upstream's does.
    INBOUND_PLAINTEXT = "inbound_plaintext"


# The direction as the access log names it.
_LOGGED = {
    d: Direction.INBOUND.value if d is Direction.INBOUND_PLAINTEXT else d.value for d in Direction
}


def _text(value: object) -> str | None:
    return None if value is None else str(value)


class ConnectionLog:
    __slots__ = (
        "_done",
        "direction",
        "dst",
        "dst_identity",
        "dst_workload",
        "hbone",
        "service",
        "src",
        "src_identity",
        "src_workload",
        "start",
        "verdict",
    )

    def __init__(
        self,
        direction: Direction,
        *,
        src: object = None,
        src_workload: Workload | None = None,
        src_identity: object = None,
        dst: object = None,
        hbone: object = None,
        service: Service | None = None,
        dst_workload: Workload | None = None,
        dst_identity: object = None,
    ) -> None:
        self.start = time.monotonic()  # when the connection was accepted
        self._done = False
        self.direction = direction
        self.src = src  # the client's address
        self.src_workload = src_workload
        self.src_identity = src_identity
        self.dst = dst  # where the bytes are delivered (pod IP and port)
        self.hbone = hbone  # the HBONE address (or how the hop was made)
        self.service = service
        self.dst_workload = dst_workload
        self.dst_identity = dst_identity
        # Inbound: the authorization verdict, so the line names the policy that decided.
        self.verdict: Verdict | None = None

    def fields(self) -> dict[str, str | None]:
        """The line's connection fields (absent ones are None)."""
        s, d = self.src_workload, self.dst_workload
        return {
            "direction": _LOGGED[self.direction],
            "src.addr": _text(self.src),
            "src.workload": s.name if s is not None else None,
            "src.namespace": s.namespace if s is not None else None,
            "src.identity": _text(self.src_identity),
            "dst.addr": _text(self.dst),
            "dst.hbone_addr": _text(self.hbone),
            "dst.service": self.service.hostname if self.service is not None else None,
            "dst.workload": d.name if d is not None else None,
            "dst.namespace": d.namespace if d is not None else None,
            "dst.identity": _text(self.dst_identity),
            "authorization_policy": self._policy(),
        }

    def _policy(self) -> str | None:
        """The policy behind an inbound verdict, if one decided."""
        v = self.verdict
        return policy_ref(v.policy, v.rule) if v is not None else None

    def finish(self, sent: int = 0, received: int = 0, error: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        # `fields()` without its absent ones, built in one pass (once per connection).
        s, d = self.src_workload, self.dst_workload
        f: dict[str, object] = {"direction": _LOGGED[self.direction]}
        if self.src is not None:
            f["src.addr"] = str(self.src)
        if s is not None:
            f["src.workload"] = s.name
            f["src.namespace"] = s.namespace
        if self.src_identity is not None:
            f["src.identity"] = str(self.src_identity)
        if self.dst is not None:
            f["dst.addr"] = str(self.dst)
        if self.hbone is not None:
            f["dst.hbone_addr"] = str(self.hbone)
        if self.service is not None:
            f["dst.service"] = self.service.hostname
        if d is not None:
            f["dst.workload"] = d.name
            f["dst.namespace"] = d.namespace
        if self.dst_identity is not None:
            f["dst.identity"] = str(self.dst_identity)
        policy = self._policy()
        if policy is not None:
            f["authorization_policy"] = policy
        f["bytes_sent"] = sent
        f["bytes_recv"] = received
        f["duration"] = f"{(time.monotonic() - self.start) * 1000:.1f}ms"
        if error:
            f["error"] = error
        _bound.info("connection complete", f)
