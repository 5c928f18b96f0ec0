"""Response flags: why a request ended the way it did, in Envoy's short codes (the
`response_flags` metric label and the access log's field). Every flag the waypoint sets is
defined here, once, with Envoy's meaning."""

from __future__ import annotations

import enum
from collections.abc import Iterable


class ResponseFlag(enum.StrEnum):
    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_CONNECTION_FAILURE = "UF"
    UPSTREAM_OVERFLOW = "UO"
    NO_ROUTE = "NR"
    UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
    UPSTREAM_REQUEST_TIMEOUT = "UT"
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"
    UPSTREAM_CONNECTION_TERMINATION = "UC"
    UPSTREAM_PROTOCOL_ERROR = "UPE"
    RBAC_DENIED = "RBAC"
    # The tunnel's word for an L4 denial (istio_tcp_* and ztunnel), for TCP passed through.
    DENY = "DENY"
    FAULT_ABORT = "FI"
    FAULT_DELAY = "DI"
    # Ours, not Envoy's: the waypoint refused the request itself before routing (a request
    # it cannot parse or that exceeds a limit, a destination it does not serve).
    WAYPOINT_REFUSED = "WR"


MEANING: dict[ResponseFlag, str] = {
    ResponseFlag.NO_HEALTHY_UPSTREAM: "no healthy upstream hosts in the upstream cluster",
    ResponseFlag.UPSTREAM_CONNECTION_FAILURE: "upstream connection failure",
    ResponseFlag.UPSTREAM_OVERFLOW: "upstream overflow (circuit breaking)",
    ResponseFlag.NO_ROUTE: "no route configured for the request",
    ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED: "upstream retry limit exceeded",
    ResponseFlag.UPSTREAM_REQUEST_TIMEOUT: "upstream request timeout",
    ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION: "downstream connection termination",
    ResponseFlag.UPSTREAM_CONNECTION_TERMINATION: "upstream connection termination",
    ResponseFlag.UPSTREAM_PROTOCOL_ERROR: "upstream protocol error",
    ResponseFlag.RBAC_DENIED: "request denied by authorization policy (RBAC)",
    ResponseFlag.DENY: "connection denied by authorization policy",
    ResponseFlag.FAULT_ABORT: "request aborted by fault injection",
    ResponseFlag.FAULT_DELAY: "request delayed by fault injection",
    ResponseFlag.WAYPOINT_REFUSED: "refused by the waypoint before routing",
}

NONE = "-"
_ORDER = {flag: i for i, flag in enumerate(ResponseFlag)}


def join_flags(flags: Iterable[ResponseFlag]) -> str:
    """The label value: flags comma-separated in one fixed order, `-` when none (Envoy's
    `%RESPONSE_FLAGS%`), so the same set always gives the same label."""
    unique = sorted(set(flags), key=_ORDER.__getitem__)
    return ",".join(unique) if unique else NONE
