"""One chaos event: a target killed with SIGKILL under steady load, restarted as a kubelet
would, and everything the event must not break checked.

Timeline (wall clock): the node link's capture and the load start; after `warmup` the
target is killed (`killed_at`); once it is gone (`down_at`) the pods' capture rules are
read while nothing replaces it; at `killed_at + backoff` it is started again
(`restarted_at`); once it answers as ready (`ready_at`) the load runs `tail` seconds more
and stops. Then the stale-state checks, and the capture is read back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nsutil
from localcluster import mesh
from localcluster.capture import Capture
from localcluster.network import CLUSTER_BRIDGE
from localcluster.processes import is_running

from . import cluster as cl
from . import pcap, probes, targets, verdict
from .targets import Target

LOAD = Path(__file__).resolve().parent / "load.py"
GONE_TIMEOUT = 5.0  # seconds for a SIGKILLed process to be gone
LEFTOVER_GRACE = 3.0  # seconds the killed process's children get to notice and exit
LOAD_EXIT_TIMEOUT = 30.0


class EventError(RuntimeError):
    """An event could not be run (not judged: the target was not there, the load broke)."""


@dataclass(frozen=True, slots=True)
class Settings:
    backoff: float = 1.0  # seconds from the kill to the restart
    warmup: float = 1.5  # seconds of load before the kill
    tail: float = 2.5  # seconds of load after the target is ready again
    interval_ms: float = 20.0  # one new connection per path every this often
    long: int = 2  # long-lived connections per path
    ready_timeout: float = 60.0
    keep_pcap: bool = False  # keep the capture even when it is clean


def enrolled_pods(c: mesh.Cluster) -> dict[str, str]:
    spec = mesh.current_spec(c)
    return {
        f"{p.namespace}/{p.name}": c.pod_netns(p.namespace, p.name)
        for p in spec.pods
        if p.enrolled(spec)
    }


def pods_per_node(c: mesh.Cluster) -> dict[str, int]:
    spec = mesh.current_spec(c)
    return {n.name: sum(1 for p in spec.pods_on(n.name) if p.enrolled(spec)) for n in spec.nodes}


def marker() -> bytes:
    return b"chaos-plaintext-" + os.urandom(8).hex().encode()


def start_load(c: mesh.Cluster, s: Settings, mark: bytes) -> subprocess.Popen[str]:
    spec = c.spec
    l4 = f"{spec.service(cl.NAMESPACE, 'echo').vip}:80"
    l7 = f"{spec.service(cl.NAMESPACE, 'web').vip}:80"
    return subprocess.Popen(
        [sys.executable, str(LOAD), "--l4", l4, "--l7", l7, "--marker", mark.decode(),
         "--interval-ms", str(s.interval_ms), "--long", str(s.long), "--max-seconds",
         str(s.warmup + s.backoff + s.ready_timeout + s.tail + 30)],
        preexec_fn=nsutil.preexec_enter(c.pod_netns(cl.NAMESPACE, cl.CLIENT)),
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def stop_load(p: subprocess.Popen[str]) -> dict[str, Any]:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        out, _ = p.communicate(timeout=LOAD_EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGUSR1)  # its threads' stacks on stderr, to say where it hangs
        time.sleep(1.0)
        p.kill()
        p.communicate()
        raise EventError(f"the load did not stop within {LOAD_EXIT_TIMEOUT:g} s") from None
    if p.returncode != 0:
        raise EventError(f"the load exited with {p.returncode}")
    doc: dict[str, Any] = json.loads(out)
    return doc


def _wait(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run(c: mesh.Cluster, t: Target, iteration: int, s: Settings, work: Path) -> dict[str, Any]:
    """Kill, restart and judge one target; the event's record (see `report`)."""
    pods = enrolled_pods(c)
    rules_before = probes.all_rules(pods)
    fds_before = targets.tunnel_netns_fds(c)
    old = mesh.process_record(c, t.process)
    if old is None:
        raise EventError(f"{t.label}: no running process {t.process}")
    env, cwd = probes.environ(old.pid), probes.cwd(old.pid)
    mark = marker()
    capture_file = work / f"{t.slug}-{iteration}.pcap"
    times: dict[str, float] = {}
    ready = True
    with Capture(c.layout.cluster_netns_path, CLUSTER_BRIDGE, capture_file):
        load = start_load(c, s, mark)
        try:
            time.sleep(s.warmup)
            marks = targets.log_sizes(c)
            times["killed_at"] = time.time()
            os.kill(old.pid, signal.SIGKILL)
            if not _wait(lambda: not is_running(old.pid, old.start_time), GONE_TIMEOUT):
                raise EventError(f"{t.label}: pid {old.pid} survived SIGKILL")
            probes.reap([old.pid])
            times["down_at"] = time.time()
            # Fail closed: with nothing serving the node, its pods' capture stays.
            rules_down = probes.all_rules(pods)
            time.sleep(max(0.0, times["killed_at"] + s.backoff - time.time()))
            times["restarted_at"] = time.time()
            targets.restart(c, old, env, cwd)
            ready = _wait(targets.ready_check(c, t, marks), s.ready_timeout)
            times["ready_at"] = time.time()
            time.sleep(s.tail)
        finally:
            result = stop_load(load)
    _wait(lambda: not probes.group_members(old.pid), LEFTOVER_GRACE)
    leftovers = probes.group_members(old.pid)
    after = {
        "rules": probes.all_rules(pods),
        "listeners": probes.all_listeners(pods),
        "fds": targets.tunnel_netns_fds(c),
    }
    packets = list(pcap.tcp_packets(capture_file.read_bytes()))
    record = judge(
        t, iteration, times, ready, result, packets, mark,
        rules_before, rules_down, after, fds_before, pods_per_node(c), leftovers,
    )  # fmt: skip
    findings = record["findings"]
    if not s.keep_pcap and not (findings["plaintext"] or findings["bypass"]):
        capture_file.unlink(missing_ok=True)
    else:
        record["capture"]["file"] = str(capture_file)
    return record


def judge(
    t: Target,
    iteration: int,
    times: dict[str, float],
    ready: bool,
    load: dict[str, Any],
    packets: list[pcap.TcpPacket],
    mark: bytes,
    rules_before: dict[str, str],
    rules_down: dict[str, str],
    after: dict[str, Any],
    fds_before: dict[str, int],
    pods: dict[str, int],
    leftovers: list[int],
) -> dict[str, Any]:
    """The event's record from what was observed (pure)."""
    expect = verdict.EXPECTED[t.kind]
    killed = times["killed_at"]
    paths: dict[str, Any] = {}
    outages: dict[str, verdict.Outage] = {}
    lost: dict[str, int] = {}
    bypass: list[str] = []
    for p in verdict.PATHS:
        attempts = [verdict.Attempt.from_row(r) for r in load["attempts"][p]]
        o = verdict.outage(attempts, killed)
        outages[p] = o
        longs = load["long"][p]
        lost[p] = verdict.long_lost(longs)
        while_down = verdict.worked_while_down(attempts, times["down_at"], times["restarted_at"])
        if p in expect.closed and while_down:
            bypass.append(f"{p}: {while_down} new connections worked while {t.label} was dead")
        paths[p] = {
            "attempted": o.attempted,
            "failed": o.failed,
            "recovery_s": o.recovery_s,
            "first_error": o.first_error,
            "worked_while_down": while_down,
            "not_made": sum(
                1 for r in load["attempts"][p] if str(r[3] or "").startswith(verdict.NOT_MADE)
            ),
            "long_lost": lost[p],
            "long_total": len(longs),
            "long": longs,
            "timeline": load["attempts"][p],  # [began, ended, ok, error] per attempt
        }
    plain = pcap.plaintext_flows(packets, mark)
    around = pcap.bypass_flows(packets)
    bypass += [f"non-HBONE TCP on the node link: {a[0]}:{a[1]} -> {b[0]}:{b[1]}" for a, b in around]
    bypass += [f"while down: {x}" for x in verdict.rules_changed(rules_before, rules_down)]
    stale = verdict.rules_changed(rules_before, after["rules"])
    stale += verdict.listener_problems(after["listeners"])
    stale += verdict.netns_fd_problems(fds_before, after["fds"], pods)
    stale += [f"pid {pid} of the killed {t.process} still runs" for pid in leftovers]
    unexpected = verdict.unexpected(t.kind, outages, lost)
    if not ready:
        unexpected.append(f"{t.label} not ready again within the timeout")
    hbone = pcap.hbone_packets(packets)
    if hbone == 0:
        unexpected.append("the capture saw no HBONE packet: it did not watch the node link")
    findings = verdict.Findings(
        plaintext=[f"marker in {a[0]}:{a[1]} -> {b[0]}:{b[1]}" for a, b in plain],
        bypass=bypass,
        stale=stale,
        unexpected=unexpected,
    )
    return {
        "target": t.label,
        "kind": t.kind,
        "process": t.process,
        "iteration": iteration,
        "times": times,
        "down_s": round(times["restarted_at"] - killed, 3),
        "ready_s": round(times["ready_at"] - killed, 3),
        "paths": paths,
        "capture": {"packets": len(packets), "hbone_packets": hbone},
        "fds_before": fds_before,
        "fds_after": after["fds"],
        "listeners_after": {
            k: {str(p): n for p, n in v.items()} for k, v in after["listeners"].items()
        },
        "findings": {
            "plaintext": findings.plaintext,
            "bypass": findings.bypass,
            "stale": findings.stale,
            "unexpected": findings.unexpected,
        },
        "clean": findings.clean(),
    }
