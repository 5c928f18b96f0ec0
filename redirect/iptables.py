"""Apply and remove the in-pod capture rules: the small privileged half of `redirect`.

Every decision (rule text, which jumps are missing, what to delete, which tables are empty)
is made by `redirect.rules`; this module only runs the commands inside a pod's netns and
maps failures to `CaptureError`.

Invariants:
- The calling process never enters the pod netns: iptables/nft run as children that enter
  it in `preexec_fn`, and netlink goes through a pyroute2 socket created in the netns.
- `apply_inpod` is idempotent (the chains are rewritten whole, jumps added only when
  missing, the ip rule only when absent) and all-or-nothing: if any step fails, what was
  applied is removed again before the error is raised.
- `remove_inpod` is idempotent and leaves the pod as it was before `apply_inpod`: our
  chains, every jump into them, the fwmark rule, the table's local route, and any
  empty accept-policy base chains iptables-nft leaves behind, and tables left empty.
  (Such a chain or table that was already empty before apply goes too; it did nothing.)
- Every child process has a timeout, so a wedged iptables lock cannot hang the caller.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

import nsutil
from redirect import rules
from redirect.rules import InpodConfig, Routing

# iptables-restore's own lock wait; the subprocess timeout below is the hard bound.
_LOCK_WAIT_SECONDS = "5"
_COMMAND_TIMEOUT_SECONDS = 30.0

# rtnetlink route types and scopes (linux/rtnetlink.h).
_RTN_LOCAL = 2
_RT_SCOPE_HOST = 254


class CaptureError(RuntimeError):
    """Capture rules could not be applied or removed in a pod netns.

    `step` names what failed, `detail` carries the tool's stderr or errno text, and the
    message ends with what to check.
    """

    def __init__(self, netns_path: str, step: str, detail: str, hint: str) -> None:
        self.netns_path = netns_path
        self.step = step
        self.detail = detail.strip()
        self.hint = hint
        super().__init__(f"{step} in {netns_path} failed: {self.detail or '(no output)'}; {hint}")


@dataclass(frozen=True, slots=True)
class NetnsSnapshot:
    """What capture changes in a pod, in comparable form (no counters, no timestamps)."""

    iptables: str  # iptables-save output without comment lines
    ip_rules: tuple[tuple[int, int, int, int], ...]  # (priority, fwmark, fwmask, table)
    routes: tuple[tuple[int, str, int, int], ...]  # table's routes: (type, dst, dst_len, oif)


def apply_inpod(netns_path: str, cfg: InpodConfig) -> None:
    """Install the capture rules and policy routing in the netns at `netns_path`."""
    require_netns(netns_path)
    try:
        apply_routing(netns_path, rules.routing(cfg))
        current = _saved_rules(netns_path)
        _restore(netns_path, rules.inpod_ruleset(cfg, current), "iptables-restore (apply)")
    except BaseException:
        # All-or-nothing: a half-applied capture could blackhole replies (route without
        # rules) or capture traffic with no way back. Best effort; the first error wins.
        with contextlib.suppress(CaptureError):
            remove_inpod(netns_path, cfg)
        raise


def remove_inpod(netns_path: str, cfg: InpodConfig) -> None:
    """Remove every trace of the capture rules from the netns at `netns_path`.

    Removing from a pod without rules is a no-op. The iptables part is driven by what the
    pod has, so it also removes a variant applied with a different `cfg` (e.g. DNS capture).
    """
    require_netns(netns_path)
    text = rules.removal_ruleset(_saved_rules(netns_path))
    if text:
        _restore(netns_path, text, "iptables-restore (remove)")
    _drop_empty_tables(netns_path)
    remove_routing(netns_path, rules.routing(cfg))


def stop_redirects(netns_path: str) -> None:
    """Release, step one: remove the nat (redirect) rules only, so new connections go
    direct, while the mangle rules and policy routing stay: connections the tunnel still
    carries (its transparent sockets' replies come back through them) keep working until
    the tunnel let them finish. `remove_inpod` removes the rest."""
    require_netns(netns_path)
    text = rules.removal_ruleset(_saved_rules(netns_path), tables=("nat",))
    if text:
        _restore(netns_path, text, "iptables-restore (stop redirects)")


def snapshot(netns_path: str, cfg: InpodConfig) -> NetnsSnapshot:
    """The pod's iptables ruleset, its IPv4 fwmark rules and the routes in `cfg`'s table."""
    require_netns(netns_path)
    text = _iptables_save(netns_path)
    save = "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))
    with NetlinkIn(netns_path, "read routing") as ipr:
        rule_rows = tuple(
            sorted(
                (
                    _int(r.get("priority")),
                    _int(r.get("fwmark")),
                    _int(r.get("fwmask")),
                    _rule_table(r),
                )
                for r in ipr.get_rules(family=socket.AF_INET)
            )
        )
        route_rows = tuple(
            sorted(
                (int(r["type"]), str(r.get("dst") or ""), int(r["dst_len"]), _int(r.get("oif")))
                for r in ipr.get_routes(family=socket.AF_INET, table=cfg.route_table)
                if _route_table(r) == cfg.route_table
            )
        )
    return NetnsSnapshot(iptables=save, ip_rules=rule_rows, routes=route_rows)


# --- iptables / nft --------------------------------------------------------------------


def _run(netns_path: str, argv: Sequence[str], step: str, stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT_SECONDS,
            preexec_fn=nsutil.preexec_enter(netns_path),
            check=False,
        )
    except FileNotFoundError as e:
        raise CaptureError(
            netns_path, step, str(e), f"is {argv[0]} installed and on PATH?"
        ) from None
    except subprocess.TimeoutExpired:
        raise CaptureError(
            netns_path,
            step,
            f"no answer after {_COMMAND_TIMEOUT_SECONDS:.0f}s",
            "is another process holding the xtables lock (/run/xtables.lock)?",
        ) from None
    except subprocess.SubprocessError as e:
        # preexec_fn failures (setns refused) surface here.
        raise CaptureError(
            netns_path, step, str(e), "is the netns still there, and are we root (CAP_SYS_ADMIN)?"
        ) from None
    if proc.returncode != 0:
        raise CaptureError(
            netns_path,
            step,
            proc.stderr or proc.stdout,
            f"exit status {proc.returncode}; check the rule text with "
            "`iptables-restore --test` and that the kernel has the xt_mark, xt_connmark, "
            "xt_REDIRECT and (DNS) xt_CT matches",
        )
    return proc.stdout


def _iptables_save(netns_path: str) -> str:
    return _run(netns_path, ["iptables-save"], "iptables-save")


def _saved_rules(netns_path: str) -> rules.SavedRules:
    try:
        return rules.parse_iptables_save(_iptables_save(netns_path))
    except rules.SaveParseError as e:
        raise CaptureError(
            netns_path, "parse iptables-save", str(e), "is iptables-save a supported version?"
        ) from None


def _restore(netns_path: str, text: str, step: str) -> None:
    _run(netns_path, ["iptables-restore", "--noflush", "-w", _LOCK_WAIT_SECONDS], step, text)


def _drop_empty_tables(netns_path: str) -> None:
    if shutil.which("nft") is None:
        # Only iptables-nft leaves empty tables behind, and it always ships with nft... but
        # a legacy-only host has neither the problem nor the binary: nothing to do.
        return
    listing = _run(netns_path, ["nft", "-j", "list", "ruleset"], "nft list ruleset")
    try:
        script = rules.nft_leftovers(listing)
    except rules.SaveParseError as e:
        raise CaptureError(
            netns_path, "parse nft -j", str(e), "is nft a version with JSON output?"
        ) from None
    if script:
        # One nft transaction: all of it goes, or nothing does.
        _run(netns_path, ["nft", "-f", "-"], "nft delete (empty tables/chains)", script)


# --- routing ---------------------------------------------------------------------------


class NetlinkIn:
    """An IPRoute whose netlink socket lives in the pod netns (pyroute2 opens it in a child
    process and passes the fd back); never creates the netns if it is missing."""

    def __init__(self, netns_path: str, step: str) -> None:
        self.netns_path = netns_path
        self.step = step
        self.ipr: Any = None

    def __enter__(self) -> Any:
        try:
            self.ipr = IPRoute(netns=self.netns_path, flags=0)
        except (OSError, TimeoutError) as e:
            raise CaptureError(
                self.netns_path, self.step, str(e), "does the netns exist, and are we root?"
            ) from None
        return self.ipr

    def __exit__(self, *exc: object) -> None:
        self.ipr.close()


def _rule_present(ipr: Any, r: rules.FwmarkRule) -> bool:
    return any(
        _int(x.get("priority")) == r.priority
        and _int(x.get("fwmark")) == r.fwmark
        and _int(x.get("fwmask")) == r.fwmask
        and _rule_table(x) == r.table
        for x in ipr.get_rules(family=socket.AF_INET)
    )


def apply_routing(netns_path: str, spec: Routing) -> None:
    step = "ip route/rule (apply)"
    with NetlinkIn(netns_path, step) as ipr:
        try:
            lo = ipr.link_lookup(ifname=spec.route.dev)
            if not lo:
                raise CaptureError(netns_path, step, "no loopback", "the netns has no lo?")
            # replace: re-applying leaves exactly one identical route.
            ipr.route(
                "replace",
                family=socket.AF_INET,
                dst=spec.route.dst,
                type=_RTN_LOCAL,
                scope=_RT_SCOPE_HOST,
                oif=lo[0],
                table=spec.route.table,
            )
            # ip rules have no "replace"; a second "add" would duplicate it.
            if not _rule_present(ipr, spec.rule):
                ipr.rule(
                    "add",
                    family=socket.AF_INET,
                    priority=spec.rule.priority,
                    fwmark=spec.rule.fwmark,
                    fwmask=spec.rule.fwmask,
                    table=spec.rule.table,
                )
        except NetlinkError as e:
            raise CaptureError(
                netns_path, step, f"{e.code} {os.strerror(e.code)}", _netlink_hint(e.code)
            ) from None


def remove_routing(netns_path: str, spec: Routing) -> None:
    step = "ip route/rule (remove)"
    with NetlinkIn(netns_path, step) as ipr:
        try:
            while _rule_present(ipr, spec.rule):
                ipr.rule(
                    "del",
                    family=socket.AF_INET,
                    priority=spec.rule.priority,
                    fwmark=spec.rule.fwmark,
                    fwmask=spec.rule.fwmask,
                    table=spec.rule.table,
                )
            for route in ipr.get_routes(family=socket.AF_INET, table=spec.route.table):
                if (
                    _route_table(route) == spec.route.table
                    and route["type"] == _RTN_LOCAL
                    and route["dst_len"] == 0
                ):
                    # The kernel matches a delete on scope and device too; use the dumped
                    # route's own values so exactly this route goes.
                    ipr.route(
                        "del",
                        family=socket.AF_INET,
                        dst=spec.route.dst,
                        type=_RTN_LOCAL,
                        scope=route["scope"],
                        oif=route.get_attr("RTA_OIF"),
                        table=spec.route.table,
                    )
        except NetlinkError as e:
            if e.code in (errno.ENOENT, errno.ESRCH):
                return  # raced with another remover: already gone is what we wanted
            raise CaptureError(
                netns_path, step, f"{e.code} {os.strerror(e.code)}", _netlink_hint(e.code)
            ) from None


def _netlink_hint(code: int) -> str:
    if code == errno.EPERM:
        return "needs root (CAP_NET_ADMIN in the pod netns)"
    if code == errno.ENETDOWN:
        return "is lo up in the pod netns?"
    return "check `ip rule` and `ip route show table <table>` in the pod netns"


def require_netns(netns_path: str) -> None:
    if not os.path.exists(netns_path):
        raise CaptureError(
            netns_path, "open netns", os.strerror(errno.ENOENT), "is the pod still running?"
        )


def _int(value: object) -> int:
    return int(value) if isinstance(value, int) else 0


def _rule_table(msg: Any) -> int:
    # Tables above 255 only fit in the FRA_TABLE attribute; the header field then says 252.
    attr = msg.get_attr("FRA_TABLE")
    return int(attr) if attr is not None else int(msg["table"])


def _route_table(msg: Any) -> int:
    attr = msg.get_attr("RTA_TABLE")
    return int(attr) if attr is not None else int(msg["table"])
