"""The local cluster's kubelet: it plays every node of a local cluster for a real API server.

`python -m localcluster.kube.kubelet --kubeconfig K --cluster-file F [--state-root R]`
runs in the caller's netns (the API server's loopback) and, for each node of the cluster
file (whose network `localcluster.network.build_network` has built):
- registers a Node (hostname/os labels, InternalIP = the node's IP, podCIDR, capacity,
  Ready) and heartbeats it: the Lease in kube-node-lease and the status every 10 s;
- follows the Pods bound to it (an informer per node, `spec.nodeName=<node>`) and realises
  each: a netns named by its UID (`kube.podnetns`), a veth on the node's bridge, an address
  from the node's pod CIDR, and the first container in that netns. An image found in the
  local image store (`localcluster.kube.images`) runs from its filesystem through the
  launcher (`localcluster.kube.container`: own mount namespace, overlay root, volumes,
  user, capabilities; `containerplan` decides it all), its volumes provided under
  `<state>/pods/<uid>/` (`localcluster.kube.volumes`: secrets, configMaps, downward API,
  service-account tokens through the TokenRequest API, refreshed while it runs). Any other
  image is recorded, not pulled: command + args run as they are (a leading
  `python`/`python3` is this interpreter), with the Kubernetes environment
  (`localcluster.kube.podplan`). `hostNetwork` pods run in the node netns with the node's IP;
- reports status (podIP, hostIP, phase, containerStatuses, Ready from the readinessProbe,
  run from the node netns; no probe: ready once started), restarts exited containers per
  `restartPolicy` with backoff, and on deletion TERMs the process (the grace period, then
  KILL), removes the netns and confirms the deletion (grace 0, the pod's UID as precondition);
- programs the Services' VIPs on every node, kube-proxy style (`localcluster.kube.proxyplan`);
- serves "the host" of the cluster, 10.10.0.1 in the cluster netns: the API server and the
  cluster DNS (`localcluster.kube.hostside`).

Invariants: every netns is recorded in the cluster state before it is created and every
process has a pidfile in the state's pid directory, so `ambientctl down` (or a test's
teardown) removes all of it after any crash. On SIGTERM the kubelet just stops: the pods
stay, as they do when a real kubelet stops; teardown removes them.

A restarted kubelet does not adopt the pods of its predecessor: it removes their netns and
processes (they are in the cluster record) and realises the pods afresh.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import nsutil
from kube import kinds
from kube.client import KubeApiError, KubeClient, Obj, load_kubeconfig
from kube.informer import Informer
from kube.podnetns import PREFIX, netns_name
from localcluster.apps import INHERITED_ENV
from localcluster.kube import images, ipam, nodeobj, podnet, volumes
from localcluster.kube.container import LAUNCH_FAILED, last_cap
from localcluster.kube.containerplan import (
    capability_set,
    hosts_file,
    launch_spec,
    merge_env,
    resolv_conf,
)
from localcluster.kube.hostside import HostSide, admission_url_file
from localcluster.kube.podplan import (
    PodPlan,
    PodPlanError,
    ServiceInfo,
    container_argv,
    container_env,
    env_from_vars,
    env_refs,
    expand,
    plan_pod,
    service_info,
)
from localcluster.kube.podstatus import (
    ContainerState,
    PodView,
    after_exit,
    pod_status,
    restart_delay,
)
from localcluster.kube.probes import run_probe
from localcluster.kube.proxyplan import endpoint_of, service_rules
from localcluster.kube.volumecontent import (
    ObjectKey,
    TokenKey,
    VolumeNotReady,
    object_keys,
    renew_at,
    token_key,
    volume_files,
)
from localcluster.network import NetworkError, NodeLayout, apply_iptables, plan_layout
from localcluster.processes import (
    ManagedProcess,
    ProcessError,
    ProcessRecord,
    proc_stat,
    spawn_in_netns,
    terminate,
)
from localcluster.spec import ClusterSpec, load_cluster
from localcluster.state import ClusterState, kubelet_shm_dir, state_dir
from meshcore.runtime.stopsignals import on_stop_signal

log = logging.getLogger("kubelet")

T = TypeVar("T")
SYNC_PERIOD_S = 0.5
SANDBOX_RETRY_S = 5.0
VOLUME_RETRY_S = 2.0
TEARDOWN_RETRY_S = 1.0
IMAGE_RETRY_S = 5.0  # a pod that cannot run looks for its image in the store this often
# How often a running pod's secret/configMap/downwardAPI files are re-read and rewritten
# when changed (the real kubelet's sync period is a minute; a local cluster answers sooner).
VOLUME_REFRESH_S = 2.0
FINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(slots=True)
class PodRecord:
    """The kubelet's own, mutable record of one pod it runs (keyed by UID)."""

    plan: PodPlan
    node: NodeLayout
    ip: IPv4Address | None = None
    netns: str = ""  # "" for a hostNetwork pod or before the sandbox exists
    proc: ManagedProcess | None = None
    phase: str = "Pending"
    state: ContainerState = field(default_factory=lambda: ContainerState("waiting"))
    last_state: ContainerState | None = None
    restarts: int = 0
    retry_at: float = 0.0  # monotonic: when the next start (or sandbox retry) is due
    start_time: str = ""
    ready: bool = False
    probe_due: float = 0.0
    probe_passes: int = 0
    probe_fails: int = 0
    probing: bool = False
    terminating: bool = False
    reported: dict[str, Any] | None = None
    pod: Obj = field(default_factory=dict)  # the latest Pod object (downward API files)
    tokens: dict[TokenKey, tuple[str, float]] = field(default_factory=dict)  # (token, renew at)
    volumes_due: float = 0.0
    refreshing: bool = False
    launch_failures: int = 0

    @property
    def netns_path(self) -> str:
        return nsutil.netns_path(self.netns) if self.netns else self.node.netns_path


class Kubelet:
    def __init__(
        self,
        client: KubeClient,
        spec: ClusterSpec,
        state: ClusterState,
        workdir: Path,
        python: str = sys.executable,
        image_store: Path | None = None,
        admission_url: Path | None = None,
    ) -> None:
        self.client = client
        self.admission_url = admission_url  # where the host side writes istiod's webhook URL
        self.spec = spec
        self.state = state
        self.workdir = workdir
        self.python = python
        self.image_store = image_store if image_store is not None else images.store_root()
        self.nodes = {n.name: n for n in plan_layout(spec).nodes}
        self.services = Informer(client, kinds.SERVICE)
        self.pods = {
            name: Informer(client, kinds.POD, field_selector=f"spec.nodeName={name}")
            for name in self.nodes
        }
        self.records: dict[str, PodRecord] = {}
        self.applied_rules: dict[str, str] = {}
        self.wake = asyncio.Event()
        self.since = nodeobj.now_iso()
        self._tasks: set[asyncio.Task[None]] = set()
        # Every netns, link, iptables and process change runs on this one thread: pyroute2's
        # synchronous API cannot run on the loop's thread, and one thread keeps them in order.
        self._io_thread = ThreadPoolExecutor(1, thread_name_prefix="kubelet-io")
        self.host = self._host_side()

    def _host_side(self) -> HostSide:
        """The API server and cluster DNS on the cluster's host address (see hostside)."""
        pods = tuple(self.pods.values())
        return HostSide(
            self.client,
            plan_layout(self.spec),
            self.services,
            pods,
            self.wake.set,
            self._io,
            admission_url_file=self.admission_url,
        )

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io_thread, fn, *args)

    # ---- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        self._remove_leftovers()  # before any thread exists (see _sandbox)
        for node in self.nodes.values():
            await self.register(node)
        for inf in (self.services, *self.pods.values()):
            inf.add_handler(lambda *_: self.wake.set())
            inf.start()
        await asyncio.gather(*(i.synced.wait() for i in (self.services, *self.pods.values())))
        self._spawn(self._heartbeats(), "heartbeats")
        await self.host.start()
        log.info("kubelet: nodes %s registered; following their pods", ", ".join(self.nodes))
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SYNC_PERIOD_S):
                    await self.wake.wait()
            self.wake.clear()
            try:
                await self.sync()
            except (KubeApiError, OSError, NetworkError) as e:
                log.warning("kubelet: sync failed: %s; retrying", e)

    async def stop(self) -> None:
        for inf in (self.services, *self.pods.values()):
            await inf.stop()
        await self.host.stop()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._io_thread.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("kubelet: task %s failed: %s", name, t.exception())
            self.wake.set()

        task.add_done_callback(done)

    def _remove_leftovers(self) -> None:
        """Pod netns (and their processes) a previous kubelet of this cluster left."""
        stale = [n for n in self.state.netns if n.startswith(PREFIX)]
        for name in stale:
            path = nsutil.netns_path(name)
            if os.path.exists(path):
                terminate(_processes_in(path))
            podnet.remove(name, self.state)
        for rec_file in self.state.pidfile_dir.glob("pod-*.pid"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                terminate([ProcessRecord.from_json(rec_file.read_text())])
            rec_file.unlink(missing_ok=True)
        # Their files: root filesystem layers and volumes (their mounts died with them).
        shutil.rmtree(self.state.dir / "pods", ignore_errors=True)
        shutil.rmtree(kubelet_shm_dir(self.spec.name), ignore_errors=True)

    # ---- nodes ---------------------------------------------------------------------------

    async def register(self, node: NodeLayout) -> None:
        obj = nodeobj.node_object(node.name, node.ip, node.pod_cidr)
        try:
            await self.client.create(kinds.NODE, obj)
        except KubeApiError as e:
            if e.status != 409:
                raise
            await self.client.patch(kinds.NODE, node.name, {"metadata": obj["metadata"]})
        await self.heartbeat(node)

    async def heartbeat(self, node: NodeLayout) -> None:
        now = nodeobj.now_iso()
        status = nodeobj.node_status(node.name, node.ip, now, self.since)
        await self.client.patch(kinds.NODE, node.name, status, subresource="status")
        lease = nodeobj.lease_object(node.name, nodeobj.now_micro())
        ns = nodeobj.NODE_LEASE_NAMESPACE
        try:
            await self.client.patch(kinds.LEASE, node.name, {"spec": lease["spec"]}, ns)
        except KubeApiError as e:
            if e.status != 404:
                raise
            await self.client.create(kinds.LEASE, lease, ns)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(nodeobj.HEARTBEAT_S)
            for node in self.nodes.values():
                try:
                    await self.heartbeat(node)
                except (KubeApiError, OSError) as e:
                    log.warning("kubelet: heartbeat of node %s failed: %s", node.name, e)

    # ---- the sync pass -------------------------------------------------------------------

    def _bound_pods(self) -> dict[str, Obj]:
        out: dict[str, Obj] = {}
        for inf in self.pods.values():
            for pod in inf.items():
                uid = str((pod.get("metadata") or {}).get("uid", ""))
                if uid:
                    out[uid] = pod
        return out

    def _service_infos(self) -> list[ServiceInfo]:
        return [service_info(s) for s in self.services.items()]

    async def sync(self) -> None:
        pods = self._bound_pods()
        now = time.monotonic()
        for uid, pod in pods.items():
            rec = self.records.get(uid)
            md = pod.get("metadata") or {}
            if md.get("deletionTimestamp"):
                if rec is None:
                    await self._confirm_deleted(pod)
                elif not rec.terminating:
                    rec.terminating = True
                    self._spawn(self._terminate(uid, rec, pod), f"terminate-{uid}")
                continue
            if rec is None:
                if str((pod.get("status") or {}).get("phase")) in FINAL_PHASES:
                    continue  # finished before this kubelet started: nothing to run
                plan = self._plan(pod)
                node = self.nodes.get(plan.node)
                if node is None:
                    continue
                rec = PodRecord(plan, node)
                self.records[uid] = rec
            rec.pod = pod
            if rec.terminating:
                continue
            await self._step(rec, now)
        for uid, rec in list(self.records.items()):
            if uid not in pods and not rec.terminating:
                # Removed without a graceful deletion (forced): stop it all the same.
                rec.terminating = True
                self._spawn(self._terminate(uid, rec, None), f"terminate-{uid}")
        # A copy: each report awaits the API server, and meanwhile a pod's termination task
        # may drop its record (iterating the dict itself then ended this kubelet).
        for uid, rec in list(self.records.items()):
            if not rec.terminating and self.records.get(uid) is rec:
                await self._report(rec)
        await self._program_services(pods)

    def _plan(self, pod: Obj) -> PodPlan:
        containers = (pod.get("spec") or {}).get("containers") or [{}]
        first = containers[0] if isinstance(containers[0], dict) else {}
        image = str(first.get("image", ""))
        bundle = images.lookup(image, self.image_store) if image else None
        return plan_pod(pod, bundle, bundle.image_id if bundle is not None else "")

    async def _step(self, rec: PodRecord, now: float) -> None:
        plan = rec.plan
        if plan.problem and plan.image_plan is None and now >= rec.retry_at:
            # Its image may have been stored since (built after the pod was created), as a
            # real kubelet keeps pulling: look again now and then.
            rec.retry_at = now + IMAGE_RETRY_S
            again = self._plan(rec.pod)
            if again != plan:
                rec.plan = plan = again
        if plan.problem:
            rec.state = ContainerState("waiting", "CreateContainerError", plan.problem)
            return
        if rec.proc is not None:
            code = rec.proc.popen.poll()
            if code is None:
                self._maybe_probe(rec, now)
                self._maybe_refresh(rec, now)
                return
            self._exited(rec, code, now)
        if rec.phase in FINAL_PHASES or now < rec.retry_at:
            return
        if rec.ip is None and not await self._sandbox(rec, now):
            return
        await self._start(rec, now)

    async def _sandbox(self, rec: PodRecord, now: float) -> bool:
        node, plan = rec.node, rec.plan
        if plan.host_network:
            rec.ip = node.ip
            return True
        taken = {r.ip for r in self.records.values() if r.ip is not None and r.node is node}
        try:
            ip = ipam.allocate(node.pod_cidr, node.gateway, taken)
            layout = podnet.pod_layout(node, plan.uid, plan.namespace, plan.name, ip)
            await self._io(podnet.create, node, layout, self.state)
        except (NetworkError, ipam.AddressesExhausted, ValueError) as e:
            rec.state = ContainerState("waiting", "CreatePodSandboxError", str(e))
            rec.retry_at = now + SANDBOX_RETRY_S
            log.warning("kubelet: pod %s: %s", plan.key, e)
            return False
        rec.ip, rec.netns = ip, layout.netns
        return True

    async def _start(self, rec: PodRecord, now: float) -> None:
        plan = rec.plan
        if plan.image_plan is not None:
            launch = await self._prepare_image(rec, now)
            if launch is None:
                return
            argv, env = launch
            cwd = Path("/")
        else:
            try:
                refs, from_vars = await self._env_refs(rec)
            except VolumeNotReady as e:
                self._not_ready(rec, now, "CreateContainerConfigError", str(e))
                return
            env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
            env.update(PYTHONUNBUFFERED="1", HOSTNAME=plan.name)
            env.update(
                container_env(
                    plan, self._service_infos(), str(rec.ip), str(rec.node.ip), refs, from_vars
                )
            )
            argv = container_argv(plan, env, self.python)
            cwd = self.workdir / plan.working_dir if plan.working_dir else self.workdir
        name = process_name(plan.uid)
        log_path = self.state.log_dir / f"{name}-{plan.namespace}-{plan.name[:100]}.log"
        try:
            rec.proc = await self._io(
                spawn_in_netns,
                rec.netns_path,
                argv,
                env,
                cwd,
                log_path,
                self.state.pidfile_dir,
                name,
            )
        except ProcessError as e:
            rec.proc = None
            stamp = nodeobj.now_iso()
            rec.last_state = ContainerState("terminated", "StartError", str(e), stamp, stamp, 128)
            self._after(rec, 128, now, "StartError")
            log.warning("kubelet: pod %s: %s", plan.key, e)
            return
        stamp = nodeobj.now_iso()
        rec.start_time = rec.start_time or stamp
        rec.state = ContainerState("running", started_at=stamp)
        rec.phase = "Running"
        rec.ready = plan.readiness is None
        rec.probe_passes = rec.probe_fails = 0
        probe = plan.readiness
        rec.probe_due = now + (probe.initial_delay_s if probe is not None else 0.0)
        log.info("kubelet: pod %s started (pid %d, ip %s)", plan.key, rec.proc.pid, rec.ip)

    def _exited(self, rec: PodRecord, code: int, now: float) -> None:
        assert rec.proc is not None
        rec.proc.pidfile.unlink(missing_ok=True)
        rec.proc = None
        failure = self._launch_failure(rec) if code == LAUNCH_FAILED else ""
        if failure:
            # The launcher could not build the container: it never ran. Kept waiting and
            # retried with back-off, as the real kubelet does with CreateContainerError.
            delay = restart_delay(rec.launch_failures)
            rec.launch_failures += 1
            rec.retry_at = now + delay
            rec.ready = False
            rec.state = ContainerState("waiting", "CreateContainerError", failure)
            log.warning("kubelet: pod %s: %s", rec.plan.key, failure)
            return
        stamp = nodeobj.now_iso()
        reason = "Completed" if code == 0 else "Error"
        rec.last_state = ContainerState(
            "terminated", reason, "", rec.state.started_at, stamp, code if code >= 0 else 128 - code
        )
        self._after(rec, rec.last_state.exit_code, now, reason)
        log.info("kubelet: pod %s: container exited with %d", rec.plan.key, code)

    def _after(self, rec: PodRecord, code: int, now: float, reason: str) -> None:
        rec.ready = False
        outcome = after_exit(rec.plan.restart_policy, code)
        rec.phase = outcome.phase
        if outcome.restart:
            delay = restart_delay(rec.restarts)
            rec.restarts += 1
            rec.retry_at = now + delay
            rec.state = ContainerState(
                "waiting", "CrashLoopBackOff", f"back-off {delay:g}s restarting failed container"
            )
        else:
            assert rec.last_state is not None
            rec.state = rec.last_state

    # ---- containers from images --------------------------------------------------------

    def _pod_dir(self, rec: PodRecord) -> Path:
        return volumes.pod_dir(self.state.dir, rec.plan.uid)

    def _launch_failure(self, rec: PodRecord) -> str:
        if rec.plan.image_plan is None:
            return ""
        try:
            return (self._pod_dir(rec) / "launch-error").read_text(errors="replace").strip()
        except OSError:
            return ""

    def _not_ready(self, rec: PodRecord, now: float, reason: str, message: str) -> None:
        if rec.state.message != message:
            log.warning("kubelet: pod %s: %s", rec.plan.key, message)
        rec.state = ContainerState("waiting", reason, message)
        rec.retry_at = now + VOLUME_RETRY_S

    async def _prepare_image(
        self, rec: PodRecord, now: float
    ) -> tuple[list[str], dict[str, str]] | None:
        """Volumes, /etc files and the launcher's document; None (and the pod waiting with
        the reason) when something it needs is not there yet."""
        plan, ip = rec.plan, rec.plan.image_plan
        assert ip is not None and rec.ip is not None
        pdir = self._pod_dir(rec)
        # Root's alone: it holds the pod's secrets (files, and env in launch.json). The
        # container reaches what it may through its mounts, not through this path.
        pdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            refs, from_vars = await self._env_refs(rec)
        except VolumeNotReady as e:
            self._not_ready(rec, now, "CreateContainerConfigError", str(e))
            return None
        try:
            sources = await self._volume_sources(rec)
        except (VolumeNotReady, OSError) as e:
            self._not_ready(rec, now, "ContainerCreating", str(e))
            return None
        services = self._service_infos()
        kube_env = container_env(plan, services, str(rec.ip), str(rec.node.ip), refs, from_vars)
        kube_env.setdefault("HOSTNAME", ip.hostname)
        env = merge_env(ip.image_env, kube_env)
        argv = [*ip.image_argv, *(expand(a, kube_env) for a in ip.pod_argv)]
        etc = pdir / "etc"
        texts = {
            "resolv.conf": resolv_conf(plan.namespace, ip.dns_policy, plan.host_network),
            "hosts": hosts_file(ip.hostname, str(rec.ip)),
            "hostname": ip.hostname + "\n",
        }
        caps = capability_set(ip.cap_add, ip.cap_drop, ip.privileged, last_cap())
        spec = launch_spec(
            ip, argv, env, sources, caps, pdir, {f"/etc/{n}": str(etc / n) for n in texts}
        )

        def write() -> None:
            etc.mkdir(parents=True, exist_ok=True)
            for n, text in texts.items():
                (etc / n).write_text(text, encoding="utf-8")
            # Each start is a new container: a fresh writable layer, as a runtime makes one.
            for d in ("upper", "work"):
                shutil.rmtree(pdir / d, ignore_errors=True)
            (pdir / "launch-error").unlink(missing_ok=True)
            tmp = pdir / ".launch.json.tmp"
            tmp.write_text(json.dumps(spec), encoding="utf-8")
            os.replace(tmp, pdir / "launch.json")

        await asyncio.to_thread(write)
        launcher_env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        launcher = [self.python, "-m", "localcluster.kube.container", str(pdir / "launch.json")]
        return launcher, launcher_env

    async def _env_refs(
        self, rec: PodRecord
    ) -> tuple[dict[tuple[str, str, str], str], dict[str, str]]:
        """The values `env`'s configMapKeyRef/secretKeyRef name, and the variables of
        `envFrom`; VolumeNotReady (CreateContainerConfigError) when a required one is
        missing."""
        out: dict[tuple[str, str, str], str] = {}
        cache: dict[ObjectKey, dict[str, bytes] | None] = {}

        async def read(kind: str, name: str) -> dict[str, bytes] | None:
            if (kind, name) not in cache:
                cache[(kind, name)] = await self._object(rec.plan.namespace, kind, name)
            return cache[(kind, name)]

        for ref, optional in env_refs(rec.plan):
            kind, name, key = ref
            data = await read(kind, name)
            if data is None or key not in data:
                if optional:
                    continue
                what = f"{kind} {name!r}" if data is None else f"key {key!r} of {kind} {name!r}"
                raise VolumeNotReady(f"env: {what} not found")
            out[ref] = data[key].decode(errors="replace")
        objects: dict[tuple[str, str], dict[str, str] | None] = {}
        for ef in rec.plan.env_from:
            data = await read(ef.kind, ef.name)
            objects[(ef.kind, ef.name)] = (
                None if data is None else {k: v.decode(errors="replace") for k, v in data.items()}
            )
        try:
            from_vars = env_from_vars(rec.plan.env_from, objects)
        except PodPlanError as e:
            raise VolumeNotReady(str(e)) from e
        return out, from_vars

    async def _object(self, namespace: str, kind: str, name: str) -> dict[str, bytes] | None:
        path = f"/api/v1/namespaces/{namespace}/{'secrets' if kind == 'secret' else 'configmaps'}"
        try:
            obj = await self.client.request("GET", f"{path}/{name}")
        except KubeApiError as e:
            if e.status == 404:
                return None
            raise
        return volumes.object_data(kind, obj)

    async def _volume_sources(self, rec: PodRecord, files_only: bool = False) -> dict[str, str]:
        """Each volume's path on this machine, created and written as needed."""
        ip = rec.plan.image_plan
        assert ip is not None
        pdir = self._pod_dir(rec)
        out: dict[str, str] = {}
        for v in ip.volumes:
            if v.kind == "hostPath" and not files_only:
                node_dir = volumes.node_host_dir(self.state.dir, rec.node.name)
                out[v.name] = str(await asyncio.to_thread(volumes.host_path, v, node_dir))
            elif v.kind == "emptyDir" and not files_only:
                shm = volumes.shm_dir(self.spec.name, rec.plan.uid)
                out[v.name] = str(await asyncio.to_thread(volumes.empty_dir, v, pdir, shm))
            elif v.kind == "files":
                objects = {k: await self._object(rec.plan.namespace, *k) for k in object_keys(v)}
                tokens = {
                    token_key(s): await self._token(rec, s.audience, s.expiration_s, token_key(s))
                    for s in v.sources
                    if s.kind == "serviceAccountToken"
                }
                files = volume_files(v, objects, self._pod_view(rec), tokens)
                target = volumes.files_dir(v, pdir)
                await asyncio.to_thread(volumes.write_files, target, files)
                out[v.name] = str(target)
        return out

    def _pod_view(self, rec: PodRecord) -> Obj:
        """The Pod as the downward API sees it: its status fields as this kubelet knows
        them (the API's copy lags behind the first start)."""
        status = dict(rec.pod.get("status") or {})
        status["hostIP"] = str(rec.node.ip)
        if rec.ip is not None:
            status["podIP"] = str(rec.ip)
        return {**rec.pod, "status": status}

    async def _token(self, rec: PodRecord, audience: str, expiration_s: int, key: TokenKey) -> str:
        """A token for the pod's service account, bound to the pod; requested again once
        80% of its lifetime has passed."""
        held = rec.tokens.get(key)
        if held is not None and time.time() < held[1]:
            return held[0]
        plan = rec.plan
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else [],
                "expirationSeconds": expiration_s,
                "boundObjectRef": {
                    "kind": "Pod",
                    "apiVersion": "v1",
                    "name": plan.name,
                    "uid": plan.uid,
                },
            },
        }
        path = f"/api/v1/namespaces/{plan.namespace}/serviceaccounts/{plan.service_account}/token"
        try:
            answer = await self.client.request("POST", path, body=body)
        except KubeApiError as e:
            raise VolumeNotReady(f"token for service account {plan.service_account}: {e}") from e
        status = answer.get("status") or {}
        token = str(status.get("token", ""))
        issued = time.time()
        renew = renew_at(issued, str(status.get("expirationTimestamp", "")), expiration_s)
        rec.tokens[key] = (token, renew)
        return token

    def _maybe_refresh(self, rec: PodRecord, now: float) -> None:
        ip = rec.plan.image_plan
        if ip is None or rec.refreshing or now < rec.volumes_due:
            return
        if not any(v.kind == "files" for v in ip.volumes):
            return
        rec.refreshing = True
        rec.volumes_due = now + VOLUME_REFRESH_S
        self._spawn(self._refresh(rec), f"volumes-{rec.plan.uid}")

    async def _refresh(self, rec: PodRecord) -> None:
        """Rewrite the files volumes that changed (a Secret or ConfigMap updated, a token
        due); a source gone meanwhile keeps the files the container has."""
        try:
            await self._volume_sources(rec, files_only=True)
        except (VolumeNotReady, KubeApiError, OSError) as e:
            log.warning("kubelet: pod %s: volume refresh: %s", rec.plan.key, e)
        finally:
            rec.refreshing = False

    def _maybe_probe(self, rec: PodRecord, now: float) -> None:
        probe = rec.plan.readiness
        if probe is None or rec.probing or now < rec.probe_due or rec.ip is None:
            return
        rec.probing = True
        rec.probe_due = now + probe.period_s
        self._spawn(self._probe(rec), f"probe-{rec.plan.uid}")

    async def _probe(self, rec: PodRecord) -> None:
        probe = rec.plan.readiness
        assert probe is not None and rec.ip is not None
        try:
            ok, why = await run_probe(probe, rec.node.netns_path, str(rec.ip))
        finally:
            rec.probing = False
        was = rec.ready
        if ok:
            rec.probe_passes, rec.probe_fails = rec.probe_passes + 1, 0
            if rec.probe_passes >= probe.success_threshold:
                rec.ready = rec.proc is not None
        else:
            rec.probe_passes, rec.probe_fails = 0, rec.probe_fails + 1
            if rec.probe_fails >= probe.failure_threshold:
                rec.ready = False
        if rec.ready != was:
            state = "ready" if rec.ready else "not ready"
            log.info("kubelet: pod %s %s (readiness probe: %s)", rec.plan.key, state, why)

    async def _report(self, rec: PodRecord) -> None:
        view = PodView(
            plan=rec.plan,
            phase=rec.phase,
            # Reported once the container first started; kept while the sandbox lives.
            pod_ip=str(rec.ip) if rec.ip is not None and rec.start_time else "",
            host_ip=str(rec.node.ip),
            start_time=rec.start_time,
            state=rec.state,
            last_state=rec.last_state,
            ready=rec.ready,
            restarts=rec.restarts,
            message=rec.plan.problem,
            image_id=rec.plan.image_plan.image_id if rec.plan.image_plan is not None else "",
        )
        status = pod_status(view)
        if status == rec.reported:
            return
        try:
            await self.client.patch(
                kinds.POD, rec.plan.name, status, rec.plan.namespace, subresource="status"
            )
        except KubeApiError as e:
            if e.status == 404:
                return  # gone meanwhile; the next pass tears it down
            raise
        rec.reported = status

    # ---- deletion ------------------------------------------------------------------------

    async def _terminate(self, uid: str, rec: PodRecord, pod: Obj | None) -> None:
        plan = rec.plan
        grace = plan.grace_s
        if pod is not None:
            g = (pod.get("metadata") or {}).get("deletionGracePeriodSeconds")
            if isinstance(g, int) and g >= 0:
                grace = float(g)
        # Said at the start too: a log that ends here tells a stuck teardown from a deletion
        # never seen.
        log.info("kubelet: pod %s terminating (grace %g s)", plan.key, grace)
        try:
            if rec.proc is not None:
                await asyncio.to_thread(rec.proc.stop, max(grace, 0.1))
                rec.proc = None
            if rec.netns:
                await self._io(podnet.remove, rec.netns, self.state)
            if plan.image_plan is not None:
                shm = volumes.shm_dir(self.spec.name, plan.uid)
                await asyncio.to_thread(volumes.remove_pod, self._pod_dir(rec), shm)
        except (ProcessError, NetworkError, OSError) as e:
            log.error("kubelet: tearing pod %s down failed: %s; will retry", plan.key, e)
            await self._retry_teardown_later(rec)
            return
        except Exception:
            # Anything else (a helper library's own error): retried as well, never a pod
            # left terminating for good with nobody to finish it.
            log.exception("kubelet: tearing pod %s down failed; will retry", plan.key)
            await self._retry_teardown_later(rec)
            return
        self.records.pop(uid, None)  # its address is free again only now
        if pod is not None:
            await self._confirm_deleted(pod)
        log.info("kubelet: pod %s deleted", plan.key)

    async def _retry_teardown_later(self, rec: PodRecord) -> None:
        # A pause first: the sync this task's end wakes would otherwise retry at once, in a
        # tight loop while the cause lasts.
        await asyncio.sleep(TEARDOWN_RETRY_S)
        rec.terminating = False

    async def _confirm_deleted(self, pod: Obj) -> None:
        md = pod.get("metadata") or {}
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": md.get("uid")},
        }
        path = kinds.POD.path(str(md.get("namespace")), str(md.get("name")))
        try:
            await self.client.request("DELETE", path, body=body)
        except KubeApiError as e:
            if e.status not in (404, 409):
                raise

    # ---- services ------------------------------------------------------------------------

    async def _program_services(self, pods: Mapping[str, Obj]) -> None:
        services = self._service_infos()
        endpoints = [ep for p in pods.values() if (ep := endpoint_of(p)) is not None]
        for node in self.nodes.values():
            text = service_rules(services, endpoints, node.pod_cidr, self.host.listed())
            if self.applied_rules.get(node.name) == text:
                continue
            await self._io(apply_iptables, node.netns_path, text)
            self.applied_rules[node.name] = text


def process_name(uid: str) -> str:
    return "pod-" + netns_name(uid).removeprefix(PREFIX)


def _processes_in(netns_path: str) -> list[ProcessRecord]:
    st = os.stat(netns_path)
    out: list[ProcessRecord] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        ps = proc_stat(int(entry)) if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino) else None
        if ps is not None:
            out.append(ProcessRecord("leftover", int(entry), ps[2], (), netns_path, ""))
    return out


# ---- the program ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m localcluster.kube.kubelet",
        description="Play the kubelet (and kube-proxy) of a local cluster's nodes.",
    )
    p.add_argument("--kubeconfig", required=True, help="the API server and credentials")
    p.add_argument("--cluster-file", required=True, help="the cluster file (its nodes)")
    p.add_argument("--state-root", default=None, help="the cluster's state root")
    p.add_argument(
        "--workdir",
        default=None,
        help="where pod commands run (default: the cluster file's directory)",
    )
    p.add_argument(
        "--image-store",
        default=None,
        help=f"the local image store (default: ${images.STORE_ENV} or {images.store_root()})",
    )
    return p


async def _main(args: argparse.Namespace) -> int:
    spec = load_cluster(args.cluster_file)
    state = ClusterState.load(spec.name, args.state_root)
    if state is None:
        root = state_dir(spec.name, args.state_root)
        print(f"kubelet: cluster {spec.name} has no state under {root}: is it up?", file=sys.stderr)
        return 1
    workdir = Path(args.workdir) if args.workdir else spec.base_dir
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Not loop.add_signal_handler: it routes signals through a wakeup fd that pyroute2's
    # forked helpers inherit, and the SIGTERM pyroute2 sends its helper would then read as
    # ours. Nor a plain handler: the helper would inherit it and live through that SIGTERM,
    # and pyroute2 waits for it with no timeout (the pod work's one thread stuck for good).
    on_stop_signal(lambda _signum: loop.call_soon_threadsafe(stop.set))
    async with KubeClient(load_kubeconfig(args.kubeconfig)) as client:
        store = Path(args.image_store) if args.image_store else None
        kubelet = Kubelet(
            client,
            spec,
            state,
            workdir,
            image_store=store,
            admission_url=admission_url_file(args.kubeconfig),
        )
        runner = asyncio.create_task(kubelet.run())
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        runner.cancel()
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await kubelet.stop()
        if runner in done and not runner.cancelled() and runner.exception() is not None:
            print(f"kubelet: {runner.exception()}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    # `kill -USR1 <pid>` prints every thread's stack to the log: a stuck kubelet explains itself.
    faulthandler.register(signal.SIGUSR1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return asyncio.run(_main(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
