"""The waypoint's L7 features for real: every request goes from a client pod on n1 through
its node's tunnel, the waypoint (`python -m waypoint`, on n1), the servers' tunnel on n2 to
the app (tests/e2e/l7app.py), in the cluster of waypoint_l7.yaml. The module applies one
waypoint and all its L7 resources once (`ambientctl apply -f`'s function) and every test
reads what the app received, what the client got and the waypoint's access-log lines.

Every load loop is bounded in count and in time.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import nsutil
from localcluster import gateways as gw
from localcluster import mesh, waypoints
from localcluster.processes import read_records

from .common import pod_ip, tunnel_log, vip

pytestmark = pytest.mark.netns

HERE = Path(__file__).parent
CLUSTER_FILE = HERE / "waypoint_l7.yaml"
NS = "l7"
WAYPOINT = "waypoint"
ISSUER = "https://issuer.e2e.test"
OTLP_PORT = 4318
STEP_TIMEOUT = 20.0  # any single wait in this module


# ---- a keep-alive HTTP/1.1 client inside a pod ----------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def info(self) -> dict[str, Any]:
        """The app's JSON account of the request it received."""
        doc = json.loads(self.body)
        assert isinstance(doc, dict), doc
        return doc


class _PodConnection(http.client.HTTPConnection):
    """http.client over a socket made in a pod's netns (unmarked: its tunnel captures it)."""

    def __init__(self, netns: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns = netns

    def connect(self) -> None:
        s = nsutil.socket_at(self._netns)
        s.settimeout(self.timeout)
        try:
            s.connect((self.host, self.port))
        except BaseException:
            s.close()
            raise
        self.sock = s


class PodClient:
    """One keep-alive connection from a pod to `host:port`, reopened when the server closes
    it (as a browser does); an error closes it and is raised."""

    def __init__(self, c: mesh.Cluster, pod: str, host: str, port: int = 80, ns: str = NS):
        self.conn = _PodConnection(c.pod_netns(ns, pod), host, port, timeout=15.0)

    def request(
        self, path: str, method: str = "GET", headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Reply:  # fmt: skip
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            r = self.conn.getresponse()
            data = r.read()
        except BaseException:
            self.conn.close()
            raise
        if r.will_close:
            self.conn.close()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, data)

    def close(self) -> None:
        self.conn.close()


@contextlib.contextmanager
def client(
    c: mesh.Cluster, host: str, pod: str = "client", ns: str = NS, port: int = 80
) -> Iterator[PodClient]:
    pc = PodClient(c, pod, host, port, ns)
    try:
        yield pc
    finally:
        pc.close()


def attempt(
    c: mesh.Cluster, host: str, path: str, pod: str = "client", ns: str = NS, port: int = 80
) -> Reply | OSError:
    """One request on a new connection: the reply, or the error that ended it."""
    try:
        with client(c, host, pod, ns, port) as pc:
            return pc.request(path)
    except OSError as e:
        return e


# ---- an OTLP/HTTP receiver in a pod outside the mesh ---------------------------------------


@dataclass
class SpanSeen:
    trace_id: str
    span_id: str
    parent: str
    name: str
    kind: int


@dataclass
class Collector:
    """Accepts OTLP/HTTP protobuf POSTs on a socket in the collector pod; keeps the spans."""

    sock: socket.socket
    spans: list[SpanSeen] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError, ValueError):
                    self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        while True:  # keep-alive: one request after another until the exporter closes
            line = f.readline(8192)
            if not line:
                return
            length = 0
            while (h := f.readline(8192)) not in (b"\r\n", b"\n", b""):
                k, _, v = h.decode("latin-1").partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            body = f.read(length) if length else b""
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            with self.lock:
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            self.spans.append(
                                SpanSeen(s.trace_id.hex(), s.span_id.hex(),
                                         s.parent_span_id.hex(), s.name, s.kind)
                            )  # fmt: skip
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\n"
                b"content-length: 0\r\n\r\n"
            )

    def of_trace(self, trace_id: str) -> list[SpanSeen]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


# ---- the module's cluster, waypoint and resources -------------------------------------------


@dataclass
class L7:
    c: mesh.Cluster
    gateway: gw.GatewaySpec
    collector: Collector
    key: rsa.RSAPrivateKey

    @property
    def log_path(self) -> Path:
        return self.c.state.log_dir / f"{waypoints.process_name(self.gateway)}.log"

    def waypoint_ip(self) -> str:
        return str(self.gateway.placed().ip)

    def access_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == "request complete":
                    out.append(doc)
        return out

    def access_line(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The access-log line `pred` picks, waited for: it is written once the response is."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            found = [d for d in self.access_lines() if pred(d)]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no access-log line as expected in {self.log_path}")
            time.sleep(0.05)

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "sub": "alice", "iat": now, "exp": now + 600, **claims}
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": "e2e"})


def host(name: str) -> str:
    return f"{name}.{NS}.svc.cluster.local"


def b64url(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def resources(key: rsa.RSAPrivateKey) -> list[dict[str, Any]]:
    pub = key.public_key().public_numbers()
    jwks = {"keys": [{"kty": "RSA", "kid": "e2e", "alg": "RS256", "use": "sig",
                      "n": b64url(pub.n), "e": b64url(pub.e)}]}  # fmt: skip
    web = [{"group": "", "kind": "Service", "name": "web"}]

    def backend(name: str, weight: int = 1) -> dict[str, Any]:
        return {"name": name, "port": 80, "weight": weight}

    def prefix(p: str) -> dict[str, Any]:
        return {"type": "PathPrefix", "value": p}

    rules: list[dict[str, Any]] = [
        {"matches": [{"path": {"type": "Exact", "value": "/split"}}],
         "backendRefs": [backend("web-v1", 3), backend("web-v2", 1)]},
        {"matches": [{"path": prefix("/m"), "headers": [{"name": "x-variant", "value": "two"}]}],
         "backendRefs": [backend("web-v2")]},
        {"matches": [{"path": prefix("/m"), "queryParams": [{"name": "v", "value": "2"}]}],
         "backendRefs": [backend("web-v2")]},
        {"matches": [{"path": prefix("/m"), "method": "POST"}],
         "backendRefs": [backend("web-v2")]},
        {"matches": [{"path": {"type": "RegularExpression", "value": "/re/[0-9]+"}}],
         "backendRefs": [backend("web-v2")]},
        {"matches": [{"path": {"type": "Exact", "value": "/old"}}],
         "filters": [{"type": "RequestRedirect",
                      "requestRedirect": {"path": {"type": "ReplaceFullPath",
                                                   "replaceFullPath": "/new"},
                                          "statusCode": 301}}]},
        {"matches": [{"path": prefix("/api")}],
         "filters": [
             {"type": "URLRewrite",
              "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                                      "replacePrefixMatch": "/internal"}}},
             {"type": "RequestHeaderModifier",
              "requestHeaderModifier": {"set": [{"name": "x-canary", "value": "yes"}],
                                        "add": [{"name": "x-added", "value": "1"}],
                                        "remove": ["x-secret"]}},
             {"type": "ResponseHeaderModifier",
              "responseHeaderModifier": {"add": [{"name": "x-route", "value": "api"}],
                                         "remove": ["x-app-internal"]}},
         ],
         "backendRefs": [backend("web-v1")]},
        {"matches": [{"path": prefix("/delay")}], "timeouts": {"request": "300ms"},
         "backendRefs": [backend("web-v1")]},
        # The default is a regex too: Istio orders every prefix (even "/") before any regex,
        # then longer regexes first, so "/re/[0-9]+" is tried before this one.
        {"matches": [{"path": {"type": "RegularExpression", "value": "/.*"}}],
         "backendRefs": [backend("web-v1")]},
    ]  # fmt: skip
    retry = {"retryOn": "reset,connect-failure"}
    return [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
         "metadata": {"name": "web-routes", "namespace": NS},
         "spec": {"parentRefs": web, "rules": rules}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
         "metadata": {"name": "flaky", "namespace": NS},
         "spec": {"hosts": [host("flaky")], "http": [
             {"match": [{"uri": {"prefix": "/reset"}}],
              "route": [{"destination": {"host": host("flaky")}}],
              "retries": {"attempts": 2, **retry}},
             {"route": [{"destination": {"host": host("flaky")}}],
              "retries": {"attempts": 3, **retry}}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
         "metadata": {"name": "faulty", "namespace": NS},
         "spec": {"hosts": [host("faulty")], "http": [
             {"match": [{"uri": {"prefix": "/abort"}}],
              "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 50}}},
              "route": [{"destination": {"host": host("faulty")}}]},
             {"match": [{"uri": {"prefix": "/slow"}}],
              "fault": {"delay": {"fixedDelay": "500ms", "percentage": {"value": 100}}},
              "route": [{"destination": {"host": host("faulty")}}]},
             {"route": [{"destination": {"host": host("faulty")}}]}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
         "metadata": {"name": "pool", "namespace": NS},
         "spec": {"host": host("pool"), "trafficPolicy": {"outlierDetection": {
             "consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "3s",
             "maxEjectionPercent": 100}}}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
         "metadata": {"name": "tight", "namespace": NS},
         "spec": {"host": host("tight"), "trafficPolicy": {"connectionPool": {
             "tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}}}},
        {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
         "metadata": {"name": "jwt", "namespace": NS},
         "spec": {"targetRefs": web,
                  "jwtRules": [{"issuer": ISSUER, "jwks": json.dumps(jwks)}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "deny-admin", "namespace": NS},
         "spec": {"targetRefs": web, "action": "DENY",
                  "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "audit", "namespace": NS},
         "spec": {"targetRefs": web, "action": "AUDIT",
                  "rules": [{"to": [{"operation": {"paths": ["/audited*"]}}]}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "require-jwt", "namespace": NS},
         "spec": {"targetRefs": web, "action": "DENY",
                  "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}],
                             "to": [{"operation": {"paths": ["/secure*"]}}]}]}},
        # L4, in the servers' tunnel: the web pods take connections from the waypoint only.
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "web-from-waypoint", "namespace": NS},
         "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
                  "rules": [{"from": [{"source": {
                      "principals": [f"cluster.local/ns/{NS}/sa/{WAYPOINT}"]}}]}]}},
    ]  # fmt: skip


def waypoint_gateway(name: str, waypoint_for: str = "all", fail_open: bool = False) -> Any:
    return gw.waypoint_resource(name, NS, waypoint_for, fail_open)


def wait_ready(c: mesh.Cluster, name: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        status = {g.name: r for g, r in mesh.waypoint_status(c, NS)}
        if status[name].ready:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"waypoint {NS}/{name} not ready: {status[name]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def l7(cluster: mesh.Cluster) -> Iterator[L7]:
    """The waypoint (on n1, exporting spans to a collector pod) and every L7 resource,
    applied once for the module. The cluster fixture takes it all down."""
    sock = nsutil.socket_at(cluster.pod_netns("plain", "collector"))
    collector_ip = pod_ip(cluster, "plain", "collector")
    sock.bind((collector_ip, OTLP_PORT))
    sock.listen(16)
    collector = Collector(sock)
    thread = threading.Thread(target=collector.serve, daemon=True)
    thread.start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    before = os.environ.get("OTLP_ENDPOINT")
    os.environ["OTLP_ENDPOINT"] = f"http://{collector_ip}:{OTLP_PORT}"
    try:
        change = mesh.apply_resources(
            cluster, [waypoint_gateway(WAYPOINT), *resources(key)], node="n1"
        )
    finally:
        if before is None:
            os.environ.pop("OTLP_ENDPOINT", None)
        else:
            os.environ["OTLP_ENDPOINT"] = before
    assert change.digest is not None
    mesh.wait_config(cluster, change.digest)
    wait_ready(cluster, WAYPOINT)
    g = mesh.current_spec(cluster).gateway(NS, WAYPOINT)
    assert g is not None
    try:
        yield L7(cluster, g, collector, key)
    finally:
        collector.stopped.set()
        thread.join(timeout=5)
        sock.close()


# ---- 1. weights ------------------------------------------------------------------------------

SPLIT_REQUESTS = 1000
SPLIT_CLIENTS = 4  # keep-alive connections, each sending its share in turn
SPLIT_SECONDS = 120.0


def test_weighted_split_over_a_thousand_requests(l7: L7) -> None:
    served: dict[str, int] = {}
    statuses: dict[int | str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + SPLIT_SECONDS

    def share() -> None:
        with client(l7.c, vip(l7.c, NS, "web")) as pc:
            for _ in range(SPLIT_REQUESTS // SPLIT_CLIENTS):
                if time.monotonic() > deadline:
                    return
                try:
                    r = pc.request("/split")
                    status: int | str = r.status
                except OSError as e:
                    status = repr(e)
                who = r.headers.get("x-served-by", "?") if isinstance(status, int) else "-"
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    served[who] = served.get(who, 0) + 1

    threads = [threading.Thread(target=share) for _ in range(SPLIT_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SPLIT_SECONDS + 20)
    assert statuses == {200: SPLIT_REQUESTS}, f"expected only 200s, saw {statuses}"
    # Weights 3:1; Binomial(1000, 0.25): mean 250, sd 13.7; 4.5 sd either way.
    mean, sd = SPLIT_REQUESTS * 0.25, math.sqrt(SPLIT_REQUESTS * 0.25 * 0.75)
    low, high = mean - 4.5 * sd, mean + 4.5 * sd
    assert set(served) == {"web-v1", "web-v2"}, f"expected web-v1 and web-v2, saw {served}"
    assert low <= served["web-v2"] <= high, (
        f"expected web-v2 to serve {low:.0f}..{high:.0f} of {SPLIT_REQUESTS}, saw {served}"
    )


# ---- 2. matches, redirect, rewrite, header modifiers -----------------------------------------

MATCHES = [
    pytest.param("GET", "/m", {}, "web-v1", id="no-match-falls-to-default"),
    pytest.param("GET", "/m", {"x-variant": "two"}, "web-v2", id="header-match"),
    pytest.param("GET", "/m?v=2", {}, "web-v2", id="query-match"),
    pytest.param("GET", "/m?v=3", {}, "web-v1", id="query-other-value"),
    pytest.param("POST", "/m", {}, "web-v2", id="method-match"),
    pytest.param("GET", "/re/123", {}, "web-v2", id="regex-match"),
    pytest.param("GET", "/re/abc", {}, "web-v1", id="regex-no-match"),
]


@pytest.mark.parametrize(("method", "path", "headers", "want"), MATCHES)
def test_route_matches(l7: L7, method: str, path: str, headers: dict[str, str], want: str) -> None:
    with client(l7.c, vip(l7.c, NS, "web")) as pc:
        r = pc.request(path, method, headers, b"{}" if method == "POST" else None)
    assert r.status == 200, f"expected 200, saw {r.status} {r.body[:200]!r}"
    info = r.info()
    assert (info["app"], info["method"], info["path"]) == (want, method, path), (
        f"expected {want} to get {method} {path}, saw {info['app']} get "
        f"{info['method']} {info['path']}"
    )
    # The app's client is the waypoint (the waypoint's upstream leg), as in Istio.
    assert info["client"] == l7.waypoint_ip(), f"expected the waypoint as client, saw {info}"


def test_redirect_rewrite_and_header_modifiers(l7: L7) -> None:
    with client(l7.c, vip(l7.c, NS, "web")) as pc:
        moved = pc.request("/old")
        r = pc.request("/api/items?q=1", headers={"x-secret": "s3", "x-keep": "k"})
    assert moved.status == 301, f"expected 301, saw {moved.status}"
    assert moved.headers.get("location", "").endswith("/new"), (
        f"expected a location ending in /new, saw {moved.headers}"
    )
    assert r.status == 200, f"expected 200, saw {r.status} {r.body[:200]!r}"
    got = r.info()
    assert got["path"] == "/internal/items?q=1", f"expected the rewritten path, saw {got['path']}"
    sent = got["headers"]
    assert (sent.get("x-canary"), sent.get("x-added"), sent.get("x-keep")) == ("yes", "1", "k"), (
        f"expected x-canary=yes, x-added=1, x-keep=k at the app, saw {sent}"
    )
    assert "x-secret" not in sent, f"expected x-secret removed before the app, saw {sent}"
    assert r.headers.get("x-route") == "api", f"expected x-route: api, saw {r.headers}"
    assert "x-app-internal" not in r.headers, f"expected x-app-internal removed, saw {r.headers}"
    assert r.headers.get("x-served-by") == "web-v1"


# ---- 3. authorization, audit, JWT --------------------------------------------------------------


def test_l7_deny_is_403_while_l4_lets_the_waypoint_through(l7: L7) -> None:
    with client(l7.c, vip(l7.c, NS, "web")) as pc:
        denied = pc.request("/admin/users")
        allowed = pc.request("/public")
    assert (denied.status, denied.body) == (403, b"RBAC: access denied"), (
        f"expected 403 RBAC: access denied, saw {denied.status} {denied.body[:200]!r}"
    )
    assert allowed.status == 200 and allowed.info()["client"] == l7.waypoint_ip()
    line = l7.access_line(lambda d: d.get("path") == "/admin/users")
    assert (line["status"], line.get("authorization")) == (403, "denied"), line
    # The L4 policy (web pods: the waypoint only) is in force: the client dialling a web
    # pod straight is refused by the servers' tunnel.
    seen = attempt(l7.c, pod_ip(l7.c, NS, "web-v1"), "/public", port=8080)
    assert isinstance(seen, OSError), f"expected the direct connection refused, saw {seen}"


def test_audit_logs_without_denying(l7: L7) -> None:
    with client(l7.c, vip(l7.c, NS, "web")) as pc:
        r = pc.request("/audited/x")
        pc.request("/not-audited")
    assert r.status == 200, f"expected 200 (AUDIT never denies), saw {r.status}"
    line = l7.access_line(lambda d: d.get("path") == "/audited/x")
    assert line.get("audited") == [f"{NS}/audit"], f"expected audited by {NS}/audit: {line}"
    plain = l7.access_line(lambda d: d.get("path") == "/not-audited")
    assert "audited" not in plain, f"expected no audit of /not-audited, saw {plain}"


def test_jwt_accepted_rejected_and_required(l7: L7) -> None:
    good = l7.token()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"iss": ISSUER, "sub": "mallory", "exp": int(time.time()) + 600},
                        other, algorithm="RS256", headers={"kid": "e2e"})  # fmt: skip
    expired = l7.token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)
    with client(l7.c, vip(l7.c, NS, "web")) as pc:
        ok = pc.request("/secure", headers={"authorization": f"Bearer {good}"})
        none = pc.request("/secure")
        bad = pc.request("/secure", headers={"authorization": f"Bearer {forged}"})
        old = pc.request("/secure", headers={"authorization": f"Bearer {expired}"})
    assert ok.status == 200, f"expected a valid token accepted, saw {ok.status} {ok.body!r}"
    assert none.status == 403, f"expected 403 without a token, saw {none.status}"
    assert bad.status == 401, f"expected 401 for a forged token, saw {bad.status}"
    assert old.status == 401, f"expected 401 for an expired token, saw {old.status}"


# ---- 4. retries, timeouts, outlier detection, circuit breaking, faults ----------------------


def test_retries_hide_a_backend_that_resets_one_connection_in_three(l7: L7) -> None:
    tag = uuid.uuid4().hex[:8]
    with client(l7.c, vip(l7.c, NS, "flaky")) as pc:
        statuses = [pc.request(f"/flaky/{tag}/{i}").status for i in range(30)]
    assert statuses == [200] * 30, f"expected 30 x 200, saw {statuses}"
    lines = [d for d in l7.access_lines() if f"/flaky/{tag}/" in d.get("path", "")]
    retried = [d for d in lines if d.get("attempts", 0) > 1]
    assert len(retried) >= 5, f"expected about 10 requests retried, saw {len(retried)}"


def test_no_retry_after_the_budget(l7: L7) -> None:
    with client(l7.c, vip(l7.c, NS, "flaky")) as pc:
        r = pc.request("/reset/always")
    assert r.status == 503, f"expected 503 once the retries are spent, saw {r.status}"
    line = l7.access_line(lambda d: d.get("path") == "/reset/always")
    assert line["attempts"] == 3, f"expected 1 try + 2 retries, saw {line}"
    # Each try ended in a reset (UC), and the retries ran out (URX).
    flags = set(line["response_flags"].split(","))
    assert {"UC", "URX"} <= flags, f"expected flags UC and URX, saw {line}"


def test_request_timeout_is_504_ut(l7: L7) -> None:
    with client(l7.c, vip(l7.c, NS, "web")) as pc:
        slow = pc.request("/delay/3000")
    with client(l7.c, vip(l7.c, NS, "web")) as pc:
        quick = pc.request("/delay/10")
    assert slow.status == 504, f"expected 504 after 300ms, saw {slow.status}"
    assert quick.status == 200, f"expected 200 within the timeout, saw {quick.status}"
    line = l7.access_line(lambda d: d.get("path") == "/delay/3000")
    assert "UT" in line["response_flags"].split(","), f"expected flag UT, saw {line}"


def test_outlier_ejection_and_return(l7: L7) -> None:
    served: list[tuple[float, str, int]] = []
    with client(l7.c, vip(l7.c, NS, "pool")) as pc:

        def one() -> tuple[float, str, int]:
            at = time.monotonic()
            r = pc.request("/pool")
            served.append((at, r.headers.get("x-served-by", "?"), r.status))
            return served[-1]

        # Until bad-0 has answered 500 twice in a row (then it is ejected).
        fails = 0
        for _ in range(100):
            status = one()[2]
            fails = fails + 1 if status == 500 else fails
            if fails >= 2:
                break
        assert fails >= 2, f"expected bad-0 to answer 500s, saw {served}"
        ejected_at = time.monotonic()
        after = [one() for _ in range(20)]
        # While ejected (3 s), only good-0 answers.
        within = [(who, st) for at, who, st in after if at - ejected_at < 2.5]
        assert within and all(st == 200 and who == "good-0" for who, st in within), (
            f"expected only good-0 while bad-0 is ejected, saw {within}"
        )
        time.sleep(max(0.0, ejected_at + 3.5 - time.monotonic()))
        back = [one() for _ in range(40)]
    assert any(who == "bad-0" for _, who, _ in back), (
        f"expected bad-0 back after the ejection time, saw {[w for _, w, _ in back]}"
    )


def test_connection_pool_overflow_is_503_uo(l7: L7) -> None:
    results: list[int | str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            with client(l7.c, vip(l7.c, NS, "tight")) as pc:
                status: int | str = pc.request(f"/delay/1500/tight{i}").status
        except OSError as e:
            status = repr(e)
        with lock:
            results.append(status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=STEP_TIMEOUT)
    assert 200 in results and 503 in results, f"expected some 200 and some 503, saw {results}"
    line = l7.access_line(lambda d: "/tight" in d.get("path", "") and d.get("status") == 503)
    assert "UO" in line["response_flags"].split(","), f"expected flag UO, saw {line}"


def test_fault_abort_ratio_and_delay(l7: L7) -> None:
    n = 200
    codes: dict[int, int] = {}
    with client(l7.c, vip(l7.c, NS, "faulty")) as pc:
        for i in range(n):
            r = pc.request(f"/abort/{i}")
            codes[r.status] = codes.get(r.status, 0) + 1
            if r.status == 418:
                assert r.body == b"fault filter abort", r.body
        began = time.monotonic()
        delayed = pc.request("/slow")
        took = time.monotonic() - began
    assert set(codes) <= {200, 418}, f"expected only 200 and 418, saw {codes}"
    # 50%: Binomial(200, 0.5), sd 7.1; 5 sd either way.
    assert 65 <= codes.get(418, 0) <= 135, f"expected about 100 of {n} aborted, saw {codes}"
    assert delayed.status == 200, f"expected the delayed request served, saw {delayed.status}"
    assert took >= 0.5, f"expected at least the 500ms delay, took {took:.3f}s"
    line = l7.access_line(lambda d: d.get("path") == "/slow")
    assert "DI" in line["response_flags"].split(","), f"expected flag DI, saw {line}"


# ---- 5. a pod bound to the waypoint ----------------------------------------------------------


def test_a_pod_bound_to_the_waypoint_takes_its_waypoint_only(l7: L7) -> None:
    target = pod_ip(l7.c, NS, "bound-0")
    # From outside the mesh, straight to the pod: the pod's tunnel refuses it.
    seen = attempt(l7.c, target, "/direct", "outsider", "plain", 8080)
    assert isinstance(seen, OSError), f"expected the direct connection refused, saw {seen}"
    deadline = time.monotonic() + STEP_TIMEOUT
    while "which alone may reach it" not in tunnel_log(l7.c):
        assert time.monotonic() < deadline, "expected the tunnel to log why it refused"
        time.sleep(0.05)
    # From a mesh client, the client's tunnel sends it through the waypoint: served.
    with client(l7.c, target, port=8080) as pc:
        r = pc.request("/via-waypoint")
    assert r.status == 200, f"expected 200 through the waypoint, saw {r.status}"
    # Port 8080 is no service's declared port, so the waypoint carries it as TCP: the app
    # seeing the waypoint as its client is the proof that it went through it.
    assert r.info()["client"] == l7.waypoint_ip(), f"expected the waypoint as client: {r.info()}"


# ---- 6. a missing waypoint ---------------------------------------------------------------------


def test_a_missing_waypoint_fails_closed(l7: L7) -> None:
    seen = attempt(l7.c, vip(l7.c, NS, "ghosted"), "/ghost")
    assert isinstance(seen, OSError), f"expected the connection refused, saw {seen}"
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        log = tunnel_log(l7.c)
        if "ghost" in log and "refused (fail closed)" in log:
            break
        assert time.monotonic() < deadline, "expected the tunnel's log to say why it refused"
        time.sleep(0.05)


def test_a_fail_open_waypoint_that_is_down_lets_traffic_go_direct(l7: L7) -> None:
    change = mesh.apply_resources(l7.c, [waypoint_gateway("ghost", "service", True)], node="n1")
    g = mesh.current_spec(l7.c).gateway(NS, "ghost")
    assert g is not None and change.digest is not None
    try:
        mesh.wait_config(l7.c, change.digest)
        waypoints.stop(l7.c.state, g)  # the waypoint is down: traffic must go direct
        with client(l7.c, vip(l7.c, NS, "ghosted")) as pc:
            r = pc.request("/open")
        assert r.status == 200, f"expected 200 straight from flaky-0, saw {r.status}"
        assert r.info()["client"] == pod_ip(l7.c, NS, "client"), r.info()
    finally:
        mesh.delete_resources(l7.c, [(gw.GATEWAY_KIND, NS, "ghost")])


# ---- 8. a server-first protocol on an undeclared port ----------------------------------------


def test_server_first_tcp_on_an_undeclared_port(l7: L7) -> None:
    s = nsutil.socket_at(l7.c.pod_netns(NS, "client"))
    with s:
        s.settimeout(10)
        s.connect((vip(l7.c, NS, "web"), 25))
        f = s.makefile("rb")
        greeting = f.readline()  # the client sends nothing first: the server speaks
        assert greeting in (b"220 web-v1 ready\r\n", b"220 web-v2 ready\r\n"), (
            f"expected the server's greeting first, saw {greeting!r}"
        )
        s.sendall(b"HELO e2e\r\n")
        assert f.readline() == b"250 HELO e2e\r\n"
        s.sendall(b"QUIT\r\n")
        assert f.readline() == b"221 bye\r\n"
        assert f.read() == b"", "expected the server to close after QUIT"


# ---- 9. traces ----------------------------------------------------------------------------------


def test_spans_reach_the_collector_with_parent_links(l7: L7) -> None:
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with client(l7.c, vip(l7.c, NS, "web")) as pc:
        r = pc.request("/traced", headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert r.status == 200
    upstream = r.info()["headers"]["traceparent"].split("-")
    assert upstream[1] == trace_id, f"expected the app in trace {trace_id}, saw {upstream}"
    deadline = time.monotonic() + STEP_TIMEOUT
    while len(spans := l7.collector.of_trace(trace_id)) < 2:
        assert time.monotonic() < deadline, f"expected 2 spans of {trace_id}, saw {spans}"
        time.sleep(0.1)
    by_id = {s.span_id: s for s in spans}
    server = [s for s in spans if s.parent == parent]
    assert len(server) == 1, f"expected one span under the client's {parent}, saw {spans}"
    attempt = by_id.get(upstream[2])
    assert attempt is not None, f"expected the app's parent {upstream[2]} exported: {spans}"
    assert attempt.parent == server[0].span_id, (
        f"expected the attempt's parent to be the server span {server[0].span_id}, saw {attempt}"
    )


# ---- 7. a restart under load (last: it replaces the waypoint's process) ---------------------

LOAD_MAX = 3000
LOAD_SECONDS = 60.0


def test_restarting_the_waypoint_under_load_fails_no_request(l7: L7) -> None:
    (old,) = [r for r in read_records(l7.c.state.pidfile_dir)
              if r.name == waypoints.process_name(l7.gateway)]  # fmt: skip
    failures: list[str] = []
    done = {"before": 0, "after": 0}
    restarted = threading.Event()
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + LOAD_SECONDS
        with client(l7.c, vip(l7.c, NS, "web")) as pc:
            for i in range(LOAD_MAX):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                phase = "after" if restarted.is_set() else "before"
                try:
                    r = pc.request(f"/m/load{i}")
                    if r.status != 200:
                        failures.append(f"{i}: status {r.status}")
                except OSError as e:
                    failures.append(f"{i}: {e!r}")
                done[phase] += 1

    t = threading.Thread(target=load)
    t.start()
    try:
        deadline = time.monotonic() + STEP_TIMEOUT
        while done["before"] < 50 and t.is_alive():
            assert time.monotonic() < deadline, f"load did not start: {done}"
            time.sleep(0.05)
        spec = mesh.current_spec(l7.c)
        new = waypoints.restart(spec, l7.c.state, l7.c.paths, l7.gateway)
        restarted.set()
        deadline = time.monotonic() + STEP_TIMEOUT
        while done["after"] < 100 and t.is_alive():
            assert time.monotonic() < deadline, f"load stalled after the restart: {done}"
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(timeout=STEP_TIMEOUT + 15)
    assert not failures, f"expected no failed request, saw {len(failures)}: {failures[:5]}"
    assert done["after"] >= 100, f"expected load after the restart, saw {done}"
    assert new.pid != old.pid and new.alive()
    (rec,) = [r for r in read_records(l7.c.state.pidfile_dir)
              if r.name.startswith(waypoints.process_name(l7.gateway))]  # fmt: skip
    assert rec.pid == new.pid, f"expected the new process to hold the record, saw {rec}"
    text = l7.log_path.read_text(errors="replace")
    assert '"waypoint draining"' in text and '"waypoint stopped"' in text
    wait_ready(l7.c, WAYPOINT)
