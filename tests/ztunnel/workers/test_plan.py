"""How many processes a tunnel runs, from TUNNEL_WORKERS and the cores."""

from __future__ import annotations

import pytest

from ztunnel.config import parse_config
from ztunnel.workers.plan import default_workers, worker_count

from ..test_config import BASE


@pytest.mark.parametrize(
    ("cores", "expected"), [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (16, 8), (64, 8)]
)
def test_default_leaves_small_nodes_one_process_and_half_of_larger_ones(
    cores: int, expected: int
) -> None:
    assert default_workers(cores) == expected


def test_the_setting_wins_over_the_cores() -> None:
    assert worker_count(2, 1) == 2
    assert worker_count(0, 16) == 8
    with pytest.raises(ValueError, match=r"not in 0\.\.64"):
        worker_count(65, 2)


def test_tunnel_workers_is_parsed_and_bounded() -> None:
    assert parse_config(BASE).workers == 0
    assert parse_config({**BASE, "TUNNEL_WORKERS": "2"}).workers == 2
    with pytest.raises(ValueError, match="TUNNEL_WORKERS"):
        parse_config({**BASE, "TUNNEL_WORKERS": "65"})
