"""One access-log line per request, as JSON through structlog (the mesh's logging).

`RequestLog` is the request-result guard: the proxy fills it in as the request goes (route,
verdict, upstream host, attempts, status, flags, bytes) and calls `finish` when the
response is done or the request failed; `finish` writes exactly one line, however many
times it is called. Strings are made only when the line is written.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import structlog

from meshcore.identity.spiffe import SpiffeId
from meshcore.observability import logging as meshlog
from meshcore.policy.verdict import policy_ref
from meshcore.state import Service, Workload
from waypoint.authz.decide import L7Verdict
from waypoint.telemetry.flags import ResponseFlag, join_flags

log = structlog.get_logger("access")
_bound = meshlog.BoundOnce(log)


class RequestLog:
    __slots__ = (
        "_done",
        "_start",
        "attempts",
        "authority",
        "bytes_received",
        "bytes_sent",
        "dst_identity",
        "dst_workload",
        "error",
        "flags",
        "method",
        "path",
        "request_id",
        "route",
        "service",
        "src",
        "src_identity",
        "src_workload",
        "status",
        "trace_id",
        "upstream_host",
        "verdict",
    )

    def __init__(
        self,
        *,
        method: str,
        authority: str,
        path: str,
        src: object = None,
        src_identity: SpiffeId | None = None,
        src_workload: Workload | None = None,
        service: Service | None = None,
        request_id: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        self._start = time.monotonic()
        self._done = False
        self.method = method
        self.authority = authority
        self.path = path
        self.src = src  # the client's address
        self.src_identity = src_identity
        self.src_workload = src_workload
        self.service = service
        self.request_id = request_id
        self.trace_id = trace_id
        self.route: str | None = None  # "ns/name" of the route (and rule) that matched
        self.verdict: L7Verdict | None = None
        self.upstream_host: object = None  # the endpoint of the last attempt
        self.dst_workload: Workload | None = None
        self.dst_identity: SpiffeId | None = None
        self.attempts = 0
        self.status = 0  # 0: no response was sent
        self.flags: list[ResponseFlag] = []
        self.bytes_received = 0  # request body bytes from the client
        self.bytes_sent = 0  # response body bytes to the client
        self.error: str | None = None

    def flag(self, *flags: ResponseFlag) -> None:
        self.flags.extend(flags)

    @property
    def response_flags(self) -> str:
        return join_flags(self.flags)

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self._start) * 1000

    def fields(self) -> dict[str, object]:
        """The line's fields, in one pass (once per request); absent ones are left out."""
        out: dict[str, object] = {
            "method": self.method,
            "authority": self.authority,
            "path": self.path,
            "status": self.status,
            "response_flags": self.response_flags,
        }
        if self.upstream_host is not None:
            out["upstream_host"] = str(self.upstream_host)
        out["attempts"] = self.attempts
        out["duration_ms"] = round(self.elapsed_ms(), 3)
        out["bytes_received"] = self.bytes_received
        out["bytes_sent"] = self.bytes_sent
        if self.trace_id is not None:
            out["trace_id"] = self.trace_id
        if self.request_id is not None:
            out["request_id"] = self.request_id
        if self.src is not None:
            out["src.addr"] = str(self.src)
        if self.src_identity is not None:
            out["src.identity"] = str(self.src_identity)
        s, d = self.src_workload, self.dst_workload
        if s is not None:
            out["src.workload"] = s.name
            out["src.namespace"] = s.namespace
        if self.service is not None:
            out["dst.service"] = self.service.hostname
        if d is not None:
            out["dst.workload"] = d.name
            out["dst.namespace"] = d.namespace
        if self.dst_identity is not None:
            out["dst.identity"] = str(self.dst_identity)
        if self.route is not None:
            out["route"] = self.route
        v = self.verdict
        if v is not None:
            if v.policy is not None:
                out["authorization_policy"] = policy_ref(v.policy, v.rule)
            out["authorization"] = "allowed" if v.allowed else "denied"
            if v.audited:
                out["audited"] = list(v.audited)
        if self.error is not None:
            out["error"] = self.error
        return out

    def finish(
        self,
        status: int | None = None,
        flags: Iterable[ResponseFlag] = (),
        error: str | None = None,
    ) -> None:
        """Write the line (once); `status`, `flags` and `error` are the last word on them."""
        if self._done:
            return
        self._done = True
        if status is not None:
            self.status = status
        self.flags.extend(flags)
        if error is not None:
            self.error = error
        _bound.info("request complete", self.fields())

    @property
    def done(self) -> bool:
        return self._done
