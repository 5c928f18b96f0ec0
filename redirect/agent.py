"""The node agent: one process per node, in the node's network namespace.

It watches the node's pods (`redirect.enrolment`), serves the ZDS socket the node's tunnel
connects to (`zds.server`), and reconciles each pod into or out of the mesh, in
istio-cni's order (cni/pkg/nodeagent/meshdataplane_linux.go, net_linux.go):

    enrol:   capture rules in the pod netns -> AddWorkload acked by a tunnel -> pod IP into
             the node's probe set (kubelet probes then skip the mesh)
    un-enrol: pod IP out of the probe set -> capture rules removed from the pod netns ->
             DelWorkload to every tunnel (which drains the pod's proxy: connections it
             already carries finish, no new ones arrive because capture is gone)

Fail closed: once its capture is installed a pod's traffic goes to the tunnel's ports or
nowhere. If no tunnel is connected (or one refuses the pod) the capture stays, the pod is
reported `pending` with the reason, and it becomes `enrolled` when a tunnel connects and
acks it (the ZDS server remembers it for the tunnel's snapshot).

Restart safety: before the ZDS socket listens, the agent re-captures (idempotently) and
registers every pod that should be enrolled, so the first snapshot a reconnecting tunnel
receives is complete and it drains nothing it should keep (upstream's
ConstructInitialSnapshot). Stale probe-set entries are pruned at start.

The agent's view is a JSON status file (`--status-file`), rewritten atomically on every
change: node, pid, mode, connected tunnels, the source's last error, and per pod uid its
name, namespace, IP, state (`enrolled` | `pending` | `failed` | `removing`) and reason.
Bad input (a malformed pod-source file) is logged and the last good view stays in force.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from meshcore.localtrust import parse_uids
from meshcore.runtime import accepterrors
from meshcore.runtime.stopsignals import on_stop_signal
from redirect import capture, probes
from redirect.capture import RedirectMode
from redirect.enrolment import FilePodSource, NodeView, PodInfo, PodSource, wanted
from redirect.iptables import CaptureError
from redirect.probes import ProbeConfig, ProbeError
from redirect.readiness import ReadinessServer
from redirect.rules import InpodConfig
from zds import WorkloadInfo, ZdsError, wire
from zds.server import ZdsNack, ZdsServer, ZdsSuperseded, ZdsUnavailable

if TYPE_CHECKING:  # the file source's agent does not load aiohttp
    from kube.client import KubeClient
    from redirect.kubesource import KubePodSource

log = structlog.get_logger("redirect.agent")

DEFAULT_ZDS_SOCKET = wire.DEFAULT_SOCKET_PATH
# Retry backoff for failed steps: upstream's work queue starts at 5 ms and caps at 5 s.
_RETRY_MIN = 0.05
_RETRY_MAX = 5.0
_ZDS_TIMEOUT = 10.0
# A release waits for the tunnel to let the pod's open connections finish (it acks the
# delete when they have, or at its RELEASE_DRAIN_SECONDS): longer than that bound.
_RELEASE_TIMEOUT = 45.0
_STATUS_REFRESH = 1.0  # seconds between status checks when nothing else happens


class PodState(enum.Enum):
    PENDING = "pending"  # captured; no tunnel has acked it yet (traffic blocked)
    ENROLLED = "enrolled"  # captured, acked, probe bypass in place
    FAILED = "failed"  # capture could not be installed; retried
    REMOVING = "removing"  # leaving the mesh; a removal step failed and is retried


class Dataplane(Protocol):
    """The privileged operations the agent drives (blocking; run off the event loop)."""

    def install_capture(self, netns: str) -> None: ...
    def stop_redirects(self, netns: str) -> None: ...
    def remove_capture(self, netns: str) -> None: ...
    def install_probes(self) -> None: ...
    def remove_probes(self) -> None: ...
    def prune_probes(self, keep: Mapping[IPv4Address, str]) -> None: ...
    def add_probe(self, ip: IPv4Address, uid: str) -> None: ...
    def remove_probe(self, ip: IPv4Address, uid: str) -> None: ...


@dataclass(frozen=True, slots=True)
class NodeDataplane:
    """The real thing: capture in pod netns, probe set and rules in this (node) netns."""

    mode: RedirectMode = RedirectMode.IPTABLES
    probe_cfg: ProbeConfig = field(default_factory=ProbeConfig)
    node_netns: str | None = None  # None: the namespace the agent runs in
    # The in-pod rules' settings (DNS capture on or off).
    inpod_cfg: InpodConfig = field(default_factory=InpodConfig)

    def install_capture(self, netns: str) -> None:
        capture.install(netns, self.mode, self.inpod_cfg)

    def stop_redirects(self, netns: str) -> None:
        capture.stop_redirects(netns, self.mode, self.inpod_cfg)

    def remove_capture(self, netns: str) -> None:
        capture.remove(netns, self.mode, self.inpod_cfg)

    def install_probes(self) -> None:
        probes.install(self.node_netns, self.probe_cfg)

    def remove_probes(self) -> None:
        probes.remove(self.node_netns, self.probe_cfg)

    def prune_probes(self, keep: Mapping[IPv4Address, str]) -> None:
        current = probes.entries(self.node_netns, self.probe_cfg)
        # Prune only: stale entries go, kept ones stay, nothing is added before an ack.
        desired = {ip: uid for ip, uid in current.items() if keep.get(ip) == uid}
        probes.sync(self.node_netns, self.probe_cfg, desired)

    def add_probe(self, ip: IPv4Address, uid: str) -> None:
        probes.add(self.node_netns, self.probe_cfg, ip, uid)

    def remove_probe(self, ip: IPv4Address, uid: str) -> None:
        probes.delete(self.node_netns, self.probe_cfg, ip, uid)


class Zds(Protocol):
    """What the agent needs of `zds.server.ZdsServer`."""

    @property
    def tunnels(self) -> int: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    # The timeouts are zds.server's own API (each bounds one ack wait).
    async def add(
        self,
        uid: str,
        info: WorkloadInfo,
        netns_path: str,
        timeout: float = ...,  # noqa: ASYNC109
    ) -> None: ...
    async def delete(self, uid: str, timeout: float = ...) -> None: ...  # noqa: ASYNC109
    def acked(self, uid: str) -> bool: ...


ZdsFactory = Callable[[Callable[[str], None], Callable[[int], None]], Zds]


class RedirectionMarker(Protocol):
    """Where the agent says which pods it captures (the Kubernetes source annotates the pod
    `ambient.istio.io/redirection: enabled`, as istio-cni does). Must not block."""

    def mark_redirection(self, pod: PodInfo, enabled: bool) -> None: ...

    def marked(self) -> Collection[str]:
        """The UIDs of this node's pods that carry the mark now (captured by an agent)."""
        ...


def zds_server_factory(path: Path, peer_uids: frozenset[int] | None = None) -> ZdsFactory:
    def make(on_acked: Callable[[str], None], on_tunnels: Callable[[int], None]) -> Zds:
        server: Zds = ZdsServer(
            str(path), on_acked=on_acked, on_tunnels_changed=on_tunnels, allowed_uids=peer_uids
        )
        return server

    return make


@dataclass(slots=True)
class Tracked:
    """The agent's record of one pod it has started to enrol (mutable: it moves on)."""

    pod: PodInfo
    state: PodState
    reason: str = ""
    captured: bool = False
    registered: bool = False  # handed to the ZDS server (remembered for snapshots)
    resend: bool = False  # the last hand-over was refused or timed out: send it again
    probe: bool = False  # IP in the probe set
    attempts: int = 0
    retry_at: float = 0.0  # monotonic time of the next attempt of a failed step

    def backoff(self, now: float) -> None:
        self.attempts += 1
        self.retry_at = now + min(_RETRY_MAX, _RETRY_MIN * 2 ** min(self.attempts, 10))


def _same_pod(a: PodInfo, b: PodInfo) -> bool:
    """Whether an enrolment still fits the pod (a new netns or IP means a new sandbox)."""
    return a.netns == b.netns and a.ip == b.ip


class NodeAgent:
    def __init__(
        self,
        node: str,
        source: PodSource,
        dataplane: Dataplane,
        zds_factory: ZdsFactory,
        status_path: Path | None = None,
        mode: RedirectMode = RedirectMode.IPTABLES,
        marker: RedirectionMarker | None = None,
    ) -> None:
        self.node = node
        self.source = source
        self.marker = marker
        self.dataplane = dataplane
        self.status_path = status_path
        self.mode = mode
        self.view: NodeView | None = None
        self.pods: dict[str, Tracked] = {}
        self.zds = zds_factory(self._on_acked, self._on_tunnels)
        self._dirty = asyncio.Event()
        self._removals: dict[str, asyncio.Task[None]] = {}  # releases in progress, by uid
        self._runner: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._status_text = ""

    # ---- callbacks (event loop) ----------------------------------------------------------

    def _on_view(self, view: NodeView) -> None:
        self.view = view
        self._dirty.set()

    def _on_acked(self, uid: str) -> None:
        self._dirty.set()

    def _on_tunnels(self, count: int) -> None:
        log.info("tunnels connected", count=count)
        self._dirty.set()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.source.start(self._on_view)
        if self.view is None:
            # No good view yet (a malformed source): starting from an empty one would prune
            # the probe set and hand a tunnel an empty snapshot, draining every pod.
            log.error("waiting for a readable pod source before serving ZDS", node=self.node)
        while self.view is None:
            await self._dirty.wait()
            self._dirty.clear()
        view = self.view
        await asyncio.to_thread(self.dataplane.install_probes)
        initial = wanted(view)
        await asyncio.to_thread(
            self.dataplane.prune_probes,
            {p.ip: uid for uid, p in initial.items() if p.ip is not None},
        )
        # Register every pod before the socket listens: a tunnel's first snapshot must be
        # complete, or it would drain pods that are still in the mesh.
        for pod in initial.values():
            await self._enrol(pod)
        self._adopt_stale(view, initial)
        await self.zds.start()
        self._write_status()
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="reconcile")
        log.info("node agent started", node=self.node, pods=len(initial), mode=self.mode.value)

    def _adopt_stale(self, view: NodeView, initial: Mapping[str, PodInfo]) -> None:
        """Pods marked captured that should no longer be (their label went while no agent
        ran, istio-cni's annotation check): released by the first reconcile. They were
        never registered, so no tunnel's snapshot names them."""
        if self.marker is None:
            return
        for uid in self.marker.marked():
            pod = view.pods.get(uid)
            if pod is None or uid in initial or uid in self.pods:
                continue
            log.info("pod captured while no agent ran is no longer wanted", pod=pod.key)
            self.pods[uid] = Tracked(pod, PodState.REMOVING, "no longer wanted", captured=True)
            self._dirty.set()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        for task in list(self._removals.values()):
            task.cancel()
        await asyncio.gather(*self._removals.values(), return_exceptions=True)
        await self.source.close()
        await self.zds.close()
        # Capture and probe rules stay: pods keep failing closed while no agent runs, and
        # a restarted agent picks them up again (upstream skips cleanup on restart too).
        self._write_status(running=False)

    async def release_all(self, timeout: float) -> int:  # noqa: ASYNC109
        """Uninstall: every pod leaves the mesh as a label removal would release it (the
        tunnel is told first, so connections it carries finish), then the node's probe
        rules go. Returns how many pods are still held at the deadline (0: all released).
        Called instead of leaving the rules, and before `close`."""
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
            self._runner = None
        for task in list(self._removals.values()):
            task.cancel()
        await asyncio.gather(*self._removals.values(), return_exceptions=True)
        self._removals.clear()
        uids = list(self.pods)
        log.info("uninstall: releasing every pod", node=self.node, pods=len(uids))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                # One pass per pod; a failed step leaves the pod tracked, and the next pass
                # retries it (every step is idempotent).
                while self.pods:
                    await asyncio.gather(
                        *(self._unenrol(uid) for uid in list(self.pods)), return_exceptions=True
                    )
                    if self.pods:
                        await asyncio.sleep(0.2)
        try:
            await asyncio.to_thread(self.dataplane.remove_probes)
        except ProbeError as e:
            log.error("uninstall: probe rules not removed", error=str(e))
        left = len(self.pods)
        if left:
            log.error("uninstall: pods still captured at the deadline", pods=left)
        self._write_status(running=False)
        return left

    async def _run(self) -> None:
        while True:
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
                # cancellation that lands as the event fires, and close() would then wait
                # forever for this loop.
                async with asyncio.timeout(_STATUS_REFRESH):
                    await self._dirty.wait()
            except TimeoutError:
                # Nothing to reconcile; the source's error state may still have changed.
                self._write_status()
                continue
            self._dirty.clear()
            try:
                await self.reconcile()
            except Exception as e:  # one bad pass must not end the agent
                log.error("reconcile failed", error=f"{type(e).__name__}: {e}")
                self._schedule(_RETRY_MAX)

    # ---- reconcile ---------------------------------------------------------------------------

    async def reconcile(self) -> None:
        desired = wanted(self.view) if self.view is not None else {}
        for uid, tracked in list(self.pods.items()):
            pod = desired.get(uid)
            if (pod is None or not _same_pod(tracked.pod, pod)) and uid not in self._removals:
                # In the background: a release waits for the pod's open connections, and
                # must hold up neither other pods nor new enrolments.
                task = asyncio.get_running_loop().create_task(
                    self._unenrol(uid), name=f"release:{uid}"
                )
                self._removals[uid] = task
                task.add_done_callback(functools.partial(self._removal_done, uid))
        now = time.monotonic()
        for uid, pod in desired.items():
            if uid in self._removals:
                continue  # wanted again: re-enrolled once its release has finished
            t = self.pods.get(uid)
            if t is not None and t.state is PodState.REMOVING:
                # Its removal failed part-way and it is wanted again: finish enrolling it
                # from wherever it is (every step is idempotent).
                t.state = PodState.PENDING
            if t is not None and t.state is PodState.ENROLLED:
                t.pod = pod  # labels and names may change without re-enrolment
                if not self.zds.acked(uid):
                    # Its tunnel went away (or a new one has not taken it yet).
                    t.state, t.reason = PodState.PENDING, "no tunnel serves it (traffic blocked)"
                    log.warning("pod pending: no tunnel serves it", pod=pod.key)
            elif t is None or t.retry_at <= now:
                await self._enrol(pod)
        self._write_status()
        self._schedule_retries()

    async def _enrol(self, pod: PodInfo) -> None:
        now = time.monotonic()
        t = self.pods.get(pod.uid)
        if t is None:
            t = self.pods[pod.uid] = Tracked(pod, PodState.PENDING, "capturing")
        t.pod = pod
        if not t.captured:
            try:
                await asyncio.to_thread(self.dataplane.install_capture, pod.netns)
            except CaptureError as e:
                t.state, t.reason = PodState.FAILED, f"capture: {e}"
                t.backoff(now)
                log.error("capture failed", pod=pod.key, error=str(e))
                return
            t.captured = True
            if self.marker is not None:
                self.marker.mark_redirection(pod, True)
        if t.registered and not t.resend and not self.zds.acked(pod.uid):
            if self.zds.tunnels == 0:
                # Remembered by the ZDS server: the next tunnel's snapshot carries it and
                # on_acked wakes us. Until then the capture blocks its traffic.
                t.state, t.reason = PodState.PENDING, "no tunnel connected (traffic blocked)"
                return
            t.resend = True  # a tunnel is there but did not take it (e.g. refused it)
        if (not t.registered or t.resend) and not await self._register(t, now):
            return
        if not t.probe and pod.ip is not None:
            try:
                await asyncio.to_thread(self.dataplane.add_probe, pod.ip, pod.uid)
            except ProbeError as e:
                t.state, t.reason = PodState.PENDING, f"probe bypass: {e}"
                t.backoff(now)
                log.error("probe set add failed", pod=pod.key, error=str(e))
                return
            t.probe = True
        if t.state is not PodState.ENROLLED:
            log.info("pod enrolled", pod=pod.key, uid=pod.uid)
        t.state, t.reason, t.attempts, t.retry_at = PodState.ENROLLED, "", 0, 0.0

    async def _register(self, t: Tracked, now: float) -> bool:
        """Hand the pod to the ZDS server; True once a tunnel acked it."""
        pod = t.pod
        info = WorkloadInfo(pod.name, pod.namespace, pod.service_account)
        try:
            await self.zds.add(pod.uid, info, pod.netns, timeout=_ZDS_TIMEOUT)
        except ZdsUnavailable:
            t.registered, t.resend = True, False
            t.state, t.reason = PodState.PENDING, "no tunnel connected (traffic blocked)"
            log.warning("pod pending: no tunnel connected", pod=pod.key)
            return False
        except (ZdsNack, ZdsSuperseded, TimeoutError) as e:
            t.registered, t.resend = True, True
            why = e.error if isinstance(e, ZdsNack) else str(e) or "no answer in time"
            t.state, t.reason = PodState.PENDING, f"tunnel did not take the pod: {why}"
            t.backoff(now)
            log.warning("pod pending: tunnel did not take it", pod=pod.key, error=why)
            return False
        except OSError as e:  # the netns could not be opened: nothing was remembered
            t.state, t.reason = PodState.FAILED, f"netns: {e}"
            t.backoff(now)
            log.error("pod netns unavailable", pod=pod.key, error=str(e))
            return False
        except ZdsError as e:  # a value ZDS cannot carry; one pod must not stall the rest
            t.state, t.reason = PodState.FAILED, f"zds: {e}"
            t.backoff(now)
            log.error("pod cannot be sent over ZDS", pod=pod.key, error=str(e))
            return False
        t.registered, t.resend = True, False
        return True

    def _removal_done(self, uid: str, task: asyncio.Task[None]) -> None:
        self._removals.pop(uid, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("pod release failed; retrying", uid=uid, error=str(task.exception()))
        self._dirty.set()

    async def _unenrol(self, uid: str) -> None:
        """Release a pod without breaking what runs: probes off; new connections no longer
        captured; the tunnel told (it acks once the connections it carries for the pod
        have ended, or at its deadline); only then the rest of the capture (the return
        path those connections needed) goes."""
        t = self.pods[uid]
        pod = t.pod
        t.state = PodState.REMOVING
        try:
            if t.probe and pod.ip is not None:
                await asyncio.to_thread(self.dataplane.remove_probe, pod.ip, uid)
                t.probe = False
            if t.captured:
                await asyncio.to_thread(self._stop_redirects, pod.netns)
        except (ProbeError, CaptureError) as e:
            t.reason = f"removal: {e}"
            t.backoff(time.monotonic())
            log.error("pod removal failed; retrying", pod=pod.key, error=str(e))
            return
        if t.registered:
            with contextlib.suppress(ZdsUnavailable):  # no tunnel: forgetting is enough
                try:
                    await self.zds.delete(uid, timeout=_RELEASE_TIMEOUT)
                except TimeoutError:
                    log.warning("tunnel did not ack the removal", pod=pod.key)
            t.registered = False
        try:
            if t.captured:
                await asyncio.to_thread(self._remove_capture, pod.netns)
                t.captured = False
        except CaptureError as e:
            t.reason = f"removal: {e}"
            t.backoff(time.monotonic())
            log.error("pod removal failed; retrying", pod=pod.key, error=str(e))
            return
        del self.pods[uid]
        if self.marker is not None:
            self.marker.mark_redirection(pod, False)
        log.info("pod removed from the mesh", pod=pod.key, uid=uid)

    def _stop_redirects(self, netns: str) -> None:
        if os.path.exists(netns):
            self.dataplane.stop_redirects(netns)

    def _remove_capture(self, netns: str) -> None:
        # A vanished netns (the pod was deleted) took its rules with it: nothing to undo.
        if os.path.exists(netns):
            self.dataplane.remove_capture(netns)

    def _schedule_retries(self) -> None:
        due = [
            t.retry_at
            for t in self.pods.values()
            if t.state is not PodState.ENROLLED and t.retry_at > 0
        ]
        if due:
            self._schedule(max(0.0, min(due) - time.monotonic()))

    def _schedule(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._dirty.set)

    # ---- status ------------------------------------------------------------------------------

    def status(self, running: bool = True) -> dict[str, Any]:
        error = getattr(self.source, "last_error", None)
        return {
            "node": self.node,
            "pid": os.getpid(),
            "running": running,
            "mode": self.mode.value,
            "tunnels": self.zds.tunnels,
            "sourceError": error,
            "pods": {
                uid: {
                    "name": t.pod.name,
                    "namespace": t.pod.namespace,
                    "ip": str(t.pod.ip) if t.pod.ip is not None else "",
                    "state": t.state.value,
                    "reason": t.reason,
                }
                for uid, t in sorted(self.pods.items())
            },
        }

    def _write_status(self, running: bool = True) -> None:
        if self.status_path is None:
            return
        text = json.dumps(self.status(running), indent=2, sort_keys=True) + "\n"
        if text == self._status_text:
            return
        tmp = self.status_path.with_name(f".{self.status_path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(self.status_path)  # atomic: readers never see half a file
        self._status_text = text


# ---- entry point ----------------------------------------------------------------------------


POD_SOURCES = ("file", "kubernetes")


class SettingsError(Exception):
    """The agent's settings cannot work (e.g. unreadable credentials); the message says why."""


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The agent's settings; NODE_NAME, POD_SOURCE and KUBECONFIG give the defaults (as a
    DaemonSet sets them), a flag overrides its variable."""
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(prog="python -m redirect.agent", description=__doc__.split("\n")[0])
    p.add_argument(
        "--node",
        default=env.get("NODE_NAME") or None,
        help="this node's name (default: $NODE_NAME)",
    )
    p.add_argument(
        "--pod-source",
        default=env.get("POD_SOURCE") or "file",
        help="where pods come from: file (--pods-file) or kubernetes (default: $POD_SOURCE "
        "or file)",
    )
    p.add_argument("--pods-file", type=Path, help="the pod source (JSON), for --pod-source=file")
    p.add_argument(
        "--kubeconfig",
        default=env.get("KUBECONFIG") or None,
        help="for --pod-source=kubernetes (default: $KUBECONFIG, else the pod's service account)",
    )
    p.add_argument(
        "--node-netns",
        help="the node's network namespace (a path) for the probe set and its rules, when the "
        "agent runs elsewhere (the local Kubernetes mode runs it on the machine's loopback, "
        "where the API server is); default: the agent's own",
    )
    p.add_argument("--zds-socket", type=Path, default=Path(DEFAULT_ZDS_SOCKET))
    p.add_argument(
        "--zds-peer-uids",
        type=parse_uids,
        default=env.get("ZDS_PEER_UIDS", ""),
        help="comma-separated uids a tunnel may connect to the ZDS socket as "
        "(env ZDS_PEER_UIDS); default: the agent's own",
    )
    p.add_argument("--status-file", type=Path, help="where to write the agent's view (JSON)")
    p.add_argument(
        "--redirect-mode",
        choices=[m.value for m in RedirectMode],
        default=RedirectMode.IPTABLES.value,
    )
    p.add_argument(
        "--dns-capture",
        action=argparse.BooleanOptionalAction,
        default=_env_flag(DNS_CAPTURE_ENV),
        help=f"redirect the pods' DNS (UDP/TCP 53) to the tunnel's 15053 "
        f"(default: ${DNS_CAPTURE_ENV}, else off)",
    )
    p.add_argument(
        "--readiness-port",
        type=int,
        default=0,
        help="serve GET /readyz on this port (all addresses of the agent's netns): 200 once "
        "started; 0 (default) serves nothing",
    )
    p.add_argument(
        "--uninstall-grace",
        type=float,
        default=20.0,
        help="seconds an uninstall may take to release every pod before the agent exits",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return p


# istio-cni's setting for the same thing (values.cni.ambient.dnsCapture).
DNS_CAPTURE_ENV = "AMBIENT_DNS_CAPTURE"


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"{name}={value!r}: expected true or false")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Settings that only make sense together; a usage error (exit 2) names the fix."""
    if not args.node:
        p.error("the node name is required: --node or NODE_NAME")
    if args.pod_source not in POD_SOURCES:
        p.error(f"pod source {args.pod_source!r} is not one of {', '.join(POD_SOURCES)}")
    if args.pod_source == "file" and args.pods_file is None:
        p.error("--pods-file is required with the file pod source")
    if not 0 <= args.readiness_port <= 65535:
        p.error(f"--readiness-port {args.readiness_port} is not a port")
    if not 0 <= args.uninstall_grace <= 300:
        p.error(f"--uninstall-grace {args.uninstall_grace} must be within 0..300 seconds")


async def run(args: argparse.Namespace) -> None:
    accepterrors.install(asyncio.get_running_loop())
    mode = RedirectMode(args.redirect_mode)
    source: PodSource
    marker: RedirectionMarker | None = None
    kube_source: KubePodSource | None = None
    client: KubeClient | None = None
    close_client: Callable[[], Awaitable[None]] | None = None
    if args.pod_source == "kubernetes":
        # Imported only here: the file source's agent does not load aiohttp.
        from kube.client import KubeApiError, KubeClient, in_cluster, load_kubeconfig
        from redirect.kubesource import KubePodSource

        try:
            config = load_kubeconfig(args.kubeconfig) if args.kubeconfig else in_cluster()
        except KubeApiError as e:
            raise SettingsError(f"Kubernetes credentials: {e.message}") from None
        client = KubeClient(config)
        close_client = client.close
        source = marker = kube_source = KubePodSource(client, args.node)
    else:
        source = FilePodSource(args.pods_file, args.node)
    agent = NodeAgent(
        args.node,
        source,
        NodeDataplane(
            mode,
            node_netns=args.node_netns,
            inpod_cfg=InpodConfig(capture_dns=args.dns_capture),
        ),
        zds_server_factory(args.zds_socket, args.zds_peer_uids),
        args.status_file,
        mode,
        marker,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        loop.call_soon_threadsafe(stop.set)

    # Not loop.add_signal_handler: it routes signals through a wakeup fd that forked
    # children inherit, and pyroute2 forks a helper per netns socket (capture's routing
    # step) and stops it with SIGTERM; a helper not yet exited would write that SIGTERM
    # into our loop, and the agent would stop itself. Nor a plain handler, which the helper
    # inherits and lives through, while pyroute2 waits for it without a timeout.
    on_stop_signal(on_signal)
    started = False
    readiness = ReadinessServer(args.readiness_port, lambda: started)
    if args.readiness_port:
        await readiness.start()
    uninstall = None
    pod_name, pod_ns = os.environ.get("POD_NAME", ""), os.environ.get("POD_NAMESPACE", "")
    if client is not None and pod_name and pod_ns:
        from redirect.uninstall import UninstallWatch

        uninstall = UninstallWatch(client, pod_ns, pod_name)
        await uninstall.start()
    await agent.start()
    started = True
    await stop.wait()
    log.info("node agent stopping", node=args.node)
    if uninstall is not None:
        if kube_source is not None and await uninstall.going():
            await agent.release_all(args.uninstall_grace)
            # The annotation patches may be refused by now (the agent's rights go with the
            # release); the pods stay right either way, the mark is only what users see.
            await kube_source.flush_marks(5.0)
        await uninstall.stop()
    await readiness.close()
    await agent.close()
    if close_client is not None:
        await close_client()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    from meshcore.observability import logging as ztlog

    ztlog.configure(args.log_level)
    try:
        asyncio.run(run(args))
    except (ProbeError, OSError, SettingsError) as e:
        log.error("node agent failed", error=str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
