"""Throwaway network namespaces for the netns tier (root only; importing needs nothing).

Each has a unique name from its prefix, so tests of several runs never share one, and is
removed when the context ends, whatever happened inside. Removing a netns takes its
links, routes, rules, qdiscs and filters with it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute, netns

import nsutil


@contextmanager
def throwaway_netns(prefix: str, lo_up: bool = True) -> Iterator[str]:
    """A fresh named netns (lo up unless told otherwise); yields its path."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    netns.create(name)
    try:
        path = nsutil.netns_path(name)
        if lo_up:
            with IPRoute(netns=path, flags=0) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        yield path
    finally:
        netns.remove(name)
