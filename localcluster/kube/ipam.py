"""Pod addresses from a node's pod CIDR (pure): the lowest free host from .10 upward.

The network address, the node's gateway (.1) and the broadcast address are never handed out,
nor an address a live pod of the node holds. An address is free again once its pod's netns is
gone (the caller releases it then, not when the Pod object goes).
"""

from __future__ import annotations

from collections.abc import Collection
from ipaddress import IPv4Address, IPv4Network

FIRST_HOST_OFFSET = 10


class AddressesExhausted(RuntimeError):
    """Every address of the node's pod CIDR is in use."""


def allocate(
    cidr: IPv4Network, gateway: IPv4Address, taken: Collection[IPv4Address]
) -> IPv4Address:
    reserved = {cidr.network_address, cidr.broadcast_address, gateway}
    addr = cidr.network_address + FIRST_HOST_OFFSET
    while addr in cidr:
        if addr not in taken and addr not in reserved:
            return addr
        addr += 1
    raise AddressesExhausted(
        f"pod CIDR {cidr} has no free address ({len(taken)} in use by live pods)"
    )
