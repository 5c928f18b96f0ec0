"""Request metrics, read back with prometheus_client's own parser; flags; the access log."""

from __future__ import annotations

import io
import ipaddress
import json
import sys
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from meshcore.identity.spiffe import SpiffeId
from meshcore.observability import logging as meshlog
from meshcore.observability.promtext import format_value
from meshcore.policy.model import Action
from tests.support.mesh import service, workload
from waypoint.authz.decide import L7Verdict
from waypoint.telemetry.accesslog import RequestLog
from waypoint.telemetry.flags import MEANING, ResponseFlag, join_flags
from waypoint.telemetry.metrics import (
    BYTE_BUCKETS,
    DURATION_BUCKETS_MS,
    LABEL_NAMES,
    RequestLabels,
    RequestMetrics,
    RequestProtocol,
    request_labels,
)

CLIENT = workload(
    name="frontend-1", namespace="shop", service_account="frontend", workload_name="frontend",
    canonical_name="frontend", canonical_revision="v1", cluster_id="c1",
)  # fmt: skip
SERVER = workload(
    name="reviews-1", namespace="shop", service_account="reviews", workload_name="reviews-v2",
    canonical_name="reviews", canonical_revision="v2", cluster_id="c1",
)  # fmt: skip
REVIEWS = service(name="reviews", namespace="shop")
CLIENT_ID = SpiffeId("cluster.local", "shop", "frontend")


def families(metrics: RequestMetrics):
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def labels(**kw: Any) -> RequestLabels:
    args: dict[str, Any] = dict(
        source=CLIENT,
        source_identity=CLIENT_ID,
        destination=SERVER,
        service=REVIEWS,
        protocol=RequestProtocol.HTTP,
        response_code=200,
    )
    args.update(kw)
    return request_labels(**args)


def test_full_label_set():
    metrics = RequestMetrics()
    metrics.record(labels(), duration_ms=12.0, request_bytes=0, response_bytes=512)
    (sample,) = families(metrics)["istio_requests"].samples
    assert sample.name == "istio_requests_total" and sample.value == 1
    assert sample.labels == {
        "reporter": "waypoint",
        "source_workload": "frontend",
        "source_canonical_service": "frontend",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/frontend",
        "source_app": "frontend",
        "source_version": "v1",
        "source_cluster": "c1",
        "destination_workload": "reviews-v2",
        "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v2",
        "destination_workload_namespace": "shop",
        "destination_principal": "spiffe://cluster.local/ns/shop/sa/reviews",
        "destination_app": "reviews",
        "destination_version": "v2",
        "destination_cluster": "c1",
        "destination_service": "reviews.shop.svc.cluster.local",
        "destination_service_name": "reviews",
        "destination_service_namespace": "shop",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    assert set(LABEL_NAMES) == set(sample.labels)


def test_unknowns_when_nothing_is_known():
    lab = labels(source=None, source_identity=None, destination=None, service=None,
                 response_code=403, response_flags="RBAC", mtls=False)  # fmt: skip
    assert lab.source_workload == lab.destination_principal == lab.destination_service == "unknown"
    assert lab.source_principal == "unknown" and lab.connection_security_policy == "unknown"
    assert (lab.response_code, lab.response_flags) == ("403", "RBAC")


def test_label_sets_are_built_once():
    assert labels() is labels()
    assert labels(response_code=503) is not labels()


RECORD_ARG = {
    "istio_request_duration_milliseconds": "duration_ms",
    "istio_request_bytes": "request_bytes",
    "istio_response_bytes": "response_bytes",
}
HIST_CASES = [
    ("istio_request_duration_milliseconds", DURATION_BUCKETS_MS, [0.2, 0.5, 3, 99999, 4e6]),
    ("istio_request_bytes", BYTE_BUCKETS, [0, 1, 5, 1000, 20_000_000]),
    ("istio_response_bytes", BYTE_BUCKETS, [10, 10, 11, 10_000_000, 0]),
]


@pytest.mark.parametrize(("name", "bounds", "values"), HIST_CASES, ids=[c[0] for c in HIST_CASES])
def test_histogram_buckets_exact(name, bounds, values):
    metrics = RequestMetrics()
    lab = labels()
    for v in values:
        kw: dict[str, Any] = {"duration_ms": 1.0, "request_bytes": 0, "response_bytes": 0}
        kw[RECORD_ARG[name]] = v
        metrics.record(lab, **kw)
    fam = families(metrics)[name]
    assert fam.type == "histogram"
    buckets = [s for s in fam.samples if s.name == f"{name}_bucket"]
    les = [s.labels["le"] for s in buckets]
    assert les == [format_value(b) for b in bounds] + ["+Inf"]
    for s in buckets:
        bound = float(s.labels["le"])
        assert s.value == sum(1 for v in values if v <= bound), s.labels["le"]
        assert {k: v for k, v in s.labels.items() if k != "le"} == dict(
            zip(LABEL_NAMES, lab.values(), strict=True)
        )
    (count,) = [s for s in fam.samples if s.name == f"{name}_count"]
    (total,) = [s for s in fam.samples if s.name == f"{name}_sum"]
    assert count.value == len(values) and total.value == pytest.approx(sum(values))


def test_duration_buckets_are_istios():
    assert DURATION_BUCKETS_MS == (
        0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
        600000, 1800000, 3600000,
    )  # fmt: skip


def test_grpc_messages_counted_only_for_grpc():
    metrics = RequestMetrics()
    grpc = labels(protocol=RequestProtocol.GRPC, grpc_status=14, response_code=200)
    metrics.record(grpc, duration_ms=1, request_bytes=5, response_bytes=7,
                   request_messages=1, response_messages=3)  # fmt: skip
    metrics.record(labels(), duration_ms=1, request_bytes=0, response_bytes=0,
                   request_messages=9, response_messages=9)  # fmt: skip
    fams = families(metrics)
    (req,) = fams["istio_request_messages"].samples
    (resp,) = fams["istio_response_messages"].samples
    assert (req.value, resp.value) == (1, 3)
    assert req.labels["grpc_response_status"] == "14" and req.labels["request_protocol"] == "grpc"


def test_negative_values_refused():
    with pytest.raises(ValueError, match="negative"):
        RequestMetrics().record(labels(), duration_ms=-1, request_bytes=0, response_bytes=0)


def test_empty_families_still_render_help_and_type():
    text = RequestMetrics().render().decode()
    for name in ("istio_requests_total", "istio_request_duration_milliseconds"):
        assert f"# TYPE {name} " in text


FLAG_CASES = [
    ("none", [], "-"),
    ("one", [ResponseFlag.UPSTREAM_REQUEST_TIMEOUT], "UT"),
    ("order fixed", [ResponseFlag.FAULT_ABORT, ResponseFlag.NO_ROUTE], "NR,FI"),
    ("repeats once", [ResponseFlag.RBAC_DENIED, ResponseFlag.RBAC_DENIED], "RBAC"),
]


@pytest.mark.parametrize(
    ("flags", "text"), [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES]
)
def test_join_flags(flags, text):
    assert join_flags(flags) == text


def test_every_flag_has_a_meaning():
    assert set(MEANING) == set(ResponseFlag)
    assert {"UO", "UT", "URX", "UF", "UH", "NR", "DC", "UC", "UPE", "RBAC", "FI", "DI"} <= {
        str(f) for f in ResponseFlag
    }


def test_access_log_one_line_with_fields():
    log = RequestLog(
        method="GET", authority="reviews:9080", path="/api?x=1",
        src=f"{ipaddress.ip_address('10.0.0.1')}:5555", src_identity=CLIENT_ID,
        src_workload=CLIENT, service=REVIEWS, request_id="rid-1", trace_id="ab" * 16,
    )  # fmt: skip
    log.route = "shop/reviews#0"
    log.verdict = L7Verdict(True, "shop/allow", 2, Action.ALLOW, "allowed", ("shop/audit",))
    log.upstream_host = "10.244.1.7:9080"
    log.dst_workload = SERVER
    log.dst_identity = SERVER.identity
    log.attempts = 2
    log.bytes_sent = 512
    log.flag(ResponseFlag.UPSTREAM_CONNECTION_FAILURE)
    with capture_logs() as captured:
        log.finish(200)
        log.finish(500, error="again")  # ignored: one line per request
    (line,) = captured
    assert line["event"] == "request complete"
    assert line["method"] == "GET" and line["authority"] == "reviews:9080"
    assert line["path"] == "/api?x=1" and line["status"] == 200
    assert line["response_flags"] == "UF" and line["attempts"] == 2
    assert line["upstream_host"] == "10.244.1.7:9080"
    assert line["bytes_sent"] == 512 and line["bytes_received"] == 0
    assert line["trace_id"] == "ab" * 16 and line["request_id"] == "rid-1"
    assert line["src.identity"] == str(CLIENT_ID) and line["dst.workload"] == "reviews-1"
    assert line["dst.service"] == "reviews.shop.svc.cluster.local"
    assert line["route"] == "shop/reviews#0"
    assert line["authorization_policy"] == "shop/allow#2" and line["audited"] == ["shop/audit"]
    assert line["duration_ms"] >= 0
    json.dumps(line)  # plain data only


def test_access_log_line_as_the_waypoint_writes_it_is_the_processors_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Logging configured as `python -m waypoint` configures it: the line is rendered
    without structlog's processors, and is the line they would have written."""
    old = structlog.get_config()
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    try:
        meshlog.configure("info")
        log = RequestLog(
            method="GET", authority="reviews:9080", path='/a"b\u00e9', src="10.0.0.1",
            src_identity=CLIENT_ID, src_workload=CLIENT, service=REVIEWS, request_id="r",
        )  # fmt: skip
        log.verdict = L7Verdict(True, "shop/allow", None, Action.ALLOW, "allowed", ("a/b",))
        log.flag(ResponseFlag.UPSTREAM_CONNECTION_FAILURE)
        log.finish(503, error="no healthy upstream")
        structlog.get_logger("access").info("request complete", **log.fields())
        structlog.get_logger("access").info("request complete", **log.fields())
    finally:
        structlog.configure(**old)
    ours, theirs, again = (json.loads(line) for line in out.getvalue().splitlines())
    moment = {"timestamp", "duration_ms"}
    assert list(ours) == list(theirs) == list(again)
    assert {k: v for k, v in ours.items() if k not in moment} == {
        k: v for k, v in theirs.items() if k not in moment
    }
    assert ours["path"] == '/a"b\u00e9' and ours["audited"] == ["a/b"]
    assert ours["status"] == 503 and ours["response_flags"] == "UF"


def test_access_log_denied_request():
    log = RequestLog(method="POST", authority="a", path="/")
    log.verdict = L7Verdict(False, "shop/deny", 0, Action.DENY, "denied")
    with capture_logs() as captured:
        log.finish(403, [ResponseFlag.RBAC_DENIED])
    (line,) = captured
    assert line["status"] == 403 and line["response_flags"] == "RBAC"
    assert line["authorization"] == "denied" and "upstream_host" not in line
