"""The log-linear histogram: percentiles within its stated relative error of exact ones."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from meshbench.hist import RELATIVE_ERROR, Histogram, bucket_index, bucket_range

values = st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=400)
percentiles = st.floats(min_value=0.0, max_value=100.0)


def exact(vals: list[int], p: float) -> int:
    """Nearest rank: the smallest value with at least p% of values at or below it."""
    ordered = sorted(vals)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


@given(values, percentiles)
def test_percentile_within_relative_error(vals: list[int], p: float) -> None:
    h = Histogram()
    h.record_all(vals)
    want = exact(vals, p)
    got = h.percentile(p)
    assert abs(got - want) <= want * RELATIVE_ERROR


@given(st.integers(min_value=0, max_value=10**15))
def test_a_value_lies_in_its_bucket(v: int) -> None:
    low, high = bucket_range(bucket_index(v))
    assert low <= v <= high
    assert high - low <= max(0, low * RELATIVE_ERROR)


@given(values, values)
def test_merge_equals_recording_everything(a: list[int], b: list[int]) -> None:
    ha, hb, both = Histogram(), Histogram(), Histogram()
    ha.record_all(a)
    hb.record_all(b)
    both.record_all(a + b)
    ha.merge(hb)
    assert ha == both


@given(values)
def test_json_round_trip_and_cdf(vals: list[int]) -> None:
    h = Histogram()
    h.record_all(vals)
    assert Histogram.from_json(h.to_json()) == h
    cdf = h.cdf(scale=1.0)
    assert cdf[-1][1] == 1.0
    assert [x for x, _ in cdf] == sorted(x for x, _ in cdf)
    assert all(f1 < f2 for (_, f1), (_, f2) in itertools.pairwise(cdf))


def test_summary_names_and_units() -> None:
    h = Histogram()
    h.record_all(range(1_000_000, 2_000_001, 1000))  # 1..2 ms in ns
    s = h.summary()
    assert set(s) == {"p50", "p90", "p99", "p999", "max", "count"}
    assert s["p50"] == pytest.approx(1.5, rel=RELATIVE_ERROR)
    assert s["max"] == 2.0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Histogram().record(-1)
    with pytest.raises(ValueError, match="percentile"):
        Histogram().percentile(101)
    with pytest.raises(ValueError, match="total"):
        Histogram.from_json({"counts": {"5": 2}, "total": 3, "min": 5, "max": 5})
