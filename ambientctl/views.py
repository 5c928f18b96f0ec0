"""Operator views of the tunnels: workloads, services, policies, certificates, connections and
`explain`, in the spirit of `istioctl ztunnel-config`.

Data comes from each node's tunnel admin port (15000, node-local), fetched from inside the
node's network namespace. Rendering is pure: JSON in, text out, so it is tested without a
cluster, and tolerant: a key the tunnel does not send shows as "-", an entry of the wrong
shape is skipped, never a crash.

Workloads, services and policies are the mesh config, the same on every tunnel, so the
all-node view shows each entry once. Certificates and connections belong to one tunnel, so
the all-node view tags each with the NODE it came from.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from meshcore.defaults import ADMIN_PORT

if TYPE_CHECKING:
    from waypoint.explain import HttpProbe

MISSING = "-"

# (node, path) -> (HTTP status, body); raises OSError when the port cannot be reached.
Getter = Callable[[str, str], tuple[int, bytes]]


class ViewError(Exception):
    """Something the operator must be told; the message says what and what to try."""


class AdminUnreachable(ViewError):
    def __init__(self, node: str, cause: OSError, hint: str = "") -> None:
        self.node = node
        super().__init__(
            f"cannot reach the tunnel admin port on node {node} "
            f"(127.0.0.1:{ADMIN_PORT} in the node's network namespace): {cause}; "
            f"is the tunnel on node {node} running?{' ' + hint if hint else ''}"
        )


# -- fetching -------------------------------------------------------------------------------


def fetch(get: Getter, node: str, path: str, hint: str = "") -> Any:
    """GET `path` from a node's tunnel admin port and decode its JSON answer."""
    try:
        status, body = get(node, path)
    except OSError as e:
        raise AdminUnreachable(node, e, hint) from e
    try:
        doc = json.loads(body)
    except ValueError:
        raise ViewError(
            f"node {node}: {path} answered {status} with something that is not JSON: {body[:200]!r}"
        ) from None
    if status != 200:
        message = doc.get("error") if isinstance(doc, dict) else None
        raise ViewError(f"node {node}: {message or f'{path} answered {status}'}")
    return doc


def explain_path(source: str, destination: str) -> str:
    return "/debug/explain?" + urlencode({"source": source, "destination": destination})


# -- small helpers --------------------------------------------------------------------------


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The dict entries of a JSON list (anything else is not an entry)."""
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, dict)]


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    if value is None or value == "" or value == [] or value == {}:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _ip(address: Any) -> str:
    """A VIP as "network/ip" -> "ip" (the network is shown only when it is not the default)."""
    text = str(address)
    network, sep, ip = text.rpartition("/")
    if not sep:
        return text
    return ip if not network else text


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Aligned columns with upper-case headers, two spaces apart, no trailing blanks."""
    all_rows = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in all_rows
    ]
    return "\n".join(lines) + "\n"


def as_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def _sections(dumps: Mapping[str, Any], key: str) -> Iterable[tuple[str, dict[str, Any]]]:
    for node, dump in dumps.items():
        if isinstance(dump, dict):
            for entry in _dicts(dump.get(key)):
                yield node, entry


def _unique(
    dumps: Mapping[str, Any], key: str, ident: Callable[[dict[str, Any]], str]
) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for _, entry in _sections(dumps, key):
        k = ident(entry)
        if k not in seen:
            seen.add(k)
            out.append(entry)
    return out


def _ns_name(e: dict[str, Any]) -> str:
    return f"{e.get('namespace')}/{e.get('name')}"


def _tagged(dumps: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    return [{**entry, "node": node} for node, entry in _sections(dumps, key)]


# -- workloads ------------------------------------------------------------------------------


def collect_workloads(dumps: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The workloads of every dump, once each (by uid)."""
    return _unique(dumps, "workloads", lambda w: str(w.get("uid", _ns_name(w))))


def render_workloads(workloads: Sequence[dict[str, Any]]) -> str:
    rows = sorted(
        (
            _text(w.get("namespace")),
            _text(w.get("name")),
            _text(w.get("ips")),
            _text(w.get("node")),
            _text(w.get("waypoint")) if w.get("waypoint") else "None",
            _text(w.get("protocol")),
        )
        for w in workloads
    )
    return table(["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"], rows)


# -- services -------------------------------------------------------------------------------


def collect_services(dumps: Mapping[str, Any]) -> dict[str, Any]:
    """The services once each, with the workloads needed to count healthy endpoints."""
    return {
        "services": _unique(
            dumps, "services", lambda s: f"{s.get('namespace')}/{s.get('hostname')}"
        ),
        "workloads": collect_workloads(dumps),
    }


def render_services(data: Mapping[str, Any]) -> str:
    status = {
        str(w.get("uid")): w.get("status") for w in _dicts(data.get("workloads")) if "uid" in w
    }
    rows = []
    for s in _dicts(data.get("services")):
        endpoints = _list(s.get("endpoints"))
        # As istioctl: healthy/total. An endpoint the dump does not describe is not healthy.
        healthy = sum(1 for uid in endpoints if status.get(str(uid)) == "HEALTHY")
        vips = _list(s.get("vips"))
        rows.append(
            (
                _text(s.get("namespace")),
                _text(s.get("name")),
                _text([_ip(v) for v in vips]),
                _text(s.get("waypoint")) if s.get("waypoint") else "None",
                f"{healthy}/{len(endpoints)}",
            )
        )
    rows.sort()
    return table(["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"], rows)


# -- policies -------------------------------------------------------------------------------


def collect_policies(dumps: Mapping[str, Any]) -> dict[str, Any]:
    errors: list[str] = []
    for dump in dumps.values():
        if isinstance(dump, dict) and isinstance(dump.get("policyErrors"), list):
            errors.extend(str(e) for e in dump["policyErrors"] if str(e) not in errors)
    return {
        "policies": _unique(dumps, "policies", _ns_name),
        "peerAuthentications": _unique(dumps, "peerAuthentications", _ns_name),
        "policyErrors": errors,
    }


def _scope(p: dict[str, Any]) -> str:
    scope = p.get("scope")
    selector = p.get("selector")
    if isinstance(selector, dict) and selector:
        labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return f"{_text(scope)} ({labels})" if scope else labels
    return _text(scope)


def render_policies(data: Mapping[str, Any]) -> str:
    policies = _dicts(data.get("policies"))
    rows = sorted(
        (
            _text(p.get("namespace")),
            _text(p.get("name")),
            _text(p.get("action")),
            _scope(p),
            "yes" if p.get("dryRun") else "no",
        )
        for p in policies
    )
    out = table(["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE", "DRY-RUN"], rows)
    peer = _dicts(data.get("peerAuthentications"))
    if peer:
        prows = []
        for pa in peer:
            ports = pa.get("portLevelMtls")
            port_modes = (
                ",".join(f"{k}:{v}" for k, v in sorted(ports.items()))
                if isinstance(ports, dict)
                else ""
            )
            prows.append(
                (
                    _text(pa.get("namespace")),
                    _text(pa.get("name")),
                    _text(pa.get("mode")),
                    _text(pa.get("selector")),
                    _text(port_modes),
                )
            )
        out += "\n" + table(
            ["NAMESPACE", "PEER AUTHENTICATION", "MODE", "SELECTOR", "PORT MODES"], sorted(prows)
        )
    warnings = [
        f"  {p.get('namespace')}/{p.get('name')}: {w}"
        for p in policies
        if isinstance(p.get("warnings"), list)
        for w in p["warnings"]
    ]
    if warnings:
        out += "\nWarnings:\n" + "\n".join(warnings) + "\n"
    errors = data.get("policyErrors")
    if isinstance(errors, list) and errors:
        out += "\nRejected (not applied):\n" + "\n".join(f"  {e}" for e in errors) + "\n"
    return out


# -- certificates ---------------------------------------------------------------------------


def collect_certificates(dumps: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every tunnel's certificates, each tagged with the node it came from."""
    return _tagged(dumps, "certificates")


def render_certificates(certs: Sequence[dict[str, Any]], with_node: bool = True) -> str:
    headers = ["CERTIFICATE NAME", "TYPE", "SERIAL", "NOT BEFORE", "NOT AFTER", "STATE"]
    rows = []
    for c in certs:
        row = [
            _text(c.get("identity")),
            _text(c.get("type") or "Leaf"),
            _text(c.get("serial")),
            _text(c.get("notBefore")),
            _text(c.get("notAfter")),
            _text(c.get("state")),
        ]
        rows.append([_text(c.get("node")), *row] if with_node else row)
    rows.sort()
    return table(["NODE", *headers] if with_node else headers, rows)


# -- connections ----------------------------------------------------------------------------


def collect_connections(per_node: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every tunnel's open connections, each tagged with the node it came from."""
    out: list[dict[str, Any]] = []
    for node, items in per_node.items():
        out.extend({**c, "node": node} for c in _dicts(items))
    return out


def age(seconds: float) -> str:
    """A duration as kubectl shows ages: 42s, 3m12s, 2h5m, 3d4h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def render_connections(
    conns: Sequence[dict[str, Any]], now: float | None = None, with_node: bool = True
) -> str:
    now = time.time() if now is None else now
    headers = [
        "DIRECTION",
        "POD",
        "SOURCE",
        "DESTINATION",
        "SOURCE IDENTITY",
        "DESTINATION IDENTITY",
        "SENT",
        "RECEIVED",
        "AGE",
    ]
    rows = []
    for c in sorted(conns, key=lambda c: _number(c.get("startedAt"), now)):
        started = c.get("startedAt")
        row = [
            _text(c.get("direction")),
            _text(c.get("pod")),
            _text(c.get("src")),
            _text(c.get("dst")),
            _text(c.get("srcIdentity")),
            _text(c.get("dstIdentity")),
            _text(c.get("bytesSent")),
            _text(c.get("bytesReceived")),
            age(now - started) if isinstance(started, int | float) else MISSING,
        ]
        rows.append([_text(c.get("node")), *row] if with_node else row)
    return table(["NODE", *headers] if with_node else headers, rows)


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) else default


# -- explain --------------------------------------------------------------------------------


def _verdict(auth: Any) -> list[str]:
    if not isinstance(auth, dict):
        return [f"authorization:  {MISSING}"]
    allowed = auth.get("allowed")
    verdict = "ALLOWED" if allowed is True else "DENIED" if allowed is False else MISSING
    by = []
    if auth.get("policy"):
        by.append(f"by policy {auth['policy']}")
        if auth.get("rule") is not None:
            by.append(f"rule {auth['rule']}")
        if auth.get("action"):
            by.append(f"({auth['action']})")
    lines = [f"authorization:  {' '.join([verdict, *by])}"]
    if auth.get("reason"):
        lines.append(f"  reason:       {auth['reason']}")
    dry = auth.get("dryRun")
    if isinstance(dry, list):
        lines.extend(f"  dry-run:      {dry_run_text(d)}" for d in dry)
    return lines


def dry_run_text(result: Any) -> str:
    """What a dry-run policy would have done, in words: `DENY policy ns/name would match
    (rule 0): the connection would be denied`."""
    if not isinstance(result, dict):
        return _text(result)
    action = str(result.get("action") or "?")
    policy = _text(result.get("policy"))
    matched = result.get("matched")
    if matched is True:
        rule = result.get("rule")
        where = f" (rule {rule})" if rule is not None else ""
        effect = {"ALLOW": "allowed", "DENY": "denied", "AUDIT": "audited"}.get(action)
        outcome = f": the connection would be {effect}" if effect else ""
        return f"{action} policy {policy} would match{where}{outcome}"
    if matched is False:
        return f"{action} policy {policy} would not match"
    return f"{action} policy {policy}: {MISSING}"


def render_explain(doc: Mapping[str, Any]) -> str:
    src = _dict(doc.get("source"))
    dst = _dict(doc.get("destination"))
    source = _text(src.get("workload"))
    if src.get("enrolled") is False:
        source += " (outside the mesh: no identity)"  # its certificate is never issued
    elif src.get("identity"):
        source += f" ({src['identity']})"
    if src.get("ip"):
        source += f" at {src['ip']}"
    destination = _text(dst.get("input"))
    if dst.get("ip"):
        destination += f" -> {dst['ip']}:{_text(dst.get('port'))}"
    if dst.get("service"):
        destination += f" (service {dst['service']})"
    lines = [
        f"Source:       {source}",
        f"Destination:  {destination}",
        f"Route:        {_text(doc.get('route'))}",
        f"Reason:       {_text(doc.get('reason'))}",
    ]
    if doc.get("warning"):
        lines.append(f"Warning:      {doc['warning']}")
    if "waypoint" in doc or "waypoint_reason" in doc:
        hop = _dict(doc.get("waypoint"))
        what = f"{_text(hop.get('name'))} ({_text(hop.get('status'))})" if hop else "none"
        lines.append(f"Waypoint:     {what}")
        if doc.get("waypoint_reason"):
            lines.append(f"  why:        {doc['waypoint_reason']}")
    if doc.get("selection"):
        lines.append(f"Selection:    {doc['selection']}")
    endpoints = _dicts(doc.get("endpoints"))
    lines.append(f"Endpoints:    {len(endpoints) if endpoints else 'none'}")
    for e in endpoints:
        where = _text(e.get("ip"))
        if e.get("port") is not None:
            where += f":{e['port']}"
        lines.append(f"  - {_text(e.get('workload'))} at {where}")
        detail = [
            f"identity:       {_text(e.get('identity'))}",
            f"node:           {_text(e.get('node'))}",
            f"hbone:          {_text(e.get('hbone'))}",
        ]
        if "healthy" in e:
            detail.append(f"healthy:        {_text(e.get('healthy'))}")
        if e.get("route"):
            detail.append(f"route:          {e['route']}")
        if e.get("delivery"):
            detail.append(f"delivery:       {e['delivery']}")
        if e.get("note"):
            detail.append(f"note:           {e['note']}")
        if "authorization" in e:
            detail.extend(_verdict(e.get("authorization")))
        if "mtls" in e:
            detail.append(f"mtls:           {_text(e.get('mtls'))}")
        lines.extend(f"      {d}" for d in detail)
    return "\n".join(lines) + "\n"


# -- explain --http: the waypoint's L7 decision ------------------------------------------------


def _seconds(value: Any) -> str:
    return f"{value:g}s" if isinstance(value, int | float) else "none"


def _headers_edit(edit: Any) -> str:
    e = _dict(edit)
    parts = [f"set {k}: {v}" for k, v in _pairs(e.get("set"))]
    parts += [f"add {k}: {v}" for k, v in _pairs(e.get("add"))]
    parts += [f"remove {_text(n)}" for n in _list(e.get("remove"))]
    return "; ".join(parts) if parts else MISSING


def _pairs(value: Any) -> list[tuple[str, str]]:
    return [(_text(p[0]), _text(p[1])) for p in _list(value) if isinstance(p, list) and len(p) == 2]


def _retry_line(retry: Any) -> str:
    r = _dict(retry)
    if not r:
        return MISSING
    attempts = r.get("attempts")
    if attempts == 0:
        text = "none"
    else:
        text = f"{_text(attempts)} retries on {_text(r.get('retryOn'))}"
        if r.get("codes"):
            text += f" (codes {_text(r.get('codes'))})"
        if r.get("perTryTimeout") is not None:
            text += f", per try {_seconds(r.get('perTryTimeout'))}"
    if r.get("default"):
        text += " (Istio's default: the route sets none)"
    return text


def _fault_line(fault: Any) -> str:
    f = _dict(fault)
    parts = []
    delay = _dict(f.get("delay"))
    if delay:
        parts.append(f"delay {_seconds(delay.get('seconds'))} for {_text(delay.get('percent'))}%")
    abort = _dict(f.get("abort"))
    if abort:
        code = abort.get("httpStatus")
        what = (
            f"HTTP {code}" if code is not None else f"grpc-status {_text(abort.get('grpcStatus'))}"
        )
        parts.append(f"abort {what} for {_text(abort.get('percent'))}%")
    return ", ".join(parts) if parts else "none"


_UNLIMITED = 2**32 - 1


def _policy_lines(policy: Any) -> list[str]:
    p = _dict(policy)
    if not p:
        return []
    lb = _dict(p.get("loadBalancer"))
    balancer = _text(lb.get("kind"))
    if lb.get("hashOn"):
        balancer += f" on {lb['hashOn']} {_text(lb.get('hashName'))}"
    pool = _dict(p.get("connectionPool"))
    limits = [
        f"{k} {v}" for k, v in pool.items() if isinstance(v, int) and v not in (0, _UNLIMITED)
    ]
    lines = [
        f"lb:             {balancer}",
        f"pool:           {', '.join(limits) if limits else 'no limits'}",
    ]
    od = _dict(p.get("outlierDetection"))
    if od:
        lines.append(
            f"outlier:        eject after {_text(od.get('consecutive5xxErrors'))} consecutive 5xx "
            f"({_text(od.get('consecutiveGatewayErrors'))} gateway errors), every "
            f"{_seconds(od.get('interval'))}, for {_seconds(od.get('baseEjectionTime'))}, "
            f"at most {_text(od.get('maxEjectionPercent'))}%"
        )
    else:
        lines.append("outlier:        off")
    return lines


def render_http(doc: Mapping[str, Any]) -> str:
    """The waypoint's decision for one request (`waypoint.explain`'s JSON), or why there is
    none (`{"waypoint": null, "summary": ...}`)."""
    lines = ["", "HTTP (L7, at the waypoint)"]
    req = _dict(doc.get("request"))
    if req:
        lines.append(
            f"  Request:        {_text(req.get('method'))} {_text(req.get('path'))} "
            f"(host {_text(req.get('authority'))})"
        )
        for k, v in _pairs(req.get("headers")):
            lines.append(f"    {k}: {v}")
    if not doc.get("waypoint"):
        lines.append(f"  Waypoint:       none: {_text(doc.get('summary'))}")
        return "\n".join(lines) + "\n"
    connect = _dict(doc.get("connect"))
    target = _text(connect.get("service") or connect.get("workload"))
    lines.append(
        f"  Waypoint:       {doc['waypoint']} (CONNECT {_text(connect.get('authority'))}, "
        f"{target}, {_text(connect.get('protocol'))})"
    )
    lines.append(f"  Outcome:        {_text(doc.get('summary'))}")
    if not doc.get("l7"):
        return "\n".join(lines) + "\n"
    authn = doc.get("authentication")
    if isinstance(authn, dict):
        ok = "verified" if authn.get("ok") else "REFUSED"
        who = f" as {authn['principal']}" if authn.get("principal") else ""
        lines.append(f"  Authentication: {ok}{who} ({_text(authn.get('reason'))})")
    else:
        lines.append("  Authentication: no RequestAuthentication applies")
    if "authorization" in doc:
        auth = doc.get("authorization")
        lines.extend(f"  {line}" for line in _verdict(auth))
        pols = _dict(auth).get("policies")
        lines.append(f"    policies:     {_text(pols) if pols else 'none apply'}")
    route = _dict(doc.get("route"))
    if route:
        if route.get("matched"):
            lines.append(f"  Route:          {route['matched']}")
        else:
            lines.append("  Route:          default (no route matched: to the service addressed)")
        action = route.get("action")
        if action == "redirect":
            r = _dict(route.get("redirect"))
            lines.append(
                f"  Action:         redirect {_text(r.get('status'))} to {_text(r.get('location'))}"
            )
        elif action == "direct":
            r = _dict(route.get("direct"))
            lines.append(
                f"  Action:         answer {_text(r.get('status'))} {_text(r.get('body'))}"
            )
        else:
            lines.append("  Action:         forward")
            rewrite = _dict(route.get("rewrite"))
            if rewrite:
                path = _dict(rewrite.get("path"))
                parts = []
                if path:
                    parts.append(f"path {_text(path.get('kind'))} {_text(path.get('value'))}")
                if rewrite.get("hostname"):
                    parts.append(f"host {rewrite['hostname']}")
                lines.append(f"  Rewrite:        {', '.join(parts) or MISSING}")
            if route.get("requestHeaders"):
                lines.append(f"  Request hdrs:   {_headers_edit(route['requestHeaders'])}")
            if route.get("responseHeaders"):
                lines.append(f"  Response hdrs:  {_headers_edit(route['responseHeaders'])}")
            for m in _dicts(route.get("mirrors")):
                lines.append(
                    f"  Mirror:         {_text(m.get('service'))}:{_text(m.get('port'))} "
                    f"({_text(m.get('percent'))}%)"
                )
            lines.append(f"  Retry:          {_retry_line(route.get('retry'))}")
            t = _dict(route.get("timeouts"))
            lines.append(
                f"  Timeouts:       request {_seconds(t.get('request'))}, "
                f"per try {_seconds(t.get('backendRequest'))}"
            )
            lines.append(f"  Fault:          {_fault_line(route.get('fault'))}")
    backends = _dicts(doc.get("backends"))
    if route.get("action", "forward") == "forward" and route:
        lines.append(f"  Backends:       {len(backends) if backends else 'none'}")
    for b in backends:
        share = b.get("share")
        pct = f"{share:.0%}" if isinstance(share, int | float) else MISSING
        name = _text(b.get("service")) if b.get("service") else "the pod addressed"
        lines.append(f"    - {name}:{_text(b.get('port'))} weight {_text(b.get('weight'))} ({pct})")
        detail = []
        if b.get("subset"):
            detail.append(f"subset:         {b['subset']}")
        if b.get("status") is not None:
            detail.append(f"answered:       {b['status']} (the backend does not resolve)")
        detail.append(f"sent as:        {_text(b.get('path'))} (host {_text(b.get('authority'))})")
        if b.get("requestHeaders"):
            detail.append(f"request hdrs:   {_headers_edit(b['requestHeaders'])}")
        if b.get("responseHeaders"):
            detail.append(f"response hdrs:  {_headers_edit(b['responseHeaders'])}")
        detail.extend(_policy_lines(b.get("trafficPolicy")))
        eps = _list(b.get("endpoints"))
        detail.append(f"endpoints:      {', '.join(map(_text, eps)) if eps else 'none healthy'}")
        lines.extend(f"        {d}" for d in detail)
    return "\n".join(lines) + "\n"


def probe_request(probe: HttpProbe) -> dict[str, Any]:
    """An `explain --http` probe (waypoint.explain's) as the request the views show."""
    return {
        "method": probe.method,
        "path": probe.path,
        "authority": probe.authority,
        "headers": [list(h) for h in probe.headers],
    }


def no_waypoint(request: Mapping[str, Any], reason: str) -> dict[str, Any]:
    """`--http`'s answer when the connection does not go through a waypoint."""
    return {"waypoint": None, "request": dict(request), "summary": reason}


# -- the commands' shared shape ---------------------------------------------------------------

# kind -> (admin path, collect(per-node answers) -> data, render(data, many nodes) -> text)
View = tuple[str, Callable[[Mapping[str, Any]], Any], Callable[[Any, bool], str]]

VIEWS: dict[str, View] = {
    "workloads": ("/config_dump", collect_workloads, lambda d, _: render_workloads(d)),
    "services": ("/config_dump", collect_services, lambda d, _: render_services(d)),
    "policies": ("/config_dump", collect_policies, lambda d, _: render_policies(d)),
    "certificates": (
        "/config_dump",
        collect_certificates,
        lambda d, many: render_certificates(d, with_node=many),
    ),
    "connections": (
        "/connections",
        collect_connections,
        lambda d, many: render_connections(d, with_node=many),
    ),
}


def show(kind: str, get: Getter, nodes: Sequence[str], output: str, hint: str = "") -> str:
    """Fetch one view from `nodes` and render it (`output` is "table" or "json")."""
    path, collect, render = VIEWS[kind]
    answers = {node: fetch(get, node, path, hint) for node in nodes}
    data = collect(answers)
    return as_json(data) if output == "json" else render(data, len(nodes) > 1)


def explain_doc(get: Getter, node: str, source: str, destination: str, hint: str = "") -> Any:
    """The tunnel's `/debug/explain` answer (an object)."""
    doc = fetch(get, node, explain_path(source, destination), hint)
    if not isinstance(doc, dict):
        raise ViewError(f"node {node}: explain answered {type(doc).__name__}, not an object")
    return doc


def explain(
    get: Getter, node: str, source: str, destination: str, output: str, hint: str = ""
) -> str:
    doc = explain_doc(get, node, source, destination, hint)
    return as_json(doc) if output == "json" else render_explain(doc)


def waypoint_hop(doc: Mapping[str, Any]) -> tuple[str, str] | str:
    """From the tunnel's answer: (the waypoint as bindings name it, the CONNECT authority
    sent to it) when the connection goes through one, else why not (one sentence)."""
    hop = _dict(doc.get("waypoint"))
    reason = str(doc.get("waypoint_reason") or "the connection goes through no waypoint")
    if not hop:
        return f"no waypoint on the path: {reason}"
    if hop.get("status") != "used" or not hop.get("name"):
        return f"the waypoint is not used: {reason}"
    dst = _dict(doc.get("destination"))
    authority = hop.get("authority")
    if not authority and dst.get("ip") is not None:
        ip = str(dst["ip"])
        authority = f"[{ip}]:{dst.get('port')}" if ":" in ip else f"{ip}:{dst.get('port')}"
    if not authority:
        return "the tunnel did not say which destination it sends the waypoint"
    return str(hop["name"]), str(authority)


def render_explain_http(doc: Mapping[str, Any], http: Mapping[str, Any], output: str) -> str:
    """`explain --http`: the tunnel's answer, then the waypoint's (JSON: under "http")."""
    if output == "json":
        return as_json({**doc, "http": dict(http)})
    return render_explain(doc) + render_http(http)
