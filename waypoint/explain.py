"""`explain_request`: what this waypoint would decide for one HTTP request, without sending
anything (pure: it reads a `MeshState`, opens no socket, starts no task).

It asks the very functions the proxy asks, in the proxy's order (`waypoint.router`):
the CONNECT's destination (`destination.resolve`), JWT (`authn`), L7 authorization
(`authz.decide.authorize_request`), the route (`RouteTable.select`), then what forwarding
would use: every weighted backend with its share (the proxy draws one at random per
request, `choose_backend`), the URL and header edits each backend gets, the retry policy
(Istio's default when the route sets none), timeouts, fault, mirrors and each backend's
DestinationRule traffic policy (load balancer, connection pool, outlier detection).

The one read outside the state: a RequestAuthentication's `jwksUri` file, which the
waypoint's own `JwtVerifier` reads when it is built (inline `jwks` needs nothing).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshcore.state import MeshState, Service, Workload
from waypoint.authn.verify import AuthnResult
from waypoint.authz.decide import DENIED_BODY, DENIED_STATUS, L7Verdict, authorize_request
from waypoint.authz.facts import facts_for
from waypoint.destination import Destination, L7Protocol, Me, Refused, resolve
from waypoint.endpoints import service_endpoints
from waypoint.http.message import BufferedBody, Request
from waypoint.l7config import L7Config
from waypoint.routes.destinationrule import TrafficPolicy
from waypoint.routes.facts import RequestFacts
from waypoint.routes.fault import Fault
from waypoint.routes.filters import apply_request
from waypoint.routes.model import (
    Backend,
    Direct,
    Forward,
    HeaderFilter,
    Redirect,
    RouteDecision,
    Timeouts,
)
from waypoint.routes.retry import DEFAULT_RETRY, RetryPolicy

# The label a waypoint's pods carry (Gateway API), naming their Gateway.
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
# The domain a Gateway's Service is named in (as `waypoint.instance.me_of` names it).
DNS_DOMAIN = "cluster.local"


class ExplainError(ValueError):
    """The request or the waypoint to explain cannot be understood (bad input)."""


@dataclass(frozen=True, slots=True)
class HttpProbe:
    """The request to explain: method, origin-form path (query included), authority (Host)
    and headers (names lower-case, repeats kept)."""

    method: str
    path: str
    authority: str
    headers: tuple[tuple[str, str], ...] = ()


def parse_probe(line: str, headers: Sequence[str], default_authority: str) -> HttpProbe:
    """`"GET /path"` (or just `"/path"`, GET) and `"name: value"` headers; a `host` header
    replaces `default_authority`. Bad input raises `ExplainError` with the reason."""
    parts = line.split()
    if len(parts) == 1 and parts[0].startswith("/"):
        parts = ["GET", parts[0]]
    if len(parts) != 2:
        raise ExplainError(f"request {line!r} must be '<METHOD> /<path>', e.g. 'GET /search'")
    method, path = parts[0].upper(), parts[1]
    if not method.isalpha():
        raise ExplainError(f"method {parts[0]!r} is not an HTTP method")
    if not path.startswith("/"):
        raise ExplainError(f"path {path!r} must start with '/'")
    if any(c in path for c in "\r\n\x00"):
        raise ExplainError("the path must not hold control characters")
    authority = default_authority
    out: list[tuple[str, str]] = []
    for h in headers:
        name, sep, value = h.partition(":")
        name = name.strip().lower()
        if not sep or not name or any(c in name for c in " \t\r\n\x00"):
            raise ExplainError(f"header {h!r} must be 'name: value'")
        value = value.strip()
        if any(c in value for c in "\r\n\x00"):
            raise ExplainError(f"header {name!r} must not hold control characters")
        if name == "host":
            authority = value
        else:
            out.append((name, value))
    return HttpProbe(method, path, authority, tuple(out))


def gateway_of(state: MeshState, address: str) -> tuple[str, str]:
    """The (namespace, name) of the waypoint Gateway a binding names, as the tunnel prints
    it (`str(GatewayAddress)`: "ns/name.ns.svc.cluster.local", or an address, with
    ":port" when the HBONE port is not the default)."""
    ip_text = address.rsplit("/", 1)[-1]  # a NetworkAddress prints "network/ip"
    if ip_text.startswith("["):  # "[v6]" or "[v6]:port"
        ip_text = ip_text[1:].split("]", 1)[0]
    elif ip_text.count(":") == 1:  # "v4:port"
        ip_text = ip_text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        ip = None
    if ip is None:
        key = address
        if "/" in key and ":" in key.split("/", 1)[1]:
            key = key.rsplit(":", 1)[0]
        service = state.service_by_key(key) if "/" in key else None
        if service is None:
            raise ExplainError(
                f"waypoint {address!r} is neither a service of the mesh config nor an address"
            )
        return service.namespace, service.name
    for w in state.workloads:
        if ip in w.ips:
            name = dict(w.labels).get(GATEWAY_NAME_LABEL)
            if name:
                return w.namespace, name
            raise ExplainError(f"workload {w.namespace}/{w.name} at {ip} is no waypoint")
    raise ExplainError(f"no workload at {ip} in the mesh config")


def me_for(state: MeshState, namespace: str, name: str) -> Me:
    """The waypoint as bindings name it (as `instance.me_of`), with its pods' IPs."""
    key = f"{namespace}/{name}.{namespace}.svc.{DNS_DOMAIN}"
    ips = frozenset(
        str(ip)
        for w in state.workloads
        if w.namespace == namespace and dict(w.labels).get(GATEWAY_NAME_LABEL) == name
        for ip in w.ips
    )
    return Me(key, ips)


# -- the answer ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendView:
    """One weighted backend of the matched route, as the proxy would use it."""

    backend: Backend
    port: int  # the port the request goes to (the backend's, else the request's)
    share: float  # the fraction of requests it gets (0..1)
    path: str  # after the route's rewrite
    authority: str
    headers: tuple[tuple[str, str], ...]  # after the rule's and the backend's header edits
    policy: TrafficPolicy | None  # None: a pod dialled directly, or an unresolved backend
    endpoints: tuple[str, ...]  # "ns/pod ip:port", the healthy ones the balancer picks from

    def to_json(self) -> dict[str, Any]:
        b = self.backend
        return {
            "service": b.service_key,
            "port": self.port,
            "subset": b.subset,
            "weight": b.weight,
            "share": round(self.share, 4),
            "status": b.status,
            "path": self.path,
            "authority": self.authority,
            "requestHeaders": _filter_json(b.request_headers),
            "responseHeaders": _filter_json(b.response_headers),
            "headers": [list(h) for h in self.headers],
            "trafficPolicy": _policy_json(self.policy) if self.policy is not None else None,
            "endpoints": list(self.endpoints),
        }


@dataclass(frozen=True, slots=True)
class RequestExplanation:
    waypoint: tuple[str, str]  # its Gateway (namespace, name)
    probe: HttpProbe
    authority: str  # the CONNECT authority (the original destination)
    destination: Destination | None
    refused: Refused | None  # the CONNECT is refused: nothing below applies
    authn: AuthnResult | None  # None: no RequestAuthentication applies
    authz: L7Verdict | None  # None: not reached (refused, or JWT rejected)
    policies: tuple[str, ...]  # the AuthorizationPolicies that apply ("ns/name")
    decision: RouteDecision | None
    backends: tuple[BackendView, ...]
    status: int | None  # what the client gets when the waypoint answers itself
    summary: str  # one sentence: the outcome

    @property
    def l7(self) -> bool:
        """Whether the waypoint reads this port as HTTP (else it passes bytes through)."""
        return self.destination is not None and self.destination.protocol is not L7Protocol.TCP

    def to_json(self) -> dict[str, Any]:
        d = self.destination
        out: dict[str, Any] = {
            "waypoint": f"{self.waypoint[0]}/{self.waypoint[1]}",
            "request": {
                "method": self.probe.method,
                "path": self.probe.path,
                "authority": self.probe.authority,
                "headers": [list(h) for h in self.probe.headers],
            },
            "connect": {
                "authority": self.authority,
                "service": d.service.key if d is not None and d.service is not None else None,
                "workload": (
                    f"{d.workload.namespace}/{d.workload.name}"
                    if d is not None and d.workload is not None
                    else None
                ),
                "protocol": d.protocol.value if d is not None else None,
                "refused": (
                    {"status": self.refused.status, "reason": self.refused.reason}
                    if self.refused is not None
                    else None
                ),
            },
            "l7": self.l7,
            "authentication": (
                {
                    "ok": self.authn.ok,
                    "reason": self.authn.reason,
                    "principal": self.authn.principal,
                }
                if self.authn is not None
                else None
            ),
            "authorization": (
                {**self.authz.to_json(), "policies": list(self.policies)}
                if self.authz is not None
                else None
            ),
            "status": self.status,
            "summary": self.summary,
        }
        out["route"] = _decision_json(self.decision) if self.decision is not None else None
        out["backends"] = [b.to_json() for b in self.backends]
        return out


def _filter_json(f: HeaderFilter) -> dict[str, Any] | None:
    if not f:
        return None
    return {
        "set": [list(h) for h in f.set],
        "add": [list(h) for h in f.add],
        "remove": list(f.remove),
    }


def _policy_json(p: TrafficPolicy) -> dict[str, Any]:
    lb: dict[str, Any] = {"kind": p.lb.kind.value}
    if p.lb.hash_on is not None:
        lb["hashOn"] = p.lb.hash_on.value
        lb["hashName"] = p.lb.hash_name
    pool = p.pool
    return {
        "loadBalancer": lb,
        "connectionPool": {
            "maxConnections": pool.max_connections,
            "http1MaxPendingRequests": pool.http1_max_pending_requests,
            "http2MaxRequests": pool.http2_max_requests,
            "maxRequestsPerConnection": pool.max_requests_per_connection,
            "maxRetries": pool.max_retries,
        },
        "outlierDetection": (
            {
                "consecutive5xxErrors": p.outlier.consecutive_5xx,
                "consecutiveGatewayErrors": p.outlier.consecutive_gateway_errors,
                "interval": p.outlier.interval,
                "baseEjectionTime": p.outlier.base_ejection_time,
                "maxEjectionPercent": p.outlier.max_ejection_percent,
            }
            if p.outlier is not None
            else None
        ),
    }


def _retry_json(r: RetryPolicy) -> dict[str, Any]:
    return {
        "default": r == DEFAULT_RETRY,
        "attempts": r.attempts,
        "retryOn": sorted(r.retry_on),
        "codes": sorted(r.codes),
        "perTryTimeout": r.per_try_timeout,
    }


def _timeouts_json(t: Timeouts) -> dict[str, Any]:
    return {"request": t.request, "backendRequest": t.backend_request}


def _fault_json(f: Fault | None) -> dict[str, Any] | None:
    if f is None:
        return None
    abort = None
    if f.abort is not None:
        abort = {
            "httpStatus": f.abort.http_status,
            "grpcStatus": f.abort.grpc_status,
            "percent": f.abort_percent,
        }
    delay = {"seconds": f.delay, "percent": f.delay_percent} if f.delay is not None else None
    return {"delay": delay, "abort": abort}


def _decision_json(decision: RouteDecision) -> dict[str, Any]:
    action = decision.action
    out: dict[str, Any] = {
        "matched": str(decision.route) if decision.route is not None else None,
        "default": decision.route is None,
    }
    if isinstance(action, Redirect):
        out["action"] = "redirect"
        out["redirect"] = {"status": action.status, "location": action.location}
    elif isinstance(action, Direct):
        out["action"] = "direct"
        out["direct"] = {"status": action.status, "body": action.body}
    else:
        out["action"] = "forward"
        rewrite = action.rewrite
        out["requestHeaders"] = _filter_json(action.request_headers)
        out["responseHeaders"] = _filter_json(action.response_headers)
        out["rewrite"] = (
            {
                "hostname": rewrite.hostname,
                "path": (
                    {"kind": rewrite.path.kind.value, "value": rewrite.path.value}
                    if rewrite.path is not None
                    else None
                ),
            }
            if rewrite is not None
            else None
        )
        out["mirrors"] = [
            {"service": m.service_key, "port": m.port, "percent": m.percent} for m in action.mirrors
        ]
        out["retry"] = _retry_json(action.retry)
        out["timeouts"] = _timeouts_json(action.timeouts)
        out["fault"] = _fault_json(action.fault)
    return out


# -- the decision ------------------------------------------------------------------------------


def explain_request(
    state: MeshState,
    waypoint: tuple[str, str],
    authority: str,
    probe: HttpProbe,
    source: Workload | None = None,
    network: str = "",
) -> RequestExplanation:
    """What waypoint `waypoint` (its Gateway's namespace and name) would do with `probe`
    arriving in a CONNECT to `authority` (the original destination "ip:port", as the
    client's tunnel sends it) from `source` (its identity and IP; None: unknown)."""
    namespace, name = waypoint
    cfg = L7Config.build(state, namespace, name)
    found = resolve(state, network, me_for(state, namespace, name), authority)

    def answer(**kw: Any) -> RequestExplanation:
        fields: dict[str, Any] = {
            "waypoint": waypoint,
            "probe": probe,
            "authority": authority,
            "destination": None,
            "refused": None,
            "authn": None,
            "authz": None,
            "policies": (),
            "decision": None,
            "backends": (),
            "status": None,
        }
        fields.update(kw)
        return RequestExplanation(**fields)

    if isinstance(found, Refused):
        return answer(
            refused=found,
            status=found.status,
            summary=f"the waypoint refuses the CONNECT ({found.status}): {found.reason}",
        )
    dest = found
    if dest.protocol is L7Protocol.TCP:
        return answer(
            destination=dest,
            summary=f"port {dest.port} is not declared HTTP: the waypoint passes the bytes "
            "through as TCP, no HTTP route or L7 policy applies",
        )
    request = Request(
        probe.method, probe.authority, probe.path, list(probe.headers), BufferedBody()
    )
    applies = cfg.for_destination(dest.service)
    # 1. JWT.
    authn: AuthnResult | None = None
    principal = None
    claims = None
    if applies.verifier.active:
        authn = applies.verifier.authenticate(request)
        if not authn.ok:
            return answer(
                destination=dest,
                authn=authn,
                status=401,
                summary=f"401: the JWT is refused: {authn.reason}",
            )
        authn.apply_to(request)
        principal, claims = authn.principal, authn.claims
    # 2. Authorization.
    policies = tuple(p.key for p in applies.policies)
    source_ip = (
        source.ips[0] if source is not None and source.ips else ipaddress.ip_address("0.0.0.0")
    )
    facts = facts_for(
        request,
        source_identity=source.identity if source is not None else None,
        source_ip=source_ip,
        destination_ip=ipaddress.ip_address(dest.ip),
        destination_port=dest.port,
        destination_service=dest.service.hostname if dest.service is not None else None,
        request_principal=principal,
        claims=claims,
    )
    verdict = authorize_request(applies.policies, facts)
    # 3. The route (shown even when denied: "which route would it have taken" is the next
    # question).
    route_facts = RequestFacts(
        method=request.method,
        path=request.path,
        headers=tuple(request.headers),
        authority=request.authority,
        is_grpc=(request.header("content-type") or "").startswith("application/grpc"),
        source_namespace=source.namespace if source is not None else None,
        source_ip=str(source_ip) if source is not None else None,
    )
    service_key = dest.service.key if dest.service is not None else None
    decision = cfg.routes.select(service_key, dest.port, route_facts)
    backends = _backends(state, cfg, dest, decision, request)
    common = {
        "destination": dest,
        "authn": authn,
        "authz": verdict,
        "policies": policies,
        "decision": decision,
        "backends": backends,
    }
    if not verdict.allowed:
        return answer(
            **common,
            status=DENIED_STATUS,
            summary=f"{DENIED_STATUS} {DENIED_BODY}: {verdict.reason}",
        )
    action = decision.action
    if isinstance(action, Redirect):
        return answer(
            **common, status=action.status, summary=f"{action.status} redirect to {action.location}"
        )
    if isinstance(action, Direct):
        what = action.body or "answered by the waypoint"
        return answer(**common, status=action.status, summary=f"{action.status}: {what}")
    usable = [b for b in backends if b.backend.status is None and b.share > 0]
    if not usable and backends:
        status = backends[0].backend.status or 500
        return answer(**common, status=status, summary=f"{status}: no backend for this route")
    where = ", ".join(_backend_name(b) for b in usable)
    return answer(**common, summary=f"forwarded to {where}")


def _backend_name(b: BackendView) -> str:
    target = b.backend.service_key or "the pod dialled"
    text = f"{target}:{b.port}"
    if b.backend.subset:
        text += f" (subset {b.backend.subset})"
    if b.share < 1:
        text += f" {b.share:.0%}"
    return text


def _backends(
    state: MeshState, cfg: L7Config, dest: Destination, decision: RouteDecision, request: Request
) -> tuple[BackendView, ...]:
    action = decision.action
    if not isinstance(action, Forward):
        return ()
    total = sum(b.weight for b in action.backends)
    out = []
    for b in action.backends:
        port = b.port or dest.port
        path, authority, headers = apply_request(
            action, b, request.path, request.authority, request.headers
        )
        share = b.weight / total if total > 0 else (1.0 if b is action.backends[0] else 0.0)
        policy: TrafficPolicy | None = None
        endpoints: tuple[str, ...] = ()
        service: Service | None = None
        if b.service_key is not None:
            service = state.service_by_key(b.service_key)
        if service is not None:
            policy = cfg.routes.traffic_policy(service.key, port, b.subset)
            found = service_endpoints(state, service, port)
            if b.subset is not None:
                labels = cfg.routes.subset_labels(service.key, b.subset) or ()
                found = tuple(e for e in found if _has_labels(e.workload, labels))
            endpoints = tuple(
                f"{e.workload.namespace}/{e.workload.name} {e.address}" for e in found
            )
        elif b.service_key is None and b.status is None and dest.workload is not None:
            w = dest.workload
            endpoints = (f"{w.namespace}/{w.name} {dest.authority}",)
        out.append(BackendView(b, port, share, path, authority, tuple(headers), policy, endpoints))
    return tuple(out)


def _has_labels(workload: Workload, labels: tuple[tuple[str, str], ...]) -> bool:
    have = dict(workload.labels)
    return all(have.get(k) == v for k, v in labels)
