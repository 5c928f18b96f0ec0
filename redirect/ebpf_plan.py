"""The eBPF capture as data: which program goes on which hook, under which tc name, built
with which settings. Pure; `redirect.ebpf` does the netlink, sysctl and bcc work.

How the mode works (the program's own header comment has the details):
- ingress of every interface with an IPv4 address: new inbound TCP is sk_assign'ed to the
  15006 listener (15008 and kubelet probes pass);
- egress of those interfaces: the app's new outbound TCP, and every packet of a flow a pod
  socket owns, is turned back onto lo's ingress with the connection mark;
- ingress of lo: a turned-back SYN is sk_assign'ed to the 15001 listener.
The pod also needs what the iptables mode has for its transparent sockets (the fwmark rule
and the local default route in table 100: here they deliver the turned-back packets, whose
destination is not a pod address), and `accept_local` on lo: a packet injected into lo's
ingress has no route attached, and its source is a pod address, which the kernel's
martian-source check refuses on input unless lo accepts local sources.

Identity: our filters sit at one tc priority and handle and carry a name of the form
`ambient-capture:<role>:<build>[:al=<0|1>]`. `build` is a digest of the program source and
the settings, so installing the same thing twice is recognised without compiling; the lo
filter also records lo's `accept_local` value from before the capture, so removal can
restore it. Nothing is pinned: the filters hold the programs.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from redirect.rules import InpodConfig

SOURCE_PATH = Path(__file__).with_name("bpf") / "capture.c"

NAME_PREFIX = "ambient-capture"
FILTER_PREF = 0x539  # tc priority of our filters (the tunnel mark, for recognisability)
FILTER_HANDLE = 1
LOOPBACK = "lo"

# lo's accept_local, as the kernel exposes it in the pod's netns.
ACCEPT_LOCAL_SYSCTL = "/proc/sys/net/ipv4/conf/lo/accept_local"

_BUILD_DIGEST_CHARS = 16


class EbpfConfigError(ValueError):
    """The eBPF mode cannot honour this InpodConfig; the message names the field."""


class Direction(enum.Enum):
    INGRESS = 0xFFFFFFF2  # clsact's ingress hook (tc parent ffff:fff2)
    EGRESS = 0xFFFFFFF3  # clsact's egress hook (ffff:fff3)

    @property
    def parent(self) -> int:
        return self.value


@dataclass(frozen=True, slots=True)
class Hook:
    """One program on one hook: `function` in capture.c, `role` in the filter name."""

    role: str
    function: str
    direction: Direction


POD_INGRESS = Hook("in", "pod_ingress", Direction.INGRESS)
POD_EGRESS = Hook("out", "pod_egress", Direction.EGRESS)
LO_INGRESS = Hook("lo", "lo_ingress", Direction.INGRESS)
HOOKS = (LO_INGRESS, POD_INGRESS, POD_EGRESS)
FUNCTIONS = tuple(h.function for h in HOOKS)


@dataclass(frozen=True, slots=True)
class FilterName:
    """What a filter's tc name says: which hook, which build, and (lo only) lo's
    accept_local before the capture."""

    role: str
    build: str
    accept_local_before: int | None = None

    def text(self) -> str:
        base = f"{NAME_PREFIX}:{self.role}:{self.build}"
        if self.accept_local_before is None:
            return base
        return f"{base}:al={self.accept_local_before}"

    @classmethod
    def parse(cls, text: str | None) -> FilterName | None:
        """The name's parts, or None for a filter that is not ours."""
        if not text:
            return None
        parts = text.split(":")
        if parts[0] != NAME_PREFIX or len(parts) not in (3, 4) or not parts[1] or not parts[2]:
            return None
        before: int | None = None
        if len(parts) == 4:
            key, _, value = parts[3].partition("=")
            if key != "al" or value not in ("0", "1"):
                return None
            before = int(value)
        return cls(parts[1], parts[2], before)


def check_config(cfg: InpodConfig) -> None:
    """Refuse what the eBPF mode does not implement, rather than capture less than the
    iptables mode would."""
    if cfg.probe_snat_ip.version != 4:
        raise EbpfConfigError(f"probe_snat_ip: {cfg.probe_snat_ip} is not IPv4")


def cflags(cfg: InpodConfig, release: bool = False) -> tuple[str, ...]:
    """The program's settings as compiler definitions (CFG_* in capture.c). `release`
    builds the variant that steers no new connection (a pod leaving the mesh)."""
    # The probe address is compared with a raw __be32 read from the packet, so it is passed
    # as the integer whose in-memory bytes (host order) are the address in network order.
    probe_be32 = int.from_bytes(ipaddress.IPv4Address(cfg.probe_snat_ip).packed, sys.byteorder)
    return (
        f"-DCFG_MASK={cfg.mask:#x}u",
        f"-DCFG_TUNNEL_MARK={cfg.tunnel_mark:#x}u",
        f"-DCFG_CONN_MARK={cfg.conn_mark:#x}u",
        f"-DCFG_PROBE_IP={probe_be32:#x}u",
        f"-DCFG_OUTBOUND_PORT={cfg.outbound_port}",
        f"-DCFG_INBOUND_PORT={cfg.inbound_plain_port}",
        f"-DCFG_HBONE_PORT={cfg.inbound_hbone_port}",
        f"-DCFG_RELEASE={int(release)}",
        f"-DCFG_CAPTURE_DNS={int(cfg.capture_dns)}",
        f"-DCFG_DNS_PORT={cfg.dns_port}",
    )


def build_id(source: str, flags: Sequence[str]) -> str:
    """A digest of everything that makes the loaded programs what they are."""
    h = hashlib.sha256(source.encode())
    for flag in flags:
        h.update(b"\0" + flag.encode())
    return h.hexdigest()[:_BUILD_DIGEST_CHARS]


def filter_name(hook: Hook, build: str, accept_local_before: int | None) -> FilterName:
    """The name `hook`'s filter gets; only lo's records accept_local."""
    return FilterName(hook.role, build, accept_local_before if hook is LO_INGRESS else None)


def up_to_date(current: FilterName | None, hook: Hook, build: str) -> bool:
    """Whether the filter found on `hook` is already this build's (so it is left alone,
    keeping its program id: installing twice changes nothing)."""
    return current is not None and current.role == hook.role and current.build == build
