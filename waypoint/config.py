"""The waypoint's one immutable configuration, parsed from its environment (pure).

Every variable name and default is written here once. The local cluster sets them when it
starts a waypoint pod; on Kubernetes the waypoint's Deployment does.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshcore import defaults
from meshcore.envconfig import (
    EnvConfigError,
    boolean,
    hbone_limits,
    integer,
    limits_from_env,
    log_level,
    required,
    seconds,
    ttl_seconds,
)
from meshcore.hbone.limits import DEFAULT_LIMITS, HboneLimits
from meshcore.identity.istio_ca import CA_ADDRESS as CA_ADDRESS
from meshcore.identity.istio_ca import CA_TOKEN_PATH as CA_TOKEN_PATH
from meshcore.identity.istio_ca import CaGrpcSettings, parse_ca_source
from meshcore.xds.source import XdsSettings, parse_source
from waypoint.http.h1 import DEFAULT_LIMITS as DEFAULT_HTTP1_LIMITS
from waypoint.http.h1 import Http1Limits
from waypoint.http.h2base import DEFAULT_H2_LIMITS, Http2Limits

NODE_NAME = "NODE_NAME"
LOCAL_XDS_PATH = "LOCAL_XDS_PATH"
# CA_ADDRESS (the CA socket's path, or host:port of a gRPC CA such as istiod's 15012),
# CA_TOKEN_PATH and CA_ROOT_CERT: read by meshcore.identity.istio_ca.parse_ca_source.
TRUST_DOMAIN = "TRUST_DOMAIN"
WAYPOINT_NAME = "WAYPOINT_NAME"
POD_NAMESPACE = "POD_NAMESPACE"
SERVICE_ACCOUNT = "SERVICE_ACCOUNT"
POD_IP = "POD_IP"
LOG_LEVEL = "LOG_LEVEL"
OTLP_ENDPOINT = "OTLP_ENDPOINT"
READINESS_PORT = "READINESS_PORT"
METRICS_PORT = "METRICS_PORT"
ADMIN_PORT = "ADMIN_PORT"
CERT_TTL_SECONDS = "CERT_TTL_SECONDS"
# Istio's name for the same lifetime, a Go duration (24h, 90m); both set must agree.
SECRET_TTL = "SECRET_TTL"
DRAIN_SECONDS = "DRAIN_SECONDS"
SNIFF_TIMEOUT = "SNIFF_TIMEOUT"
ACCESS_LOG = "ACCESS_LOG"
HTTP1_PREFIX = "WAYPOINT_HTTP1_"
HTTP2_PREFIX = "WAYPOINT_HTTP2_"

DEFAULT_CERT_TTL = 24 * 3600
MIN_CERT_TTL = 60
MAX_CERT_TTL = 7 * 24 * 3600
DEFAULT_DRAIN_SECONDS = 5
# How long an undeclared port waits for the client's first bytes before treating the
# connection as TCP: a server-first protocol (MySQL, SMTP) sends nothing until the server
# greets it, so waiting longer only delays its greeting.
DEFAULT_SNIFF_TIMEOUT = 0.2
# Upstream Envoy waypoints: 100 concurrent streams per HBONE connection.
WAYPOINT_LIMITS = dataclasses.replace(DEFAULT_LIMITS, max_concurrent_streams=100)


@dataclass(frozen=True, slots=True)
class WaypointConfig:
    name: str  # the Gateway's name
    namespace: str
    node_name: str
    pod_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    # Exactly one source of mesh state: the local file, or a discovery server (XDS_ADDRESS +
    # XDS_ROOT_CERT) that pushes routes, policies and endpoints.
    local_xds_path: Path | None
    ca_address: Path | None  # the CA socket; None with a gRPC CA (`ca_grpc`)
    ca_token_path: Path
    service_account: str = ""  # "" = the Gateway's name, as istiod's deployment does
    trust_domain: str = defaults.TRUST_DOMAIN
    log_level: str = "info"
    otlp_endpoint: str | None = None
    readiness_port: int = defaults.READINESS_PORT
    metrics_port: int = defaults.METRICS_PORT
    admin_port: int = defaults.ADMIN_PORT
    hbone_port: int = defaults.HBONE_PORT
    cert_ttl_seconds: int = DEFAULT_CERT_TTL
    drain_seconds: int = DEFAULT_DRAIN_SECONDS
    sniff_timeout: float = DEFAULT_SNIFF_TIMEOUT
    access_log: bool = True
    hbone_limits: HboneLimits = WAYPOINT_LIMITS
    # The HTTP/1.1 and HTTP/2 servers inside each HBONE stream: WAYPOINT_HTTP1_<FIELD>,
    # WAYPOINT_HTTP2_<FIELD> (waypoint/http/h1.py, h2base.py).
    http1_limits: Http1Limits = DEFAULT_HTTP1_LIMITS
    http2_limits: Http2Limits = DEFAULT_H2_LIMITS
    xds: XdsSettings | None = None
    ca_grpc: CaGrpcSettings | None = None

    @property
    def account(self) -> str:
        return self.service_account or self.name


def _otlp(env: Mapping[str, str]) -> str | None:
    raw = env.get(OTLP_ENDPOINT, "").strip()
    if not raw:
        return None
    if not raw.startswith("http://"):
        raise EnvConfigError(f"{OTLP_ENDPOINT}={raw!r} must be an http:// URL (OTLP/HTTP)")
    return raw.rstrip("/")


def parse_config(env: Mapping[str, str]) -> WaypointConfig:
    raw_ip = required(env, POD_IP)
    try:
        pod_ip = ipaddress.ip_address(raw_ip)
    except ValueError:
        raise EnvConfigError(f"{POD_IP}={raw_ip!r} is not an IP address") from None
    local_xds_path, xds = parse_source(env, LOCAL_XDS_PATH)
    ca = parse_ca_source(env)
    return WaypointConfig(
        name=required(env, WAYPOINT_NAME),
        namespace=required(env, POD_NAMESPACE),
        node_name=required(env, NODE_NAME),
        pod_ip=pod_ip,
        local_xds_path=local_xds_path,
        xds=xds,
        ca_address=ca.socket,
        ca_token_path=ca.token_path,
        ca_grpc=ca.grpc,
        service_account=env.get(SERVICE_ACCOUNT, "").strip(),
        trust_domain=env.get(TRUST_DOMAIN, "").strip() or defaults.TRUST_DOMAIN,
        log_level=log_level(env, LOG_LEVEL),
        otlp_endpoint=_otlp(env),
        readiness_port=integer(env, READINESS_PORT, defaults.READINESS_PORT, 1, 65535),
        metrics_port=integer(env, METRICS_PORT, defaults.METRICS_PORT, 1, 65535),
        admin_port=integer(env, ADMIN_PORT, defaults.ADMIN_PORT, 1, 65535),
        cert_ttl_seconds=ttl_seconds(
            env, CERT_TTL_SECONDS, SECRET_TTL, DEFAULT_CERT_TTL, MIN_CERT_TTL, MAX_CERT_TTL
        ),
        drain_seconds=integer(env, DRAIN_SECONDS, DEFAULT_DRAIN_SECONDS, 0, 3600),
        sniff_timeout=seconds(env, SNIFF_TIMEOUT, DEFAULT_SNIFF_TIMEOUT, 0.01, 5.0),
        access_log=boolean(env, ACCESS_LOG, True),
        hbone_limits=hbone_limits(env, WAYPOINT_LIMITS),
        http1_limits=limits_from_env(env, HTTP1_PREFIX, DEFAULT_HTTP1_LIMITS),
        http2_limits=limits_from_env(env, HTTP2_PREFIX, DEFAULT_H2_LIMITS),
    )
