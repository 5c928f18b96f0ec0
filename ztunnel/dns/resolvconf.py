"""The upstream resolvers, from a resolv.conf (the tunnel's own, as upstream ztunnel reads
its /etc/resolv.conf: on a node that is the cluster DNS every pod's resolv.conf names).

Only `nameserver` lines matter: the client already applied its search path, so a
forwarded query is sent as asked. Pure: text in, addresses out.
"""

from __future__ import annotations

import ipaddress

MAX_NAMESERVERS = 3  # glibc's MAXNS: the rest are ignored by every stub resolver too


class ResolvConfError(ValueError):
    """A resolv.conf naming no usable nameserver; the message says what it held."""


def nameservers(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """The nameserver addresses of a resolv.conf, in order, at most three. A malformed
    `nameserver` line is an error (a typo must not silently send DNS elsewhere)."""
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        words = line.split()
        if not words or words[0] != "nameserver":
            continue
        if len(words) != 2:
            raise ResolvConfError(f"line {lineno}: expected 'nameserver <ip>', got {raw!r}")
        try:
            ip = ipaddress.ip_address(words[1].split("%", 1)[0])
        except ValueError:
            raise ResolvConfError(f"line {lineno}: {words[1]!r} is not an IP address") from None
        if ip not in out and len(out) < MAX_NAMESERVERS:
            out.append(ip)
    if not out:
        raise ResolvConfError("no nameserver line")
    return tuple(out)
