"""Per-namespace sysctls written from outside the namespace."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import nsutil
from tests.support.netns import throwaway_netns

pytestmark = pytest.mark.netns


@pytest.fixture
def ns_fd() -> Iterator[int]:
    with throwaway_netns("sysctl", lo_up=False) as path:
        fd = nsutil.open_netns(path)
        try:
            yield fd
        finally:
            os.close(fd)


def test_sysctl_is_set_in_the_namespace_only(ns_fd: int) -> None:
    key = "net/ipv4/tcp_migrate_req"
    with open(f"/proc/sys/{key}") as f:
        root_before = f.read().strip()
    nsutil.write_sysctl(ns_fd, key, "1")
    assert nsutil.read_sysctl(ns_fd, key) == "1"
    with open(f"/proc/sys/{key}") as f:
        assert f.read().strip() == root_before
    nsutil.write_sysctl(ns_fd, key, "0")
    assert nsutil.read_sysctl(ns_fd, key) == "0"


@pytest.mark.parametrize("name", ["", "/etc/passwd", "net/../../etc"])
def test_bad_names_are_refused(ns_fd: int, name: str) -> None:
    with pytest.raises(ValueError, match="bad sysctl name"):
        nsutil.write_sysctl(ns_fd, name, "1")
