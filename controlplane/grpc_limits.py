"""What an unauthenticated or misbehaving peer may cost the control plane's gRPC server
(istiod's 15012: delta xDS and the CA), as grpcio server options (pure).

Any pod can reach 15012 and open TLS connections before proving anything, so connections
and handshakes are bounded and timed out; an accepted connection's streams, messages and
idle time are bounded too. Defaults follow Envoy's edge best practices (100 concurrent
streams per connection, a 10 s request-headers timeout for the handshake, connections idle
for an hour closed; gRPC itself allows 4 MiB messages and 120 s handshakes). Every field is
a setting: the environment variable `CONTROLPLANE_GRPC_<FIELD IN CAPITALS>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshcore.envconfig import limits_from_env

PREFIX = "CONTROLPLANE_GRPC_"


@dataclass(frozen=True, slots=True)
class GrpcLimits:
    # Connections open at once (TLS handshakes included); past it a new one is closed at
    # accept. A proxy holds one (its xDS stream and CA calls share it).
    max_connections: int = 4096
    # From accept to the end of the TLS handshake (gRPC's own default: 120 s).
    handshake_timeout: float = 10.0
    # Streams open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    max_concurrent_streams: int = 100
    # RPCs in progress over the whole server (each xDS stream is one); past it a new one
    # fails RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 256
    # One received message: an xDS request or a CSR is a few KiB.
    max_receive_message_bytes: int = 4 * 1024 * 1024
    # A connection with no RPC open for this long is closed (GOAWAY).
    idle_timeout: float = 3600.0
    # Every connection is closed after this long (GOAWAY, then after the grace period at
    # once), as istiod does (its keepalive MaxServerConnectionAge, 30 min): the client
    # reconnects, and whatever a peer that stopped reading made gRPC hold is freed.
    max_connection_age: float = 1800.0
    max_connection_age_grace: float = 10.0
    # One xDS push the client has not taken (its flow-control window stays shut) for this
    # long: the stream is closed and what it held freed; the client reconnects and gets
    # the current state at once.
    push_timeout: float = 60.0


DEFAULT_GRPC_LIMITS = GrpcLimits()


def grpc_limits(env: Mapping[str, str]) -> GrpcLimits:
    return limits_from_env(env, PREFIX, DEFAULT_GRPC_LIMITS)


def server_options(limits: GrpcLimits) -> list[tuple[str, int]]:
    """The grpcio channel arguments that enforce `limits` (all but the RPC count, which
    is `grpc.aio.server`'s own argument, and the push timeout, which is the xDS server's)."""
    return [
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.server_handshake_timeout_ms", int(limits.handshake_timeout * 1000)),
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        ("grpc.max_receive_message_length", limits.max_receive_message_bytes),
        ("grpc.max_connection_idle_ms", int(limits.idle_timeout * 1000)),
        ("grpc.max_connection_age_ms", int(limits.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(limits.max_connection_age_grace * 1000)),
    ]


def new_server(limits: GrpcLimits = DEFAULT_GRPC_LIMITS) -> Any:
    """A `grpc.aio.Server` with `limits` (grpcio is imported only by who serves gRPC)."""
    import grpc

    return grpc.aio.server(
        options=server_options(limits), maximum_concurrent_rpcs=limits.max_concurrent_rpcs
    )
