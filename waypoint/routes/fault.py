"""Fault injection (VirtualService `fault`), decided purely: the random numbers are given."""

from __future__ import annotations

from dataclasses import dataclass

# gRPC status names VirtualService's abort.grpcStatus takes.
GRPC_STATUS_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


@dataclass(frozen=True, slots=True)
class Abort:
    """Answer without forwarding: an HTTP status, or for gRPC a 200 with this grpc-status."""

    http_status: int | None = None
    grpc_status: int | None = None


@dataclass(frozen=True, slots=True)
class Fault:
    """Delay and/or abort, each applied to `percent` (0..100) of the requests."""

    delay: float | None = None  # seconds
    delay_percent: float = 100.0
    abort: Abort | None = None
    abort_percent: float = 100.0


def fault_decision(
    fault: Fault | None, rnd_delay: float, rnd_abort: float
) -> tuple[float | None, Abort | None]:
    """(seconds to delay or None, the abort or None) for one request; each rnd is uniform in
    [0, 1). Both may apply: the delay is served first, then the abort (as Envoy does)."""
    if fault is None:
        return None, None
    delay = None
    if fault.delay is not None and rnd_delay * 100.0 < fault.delay_percent:
        delay = fault.delay
    abort = None
    if fault.abort is not None and rnd_abort * 100.0 < fault.abort_percent:
        abort = fault.abort
    return delay, abort
