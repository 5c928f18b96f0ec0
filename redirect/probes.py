"""Kubelet probe bypass on the node: the host side of "probes skip the mesh".

An enrolled pod redirects every inbound TCP connection to its tunnel, so the node's own
health probes would need mesh identity they do not have. As istio-cni does, the node
SNATs locally originated TCP to an enrolled pod's IP to a link-local address
(169.254.7.127); the in-pod rules (`redirect.rules`, nat ISTIO_PRERT) accept anything from
that address unredirected. Which pod IPs are enrolled lives in an ipset, so enrolling a
pod is one set entry, never a rule change:

    ipset   istio-inpod-probes-v4  hash:ip family inet comment   (entry comment = pod uid)
    nat     POSTROUTING -j ISTIO_POSTRT
            ISTIO_POSTRT -p tcp -m owner --socket-exists
                         -m set --match-set istio-inpod-probes-v4 dst
                         -j SNAT --to-source 169.254.7.127

`--socket-exists` is upstream's test for "sent by a local process" (a forwarded packet has
no socket), so pod-to-pod traffic routed through the node is never SNATed.

The first half of this module is pure (restore texts, golden-tested); the second half runs
`ipset`/`iptables-restore` in a namespace (the caller's own when `netns_path` is None) and
maps failures to `ProbeError`. Invariants:
- installing twice changes nothing; removal leaves the node as it was (jump, chain, set);
- a pod's entry is removed only while its comment still names that pod's uid: if another
  pod took the IP meanwhile (an "add" always overwrites), its entry survives;
- `sync_script` turns any current set into the desired one with per-entry adds/deletes,
  never a flush, so probes of pods that stay enrolled never fail in between.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

import nsutil
from redirect.rules import DEFAULT_PROBE_SNAT_IP, SavedRules, SaveParseError, parse_iptables_save

PROBE_SET = "istio-inpod-probes-v4"
HOST_CHAIN = "ISTIO_POSTRT"
_COMMAND_TIMEOUT_SECONDS = 30.0
_LOCK_WAIT_SECONDS = "5"
_MAX_COMMENT = 255  # ipset's comment extension limit


class ProbeConfigError(ValueError):
    """A probe setting or entry is invalid; the message names the field."""


class ProbeError(RuntimeError):
    """The node's probe rules or set could not be changed; says which step and what to check."""

    def __init__(self, step: str, detail: str, hint: str) -> None:
        self.step = step
        self.detail = detail.strip()
        self.hint = hint
        super().__init__(f"{step} failed: {self.detail or '(no output)'}; {hint}")


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    set_name: str = PROBE_SET
    chain: str = HOST_CHAIN
    snat_ip: IPv4Address = DEFAULT_PROBE_SNAT_IP

    def __post_init__(self) -> None:
        # ipset names are at most 31 characters; both names end up in command lines.
        if not self.set_name or len(self.set_name) > 31 or not _plain(self.set_name):
            raise ProbeConfigError(f"set_name: {self.set_name!r} must be 1-31 of [A-Za-z0-9_-]")
        if not self.chain or len(self.chain) > 28 or not _plain(self.chain):
            raise ProbeConfigError(f"chain: {self.chain!r} must be 1-28 of [A-Za-z0-9_-]")
        if not isinstance(self.snat_ip, IPv4Address):
            raise ProbeConfigError(f"snat_ip: expected IPv4Address, got {self.snat_ip!r}")


def _plain(name: str) -> bool:
    return all(c.isalnum() or c in "_-" for c in name)


def _check_comment(uid: str) -> None:
    if not uid or len(uid) > _MAX_COMMENT or any(c in uid for c in '"\n\r\\'):
        raise ProbeConfigError(
            f"uid: {uid!r} cannot be an ipset comment (1-{_MAX_COMMENT} chars, no quotes)"
        )


# --- pure: iptables ----------------------------------------------------------------------


def snat_rule(cfg: ProbeConfig) -> str:
    """The SNAT rule's spec, in the canonical order iptables-save prints it."""
    return (
        f"-p tcp -m owner --socket-exists -m set --match-set {cfg.set_name} dst "
        f"-j SNAT --to-source {cfg.snat_ip}"
    )


def _jump(cfg: ProbeConfig) -> tuple[str, str]:
    return ("POSTROUTING", f"-j {cfg.chain}")


def host_ruleset(cfg: ProbeConfig, current: SavedRules) -> str:
    """`iptables-restore --noflush` input installing (or re-installing) the host rules.

    The chain is declared (created or flushed) and refilled; the jump is added only if
    `current` (the node's nat table now) lacks it.
    """
    lines = ["*nat", f":{cfg.chain} - [0:0]"]
    if _jump(cfg) not in current.table_rules("nat"):
        lines.append(f"-A POSTROUTING -j {cfg.chain}")
    lines.append(f"-A {cfg.chain} {snat_rule(cfg)}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def host_removal_ruleset(cfg: ProbeConfig, current: SavedRules) -> str:
    """Restore input deleting every jump into our chain and the chain; "" if none exist."""
    has_chain = cfg.chain in current.chains.get("nat", ())
    hooks = [
        (chain, spec)
        for chain, spec in current.table_rules("nat")
        if chain != cfg.chain and _targets(spec, cfg.chain)
    ]
    if not has_chain and not hooks:
        return ""
    lines = ["*nat"]
    if has_chain:
        lines.append(f":{cfg.chain} - [0:0]")
    lines += [f"-D {chain} {spec}" for chain, spec in hooks]
    if has_chain:
        lines.append(f"-X {cfg.chain}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def host_rules_match(cfg: ProbeConfig, current: SavedRules) -> bool:
    """Whether `current` holds exactly our chain body and the jump."""
    ours = [spec for chain, spec in current.table_rules("nat") if chain == cfg.chain]
    return _jump(cfg) in current.table_rules("nat") and ours == [snat_rule(cfg)]


def _targets(spec: str, chain: str) -> bool:
    words = spec.split()
    return any(
        w in ("-j", "-g") and i + 1 < len(words) and words[i + 1] == chain
        for i, w in enumerate(words)
    )


# --- pure: ipset ---------------------------------------------------------------------------


def create_set_script(cfg: ProbeConfig) -> str:
    """`ipset restore` input creating the set if missing (never touching its entries)."""
    return f"create {cfg.set_name} hash:ip family inet comment -exist\n"


def add_line(cfg: ProbeConfig, ip: IPv4Address, uid: str) -> str:
    """Upsert: `-exist` makes a present IP take the new uid, as upstream's replace does."""
    _check_comment(uid)
    return f'add {cfg.set_name} {ip} comment "{uid}" -exist'


def del_line(cfg: ProbeConfig, ip: IPv4Address) -> str:
    return f"del {cfg.set_name} {ip} -exist"


def parse_ipset_save(text: str, set_name: str) -> dict[IPv4Address, str]:
    """The entries (ip -> comment) of `set_name` in `ipset save`/`list -o save` output."""
    out: dict[IPv4Address, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.startswith("add "):
            continue
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise SaveParseError(f"ipset line {lineno}: {e}: {line!r}") from None
        if len(words) < 3 or words[1] != set_name:
            continue
        try:
            ip = IPv4Address(words[2])
        except ValueError:
            raise SaveParseError(f"ipset line {lineno}: {words[2]!r} is not IPv4") from None
        comment = ""
        if "comment" in words[3:]:
            i = words.index("comment", 3)
            comment = words[i + 1] if i + 1 < len(words) else ""
        out[ip] = comment
    return out


def sync_script(
    cfg: ProbeConfig, current: Mapping[IPv4Address, str], desired: Mapping[IPv4Address, str]
) -> str:
    """`ipset restore` input turning `current` into `desired` (both ip -> uid); "" if equal.

    Deletes first (stale entries), then adds for missing or re-owned IPs; sorted, so the
    text is a function of the two mappings alone.
    """
    lines = [del_line(cfg, ip) for ip in sorted(set(current) - set(desired))]
    lines += [
        add_line(cfg, ip, uid) for ip, uid in sorted(desired.items()) if current.get(ip) != uid
    ]
    return "\n".join(lines) + "\n" if lines else ""


def remove_entry_script(
    cfg: ProbeConfig, current: Mapping[IPv4Address, str], ip: IPv4Address, uid: str
) -> str:
    """Delete `ip` only while it still belongs to `uid`; "" otherwise."""
    return del_line(cfg, ip) + "\n" if current.get(ip) == uid else ""


# --- I/O ---------------------------------------------------------------------------------


def _run(netns_path: str | None, argv: Sequence[str], step: str, stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT_SECONDS,
            preexec_fn=nsutil.preexec_enter(netns_path) if netns_path else None,
            check=False,
        )
    except FileNotFoundError as e:
        raise ProbeError(step, str(e), f"is {argv[0]} installed (scripts/setup.sh)?") from None
    except subprocess.TimeoutExpired:
        raise ProbeError(
            step, f"no answer after {_COMMAND_TIMEOUT_SECONDS:.0f}s", "is the xtables lock held?"
        ) from None
    except subprocess.SubprocessError as e:
        raise ProbeError(step, str(e), "does the node netns exist, and are we root?") from None
    if proc.returncode != 0:
        raise ProbeError(
            step,
            proc.stderr or proc.stdout,
            f"exit status {proc.returncode}; the kernel needs ip_set, xt_set and xt_owner",
        )
    return proc.stdout


def _saved_nat(netns_path: str | None) -> SavedRules:
    text = _run(netns_path, ["iptables-save", "-t", "nat"], "iptables-save (node)")
    try:
        return parse_iptables_save(text)
    except SaveParseError as e:
        raise ProbeError("parse iptables-save (node)", str(e), "unsupported iptables?") from None


def _restore_ipset(netns_path: str | None, text: str, step: str) -> None:
    if text:
        _run(netns_path, ["ipset", "restore"], step, text)


def entries(netns_path: str | None, cfg: ProbeConfig) -> dict[IPv4Address, str]:
    """The set's entries (ip -> pod uid); empty if the set does not exist."""
    try:
        text = _run(netns_path, ["ipset", "save", cfg.set_name], "ipset save")
    except ProbeError as e:
        if "does not exist" in e.detail:
            return {}
        raise
    try:
        return parse_ipset_save(text, cfg.set_name)
    except SaveParseError as e:
        raise ProbeError("parse ipset save", str(e), "unsupported ipset version?") from None


def install(netns_path: str | None, cfg: ProbeConfig) -> None:
    """Create the set (keeping its entries) and install the SNAT chain and jump."""
    _restore_ipset(netns_path, create_set_script(cfg), "ipset create")
    text = host_ruleset(cfg, _saved_nat(netns_path))
    _run(
        netns_path,
        ["iptables-restore", "--noflush", "-w", _LOCK_WAIT_SECONDS],
        "iptables-restore (probes)",
        text,
    )


def remove(netns_path: str | None, cfg: ProbeConfig) -> None:
    """Remove the jump, the chain and the set. Idempotent."""
    text = host_removal_ruleset(cfg, _saved_nat(netns_path))
    if text:
        _run(
            netns_path,
            ["iptables-restore", "--noflush", "-w", _LOCK_WAIT_SECONDS],
            "iptables-restore (probe removal)",
            text,
        )
    if _set_exists(netns_path, cfg):
        _run(netns_path, ["ipset", "destroy", cfg.set_name], "ipset destroy")


def _set_exists(netns_path: str | None, cfg: ProbeConfig) -> bool:
    names = _run(netns_path, ["ipset", "list", "-n"], "ipset list").split()
    return cfg.set_name in names


def sync(netns_path: str | None, cfg: ProbeConfig, desired: Mapping[IPv4Address, str]) -> None:
    """Make the set hold exactly `desired` (ip -> uid)."""
    _restore_ipset(netns_path, sync_script(cfg, entries(netns_path, cfg), desired), "ipset sync")


def add(netns_path: str | None, cfg: ProbeConfig, ip: IPv4Address, uid: str) -> None:
    _restore_ipset(netns_path, add_line(cfg, ip, uid) + "\n", "ipset add")


def delete(netns_path: str | None, cfg: ProbeConfig, ip: IPv4Address, uid: str) -> None:
    """Remove `ip` if it still belongs to `uid`."""
    script = remove_entry_script(cfg, entries(netns_path, cfg), ip, uid)
    _restore_ipset(netns_path, script, "ipset del")
