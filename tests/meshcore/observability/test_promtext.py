"""The hand-written Prometheus text format, checked against prometheus_client: its parser
reads back what we write, and its writer writes the same bytes for the same families."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from meshcore.observability import promtext
from meshcore.observability.promtext import (
    COUNTER,
    GAUGE,
    Family,
    ProcessMetrics,
    format_value,
    render,
)

TRICKY = [
    'quote " inside',
    "back\\slash",
    "trailing backslash\\",
    "new\nline",
    "\\n literally",
    '\\"',
    "unicode é ü 漢字 🚀",
    "",
    "tab\there",
    "carriage\rreturn",
    "{braces}=,commas",
]


def parse(text: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def reference(families: list[Family]) -> bytes:
    """The same families written by prometheus_client."""

    class Collector:
        def collect(self) -> Iterator[Metric]:
            for f in families:
                kind = CounterMetricFamily if f.type == COUNTER else GaugeMetricFamily
                m = kind(f.name, f.help, labels=f.labels)
                for values, value in f.samples:
                    m.add_metric(values, value)
                yield m

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry)


@pytest.mark.parametrize("value", TRICKY)
def test_tricky_label_values_round_trip_through_the_reference_parser(value):
    fam = Family("x_total", "help", COUNTER, ("a", "b"), [((value, "plain"), 3)])
    got = parse(render([fam]))
    assert got == {"x_total": [({"a": value, "b": "plain"}, 3.0)]}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(), min_size=1, max_size=5, unique=True))
def test_any_label_values_round_trip(values):
    fam = Family("y", "h", GAUGE, ("v",), [((v,), i) for i, v in enumerate(values)])
    got = parse(render([fam]))
    assert got == {"y": [({"v": v}, float(i)) for i, v in enumerate(values)]}


def test_same_bytes_as_prometheus_client():
    families = [
        Family(
            "istio_tcp_connections_opened_total",
            "Opened \\ with a backslash\nand a newline in the help",
            COUNTER,
            ("z_last", "a_first", "mid"),
            [
                (("1", "2", "3"), 1),
                ((TRICKY[0], TRICKY[1], TRICKY[3]), 12345678),
                (("x", "y", TRICKY[6]), 10**15),
            ],
        ),
        Family("empty_total", "no samples yet", COUNTER, ("a",), []),
        Family(
            "g",
            "a gauge",
            GAUGE,
            (),
            [((), 0.1)],
        ),
        Family("h", "values", GAUGE, ("k",), [(("nan",), math.nan), (("inf",), math.inf)]),
        Family("neg", "values", GAUGE, ("k",), [(("a",), -1.5), (("b",), -(10**9))]),
    ]
    assert render(families) == reference(families)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (0, "0.0"),
        (1, "1.0"),
        (123456, "123456.0"),
        (1234567, "1.234567e+06"),
        (10**12, "1e+12"),
        (0.25, "0.25"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_values_are_formatted_as_go_prints_them(value, want):
    assert format_value(value) == want


def test_label_count_mismatch_is_refused():
    with pytest.raises(ValueError, match="label values"):
        render([Family("x", "h", GAUGE, ("a", "b"), [(("only one",), 1)])])


def test_process_metrics_have_the_standard_names_and_sane_values():
    text = ProcessMetrics().render()
    got = {name: samples[0][1] for name, samples in parse(text).items()}
    assert set(got) == {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
        "process_max_fds",
    }
    with open("/proc/self/status") as f:
        vm_rss_kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    # The same RSS as the kernel reports, within what a scrape can allocate in between.
    assert abs(got["process_resident_memory_bytes"] - vm_rss_kb * 1024) < 8 * 1024 * 1024
    assert got["process_virtual_memory_bytes"] >= got["process_resident_memory_bytes"]
    assert time.time() - 24 * 3600 < got["process_start_time_seconds"] <= time.time()
    assert 0 < got["process_cpu_seconds_total"] <= time.process_time() + 1
    assert 0 < got["process_open_fds"] <= got["process_max_fds"]
    assert abs(got["process_open_fds"] - len(os.listdir("/proc/self/fd"))) <= 2


def test_process_metrics_read_as_prometheus_client_reads_them():
    """Same family names, types and help text as prometheus_client's ProcessCollector."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)

    def shape(text: bytes) -> list[tuple[str, str, str]]:
        return [
            (f.name, f.type, f.documentation) for f in text_string_to_metric_families(text.decode())
        ]

    assert shape(ProcessMetrics().render()) == shape(generate_latest(registry))
    assert promtext.CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_process_metrics_without_proc_are_absent(tmp_path):
    assert ProcessMetrics(proc=str(tmp_path)).render() == b""
