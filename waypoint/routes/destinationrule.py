"""Istio `DestinationRule` documents: connection pool, outlier detection and load balancing
for a service, per port and per subset, with Istio's defaults for what is not given.

A port's or subset's settings replace the service-wide ones field by field (connectionPool,
outlierDetection, loadBalancer), as Istio merges them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from meshcore.reader import Reader, join
from waypoint.routes.document import Meta, each_mapping, read_meta
from waypoint.routes.values import integer, istio_duration, number, one_of, reader

UNLIMITED = 2**32 - 1  # Envoy's "no limit" for the circuit-breaker thresholds


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int = UNLIMITED
    http1_max_pending_requests: int = UNLIMITED
    http2_max_requests: int = UNLIMITED
    max_requests_per_connection: int = 0  # 0: no limit
    max_retries: int = UNLIMITED


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_5xx: int = 5  # 0 disables
    consecutive_gateway_errors: int = 0  # 0 disables
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10


class LbKind(enum.Enum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"  # Istio's default
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"
    CONSISTENT_HASH = "CONSISTENT_HASH"


class HashOn(enum.Enum):
    HEADER = "httpHeaderName"
    COOKIE = "httpCookie"
    SOURCE_IP = "useSourceIp"
    QUERY = "httpQueryParameterName"


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    kind: LbKind = LbKind.LEAST_REQUEST
    hash_on: HashOn | None = None
    hash_name: str = ""  # the header, cookie or query parameter
    ring_size: int = 1024


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    pool: ConnectionPool = ConnectionPool()
    outlier: OutlierPolicy | None = None  # outlier detection is off unless configured
    lb: LoadBalancer = LoadBalancer()


DEFAULT_POLICY = TrafficPolicy()


@dataclass(frozen=True, slots=True)
class _Partial:
    """Settings as written: None where the document says nothing (so merging knows)."""

    pool: ConnectionPool | None = None
    outlier: OutlierPolicy | None = None
    lb: LoadBalancer | None = None

    def over(self, base: TrafficPolicy) -> TrafficPolicy:
        return TrafficPolicy(
            self.pool or base.pool, self.outlier or base.outlier, self.lb or base.lb
        )


@dataclass(frozen=True, slots=True)
class Subset:
    labels: tuple[tuple[str, str], ...]
    policy: _Partial
    ports: Mapping[int, _Partial]


@dataclass(frozen=True, slots=True)
class DestinationRule:
    meta: Meta
    host: str
    policy: _Partial
    ports: Mapping[int, _Partial]
    subsets: Mapping[str, Subset]

    def traffic_policy(self, port: int | None = None, subset: str | None = None) -> TrafficPolicy:
        """The effective policy: service-wide, then the port's, then the subset's, then the
        subset's port's settings, each replacing what it sets."""
        out = self.policy.over(DEFAULT_POLICY)
        if port is not None and port in self.ports:
            out = self.ports[port].over(out)
        chosen = self.subsets.get(subset) if subset is not None else None
        if chosen is not None:
            out = chosen.policy.over(out)
            if port is not None and port in chosen.ports:
                out = chosen.ports[port].over(out)
        return out

    def subset_labels(self, subset: str) -> tuple[tuple[str, str], ...] | None:
        chosen = self.subsets.get(subset)
        return chosen.labels if chosen is not None else None


def parse_destination_rule(doc: Any) -> DestinationRule:
    r = reader()
    meta, spec = read_meta(r, doc, ("DestinationRule",))
    r.check_keys(spec, ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"), "spec")
    if spec.get("workloadSelector") is not None:
        r.fail("spec.workloadSelector", "is not supported by the waypoint")
    r.strings(spec.get("exportTo"), "spec.exportTo")
    host = r.string(spec, "host", "spec")
    policy, ports = _policy(r, spec.get("trafficPolicy"), "spec.trafficPolicy", top=True)
    subsets: dict[str, Subset] = {}
    for at, entry in each_mapping(r, spec.get("subsets"), "spec.subsets", 256):
        r.check_keys(entry, ("name", "labels", "trafficPolicy"), at)
        name = r.string(entry, "name", at)
        if name in subsets:
            r.fail(join(at, "name"), f"subset {name!r} is given twice")
        labels = tuple(sorted(r.string_map(entry.get("labels"), join(at, "labels")).items()))
        sub_policy, sub_ports = _policy(
            r, entry.get("trafficPolicy"), join(at, "trafficPolicy"), top=True
        )
        subsets[name] = Subset(labels, sub_policy, sub_ports)
    return DestinationRule(meta, host, policy, ports, subsets)


def _policy(r: Reader, value: Any, path: str, *, top: bool) -> tuple[_Partial, dict[int, _Partial]]:
    body = r.mapping(value, path)
    keys = ["connectionPool", "outlierDetection", "loadBalancer", "tls", "tunnel", "proxyProtocol"]
    keys.append("portLevelSettings" if top else "port")
    r.check_keys(body, keys, path)
    for key in ("tunnel", "proxyProtocol"):
        if body.get(key) is not None:
            r.fail(join(path, key), "is not supported by the waypoint")
    # `tls` is accepted and has no effect: every hop from the waypoint is HBONE mTLS.
    r.mapping(body.get("tls"), join(path, "tls"))
    partial = _Partial(
        pool=_pool(r, body.get("connectionPool"), join(path, "connectionPool")),
        outlier=_outlier(r, body.get("outlierDetection"), join(path, "outlierDetection")),
        lb=_lb(r, body.get("loadBalancer"), join(path, "loadBalancer")),
    )
    ports: dict[int, _Partial] = {}
    if top:
        for at, entry in each_mapping(
            r, body.get("portLevelSettings"), join(path, "portLevelSettings"), 64
        ):
            ppath = join(at, "port")
            raw_port = r.mapping(entry.get("port"), ppath, required=True)
            r.check_keys(raw_port, ("number",), ppath)
            number_ = r.port(raw_port.get("number"), join(ppath, "number"))
            if number_ in ports:
                r.fail(ppath, f"port {number_} is given twice")
            ports[number_] = _policy(r, entry, at, top=False)[0]
    return partial, ports


def _pool(r: Reader, value: Any, path: str) -> ConnectionPool | None:
    if value is None:
        return None
    body = r.mapping(value, path)
    r.check_keys(body, ("tcp", "http"), path)
    tcp = r.mapping(body.get("tcp"), join(path, "tcp"))
    tpath = join(path, "tcp")
    r.check_keys(
        tcp,
        (
            "maxConnections",
            "connectTimeout",
            "tcpKeepalive",
            "maxConnectionDuration",
            "idleTimeout",
        ),
        tpath,
    )
    http = r.mapping(body.get("http"), join(path, "http"))
    hpath = join(path, "http")
    r.check_keys(
        http,
        (
            "http1MaxPendingRequests",
            "http2MaxRequests",
            "maxRequestsPerConnection",
            "maxRetries",
            "idleTimeout",
            "h2UpgradePolicy",
            "useClientProtocol",
            "maxConcurrentStreams",
        ),
        hpath,
    )
    return ConnectionPool(
        max_connections=integer(r, tcp, "maxConnections", tpath, UNLIMITED, low=1, high=UNLIMITED),
        http1_max_pending_requests=integer(
            r, http, "http1MaxPendingRequests", hpath, UNLIMITED, low=1, high=UNLIMITED
        ),
        http2_max_requests=integer(
            r, http, "http2MaxRequests", hpath, UNLIMITED, low=1, high=UNLIMITED
        ),
        max_requests_per_connection=integer(
            r, http, "maxRequestsPerConnection", hpath, 0, low=0, high=UNLIMITED
        ),
        max_retries=integer(r, http, "maxRetries", hpath, UNLIMITED, low=0, high=UNLIMITED),
    )


def _outlier(r: Reader, value: Any, path: str) -> OutlierPolicy | None:
    if value is None:
        return None
    body = r.mapping(value, path)
    r.check_keys(
        body,
        (
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
            "splitExternalLocalOriginErrors",
            "consecutiveLocalOriginFailures",
            "consecutiveErrors",
        ),
        path,
    )
    d = OutlierPolicy()
    interval, base = d.interval, d.base_ejection_time
    if body.get("interval") is not None:
        interval = istio_duration(r, body["interval"], join(path, "interval"), minimum=0.001)
    if body.get("baseEjectionTime") is not None:
        base = istio_duration(
            r, body["baseEjectionTime"], join(path, "baseEjectionTime"), minimum=0.001
        )
    number(r, body, "minHealthPercent", path, low=0, high=100)
    return OutlierPolicy(
        consecutive_5xx=integer(r, body, "consecutive5xxErrors", path, d.consecutive_5xx, low=0),
        consecutive_gateway_errors=integer(
            r, body, "consecutiveGatewayErrors", path, d.consecutive_gateway_errors, low=0
        ),
        interval=interval,
        base_ejection_time=base,
        max_ejection_percent=integer(
            r, body, "maxEjectionPercent", path, d.max_ejection_percent, low=0, high=100
        ),
    )


def _lb(r: Reader, value: Any, path: str) -> LoadBalancer | None:
    if value is None:
        return None
    body = r.mapping(value, path)
    r.check_keys(
        body,
        ("simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup"),
        path,
    )
    if ("simple" in body) == ("consistentHash" in body):
        r.fail(path, "exactly one of simple or consistentHash is required")
    if "simple" in body:
        kind = one_of(
            r,
            body["simple"],
            join(path, "simple"),
            (
                "UNSPECIFIED",
                "LEAST_CONN",
                *(k.value for k in LbKind if k is not LbKind.CONSISTENT_HASH),
            ),
        )
        if kind in ("UNSPECIFIED", "LEAST_CONN"):  # LEAST_CONN is the deprecated spelling
            kind = "LEAST_REQUEST"
        return LoadBalancer(LbKind(kind))
    hpath = join(path, "consistentHash")
    raw = r.mapping(body["consistentHash"], hpath, required=True)
    r.check_keys(raw, (*(h.value for h in HashOn), "minimumRingSize", "ringHash", "maglev"), hpath)
    given = [h for h in HashOn if raw.get(h.value) is not None]
    if len(given) != 1:
        r.fail(
            hpath,
            "exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName"
            " is required",
        )
    hash_on = given[0]
    name = ""
    if hash_on is HashOn.COOKIE:
        cpath = join(hpath, "httpCookie")
        cookie = r.mapping(raw["httpCookie"], cpath, required=True)
        r.check_keys(cookie, ("name", "path", "ttl"), cpath)
        name = r.string(cookie, "name", cpath)
    elif hash_on is HashOn.SOURCE_IP:
        if not r.boolean(raw, "useSourceIp", hpath, False):
            r.fail(join(hpath, "useSourceIp"), "must be true when given")
    else:
        name = r.string(raw, hash_on.value, hpath)
        if hash_on is HashOn.HEADER:
            name = name.lower()
    ring = integer(r, raw, "minimumRingSize", hpath, 1024, low=1, high=1 << 20)
    return LoadBalancer(LbKind.CONSISTENT_HASH, hash_on, name, ring)


def with_outlier(policy: TrafficPolicy, outlier: OutlierPolicy | None) -> TrafficPolicy:
    return replace(policy, outlier=outlier)
