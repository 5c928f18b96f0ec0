"""In-pod capture rules as data and text: the pure half of the iptables backend.

Nothing here runs a command or touches a namespace. Given an `InpodConfig` (and, where a
decision depends on what a pod already has, the text `iptables-save` printed there), the
functions return the exact `iptables-restore --noflush` input to apply or remove the rules,
and the policy-routing entries as frozen values. `redirect.iptables` does the I/O.

Invariants:
- Our chains are ISTIO_PRERT and ISTIO_OUTPUT in the mangle, nat and (DNS capture only) raw
  tables, and ISTIO_INPUT in mangle. Declaring a chain in restore text (":CHAIN - [0:0]")
  creates or flushes it, so the chain bodies are rewritten whole on every apply, never
  appended to.
- Jumps from the built-in chains are the only lines that could pile up on a re-apply; they
  are emitted only when the current ruleset lacks them (`missing_jumps`).
- Rules are written in the canonical form `iptables-save` prints them in, so a saved ruleset
  can be compared line by line with what we generate (`chain_bodies_match`).
- Removal is derived from the current ruleset, not from a config: whatever variant was
  applied (with or without DNS capture), every rule that jumps to one of our chains and the
  chains themselves go, in one atomic restore.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from meshcore.defaults import HBONE_PORT, INBOUND_PLAIN_PORT, OUTBOUND_PORT, TUNNEL_MARK

CHAIN_PREROUTING = "ISTIO_PRERT"
CHAIN_OUTPUT = "ISTIO_OUTPUT"
# mangle only: holds a SYN for a tunnel port while no tunnel listens (see chain_bodies).
CHAIN_INPUT = "ISTIO_INPUT"
OUR_CHAINS = (CHAIN_PREROUTING, CHAIN_OUTPUT, CHAIN_INPUT)

# The tables we may touch, in the order restore text lists them.
TABLES = ("mangle", "nat", "raw")

# The node SNATs kubelet probes to this link-local address (upstream's default).
DEFAULT_PROBE_SNAT_IP = IPv4Address("169.254.7.127")

# Full 32-bit masks: restore-mark copies the whole connmark, as upstream does.
# Only a connection's SYN is redirected. Installing rules switches conntrack on in the pod,
# which then picks up connections opened before mid-stream; without this match their next
# packet would be NATed to a tunnel port that never saw their handshake, and reset. With it
# they keep flowing, untouched, until they close: enrolment does not break running apps.
# (Written as iptables-save prints it, so re-applying finds it unchanged.)
_SYN = "--tcp-flags FIN,SYN,RST,ACK SYN"
_RESTORE_MASK = "0xffffffff"

# Routing tables the kernel reserves (unspec, default, main, local) and 252 (compat alias).
_RESERVED_TABLES = frozenset({0, 252, 253, 254, 255})
# "lookup main" sits at 32766; a rule at or after it would never see the packet first.
_MAIN_RULE_PRIORITY = 32766


class RulesConfigError(ValueError):
    """An InpodConfig value is out of range or inconsistent; the message names the field."""


class SaveParseError(ValueError):
    """`iptables-save` or `nft -j` output could not be understood."""


@dataclass(frozen=True, slots=True)
class InpodConfig:
    """Everything the in-pod rules depend on. Defaults are Istio ambient's values."""

    tunnel_mark: int = TUNNEL_MARK  # SO_MARK on every socket the tunnel opens
    mask: int = 0xFFF  # the mark bits we own; the rest belong to others
    conn_mark: int = 0x111  # connmark of connections the tunnel opened into the pod
    probe_snat_ip: IPv4Address = DEFAULT_PROBE_SNAT_IP  # kubelet probes arrive from here
    outbound_port: int = OUTBOUND_PORT
    inbound_plain_port: int = INBOUND_PLAIN_PORT
    inbound_hbone_port: int = HBONE_PORT
    route_table: int = 100
    rule_priority: int = 32764
    capture_dns: bool = False
    dns_port: int = 15053

    def __post_init__(self) -> None:
        probe: object = self.probe_snat_ip  # typed loosely: callers may pass text at runtime
        if isinstance(probe, str):
            # Accept the textual form at the edge; store the parsed value.
            try:
                object.__setattr__(self, "probe_snat_ip", IPv4Address(probe))
            except ValueError as e:
                raise RulesConfigError(f"probe_snat_ip: not an IPv4 address: {e}") from None
        elif not isinstance(probe, IPv4Address):
            raise RulesConfigError(
                f"probe_snat_ip: expected IPv4Address, got {self.probe_snat_ip!r}"
            )
        if not 0 < self.mask <= 0xFFFFFFFF:
            raise RulesConfigError(f"mask: must be a non-zero 32-bit value, got {self.mask:#x}")
        for name in ("tunnel_mark", "conn_mark"):
            value = getattr(self, name)
            if not 0 < value <= self.mask or value & ~self.mask:
                raise RulesConfigError(
                    f"{name}: {value:#x} must be non-zero and fit inside mask {self.mask:#x}"
                )
        if self.tunnel_mark == self.conn_mark:
            raise RulesConfigError(
                f"tunnel_mark and conn_mark are both {self.tunnel_mark:#x}; they must differ"
            )
        ports = {
            "outbound_port": self.outbound_port,
            "inbound_plain_port": self.inbound_plain_port,
            "inbound_hbone_port": self.inbound_hbone_port,
            "dns_port": self.dns_port,
        }
        for name, port in ports.items():
            if not 0 < port < 65536:
                raise RulesConfigError(f"{name}: {port} is not a TCP/UDP port (1-65535)")
        if len(set(ports.values())) != len(ports):
            raise RulesConfigError(f"ports must be distinct, got {ports}")
        if self.route_table in _RESERVED_TABLES or not 0 < self.route_table <= 0xFFFFFFFF:
            raise RulesConfigError(
                f"route_table: {self.route_table} is reserved or out of range "
                "(use 1-251 or 256-4294967295)"
            )
        if not 0 < self.rule_priority < _MAIN_RULE_PRIORITY:
            raise RulesConfigError(
                f"rule_priority: {self.rule_priority} must be 1-{_MAIN_RULE_PRIORITY - 1}, "
                "before the main table's rule"
            )

    @property
    def tunnel_mark_spec(self) -> str:
        return f"{self.tunnel_mark:#x}/{self.mask:#x}"

    @property
    def conn_mark_spec(self) -> str:
        return f"{self.conn_mark:#x}/{self.mask:#x}"


@dataclass(frozen=True, slots=True)
class Jump:
    """A rule `-A <builtin> -j <our chain>` in `table`: the hook into our chains."""

    table: str
    builtin: str
    target: str

    @property
    def spec(self) -> str:
        return f"-A {self.builtin} -j {self.target}"


@dataclass(frozen=True, slots=True)
class FwmarkRule:
    """`ip rule add fwmark <mark>/<mask> pref <priority> lookup <table>` (IPv4)."""

    fwmark: int
    fwmask: int
    priority: int
    table: int


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """`ip route add local 0.0.0.0/0 dev lo table <table>`: every marked packet is delivered
    locally, so replies to connections the tunnel opened into the pod go back to the tunnel
    instead of out of eth0."""

    table: int
    dst: str = "0.0.0.0/0"
    dev: str = "lo"


@dataclass(frozen=True, slots=True)
class Routing:
    rule: FwmarkRule
    route: LocalRoute


@dataclass(frozen=True, slots=True)
class SavedRules:
    """One `iptables-save` output, parsed: per table, its chains and its rules in order.

    A rule is kept as (chain, the text after "-A <chain> "), exactly as printed.
    """

    chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rules: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)

    def has_table(self, table: str) -> bool:
        return table in self.chains

    def table_rules(self, table: str) -> tuple[tuple[str, str], ...]:
        return self.rules.get(table, ())


EMPTY = SavedRules()


def _tables_for(cfg: InpodConfig) -> tuple[str, ...]:
    # raw is only needed for the DNS conntrack-zone rules; touching it otherwise would
    # create an empty table (and, with iptables-nft, an extra hook) for nothing.
    return TABLES if cfg.capture_dns else ("mangle", "nat")


def chains_for(table: str) -> tuple[str, ...]:
    """Our chains in `table`."""
    return OUR_CHAINS if table == "mangle" else (CHAIN_PREROUTING, CHAIN_OUTPUT)


def jumps(cfg: InpodConfig) -> tuple[Jump, ...]:
    """The hooks from built-in chains into ours, per table, in upstream's order (then
    ours: the INPUT hook)."""
    out = [
        Jump("mangle", "PREROUTING", CHAIN_PREROUTING),
        Jump("mangle", "OUTPUT", CHAIN_OUTPUT),
        Jump("mangle", "INPUT", CHAIN_INPUT),
        Jump("nat", "PREROUTING", CHAIN_PREROUTING),
        Jump("nat", "OUTPUT", CHAIN_OUTPUT),
    ]
    if cfg.capture_dns:
        out += [Jump("raw", "PREROUTING", CHAIN_PREROUTING), Jump("raw", "OUTPUT", CHAIN_OUTPUT)]
    return tuple(out)


def chain_bodies(cfg: InpodConfig) -> dict[str, tuple[tuple[str, str], ...]]:
    """Per table, the rules of our chains as (chain, spec) in evaluation order.

    Specs are in the canonical form iptables-save prints (e.g. "-m tcp" after "-p tcp").
    """
    tm, cm = cfg.tunnel_mark_spec, cfg.conn_mark_spec
    probe = f"{cfg.probe_snat_ip}/32"
    pre, out, inp = CHAIN_PREROUTING, CHAIN_OUTPUT, CHAIN_INPUT
    ports = f"{cfg.outbound_port},{cfg.inbound_plain_port},{cfg.inbound_hbone_port}"
    mangle = (
        # A packet the tunnel sent into the pod marks its connection, so the pod's replies...
        (pre, f"-m mark --mark {tm} -j CONNMARK --set-xmark {cm}"),
        # ...get the mark back on the way out and are routed to lo by the fwmark rule.
        (
            out,
            f"-m connmark --mark {cm} -j CONNMARK --restore-mark "
            f"--nfmask {_RESTORE_MASK} --ctmask {_RESTORE_MASK}",
        ),
        # A new connection to a tunnel port (after the redirect) while no tunnel listens
        # there, as between one tunnel's exit and the next one's start (an upgrade where
        # the old pod must go before the new one is made, a crash): its SYN is dropped, not
        # answered with a reset, so the client's own SYN retransmission reaches the next
        # tunnel and the connection is made late instead of refused. Still closed: nothing
        # passes uncaptured. A listening socket there takes the SYN as before. The socket
        # lookup comes last in its rule: only a new connection to a tunnel port pays for it,
        # never the packets of established flows.
        (
            inp,
            f"-p tcp -m multiport --dports {ports} -m tcp {_SYN} -m socket --nowildcard -j RETURN",
        ),
        (inp, f"-p tcp -m multiport --dports {ports} -m tcp {_SYN} -j DROP"),
    )
    nat_pre = (
        # Kubelet probes (SNATed to the probe IP on the node) bypass the mesh.
        (pre, f"-s {probe} -p tcp -m tcp -j ACCEPT"),
        # Everything else inbound goes to the plaintext inbound port, except HBONE (15008 is
        # served directly) and the tunnel's own traffic.
        (
            pre,
            f"! -d 127.0.0.1/32 -p tcp -m tcp ! --dport {cfg.inbound_hbone_port} {_SYN} "
            f"-m mark ! --mark {tm} -j REDIRECT --to-ports {cfg.inbound_plain_port}",
        ),
    )
    nat_out: list[tuple[str, str]] = [
        # Replies to the probes leave unredirected.
        (out, f"-d {probe} -p tcp -m tcp -j ACCEPT"),
    ]
    if cfg.capture_dns:
        nat_out += [
            (
                out,
                f"! -o lo -p udp -m mark ! --mark {tm} -m udp --dport 53 "
                f"-j REDIRECT --to-ports {cfg.dns_port}",
            ),
            (
                out,
                f"! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark {tm} "
                f"-j REDIRECT --to-ports {cfg.dns_port}",
            ),
        ]
    nat_out += [
        # Replies on connections the tunnel opened into the pod (connmark restored above).
        (out, f"-p tcp -m mark --mark {cm} -j ACCEPT"),
        # The app calling its own pod IP stays on lo and is not captured.
        (out, "! -d 127.0.0.1/32 -o lo -j ACCEPT"),
        # All other outbound TCP, except the tunnel's own, goes to the outbound port.
        (
            out,
            f"! -d 127.0.0.1/32 -p tcp -m tcp {_SYN} -m mark ! --mark {tm} "
            f"-j REDIRECT --to-ports {cfg.outbound_port}",
        ),
    ]
    bodies: dict[str, tuple[tuple[str, str], ...]] = {
        "mangle": mangle,
        "nat": nat_pre + tuple(nat_out),
    }
    if cfg.capture_dns:
        # The DNS proxy's upstream queries and their answers get their own conntrack zone,
        # so they cannot collide with the redirected app queries on the same ports.
        bodies["raw"] = (
            (pre, f"-p udp -m mark ! --mark {tm} -m udp --sport 53 -j CT --zone 1"),
            (out, f"-p udp -m mark --mark {tm} -m udp --dport 53 -j CT --zone 1"),
        )
    return bodies


def missing_jumps(cfg: InpodConfig, current: SavedRules) -> tuple[Jump, ...]:
    """The jumps of `cfg` that `current` does not have yet (exact `-A X -j Y` lines)."""
    return tuple(
        j for j in jumps(cfg) if (j.builtin, f"-j {j.target}") not in current.table_rules(j.table)
    )


def inpod_ruleset(cfg: InpodConfig, current: SavedRules = EMPTY) -> str:
    """`iptables-restore --noflush` input that installs (or re-installs) the capture rules.

    Our chains are declared, hence created or flushed, and refilled; jumps are added only
    where `current` (the pod's ruleset now; EMPTY for a fresh pod) lacks them.
    """
    todo = missing_jumps(cfg, current)
    bodies = chain_bodies(cfg)
    lines: list[str] = []
    for table in _tables_for(cfg):
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for chain in chains_for(table)]
        lines += [j.spec for j in todo if j.table == table]
        lines += [f"-A {chain} {spec}" for chain, spec in bodies[table]]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def removal_ruleset(current: SavedRules, tables: tuple[str, ...] = TABLES) -> str:
    """`iptables-restore --noflush` input that removes every trace of our chains (in
    `tables`; all by default), or "" if `current` has none.

    Every rule whose target is one of our chains is deleted (however many copies), then the
    chains are flushed (by declaring them) and deleted. Tables without our chains are not
    mentioned, so removal never creates a table.
    """
    lines: list[str] = []
    for table in tables:
        ours = [c for c in OUR_CHAINS if c in current.chains.get(table, ())]
        hooks = [
            (chain, spec)
            for chain, spec in current.table_rules(table)
            if chain not in OUR_CHAINS and _target(spec) in OUR_CHAINS
        ]
        if not ours and not hooks:
            continue
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for chain in ours]
        lines += [f"-D {chain} {spec}" for chain, spec in hooks]
        lines += [f"-X {chain}" for chain in ours]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def chain_bodies_match(cfg: InpodConfig, current: SavedRules) -> bool:
    """Whether `current` holds exactly our chains' rules and every jump of `cfg`."""
    if missing_jumps(cfg, current):
        return False
    for table, body in chain_bodies(cfg).items():
        have = tuple((c, s) for c, s in current.table_rules(table) if c in OUR_CHAINS)
        if sorted(have, key=lambda r: OUR_CHAINS.index(r[0])) != sorted(
            body, key=lambda r: OUR_CHAINS.index(r[0])
        ):
            return False
    return True


def routing(cfg: InpodConfig) -> Routing:
    """The policy routing that sends connmarked replies back to the tunnel via lo."""
    return Routing(
        rule=FwmarkRule(
            fwmark=cfg.conn_mark, fwmask=cfg.mask, priority=cfg.rule_priority, table=cfg.route_table
        ),
        route=LocalRoute(table=cfg.route_table),
    )


def parse_iptables_save(text: str) -> SavedRules:
    """Parse `iptables-save` output (with or without counters and comment lines)."""
    chains: dict[str, list[str]] = {}
    rules: dict[str, list[tuple[str, str]]] = {}
    table: str | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:]
            chains.setdefault(table, [])
            rules.setdefault(table, [])
        elif table is None:
            raise SaveParseError(f"line {lineno}: {line!r} appears before any *table line")
        elif line == "COMMIT":
            table = None
        elif line.startswith(":"):
            chains[table].append(line[1:].split(maxsplit=1)[0])
        elif line.startswith("["):
            # "[pkts:bytes] -A CHAIN ..." as printed by iptables-save -c: drop the counters.
            _, _, rest = line.partition("] ")
            rules[table].append(_split_rule(rest, lineno))
        elif line.startswith("-A "):
            rules[table].append(_split_rule(line, lineno))
        else:
            raise SaveParseError(f"line {lineno}: unexpected {line!r}")
    return SavedRules(
        chains={t: tuple(c) for t, c in chains.items()},
        rules={t: tuple(r) for t, r in rules.items()},
    )


def _split_rule(line: str, lineno: int) -> tuple[str, str]:
    parts = line.split(maxsplit=2)
    if len(parts) < 3 or parts[0] != "-A":
        raise SaveParseError(f"line {lineno}: not a rule: {line!r}")
    return parts[1], parts[2]


def _target(spec: str) -> str | None:
    """The -j/-g target of a rule spec, or None."""
    try:
        words = shlex.split(spec)
    except ValueError:
        words = spec.split()
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "--jump", "-g", "--goto"):
            return words[i + 1]
    return None


def nft_leftovers(nft_json: str, candidates: Iterable[str] = TABLES) -> str:
    """An `nft -f` script deleting what iptables-nft left behind in the `ip` family
    `candidates` tables of `nft -j list ruleset` output, or "" if nothing is left over.

    iptables-nft creates a table, and the base chain of a hook, the first time a rule needs
    them, and leaves both behind when the rules go; an empty base chain still hooks
    netfilter (and for nat keeps conntrack on). So after our removal: a base chain with an
    accept policy and no rules is deleted, and a table holding nothing else is deleted
    whole. Any other object (a user chain, a set, a rule, a drop policy) keeps its table
    and is never touched. Such a chain that was already empty before apply goes too; it
    did nothing, and iptables-save prints the same either way.
    """
    try:
        doc = json.loads(nft_json)
        items = doc["nftables"]
    except (ValueError, KeyError, TypeError) as e:
        raise SaveParseError(f"nft -j output is not the expected JSON: {e}") from None
    if not isinstance(items, list):
        raise SaveParseError("nft -j output: 'nftables' is not a list")
    wanted = set(candidates)
    present: set[str] = set()
    empty_base: dict[str, list[str]] = {}
    busy: set[str] = set()  # tables holding something that is not an empty base chain
    used: set[tuple[str, str]] = set()  # (table, chain) with at least one rule
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            raise SaveParseError(f"nft -j output has an unexpected item: {item!r}")
        ((kind, obj),) = item.items()
        if kind == "metainfo" or not isinstance(obj, dict) or obj.get("family") != "ip":
            continue
        table = obj.get("name") if kind == "table" else obj.get("table")
        if table not in wanted:
            continue
        if kind == "table":
            present.add(table)
        elif kind == "chain" and "hook" in obj and obj.get("policy", "accept") == "accept":
            empty_base.setdefault(table, []).append(str(obj["name"]))
        elif kind == "rule":
            used.add((table, str(obj.get("chain"))))
            busy.add(table)
        else:
            busy.add(table)
    lines: list[str] = []
    for table in TABLES:
        if table not in present:
            continue
        idle = [c for c in empty_base.get(table, []) if (table, c) not in used]
        if table not in busy:
            lines.append(f"delete table ip {table}")
        else:
            lines += [f"delete chain ip {table} {chain}" for chain in idle]
    return "\n".join(lines) + "\n" if lines else ""
