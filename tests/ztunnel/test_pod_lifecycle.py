"""The pod lifecycle table: the steps a pod's proxy may take, and the ones it may not."""

from __future__ import annotations

import pytest

from ztunnel.inpod import PodState, lifecycle_step

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
