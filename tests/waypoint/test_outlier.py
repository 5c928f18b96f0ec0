# The case tables read best one case per line.
# ruff: noqa: E501
"""Outlier detection: ejection, return, growing ejection time, the max percent."""

from __future__ import annotations

import pytest

from waypoint.outlier import HostEvent, HostState, OutlierDetector, step
from waypoint.routes.destinationrule import OutlierPolicy

POLICY = OutlierPolicy(consecutive_5xx=3, base_ejection_time=30.0, max_ejection_percent=50)
EPS = ["a", "b", "c", "d"]


def test_consecutive_5xx_eject_then_return():
    det = OutlierDetector(POLICY, EPS)
    assert not det.record("a", 500, 0) and not det.record("a", 503, 1)
    assert det.record("a", 500, 2)
    assert det.healthy(EPS, 3) == ["b", "c", "d"]
    assert det.state("a", 31.9) is HostState.EJECTED
    assert det.state("a", 32.0) is HostState.HEALTHY


def test_success_resets_the_count():
    det = OutlierDetector(POLICY, EPS)
    det.record("a", 500, 0)
    det.record("a", 500, 0)
    det.record("a", 200, 0)
    assert not det.record("a", 500, 0)


def test_second_ejection_is_longer():
    det = OutlierDetector(POLICY, EPS)
    for _ in range(3):
        det.record("a", 500, 0)
    for _ in range(3):
        det.record("a", 500, 30)
    assert det.state("a", 89) is HostState.EJECTED
    assert det.state("a", 90) is HostState.HEALTHY


def test_max_ejection_percent():
    det = OutlierDetector(POLICY, EPS)
    ejected = [det.record(e, 500, 0) for e in EPS for _ in range(3)]
    assert sum(ejected) == 2  # 50% of 4
    assert len(det.healthy(EPS, 1)) == 2


def test_default_ten_percent_ejects_nothing_among_few():
    det = OutlierDetector(OutlierPolicy(), EPS)
    assert not any(det.record("a", 500, 0) for _ in range(10))


@pytest.mark.parametrize(
    ("policy", "outcomes", "ejected"),
    [
        (OutlierPolicy(consecutive_5xx=0, consecutive_gateway_errors=2, max_ejection_percent=100), [502, None], True),
        (OutlierPolicy(consecutive_5xx=0, consecutive_gateway_errors=2, max_ejection_percent=100), [500, 500], False),
        (OutlierPolicy(consecutive_5xx=2, max_ejection_percent=100), [404, 404], False),
    ],
    ids=["gateway errors and connect failures", "500 is no gateway error", "4xx never"],
)  # fmt: skip
def test_gateway_errors(policy, outcomes, ejected):
    det = OutlierDetector(policy, EPS)
    assert any([det.record("a", o, 0) for o in outcomes]) is ejected


def test_state_table_refuses_other_steps():
    assert step(HostState.HEALTHY, HostEvent.EJECT) is HostState.EJECTED
    with pytest.raises(ValueError, match="cannot return when healthy"):
        step(HostState.HEALTHY, HostEvent.RETURN)
