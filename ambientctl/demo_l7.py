"""The demo's L7 act: a waypoint for namespace `travel`, and what it does to requests.

On the cluster the L4 part left running: the waypoint is applied (its traces exported to a
tiny OTLP/HTTP receiver listening inside the waypoint's own pod) and the namespace bound to
it; then a canary split, retries hiding a flaky replica, a fault delay meeting a route
timeout, an L7 AuthorizationPolicy, the waypoint's request metrics and one request's trace.
Every line printed is read from the running system: the answers the pods got, the
waypoint's access log, its /metrics and the spans it exported. `ambientctl.demo_evidence`
turns that raw material into facts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nsutil
from ambientctl import demo_evidence as ev
from localcluster import gateways as gw
from localcluster import mesh, policies, waypoints
from localcluster.labels import LabelChange
from localcluster.network import waypoint_layout

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
NS = "travel"
WAYPOINT = "waypoint"
CLIENT_POD = "frontend-0"
OTLP_PORT = 4318
MAX_EXPORT = 16 << 20  # bytes of one OTLP POST the receiver reads
CANARY_REQUESTS = 200
CANARY_WEIGHT = 10  # percent to flights v2
RETRY_REQUESTS = 30
FAULT_DELAY = "1s"
ROUTE_TIMEOUT = "500ms"
READY_TIMEOUT = 30.0
FLUSH_TIMEOUT = 12.0  # the exporter sends every 5 s; one retry round on top
METRICS_PORT = 15020
L4_POLICY = ("AuthorizationPolicy", NS, "pricing-from-flights")


def _host(service: str) -> str:
    return f"{service}.{NS}.svc.cluster.local"


# ---- the resources the act applies ---------------------------------------------------------


def canary_route(timeout: str | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "backendRefs": [
            {"name": "flights-v1", "port": 80, "weight": 100 - CANARY_WEIGHT},
            {"name": "flights-v2", "port": 80, "weight": CANARY_WEIGHT},
        ]
    }
    if timeout is not None:
        rule["timeouts"] = {"request": timeout}
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "flights-canary", "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "flights", "port": 80}],
            "rules": [rule],
        },
    }


def pricing_virtual_service(delay: str | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {
        "route": [{"destination": {"host": _host("pricing"), "port": {"number": 80}}}],
        "retries": {"attempts": 2, "retryOn": "reset,connect-failure,refused-stream"},
    }
    if delay is not None:
        route["fault"] = {"delay": {"fixedDelay": delay, "percentage": {"value": 100}}}
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "pricing", "namespace": NS},
        "spec": {"hosts": [_host("pricing")], "http": [route]},
    }


NO_POST_TO_PRICING = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "pricing-read-only", "namespace": NS},
    "spec": {
        "targetRefs": [{"group": "", "kind": "Service", "name": "pricing"}],
        "action": "DENY",
        "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}],
    },
}


# ---- an OTLP/HTTP receiver inside the waypoint's pod ----------------------------------------


class Collector:
    """Receives `POST /v1/traces` (protobuf) on 127.0.0.1:`port` of a netns and keeps the
    decoded spans. The socket is made inside the netns, the server runs on a thread of this
    process, so nothing is left behind when `close` is called."""

    def __init__(self, netns_path: str, port: int = OTLP_PORT) -> None:
        self.spans: list[ev.SpanView] = []
        self.posts = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or "")
                    if not 0 <= length <= MAX_EXPORT:
                        raise ValueError(f"Content-Length {length} outside 0..{MAX_EXPORT}")
                    spans = ev.decode_export(self.rfile.read(length))
                    status = 200
                except ValueError as e:
                    self.close_connection = True  # the rest of the stream is not trusted
                    spans, status = [], 400
                    with collector._lock:
                        collector.errors.append(str(e))
                if status == 200:
                    with collector._lock:
                        collector.spans.extend(spans)
                        collector.posts += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")  # an empty ExportTraceServiceResponse
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler, bind_and_activate=False)
        self._server.socket.close()
        sock = nsutil.socket_at(netns_path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(16)
        self._server.socket = sock
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="otlp-receiver", daemon=True
        )
        self._thread.start()

    def trace(self, trace_id: str) -> list[ev.SpanView]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    """`key=value` in this process's environment for the block: the waypoint process the
    block starts inherits it, as `OTLP_ENDPOINT=... ambientctl waypoint apply` would."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


# ---- the act -------------------------------------------------------------------------------


class Act:
    def __init__(self, cluster: mesh.Cluster) -> None:
        self.cluster = cluster
        self.collector: Collector | None = None
        self.log_mark = 0
        self.netns = ""
        self.ip = ""
        self.log = Path()
        self.retried_trace = ""  # a retried quote's trace id, from the access log

    # -- I/O helpers

    def fetch(self, url: str, *args: str, timeout: float = 60) -> tuple[int, str, str]:
        """travel/fetch.py from inside the client pod: (exit code, stdout, stderr)."""
        proc = subprocess.run(
            [sys.executable, str(DEMO_DIR / "travel" / "fetch.py"), url, *args],
            preexec_fn=nsutil.preexec_enter(self.cluster.pod_netns(NS, CLIENT_POD)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return proc.returncode, proc.stdout, proc.stderr

    def url(self, service: str, path: str) -> str:
        return f"http://{self.cluster.spec.service(NS, service).vip}{path}"

    def new_lines(self) -> list[dict[str, Any]]:
        """The waypoint's access-log lines written since the last call."""
        try:
            with self.log.open("rb") as f:
                f.seek(self.log_mark)
                data = f.read()
        except OSError:
            return []
        # Only whole lines: one being written now is read next time.
        data = data[: data.rfind(b"\n") + 1]
        self.log_mark += len(data)
        return ev.access_lines(data.decode(errors="replace"))

    def waypoint_digest(self) -> str | None:
        try:
            status, body = waypoints.probe(
                self.netns, self.ip, waypoints.READY_PORT, "/healthz/ready"
            )
            doc = json.loads(body)
        except (OSError, ValueError):
            return None
        digest = doc.get("config_digest") if status == 200 and isinstance(doc, dict) else None
        return digest if isinstance(digest, str) else None

    def in_force(self, digest: str | None) -> bool:
        """Wait until the tunnels and the waypoint run the mesh config `digest`."""
        if digest is None:
            return True
        try:
            mesh.wait_config(self.cluster, digest, timeout=READY_TIMEOUT)
        except mesh.ConfigNotInForce as e:
            print(f"   FAILED: {e}")
            return False
        deadline = time.monotonic() + READY_TIMEOUT
        while self.netns and self.waypoint_digest() != digest:
            if time.monotonic() >= deadline:
                print(f"   FAILED: the waypoint does not run mesh config {digest[:12]}")
                return False
            time.sleep(0.1)
        return True

    def apply(self, docs: Sequence[dict[str, Any]]) -> bool:
        done = mesh.apply_resources(self.cluster, docs, "demo")
        for line in done.lines:
            print(f"   applied: {line}")
        return self.in_force(done.digest)

    def metrics(self) -> str:
        s = nsutil.socket_at(self.netns)
        try:
            s.settimeout(5)
            s.connect((self.ip, METRICS_PORT))
            s.sendall(f"GET /metrics HTTP/1.0\r\nHost: {self.ip}\r\n\r\n".encode())
            data = b""
            while len(data) < (8 << 20) and (chunk := s.recv(65536)):
                data += chunk
        finally:
            s.close()
        return data.partition(b"\r\n\r\n")[2].decode(errors="replace")

    # -- the scenes

    def setup(self) -> bool:
        print("== L7: a waypoint for namespace travel")
        present = {policies.key_of(d) for d in mesh.read_policies(self.cluster)}
        if L4_POLICY in present:
            done = mesh.delete_policies(self.cluster, [L4_POLICY])
            print(f"   {done.lines[0]}: behind a waypoint, pricing's peer is the waypoint,")
            print("   and L7 policy is the waypoint's to enforce")
            if not self.in_force(done.digest):
                return False
        # The waypoint's traces go to a receiver in its own pod: the endpoint is the
        # waypoint's 127.0.0.1, reachable whatever the node.
        with _env("OTLP_ENDPOINT", f"http://127.0.0.1:{OTLP_PORT}"):
            applied = mesh.apply_resources(
                self.cluster, [gw.waypoint_resource(WAYPOINT, NS)], "waypoint"
            )
        g = next(
            g
            for g in mesh.current_spec(self.cluster).gateways
            if (g.namespace, g.name) == (NS, WAYPOINT)
        )
        pod = waypoint_layout(mesh.current_spec(self.cluster), g)
        self.netns, self.ip = pod.netns_path, str(pod.ip)
        self.log = self.cluster.state.log_dir / f"{waypoints.process_name(g)}.log"
        self.collector = Collector(self.netns)
        print(f"   {applied.lines[0]}, traces to an OTLP receiver on its 127.0.0.1:{OTLP_PORT}")
        labeled = mesh.label(
            self.cluster, "namespace", NS, [LabelChange("istio.io/use-waypoint", WAYPOINT)]
        )
        print(f"   namespace {NS} labeled istio.io/use-waypoint={WAYPOINT}")
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            ready = [r for g2, r in mesh.waypoint_status(self.cluster, NS) if g2.name == WAYPOINT]
            if ready and ready[0].ready:
                break
            if time.monotonic() >= deadline:
                why = ready[0].message if ready else "gone"
                print(f"   FAILED: the waypoint is not programmed: {why}")
                return False
            time.sleep(0.2)
        print(f"   waypoint {NS}/{WAYPOINT} is programmed: {ready[0].message} ({self.ip})")
        if not self.in_force(labeled.digest):
            return False
        self.new_lines()
        rc, _, err = self.fetch(self.url("frontend", "/book?from=AMS&to=LIS"))
        lines = self.new_lines()
        print(f"   {CLIENT_POD} -> frontend /book: {'200' if rc == 0 else f'FAILED {err.strip()}'};"
              f" the waypoint logged {len(lines)} requests of it:")  # fmt: skip
        for line in lines:
            print(
                f"     {line.get('src.workload')} -> {line.get('dst.service')}"
                f"{line.get('path', '').split('?')[0]} {line.get('status')}"
                f" via {line.get('upstream_host')} ({line.get('dst.workload')})"
            )
        # frontend -> flights, flights -> pricing x3: all four through the waypoint.
        return rc == 0 and len(lines) >= 4

    def canary(self) -> bool:
        print(f"== L7 canary: HTTPRoute flights-canary sends {CANARY_WEIGHT} % of flights to v2")
        if not self.apply([canary_route()]):
            return False
        _, out, _ = self.fetch(
            self.url("flights", "/healthz"), "--count", str(CANARY_REQUESTS), "--deadline", "40"
        )
        answers = ev.parse_answers(out)
        version = {p.name: p.labels.get("version", "?") for p in self.cluster.spec.pods}
        pods = Counter(a.served_by or "none" for a in answers if a.status == 200)
        by_version = Counter(version.get(p, "?") for p in pods.elements())
        n, k = len(answers), by_version.get("v2", 0)
        low, high = ev.binomial_bounds(n, CANARY_WEIGHT / 100)
        print(f"   {n} requests from {CLIENT_POD}: {ev.status_counts(answers)}")
        for pod, count in sorted(pods.items()):
            print(f"     {pod:13} ({version.get(pod, '?')}) {count}")
        verdict = "within" if ev.within_binomial(n, k, CANARY_WEIGHT / 100) else "OUTSIDE"
        print(
            f"   v2 share {k}/{n} = {100 * k / max(n, 1):.1f} %: {verdict} the binomial "
            f"bounds [{low}, {high}] (4 sigma around {CANARY_WEIGHT} %)"
        )
        self.new_lines()
        return n >= CANARY_REQUESTS and verdict == "within" and sum(pods.values()) == n

    def retries(self) -> bool:
        print("== L7 retries: pricing-1 (resets every 3rd quote) joins service pricing")
        labeled = mesh.label(
            self.cluster, "pod", f"{NS}/pricing-1", [LabelChange("app", "pricing")]
        )
        print("   pod travel/pricing-1 labeled app=pricing")
        if not self.in_force(labeled.digest):
            return False
        ok = True
        before = self._quotes("without a retry policy (Istio's default does not retry resets)")
        ok &= before.get("200", 0) < RETRY_REQUESTS  # the flaky replica shows
        print("   VirtualService pricing: retries attempts 2 on reset,connect-failure")
        if not self.apply([pricing_virtual_service()]):
            return False
        after = self._quotes("with the retry policy")
        ok &= after == {"200": RETRY_REQUESTS}
        return ok

    def _quotes(self, label: str) -> dict[str, int]:
        self.new_lines()
        _, out, _ = self.fetch(
            self.url("pricing", "/quote?flight=KL1"), "--count", str(RETRY_REQUESTS),
            "--deadline", "30",
        )  # fmt: skip
        answers = ev.parse_answers(out)
        lines = ev.for_service(self.new_lines(), _host("pricing"))
        counts = ev.status_counts(answers)
        retried = [line for line in lines if int(line.get("attempts") or 0) > 1]
        print(f"   {label}: {len(answers)} quotes from {CLIENT_POD} -> {counts}")
        print(
            f"     waypoint log: flags {ev.flag_counts(lines)},"
            f" {len(retried)} requests needed a retry"
        )
        for line in [*(x for x in lines if x.get("status") != 200), *retried][:2]:
            print(
                f"     e.g. status {line.get('status')} flags {line.get('response_flags')}"
                f" attempts {line.get('attempts')} last upstream {line.get('upstream_host')}"
                f" ({line.get('dst.workload')})"
                + (f": {line.get('error')}" if line.get("error") else "")
            )
        if retried:
            self.retried_trace = str(retried[0].get("trace_id") or "")
        return counts

    def timeout(self) -> bool:
        print(
            f"== L7 fault and timeout: pricing delayed {FAULT_DELAY} (VirtualService fault),"
            f" flights' route times out at {ROUTE_TIMEOUT}"
        )
        if not self.apply([pricing_virtual_service(FAULT_DELAY), canary_route(ROUTE_TIMEOUT)]):
            return False
        self.new_lines()
        rc, out, err = self.fetch(self.url("flights", "/search?from=AMS&to=LIS"))
        # The line is written as the answer goes out: it may land just after the client has
        # read it, so look again briefly.
        lines: list[Mapping[str, Any]] = []
        deadline = time.monotonic() + 2.0
        while not lines and time.monotonic() < deadline:
            lines = [x for x in ev.for_service(self.new_lines(), _host("flights"))
                     if x.get("status") == 504]  # fmt: skip
            if not lines:
                time.sleep(0.05)
        print(f"   {CLIENT_POD} -> flights /search: {err.strip() or rc} {out.strip()!r}")
        for line in lines[:1]:
            print(
                f"   waypoint log: status {line.get('status')} response_flags"
                f" {line.get('response_flags')} after {line.get('duration_ms')} ms"
                f" (route {line.get('route')})"
            )
        ok = rc == 1 and bool(lines) and lines[0].get("response_flags") == "UT"
        print("   (fault removed, timeout kept)")
        return self.apply([pricing_virtual_service(), canary_route(ROUTE_TIMEOUT)]) and ok

    def authorization(self) -> bool:
        print("== L7 policy: AuthorizationPolicy pricing-read-only (targetRefs Service pricing)"
              " denies POST")  # fmt: skip
        if not self.apply([NO_POST_TO_PRICING]):
            return False
        self.new_lines()
        ok = True
        for method, want in (("GET", 0), ("POST", 1)):
            rc, out, err = self.fetch(self.url("pricing", "/quote?flight=KL1"), "--method", method)
            shown = out.strip() if rc else f"{out.strip()[:60]}..."
            print(f"   {method:4} pricing /quote: {err.strip() or 'answered 200'}  {shown!r}")
            ok &= rc == want and (want == 0 or out.strip() == "RBAC: access denied")
        for line in ev.for_service(self.new_lines(), _host("pricing")):
            if line.get("authorization") == "denied":
                print(
                    f"   waypoint log: {line.get('method')} {line.get('status')}"
                    f" {line.get('src.identity')} denied by {line.get('authorization_policy')}"
                )
        return ok

    def request_metrics(self) -> bool:
        print(f"== L7 metrics: istio_requests_total{{reporter=\"waypoint\"}} from {self.ip}:"
              f"{METRICS_PORT}")  # fmt: skip
        try:
            text = self.metrics()
        except OSError as e:
            print(f"   FAILED: {e}")
            return False
        samples = ev.parse_samples(text, "istio_requests_total", {"reporter": "waypoint"})
        columns = ("source_workload", "destination_service_name", "destination_version",
                   "response_code", "response_flags")  # fmt: skip
        for line in ev.requests_table(samples, columns):
            print(f"   {line}")
        codes = {s.labels.get("response_code") for s in samples}
        return {"200", "403", "504"} <= codes

    def trace(self) -> bool:
        print("== L7 trace: one retried quote, as the waypoint exported it (OTLP/HTTP)")
        assert self.collector is not None
        trace_id = self.retried_trace
        if not trace_id:
            print("   FAILED: no retried request to show")
            return False
        deadline = time.monotonic() + FLUSH_TIMEOUT
        spans = self.collector.trace(trace_id)
        while len(spans) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            spans = self.collector.trace(trace_id)
        print(f"   trace {trace_id} ({self.collector.posts} exports received):")
        for line in ev.span_tree(spans, trace_id):
            print(f"     {line}")
        kinds = Counter(s.kind for s in spans)
        return kinds["server"] == 1 and kinds["client"] >= 2

    def close(self) -> None:
        if self.collector is not None:
            self.collector.close()


def l7_act(cluster: mesh.Cluster) -> bool:
    """Run the act on a cluster up from demo/travel-cluster.yaml; True when every check held."""
    act = Act(cluster)
    try:
        if not act.setup():
            return False
        ok = act.canary()
        ok &= act.retries()
        ok &= act.timeout()
        ok &= act.authorization()
        ok &= act.request_metrics()
        ok &= act.trace()
        return ok
    finally:
        act.close()
