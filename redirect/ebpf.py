"""eBPF capture mode: install and remove the tc programs of `redirect/bpf/capture.c` in a pod.

Observable semantics are the iptables mode's (see `redirect.capture`); what goes where and
why is in `redirect.ebpf_plan`. This module only does the I/O: netlink in the pod netns
(qdiscs, filters, the policy routing shared with the iptables mode), lo's accept_local
sysctl, and loading the programs through `redirect.ebpf_load`.

Invariants:
- `install` is idempotent: a filter already carrying this build's name is left as it is
  (same program id), the clsact qdisc is added only when missing, routing is replaced or
  added only when absent, and accept_local is written only when it differs.
- `install` is all-or-nothing: on any failure what was installed is removed again before
  the error is raised (as `redirect.iptables.apply_inpod`).
- Hooks are attached lo first and the egress hooks last, and removed in the reverse order,
  so that at no moment are packets turned back onto lo without something to receive them.
- `remove` is idempotent and leaves the pod as it was: our filters (found by priority,
  handle and name, on every link), every clsact qdisc left without filters, lo's
  accept_local as recorded in the lo filter's name, and the fwmark rule and local route.
  (A clsact that was already empty before install goes too; it did nothing.)
- Nothing is pinned in bpffs; the filters hold the programs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

import nsutil
from redirect import ebpf_load, ebpf_plan, rules
from redirect.ebpf_plan import Direction, FilterName, Hook

# The policy routing is the iptables mode's own (same rule, same table), so its code is
# shared rather than repeated.
from redirect.iptables import (
    CaptureError,
    NetlinkIn,
    apply_routing,
    remove_routing,
    require_netns,
)
from redirect.rules import InpodConfig

_SETUP_HINT = (
    "the eBPF mode needs bcc (python3-bpfcc) and kernel headers at "
    "/lib/modules/$(uname -r)/build: run scripts/setup.sh, or use --redirect-mode iptables"
)
_ARPHRD_ETHER = 1  # link type of Ethernet-framed interfaces (veth, macvlan, ipvlan)
_TC_HINT = "needs root (CAP_NET_ADMIN) and a kernel with clsact and cls_bpf"


def install(netns_path: str, cfg: InpodConfig) -> None:
    """Install the eBPF capture in the netns at `netns_path`.

    Raises `CaptureError` naming the failing step; the pod is then left without capture.
    """
    try:
        ebpf_plan.check_config(cfg)
    except ebpf_plan.EbpfConfigError as e:
        raise CaptureError(netns_path, "eBPF capture (config)", str(e), _SETUP_HINT) from None
    require_netns(netns_path)
    source = _source(netns_path)
    flags = ebpf_plan.cflags(cfg)
    build = ebpf_plan.build_id(source, flags)
    try:
        apply_routing(netns_path, rules.routing(cfg))
        _install_hooks(netns_path, source, flags, build)
    except BaseException:
        # All-or-nothing, as the iptables mode: half a capture could turn packets back
        # onto lo with nothing to take them. Best effort; the first error wins.
        with contextlib.suppress(CaptureError):
            remove(netns_path, cfg)
        raise


def stop_redirects(netns_path: str, cfg: InpodConfig) -> None:
    """Release, step one: swap the programs for their release build, which steers no new
    connection but keeps steering the packets of those already captured, so they run to
    their end through the tunnel. A pod without the capture is left alone. `remove`
    removes the rest."""
    require_netns(netns_path)
    step = "tc (release eBPF capture)"
    with NetlinkIn(netns_path, step) as ipr:
        try:
            present = any(
                _our_filter(ipr, index, d) is not None
                for index in _links(ipr)
                for d in (Direction.INGRESS, Direction.EGRESS)
            )
        except NetlinkError as e:
            raise CaptureError(netns_path, step, _errtext(e), _TC_HINT) from None
    if not present:
        return
    source = _source(netns_path)
    flags = ebpf_plan.cflags(cfg, release=True)
    _install_hooks(netns_path, source, flags, ebpf_plan.build_id(source, flags))


def remove(netns_path: str, cfg: InpodConfig) -> None:
    """Remove every trace of the eBPF capture from the netns at `netns_path`. Removing from
    a pod without it is a no-op."""
    require_netns(netns_path)
    step = "tc (remove eBPF capture)"
    with NetlinkIn(netns_path, step) as ipr:
        try:
            accept_local_before: int | None = None
            links = _links(ipr)
            # Egress first (nothing new is turned back), then the pods' ingress, lo last.
            for direction, on_lo in (
                (Direction.EGRESS, False),
                (Direction.INGRESS, False),
                (Direction.INGRESS, True),
            ):
                for index, name in links.items():
                    if (name == ebpf_plan.LOOPBACK) != on_lo:
                        continue
                    found = _our_filter(ipr, index, direction)
                    if found is None:
                        continue
                    if found.accept_local_before is not None:
                        accept_local_before = found.accept_local_before
                    _del_filter(ipr, index, direction)
            if accept_local_before is not None:
                _set_accept_local(netns_path, accept_local_before)
            for index in links:
                _drop_clsact_if_empty(ipr, index)
        except NetlinkError as e:
            raise CaptureError(netns_path, step, _errtext(e), _TC_HINT) from None
    remove_routing(netns_path, rules.routing(cfg))


# --- install ---------------------------------------------------------------------------


def _install_hooks(netns_path: str, source: str, flags: tuple[str, ...], build: str) -> None:
    step = "tc (install eBPF capture)"
    with NetlinkIn(netns_path, step) as ipr:
        try:
            links = _links(ipr)
            lo = next((i for i, n in links.items() if n == ebpf_plan.LOOPBACK), None)
            if lo is None:
                raise CaptureError(netns_path, step, "no lo", "the netns has no loopback?")
            pod_links = sorted(_addressed_links(ipr) - {lo})
            not_ethernet = [links[i] for i in pod_links if _link_type(ipr, i) != _ARPHRD_ETHER]
            if not_ethernet:
                # The programs parse Ethernet frames; an interface they cannot parse would
                # carry the pod's traffic past the tunnel, so refuse instead.
                raise CaptureError(
                    netns_path,
                    step,
                    f"not Ethernet: {', '.join(not_ethernet)}",
                    "the eBPF mode captures Ethernet interfaces only; use the iptables mode",
                )
            if not pod_links:
                raise CaptureError(
                    netns_path,
                    step,
                    "no interface with an IPv4 address",
                    "install the capture after the pod's network is set up",
                )
            plan: list[tuple[int, Hook]] = [(lo, ebpf_plan.LO_INGRESS)]
            plan += [(i, ebpf_plan.POD_INGRESS) for i in pod_links]
            plan += [(i, ebpf_plan.POD_EGRESS) for i in pod_links]
            current = {(i, h): _our_filter(ipr, i, h.direction) for i, h in plan}
            stale = [(i, h) for i, h in plan if not ebpf_plan.up_to_date(current[i, h], h, build)]

            # lo's accept_local before the capture: the lo filter remembers it once set, so
            # it is attached (inert on its own) before the sysctl is changed.
            lo_now = current[lo, ebpf_plan.LO_INGRESS]
            before = (
                lo_now.accept_local_before
                if lo_now is not None and lo_now.accept_local_before is not None
                else _get_accept_local(netns_path)
            )
            progs = _programs(netns_path, build, source, flags) if stale else None
            for index, hook in plan:
                if progs is not None and (index, hook) in stale:
                    _ensure_clsact(ipr, index)
                    _put_filter(
                        ipr,
                        index,
                        hook,
                        progs.fds[hook.function],
                        ebpf_plan.filter_name(hook, build, before),
                        replace=current[index, hook] is not None,
                    )
                if hook is ebpf_plan.LO_INGRESS:
                    _set_accept_local(netns_path, 1)
        except NetlinkError as e:
            raise CaptureError(netns_path, step, _errtext(e), _TC_HINT) from None


def _programs(
    netns_path: str, build: str, source: str, flags: tuple[str, ...]
) -> ebpf_load.Programs:
    try:
        return ebpf_load.programs(build, source, flags, ebpf_plan.FUNCTIONS)
    except ebpf_load.LoadError as e:
        raise CaptureError(netns_path, "eBPF capture (load)", str(e), _SETUP_HINT) from None


def _source(netns_path: str) -> str:
    try:
        return ebpf_plan.SOURCE_PATH.read_text()
    except OSError as e:
        raise CaptureError(
            netns_path, "eBPF capture (source)", str(e), "is the package installed whole?"
        ) from None


# --- netlink ---------------------------------------------------------------------------


def _links(ipr: Any) -> dict[int, str]:
    return {int(m["index"]): str(m.get_attr("IFLA_IFNAME")) for m in ipr.get_links()}


def _link_type(ipr: Any, index: int) -> int:
    return int(ipr.get_links(index)[0]["ifi_type"])


def _addressed_links(ipr: Any) -> set[int]:
    return {int(m["index"]) for m in ipr.get_addr(family=socket.AF_INET)}


def _filters(ipr: Any, index: int, direction: Direction) -> list[Any]:
    """Filter entries on one hook (not the per-priority header entries without a handle)."""
    try:
        msgs = ipr.get_filters(index=index, parent=direction.parent)
    except NetlinkError as e:
        if e.code == errno.EINVAL:  # no clsact (so no hook) on this link
            return []
        raise
    return [m for m in msgs if m["handle"]]


def _our_filter(ipr: Any, index: int, direction: Direction) -> FilterName | None:
    for m in _filters(ipr, index, direction):
        if m["info"] >> 16 != ebpf_plan.FILTER_PREF or m["handle"] != ebpf_plan.FILTER_HANDLE:
            continue
        if m.get_attr("TCA_KIND") != "bpf":
            continue
        options = m.get_attr("TCA_OPTIONS")
        name = ebpf_plan.FilterName.parse(
            options.get_attr("TCA_BPF_NAME") if options is not None else None
        )
        if name is not None:
            return name
    return None


def _has_clsact(ipr: Any, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=index))


def _ensure_clsact(ipr: Any, index: int) -> None:
    if not _has_clsact(ipr, index):
        ipr.tc("add", "clsact", index)


def _drop_clsact_if_empty(ipr: Any, index: int) -> None:
    if not _has_clsact(ipr, index):
        return
    if _filters(ipr, index, Direction.INGRESS) or _filters(ipr, index, Direction.EGRESS):
        return  # someone else's filters: their qdisc stays
    ipr.tc("del", "clsact", index)


def _put_filter(
    ipr: Any, index: int, hook: Hook, fd: int, name: FilterName, *, replace: bool
) -> None:
    ipr.tc(
        "replace-filter" if replace else "add-filter",
        "bpf",
        index,
        ebpf_plan.FILTER_HANDLE,
        fd=fd,
        name=name.text(),
        parent=hook.direction.parent,
        classid=1,
        direct_action=True,
        prio=ebpf_plan.FILTER_PREF,
    )


def _del_filter(ipr: Any, index: int, direction: Direction) -> None:
    ipr.tc(
        "del-filter",
        "bpf",
        index,
        ebpf_plan.FILTER_HANDLE,
        parent=direction.parent,
        prio=ebpf_plan.FILTER_PREF,
    )


def _errtext(e: NetlinkError) -> str:
    return f"{e.code} {os.strerror(e.code)}"


# --- lo's accept_local -----------------------------------------------------------------


def _get_accept_local(netns_path: str) -> int:
    return int(_sysctl(netns_path, None))


def _set_accept_local(netns_path: str, value: int) -> None:
    _sysctl(netns_path, value)


def _sysctl(netns_path: str, value: int | None) -> str:
    """Read lo's accept_local in the pod, or write `value` when it differs. /proc/sys/net
    shows the netns of the thread that opens it, so the file is used while inside."""
    step = "sysctl net.ipv4.conf.lo.accept_local"
    try:
        fd = nsutil.open_netns(netns_path)
        try:
            with nsutil.entered(fd), open(ebpf_plan.ACCEPT_LOCAL_SYSCTL, "r+") as f:
                current = f.read().strip()
                if value is not None and current != str(value):
                    f.seek(0)
                    f.write(str(value))
                    current = str(value)
        finally:
            os.close(fd)
    except OSError as e:
        raise CaptureError(netns_path, step, str(e), "needs root in the pod netns") from None
    return current
