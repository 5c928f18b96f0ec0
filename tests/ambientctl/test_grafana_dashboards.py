"""The Grafana dashboards (dashboards/grafana/*.json) ask only for what the proxies export:
every PromQL expression parses, every metric it names is one the code defines, and every
label it matches, groups or joins on is one of that metric's labels."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from meshcore.observability import metrics as tcp
from meshcore.observability.promtext import ProcessMetrics
from waypoint.telemetry import metrics as l7
from ztunnel.dns import metrics as dns

from .promql import PromQLError, parse

DASHBOARDS = sorted((Path(__file__).parents[2] / "dashboards" / "grafana").glob("*.json"))
# Labels Prometheus adds to every series it scrapes.
SCRAPE_LABELS = frozenset({"job", "instance"})
# Grafana's own variables, as Grafana substitutes them before the query reaches Prometheus.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*(?P<label>\w+)\s*\)$")


def exported() -> dict[str, frozenset[str]]:
    """Every metric the tunnel and the waypoint expose, with its labels, from the modules
    that define them."""
    out: dict[str, frozenset[str]] = {}
    tcp_labels = frozenset(tcp.LABEL_NAMES)
    for name in (tcp.OPENED, tcp.CLOSED, tcp.RECEIVED_BYTES, tcp.SENT_BYTES):
        out[f"{name}_total"] = tcp_labels
    out[tcp.SOCKETS_OPEN] = tcp_labels
    out[f"{tcp.HBONE_REFUSED}_total"] = frozenset(tcp.HBONE_REFUSED_LABELS)
    l7_labels = frozenset(l7.LABEL_NAMES)
    for name in (l7.REQUESTS, l7.REQUEST_MESSAGES, l7.RESPONSE_MESSAGES):
        out[name] = l7_labels
    for name in (l7.DURATION, l7.REQUEST_BYTES, l7.RESPONSE_BYTES):
        out[f"{name}_bucket"] = l7_labels | {"le"}
        out[f"{name}_count"] = out[f"{name}_sum"] = l7_labels
    for name in (dns.REQUESTS, dns.UPSTREAM_REQUESTS, dns.UPSTREAM_FAILURES):
        out[name] = frozenset(dns.LABELS)
    for family in ProcessMetrics().families():
        out[family.name] = frozenset(family.labels)
    return {name: labels | SCRAPE_LABELS for name, labels in out.items()}


EXPORTED = exported()


def check(expr: str) -> list[str]:
    """What is wrong with one expression (empty: nothing); raises PromQLError if it does
    not parse."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    query = parse(expr)
    problems = []
    if not query.selectors:
        problems.append(f"{expr}: selects no metric")
    for s in query.selectors:
        if s.metric not in EXPORTED:
            problems.append(f"{expr}: no metric {s.metric!r} is exported")
            continue
        problems += [
            f"{expr}: {s.metric} has no label {label!r}"
            for label, _, _ in s.matchers
            if label not in EXPORTED[s.metric]
        ]
    for label, metrics in query.groupings:
        known = set().union(*(EXPORTED.get(m, frozenset()) for m in metrics))
        if label not in known:
            problems.append(f"{expr}: groups by {label!r}, a label of none of {sorted(metrics)}")
    return problems


def exprs(doc: dict[str, Any]) -> list[str]:
    """The PromQL of every panel target and every query variable."""
    out = [t["expr"] for p in doc["panels"] for t in p.get("targets", []) if "expr" in t]
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        m = LABEL_VALUES.match(var["definition"])
        assert m is not None, f"variable {var['name']}: not label_values(SELECTOR, LABEL)"
        out.append(f"count by ({m.group('label')}) ({m.group('selector')})")
    return out


def test_there_are_dashboards() -> None:
    assert {p.name for p in DASHBOARDS} >= {"ambient-mesh.json", "ambient-tunnels.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_uses_exported_metrics_and_their_labels(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert doc["uid"] and doc["title"] and doc["panels"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in doc["panels"]:
        assert p.get("targets"), f"panel {p['title']!r} has no query"
    queries = exprs(doc)
    problems = [problem for e in queries for problem in check(e)]
    assert problems == []
    # The mesh dashboard shows traffic, errors, latency and denials: the figures users open it for.
    used = {s.metric for e in queries for s in parse(_subst(e)).selectors}
    assert used & {"istio_tcp_connections_opened_total", "istio_requests_total"}


def _subst(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


@pytest.mark.parametrize(
    ("expr", "wrong"),
    [
        ("rate(istio_tcp_conections_opened_total[1m])", "no metric"),
        ('sum(rate(istio_requests_total{respone_code="200"}[1m]))', "no label"),
        ("sum by (response_code) (istio_tcp_sockets_open)", "groups by"),
        ("istio_requests_total / on (nope) istio_tcp_sockets_open", "groups by"),
    ],
)
def test_the_check_finds_a_wrong_name(expr: str, wrong: str) -> None:
    problems = check(expr)
    assert len(problems) == 1 and wrong in problems[0]


@pytest.mark.parametrize(
    "expr",
    ["sum(rate(x[1m])", "rate(x[1m]) +", "foo(x)", 'x{a="b" c="d"}', "x[5q]", '{a="b"}'],
)
def test_what_is_not_promql_is_refused(expr: str) -> None:
    with pytest.raises(PromQLError):
        parse(expr)


def test_promql_forms_dashboards_use_are_read() -> None:
    q = parse(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x=~"1.*", y!="2"}[5m:1m]))) '
        "> bool 3 and on (x) group_left (y) -max without (z) (b offset 5m) / 2"
    )
    assert [s.metric for s in q.selectors] == ["a_bucket", "b"]
    assert q.selectors[0].matchers == (("x", "=~", "1.*"), ("y", "!=", "2"))
    assert sorted(label for label, _ in q.groupings) == ["le", "x", "y", "z"]
