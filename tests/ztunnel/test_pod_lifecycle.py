"""The pod lifecycle table: the steps a pod's proxy may take, and the ones it may not; and
how often a pod's leftover TIME-WAIT sockets are swept."""

from __future__ import annotations

import pytest

from ztunnel.inpod import (
    TIME_WAIT_SWEEP_INTERVAL,
    TIME_WAIT_SWEEP_SPACING,
    PodState,
    lifecycle_step,
    sweep_interval,
)

S = PodState

ALLOWED = [
    (S.STARTING, S.READY),
    (S.STARTING, S.DRAINING),  # the tunnel drains while a pod is still starting
    (S.STARTING, S.STOPPING),  # a failed start is cleaned up
    (S.READY, S.DRAINING),
    (S.READY, S.STOPPING),
    (S.DRAINING, S.DRAINING),  # released while the whole tunnel drains
    (S.DRAINING, S.STOPPING),
    (S.STOPPING, S.STOPPED),
]


@pytest.mark.parametrize(("current", "to"), ALLOWED, ids=lambda s: s.value)
def test_allowed_steps(current: PodState, to: PodState) -> None:
    assert lifecycle_step(current, to, "web-0") is to


REFUSED = [(current, to) for current in PodState for to in PodState if (current, to) not in ALLOWED]


@pytest.mark.parametrize(("current", "to"), REFUSED, ids=lambda s: s.value)
def test_every_other_step_is_refused_and_named(current: PodState, to: PodState) -> None:
    with pytest.raises(RuntimeError, match=f"pod web-0: {current.value} -> {to.value}"):
        lifecycle_step(current, to, "web-0")


def test_stopped_is_the_end_and_every_state_can_reach_it() -> None:
    reach = {S.STOPPED}
    for _ in PodState:
        reach |= {a for a, b in ALLOWED if b in reach}
    assert reach == set(PodState)
    assert not [b for a, b in ALLOWED if a is S.STOPPED]


def test_time_wait_sweeps_are_spaced_by_the_pods_a_process_serves() -> None:
    """Each sweep walks the kernel's whole connection table: a few pods are swept every 5 s,
    many less often each, so a process never does more than ten sweeps a second."""
    assert sweep_interval(1) == sweep_interval(50) == TIME_WAIT_SWEEP_INTERVAL == 5.0
    assert sweep_interval(200) == pytest.approx(20.0)
    for pods in (1, 10, 51, 200, 5000):
        assert pods / sweep_interval(pods) <= 1 / TIME_WAIT_SWEEP_SPACING + 1e-9
