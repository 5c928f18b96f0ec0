"""Per-namespace sysctls written from outside the namespace."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from pyroute2 import netns

import nsutil

pytestmark = pytest.mark.netns


@pytest.fixture
def ns_fd() -> Iterator[int]:
    name = f"sysctl-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    fd = nsutil.open_netns(nsutil.netns_path(name))
    try:
        yield fd
    finally:
        os.close(fd)
        netns.remove(name)


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
