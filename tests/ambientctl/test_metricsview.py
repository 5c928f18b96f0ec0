"""`ambientctl metrics`, the pure parts: the text format read back (checked against what the
tunnel's own writer produces), name filters, and the per-source output (golden)."""

from __future__ import annotations

import json
import math

import pytest

from ambientctl import metricsview as mv
from ambientctl import promparse
from meshcore.observability.promtext import COUNTER, GAUGE, Family, render
from tests.ambientctl.golden import check

LABELS = ("reporter", "source_workload", "destination_workload", "response_flags")
TEXT = render(
    [
        Family(
            "istio_tcp_connections_opened_total",
            "Connections opened",
            COUNTER,
            LABELS,
            [(("source", "frontend", "pricing", "-"), 3.0)],
        ),
        Family(
            "istio_tcp_connections_closed_total",
            'Connections closed, "with" a \\ backslash',
            COUNTER,
            LABELS,
            [
                (("destination", "frontend", "pricing", "DENY"), 2.0),
                (("destination", 'we"ird\\name\nx', "pricing", "-"), 1.0),
            ],
        ),
        Family("process_resident_memory_bytes", "Resident memory", GAUGE, (), [((), 3.3e7)]),
        Family("ztunnel_idle", "nothing yet", GAUGE, ("node",), []),
    ]
).decode()
HISTOGRAM = """# HELP request_seconds Request time.
# TYPE request_seconds histogram
request_seconds_bucket{le="0.1"} 1
request_seconds_bucket{le="+Inf"} 2
request_seconds_sum 0.35
request_seconds_count 2
up 1 1700000000000
"""


def test_parses_what_the_tunnel_writes() -> None:
    families = promparse.parse(TEXT)
    assert [f.name for f in families] == [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "process_resident_memory_bytes",
        "ztunnel_idle",
    ]
    closed = families[1]
    assert closed.type == "counter" and closed.help.startswith("Connections closed")
    assert closed.samples[0].labels["response_flags"] == "DENY"
    assert closed.samples[1].labels["source_workload"] == 'we"ird\\name\nx'
    assert families[2].samples[0].value == 3.3e7
    assert families[3].samples == [] and len(families[3].lines) == 2
    assert promparse.render(families) == TEXT  # lines kept as written


def test_a_histogram_is_one_family_and_an_untyped_sample_its_own() -> None:
    families = promparse.parse(HISTOGRAM)
    assert [(f.name, f.type, len(f.samples)) for f in families] == [
        ("request_seconds", "histogram", 4),
        ("up", "untyped", 1),
    ]
    assert families[0].samples[1].labels == {"le": "+Inf"}


def test_special_values_in_json() -> None:
    text = "a NaN\nb +Inf\nc -Inf\n"
    got = [s.to_json()["value"] for f in promparse.parse(text) for s in f.samples]
    assert got == ["NaN", "+Inf", "-Inf"]
    assert math.isnan(promparse.parse(text)[0].samples[0].value)


@pytest.mark.parametrize("bad", ["what is this", 'x{a="1" 2', 'x{a="1"} one'])
def test_what_is_not_the_format_is_refused(bad: str) -> None:
    with pytest.raises(promparse.PromParseError):
        promparse.parse(bad)


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        (None, 4),
        ("tcp", 2),
        ("closed", 1),
        ("^istio_tcp_.*_total$", 2),
        ("opened|resident", 2),
        ("request_seconds_count", 0),
        ("(unbalanced", 0),  # not a regex: taken literally
        ("nothing_matches", 0),
    ],
)
def test_name_filter(pattern: str | None, names: int) -> None:
    chosen = promparse.select(promparse.parse(TEXT), promparse.name_filter(pattern))
    assert len(chosen) == names


def test_a_filter_matches_a_histogram_by_its_sample_names() -> None:
    wanted = promparse.name_filter("_bucket")
    assert [f.name for f in promparse.select(promparse.parse(HISTOGRAM), wanted)] == [
        "request_seconds"
    ]


def scrapes() -> list[mv.Scrape]:
    return [
        mv.Scrape("ztunnel/node1", "node1", promparse.parse(TEXT)),
        mv.Scrape("ztunnel/node2", "node2", [], "unreachable: Connection refused"),
        mv.Scrape("waypoint/travel/waypoint", "node1", promparse.parse(HISTOGRAM)),
    ]


def test_metrics_text_golden() -> None:
    check("metrics_tcp", mv.render_text(scrapes(), promparse.name_filter("istio_tcp")))


def test_metrics_json_golden() -> None:
    doc = mv.to_json(scrapes(), promparse.name_filter("closed"))
    check("metrics_closed_json", json.dumps(doc, indent=2) + "\n")


def test_a_target_that_fails_is_named_not_fatal() -> None:
    def refused(path: str) -> tuple[int, bytes]:
        raise ConnectionRefusedError(111, "Connection refused")

    def not_found(path: str) -> tuple[int, bytes]:
        return 404, b"no"

    def garbage(path: str) -> tuple[int, bytes]:
        return 200, b"<html>"

    def fine(path: str) -> tuple[int, bytes]:
        assert path == "/metrics"
        return 200, TEXT.encode()

    got = [
        mv.scrape(mv.Target(name, "n1", fetch))
        for name, fetch in [("a", refused), ("b", not_found), ("c", garbage), ("d", fine)]
    ]
    assert [s.error for s in got[:3]] == [
        "unreachable: Connection refused",
        "/metrics answered 404",
        "not the Prometheus text format: not a sample: '<html>'",
    ]
    assert got[3].error is None and len(got[3].families) == 4
