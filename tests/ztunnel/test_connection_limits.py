"""Which limit a pod listener's new connection exceeds (the pure decision)."""

from __future__ import annotations

from meshcore.hbone.limits import HboneLimits
from ztunnel.proxy.common import IN_FLIGHT_LIMIT, POD_LIMIT, TUNNEL_LIMIT, connection_refusal

LIMITS = HboneLimits(
    max_connects_in_flight_per_listener=3, max_connections_per_pod=10, max_connections_per_tunnel=50
)


def test_under_every_limit_is_admitted() -> None:
    assert connection_refusal(LIMITS, in_flight=2, relaying=7, tunnel_open=40) is None
    assert connection_refusal(HboneLimits(), 0, 0, 0) is None


def test_each_limit_is_named_at_its_bound() -> None:
    assert connection_refusal(LIMITS, in_flight=3, relaying=0, tunnel_open=0) == IN_FLIGHT_LIMIT
    assert connection_refusal(LIMITS, in_flight=2, relaying=8, tunnel_open=0) == POD_LIMIT
    assert connection_refusal(LIMITS, in_flight=0, relaying=10, tunnel_open=0) == POD_LIMIT
    # The tunnel's table holds relays only: its own listener's in-flight ones are added.
    assert connection_refusal(LIMITS, in_flight=1, relaying=0, tunnel_open=49) == TUNNEL_LIMIT
    assert connection_refusal(LIMITS, in_flight=0, relaying=0, tunnel_open=50) == TUNNEL_LIMIT


def test_the_limits_are_settings_named_after_their_fields() -> None:
    # The reason reported is the field's name, as for every other HBONE limit.
    for reason in (IN_FLIGHT_LIMIT, POD_LIMIT, TUNNEL_LIMIT):
        assert hasattr(LIMITS, reason)
