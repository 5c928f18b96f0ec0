"""The tunnel's one immutable Config, parsed from the environment by a pure function.

Every variable name and default is written once, here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshcore import defaults
from meshcore.envconfig import EnvConfigError as EnvConfigError
from meshcore.envconfig import boolean as _bool
from meshcore.envconfig import hbone_limit_names as hbone_limit_names
from meshcore.envconfig import hbone_limits as _hbone_limits
from meshcore.envconfig import integer as _int
from meshcore.envconfig import limits_from_env
from meshcore.envconfig import log_level as _log_level
from meshcore.envconfig import required as _required
from meshcore.envconfig import ttl_seconds as _ttl_seconds
from meshcore.hbone.limits import DEFAULT_LIMITS, HboneLimits
from meshcore.identity.istio_ca import CA_ADDRESS as CA_ADDRESS
from meshcore.identity.istio_ca import CA_ROOT_CERT as CA_ROOT_CERT
from meshcore.identity.istio_ca import CA_TOKEN_PATH as CA_TOKEN_PATH
from meshcore.identity.istio_ca import CaGrpcSettings, parse_ca_source
from meshcore.localtrust import parse_uids
from meshcore.xds.source import XDS_ADDRESS as XDS_ADDRESS
from meshcore.xds.source import XDS_ROOT_CERT as XDS_ROOT_CERT
from meshcore.xds.source import XdsSettings, parse_source
from ztunnel.dns.limits import DnsLimits

NODE_NAME = "NODE_NAME"
LOCAL_XDS_PATH = "LOCAL_XDS_PATH"
ENROLMENT_PATH = "ENROLMENT_PATH"
ZDS_SOCKET = "ZDS_SOCKET"
ZDS_PEER_UIDS = "ZDS_PEER_UIDS"  # the uids the node agent may run as; default: ours
# CA_ADDRESS, CA_TOKEN_PATH, CA_ROOT_CERT: meshcore.identity.istio_ca.parse_ca_source (the
# waypoint reads them the same way).
TRUST_DOMAIN = "TRUST_DOMAIN"
READINESS_PORT = "READINESS_PORT"
LOG_LEVEL = "LOG_LEVEL"
CERT_TTL_SECONDS = "CERT_TTL_SECONDS"
# Istio's name for the same lifetime, a Go duration (24h, 90m); both set must agree.
SECRET_TTL = "SECRET_TTL"
ROOT_NAMESPACE = "ROOT_NAMESPACE"
ADMIN_PORT = "ADMIN_PORT"
METRICS_PORT = "METRICS_PORT"
DRAIN_SECONDS = "DRAIN_SECONDS"
RELEASE_DRAIN_SECONDS = "RELEASE_DRAIN_SECONDS"
SAME_NODE_IN_PROCESS = "SAME_NODE_IN_PROCESS"
# How many processes serve the pods (the owner and TUNNEL_WORKERS - 1 workers); unset or 0:
# chosen from the cores (ztunnel.workers.plan.default_workers).
TUNNEL_WORKERS = "TUNNEL_WORKERS"
MAX_TUNNEL_WORKERS = 64
# The DNS proxy (15053 in each pod), upstream's proxy-metadata name for it; off by default.
# The node agent's capture setting must be on too (AMBIENT_DNS_CAPTURE), or no query
# reaches it.
DNS_CAPTURE = "ISTIO_META_DNS_CAPTURE"
# Where the upstream resolvers are named (upstream ztunnel reads its own /etc/resolv.conf).
DNS_RESOLV_CONF = "DNS_RESOLV_CONF"
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
# Every HboneLimits field is a setting of its own: HBONE_<FIELD IN CAPITALS>
# (meshcore.envconfig.hbone_limits); every DnsLimits field likewise: DNS_PROXY_<FIELD>.
DNS_LIMITS_PREFIX = "DNS_PROXY_"
# Upstream ztunnel's own DNS_PROXY_* settings: not limits, and not refused (a user may carry them
# over; the DNS proxy listens on 127.0.0.1:15053 in each pod here).
UPSTREAM_DNS_PROXY_SETTINGS = ("DNS_PROXY_ADDR",)
DEFAULT_DNS_LIMITS = DnsLimits()

# How long a stopping tunnel lets open connections finish (Kubernetes' default grace).
DEFAULT_DRAIN_SECONDS = 30
# How long a pod leaving the mesh keeps the connections this tunnel carries for it (the node
# agent waits for the answer, and then removes the return path they need).
DEFAULT_RELEASE_DRAIN_SECONDS = 30
DEFAULT_CERT_TTL = 24 * 3600
# Workload certificate lifetime asked of the CA (Istio's SECRET_TTL; the CA may issue less).
# Down to seconds, for rotation tests: refresh comes at half the lifetime left.
MIN_CERT_TTL = 5
MAX_CERT_TTL = 7 * 24 * 3600
MAX_UNIX_PATH = 107  # sun_path holds 108 bytes, the last one a NUL


@dataclass(frozen=True, slots=True)
class Config:
    node_name: str
    # Exactly one of these says where the mesh state comes from: the local file, or a
    # discovery server (XDS_ADDRESS + XDS_ROOT_CERT) pushing delta xDS.
    local_xds_path: Path | None
    # Exactly one of these says where enrolment comes from: the node agent's ZDS socket,
    # or (the local cluster until it runs an agent) an enrolment file.
    enrolment_path: Path | None
    ca_address: Path | None  # the built-in CA's unix socket; None with ca_grpc
    ca_token_path: Path
    trust_domain: str = defaults.TRUST_DOMAIN
    readiness_port: int = defaults.READINESS_PORT
    log_level: str = "info"
    cert_ttl_seconds: int = DEFAULT_CERT_TTL
    root_namespace: str = defaults.ROOT_NAMESPACE
    admin_port: int = defaults.ADMIN_PORT
    metrics_port: int = defaults.METRICS_PORT
    drain_seconds: int = DEFAULT_DRAIN_SECONDS
    release_drain_seconds: int = DEFAULT_RELEASE_DRAIN_SECONDS
    zds_socket: Path | None = None
    zds_peer_uids: frozenset[int] | None = None  # None: the tunnel's own uid
    # Same-node connections go from one pod's proxy to the other's in process, skipping
    # the TLS and HTTP/2 of a hop that starts and ends here; false sends them over HBONE.
    same_node_in_process: bool = True
    # What one HBONE peer may cost (meshcore/hbone/limits.py).
    hbone_limits: HboneLimits = DEFAULT_LIMITS
    xds: XdsSettings | None = None
    # The DNS proxy: on or off, and the resolv.conf naming the resolvers it forwards to.
    dns_capture: bool = False
    dns_limits: DnsLimits = DEFAULT_DNS_LIMITS
    dns_resolv_conf: Path = Path(DEFAULT_RESOLV_CONF)
    # An Istio-compatible CA over gRPC instead of the unix socket (CA_ADDRESS host:port).
    ca_grpc: CaGrpcSettings | None = None
    # TUNNEL_WORKERS as set; 0: not set (the count then comes from the cores at start).
    workers: int = 0


def _enrolment(env: Mapping[str, str]) -> tuple[Path | None, Path | None]:
    """(enrolment file, ZDS socket): exactly one is set."""
    zds = env.get(ZDS_SOCKET, "").strip()
    file = env.get(ENROLMENT_PATH, "").strip()
    if zds and file:
        # Refused rather than silently preferring one: either could be the intended source.
        raise EnvConfigError(f"set either {ZDS_SOCKET} or {ENROLMENT_PATH}, not both")
    if not zds and not file:
        raise EnvConfigError(f"{ZDS_SOCKET} or {ENROLMENT_PATH} must be set")
    if file:
        return Path(file), None
    if len(os.fsencode(zds)) > MAX_UNIX_PATH:
        raise EnvConfigError(
            f"{ZDS_SOCKET}={zds!r} is longer than a unix socket path may be ({MAX_UNIX_PATH} bytes)"
        )
    return None, Path(zds)


def _ca(env: Mapping[str, str]) -> tuple[Path | None, CaGrpcSettings | None, Path]:
    """(unix socket, gRPC settings, token path): exactly one of the first two is set."""
    source = parse_ca_source(env)
    return source.socket, source.grpc, source.token_path


def _uids(env: Mapping[str, str], name: str) -> frozenset[int] | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        return parse_uids(text)
    except ValueError as e:
        raise EnvConfigError(f"{name}={text!r}: {e}") from None


def parse_config(env: Mapping[str, str]) -> Config:
    level = _log_level(env, LOG_LEVEL)
    enrolment_path, zds_socket = _enrolment(env)
    local_xds_path, xds = parse_source(env, LOCAL_XDS_PATH)
    ca_socket, ca_grpc, ca_token_path = _ca(env)
    return Config(
        node_name=_required(env, NODE_NAME),
        local_xds_path=local_xds_path,
        xds=xds,
        enrolment_path=enrolment_path,
        zds_socket=zds_socket,
        zds_peer_uids=_uids(env, ZDS_PEER_UIDS),
        ca_address=ca_socket,
        ca_token_path=ca_token_path,
        ca_grpc=ca_grpc,
        trust_domain=env.get(TRUST_DOMAIN, "").strip() or defaults.TRUST_DOMAIN,
        readiness_port=_int(env, READINESS_PORT, defaults.READINESS_PORT, 1, 65535),
        log_level=level,
        cert_ttl_seconds=_ttl_seconds(
            env, CERT_TTL_SECONDS, SECRET_TTL, DEFAULT_CERT_TTL, MIN_CERT_TTL, MAX_CERT_TTL
        ),
        root_namespace=env.get(ROOT_NAMESPACE, "").strip() or defaults.ROOT_NAMESPACE,
        admin_port=_int(env, ADMIN_PORT, defaults.ADMIN_PORT, 1, 65535),
        metrics_port=_int(env, METRICS_PORT, defaults.METRICS_PORT, 1, 65535),
        drain_seconds=_int(env, DRAIN_SECONDS, DEFAULT_DRAIN_SECONDS, 0, 3600),
        release_drain_seconds=_int(
            env, RELEASE_DRAIN_SECONDS, DEFAULT_RELEASE_DRAIN_SECONDS, 0, 40
        ),
        same_node_in_process=_bool(env, SAME_NODE_IN_PROCESS, True),
        workers=_int(env, TUNNEL_WORKERS, 0, 0, MAX_TUNNEL_WORKERS),
        hbone_limits=_hbone_limits(env),
        dns_capture=_bool(env, DNS_CAPTURE, False),
        dns_limits=limits_from_env(
            env, DNS_LIMITS_PREFIX, DEFAULT_DNS_LIMITS, others=UPSTREAM_DNS_PROXY_SETTINGS
        ),
        dns_resolv_conf=Path(env.get(DNS_RESOLV_CONF, "").strip() or DEFAULT_RESOLV_CONF),
    )
