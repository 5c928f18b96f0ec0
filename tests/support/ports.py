"""A TCP port a test can hand to a process it starts, to listen on later.

The usual way (bind port 0, read the number, close) returns an ephemeral port: until the
process binds it, any outgoing connection on the machine may take that very port as its
source port, and the process then fails with "address already in use" (seen with tests
running in parallel). A port below the kernel's ephemeral range is never handed out that
way; it is picked at random there and checked free on every address.
"""

from __future__ import annotations

import random
import socket

# Above the ports the mesh and its apps listen on (15000-15100, 8080, ...).
LOWEST = 20_000
TRIES = 200


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (its usual default when unreadable)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A port no socket is bound to now, outside the ephemeral range when there is room."""
    high = ephemeral_low() - 1
    for _ in range(TRIES if high > LOWEST else 0):
        port = random.randint(LOWEST, high)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the range: the usual way
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
