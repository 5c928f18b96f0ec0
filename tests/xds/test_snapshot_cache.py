"""The server's encoding cache: a snapshot made with it is exactly the one made without it,
and only the entries that changed are encoded again."""

from __future__ import annotations

from unittest import mock

from controlplane.xds.server import EncodeCache, snapshot_of
from meshcore.xds import convert
from tests.xds.states import demo_state
from tests.xds.test_server import changed_state


def test_cached_snapshots_equal_fresh_ones_and_encode_only_what_changed() -> None:
    cache: EncodeCache = {}
    assert snapshot_of(demo_state(), cache) == snapshot_of(demo_state())
    assert len(cache) == sum(len(v) for v in snapshot_of(demo_state()).values())
    real = convert.encode_item
    with mock.patch.object(convert, "encode_item", side_effect=real) as enc:
        assert snapshot_of(changed_state(), cache) == snapshot_of(changed_state())
        # changed_state: one workload changed, one removed, one policy removed -> one encode
        # through the cache (the second, uncached call above encodes everything).
        cached_calls = enc.call_count - sum(len(v) for v in snapshot_of(changed_state()).values())
    assert cached_calls == 1
    # Removed entries leave the cache with the state.
    assert len(cache) == sum(len(v) for v in snapshot_of(changed_state()).values())
