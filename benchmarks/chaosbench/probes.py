"""What the chaos benchmark reads from the running cluster to judge an event: capture rules
and listeners in pod netns, the netns fds a tunnel holds, the processes left of a killed
instance. Small I/O around pure parsing (`listener_counts`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

import nsutil
from redirect import iptables
from redirect.rules import InpodConfig

SS_TIMEOUT = 10.0


def rules(netns_path: str) -> str:
    """The pod's capture as comparable text: iptables-save without counters or comments,
    the fwmark ip rules and the tunnel's routing table."""
    snap = iptables.snapshot(netns_path, InpodConfig())
    return (
        snap.iptables
        + "".join(f"ip rule {r}\n" for r in snap.ip_rules)
        + "".join(f"route {r}\n" for r in snap.routes)
    )


def all_rules(pods: Mapping[str, str]) -> dict[str, str]:
    """pod -> its rules text (pod -> netns path in), "" for a pod whose rules cannot be
    read (its netns is gone: that shows as a difference)."""
    out = {}
    for pod, netns in pods.items():
        try:
            out[pod] = rules(netns)
        except iptables.CaptureError:
            out[pod] = ""
    return out


def listener_counts(ss_output: str) -> dict[int, int]:
    """port -> how many TCP listeners, from `ss -ltnH` (local address is the 4th column)."""
    out: dict[int, int] = {}
    for line in ss_output.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        _, _, port = cols[3].rpartition(":")
        if port.isdigit():
            out[int(port)] = out.get(int(port), 0) + 1
    return out


def listeners(netns_path: str) -> dict[int, int]:
    proc = subprocess.run(
        ["ss", "-ltnH"],
        capture_output=True,
        text=True,
        timeout=SS_TIMEOUT,
        preexec_fn=nsutil.preexec_enter(netns_path),
        check=True,
    )
    return listener_counts(proc.stdout)


def all_listeners(pods: Mapping[str, str]) -> dict[str, dict[int, int]]:
    return {pod: listeners(netns) for pod, netns in pods.items()}


def netns_fds(pid: int) -> int:
    """How many of a process's fds refer to a network namespace."""
    n = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("net:["):
                n += 1
        except OSError:
            continue  # closed meanwhile
    return n


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group: what is left of a killed leader."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        rest = text[text.rindex(")") + 2 :].split()
        if rest[0] != "Z" and int(rest[2]) == pgid:
            out.append(int(entry.name))
    return out


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def cwd(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/cwd")


def reap(pids: Iterable[int]) -> None:
    """Collect the exit status of our own children that died (a killed process we spawned
    would stay a zombie until then); not our child: nothing to do."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
