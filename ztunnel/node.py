"""The tunnel of one node: mesh state, certificates, and the enrolled pods' proxies.

A pod runs when it is enrolled AND its workload is known. Enrolment arrives either as a
whole desired set (the file source: `on_enrolment`, then reconcile) or pod by pod from the
node agent over ZDS (`add_pod`, `remove_pod`, `keep_only`). Both feed the same `desired`
map, and the reconcile loop keeps retrying whatever is enrolled but not running: a pod
whose workload is not yet in the config waits, marked pending, and starts when it arrives;
a pod whose start failed is retried.

ZDS semantics follow upstream ztunnel's in-pod state manager: an Add returns (is acked)
once the pod's listeners are up; a start that fails raises (is nacked) and the pod stays
pending and is retried; an Add repeated for the same netns changes nothing; an Add with a
new netns (recreated sandbox) replaces the running proxy. One difference is forced by our
design: upstream starts a pod's proxies from the Add's WorkloadInfo alone and holds its
connections until the workload shows up in the config, while ours needs the workload to
start. So an Add waits briefly for it and, if it has not come, is acked with the pod
marked pending; it starts as soon as the config names it. Either way no traffic passes
unencrypted: until then the pod's captured traffic finds no listener.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from meshcore.admin import views
from meshcore.defaults import ROOT_NAMESPACE
from meshcore.discovery import ConfigStatus
from meshcore.hbone.limits import DEFAULT_LIMITS, HboneLimits
from meshcore.hbone.server import Guard
from meshcore.hbone.transport import H2Transport
from meshcore.identity.certs import CertificateSource
from meshcore.identity.spiffe import SpiffeId
from meshcore.observability.connections import ConnectionTable
from meshcore.policy.authz import authorize
from meshcore.policy.index import PolicyIndex
from meshcore.policy.verdict import Verdict
from meshcore.runtime.tasks import TaskSet
from meshcore.sockets import SocketAddr
from meshcore.state import IPAddress, MeshState, Workload
from ztunnel.config import DEFAULT_RELEASE_DRAIN_SECONDS
from ztunnel.dns.limits import DnsLimits
from ztunnel.dns.metrics import DnsMetrics
from ztunnel.explain import explain
from ztunnel.inpod import Enrolment, PodProxy, PodState
from ztunnel.proxy.inbound import InboundProxy

if TYPE_CHECKING:
    from ztunnel.workers.owner import WorkerPool

log = structlog.get_logger(__name__)

# How long a ZDS Add waits for its workload to appear in the mesh config before it is
# acked with the pod pending (the config and the agent are independent sources).
WORKLOAD_WAIT = 2.0
NO_WORKLOAD = "workload not in the mesh config yet"


class PodStartError(Exception):
    """A pod's proxy could not be started; the message says why (the pod stays enrolled,
    marked pending, and is retried)."""


class NodeProxy:
    def __init__(
        self,
        node_name: str,
        certs: CertificateSource,
        trust_domain: str,
        root_namespace: str = ROOT_NAMESPACE,
        connection_table: ConnectionTable | None = None,
        workload_wait: float = WORKLOAD_WAIT,
        release_drain: float = DEFAULT_RELEASE_DRAIN_SECONDS,
        same_node_in_process: bool = True,
        hbone_limits: HboneLimits = DEFAULT_LIMITS,
        dns_upstreams: tuple[IPAddress, ...] | None = None,
        dns_limits: DnsLimits | None = None,
        dns_listen: bool = True,
    ) -> None:
        """`dns_upstreams`: the resolvers each pod's DNS proxy forwards to; None runs no
        DNS proxy (ISTIO_META_DNS_CAPTURE off). `dns_listen` false: the pods' DNS proxies
        only resolve for their connections and answer no query (a worker process: its
        owner answers them)."""
        self.dns_listen = dns_listen
        # How many processes of this tunnel serve every pod (the owner sets it once its
        # workers run; a worker is told by the owner).
        self.processes = 1
        self.node_name = node_name
        self.dns_upstreams = dns_upstreams
        self.dns_limits = dns_limits
        # The DNS proxies' counters, one set for the node (rendered on 15020).
        self.dns_metrics = DnsMetrics()
        self.workload_wait = workload_wait
        self.release_drain = release_drain
        self.same_node_in_process = same_node_in_process
        self.certs = certs
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self.connection_table = (
            connection_table if connection_table is not None else ConnectionTable()
        )
        self.policies = PolicyIndex.build(MeshState.empty(), root_namespace)
        # Every pod's HBONE endpoints share one guard: the handshake limits are per tunnel.
        self.guard = Guard(hbone_limits, self.connection_table.metrics.hbone_refused)
        self.guard.tunnel_connections = self.connection_table.__len__
        # Strangers to the mesh (no workload at their address) share part of the handshake
        # bound, and known sources share it fairly by node; the state they are judged by is
        # the one in force at each accept.
        self.guard.gate.group_of = lambda source: self.state.source_group(source)
        self.quit_requested = asyncio.Event()
        self.state = MeshState.empty()
        self.state_loaded = False
        # Which config file content is in force and whether a newer one was refused, from
        # the config source (readiness and the config dump show it: writers wait on it).
        self.config_status: Callable[[], ConfigStatus] | None = None
        self.desired: dict[str, Enrolment] = {}
        self.pods: dict[str, PodProxy] = {}
        self._by_workload: dict[str, PodProxy] | None = None  # workload uid -> pod, lazily
        self.pending: dict[str, str] = {}  # uid -> why it is not running
        # Where enrolment comes from, and whether it is complete: a ZDS source is not
        # until the agent's snapshot arrived on the current connection (as upstream, the
        # tunnel is not ready while the agent is away).
        self.enrolment_source = "file"
        self.enrolment_synced = True
        self.enrolment_detail = ""
        self._state_changed = asyncio.Event()
        self._waited_in_vain: MeshState | None = None
        self.tasks = TaskSet("node")
        self._lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        # The tunnel's other processes (TUNNEL_WORKERS > 1): they serve every pod this node
        # serves, beside it; None in a single-process tunnel and in a worker.
        self.workers: WorkerPool | None = None

    def start(self) -> None:
        self._runner = self.tasks.spawn(self._run(), "reconcile")

    def on_state(self, state: MeshState) -> None:
        policies_changed = state.policies != self.state.policies or not self.state_loaded
        self.state = state
        self.state_loaded = True
        if policies_changed:
            self._load_policies(state)
        for pod in self.pods.values():
            w = self.workload_for(pod.enrolment)
            if w is not None:
                pod.workload = w
        self._by_workload = None
        changed, self._state_changed = self._state_changed, asyncio.Event()
        changed.set()
        if self.workers is not None:
            self.workers.push_state(state)  # before any pod they are sent next
        # Workloads (labels, addresses) feed policy too: re-check after any change.
        closed = self.connection_table.recheck()
        if closed:
            log.info("policy re-check closed connections", count=closed)
        self._dirty.set()

    def _load_policies(self, state: MeshState) -> None:
        old_warnings = set(self.policies.warnings)
        self.policies = PolicyIndex.build(state, self.root_namespace)
        # Each warning once, when it first appears (not again on every config change).
        for w in self.policies.warnings:
            if w not in old_warnings:
                log.warning("policy warning", warning=w)
        for err in self.policies.errors:
            log.error("policy rejected; it denies every connection it could apply to", error=err)
        log.info("policies loaded", count=len(self.policies.policies))

    def authorize(
        self, workload: Workload, peer: SpiffeId | None, client: SocketAddr, target: SocketAddr
    ) -> Verdict:
        """The proxies' authorizer. Dry-run policies are logged here, never enforced."""
        verdict = authorize(self.policies, workload, peer, client.ip, target)
        for dry in verdict.dry_run:
            log.info(
                "dry-run policy evaluated",
                policy=dry.policy,
                action=dry.action.value,
                matched=dry.matched,
                src=str(client),
                src_identity=str(peer) if peer else None,
                dst=str(target),
            )
        return verdict

    def local_inbound(self, workload: Workload) -> InboundProxy | None:
        """The inbound proxy of `workload` when this tunnel serves it and is accepting for
        it: the outbound side then delivers same-node connections in process."""
        if not self.same_node_in_process or workload.node != self.node_name:
            return None
        index = self._by_workload
        if index is None:
            index = self._by_workload = {p.workload.uid: p for p in self.pods.values()}
        pod = index.get(workload.uid)
        if pod is None or pod.state is not PodState.READY:
            return None  # draining or stopping: as for HBONE, new connections go elsewhere
        return pod.inbound

    def workload_for(self, enrolment: Enrolment) -> Workload | None:
        """The mesh workload of an enrolled pod: by uid, else (a ZDS pod, whose uid is the
        Kubernetes pod uid) by namespace and name among this node's workloads, as
        upstream finds a pod's workload from its WorkloadInfo."""
        w = self.state.workload_by_uid(enrolment.uid)
        if w is not None or enrolment.info is None:
            return w
        info = enrolment.info
        for w in self.state.workloads_on_node(self.node_name):
            if w.name == info.name and w.namespace == info.namespace:
                return w
        return None

    def workload_of(self, uid: str) -> Workload | None:
        """`workload_for` by uid, for views (None for a pod that is not enrolled)."""
        enrolment = self.desired.get(uid)
        if enrolment is None:
            return self.state.workload_by_uid(uid)
        return self.workload_for(enrolment)

    def on_enrolment(self, desired: dict[str, Enrolment]) -> None:
        for uid, old in self.desired.items():
            if desired.get(uid) is not old:
                old.release()
        self.desired = desired
        self._dirty.set()

    # ---- ZDS: pod by pod -----------------------------------------------------------------

    async def add_pod(self, enrolment: Enrolment) -> None:
        """Enrol one pod and start it; returns once its listeners are up, or once it is
        marked pending because its workload is not in the config yet (it starts when the
        config names it). Raises PodStartError with the reason if starting failed: the pod
        stays enrolled and pending, and is retried.

        Takes ownership of `enrolment.netns_fd`: kept while the pod is enrolled, closed
        when it is removed, replaced, or when this Add repeats the enrolment it has."""
        uid = enrolment.uid
        try:
            async with self._lock:
                current = self.desired.get(uid)
                if current is not None and current == enrolment:
                    enrolment.release()  # same netns: the handle we have is as good
                    enrolment = current
                    if uid in self.pods:
                        return
                else:
                    await self._forget(uid)
                    self.desired[uid] = enrolment
            if self.workload_for(enrolment) is None:
                await self._wait_for_workload(enrolment)
            async with self._lock:
                if self.desired.get(uid) is not enrolment:
                    raise PodStartError(f"pod {uid} was removed or replaced while it started")
                if uid in self.pods:
                    return  # the reconcile loop started it meanwhile
                error = await self._start_pod(enrolment)
        except BaseException:
            # Cancelled (shutdown) or superseded: an fd no map holds must not leak.
            if self.desired.get(uid) is not enrolment:
                enrolment.release()
            raise
        if error == NO_WORKLOAD:
            log.warning("pod enrolled before its workload is known; pending", uid=uid)
        elif error is not None:
            raise PodStartError(error)

    async def remove_pod(self, uid: str, drain: float | None = None) -> None:
        """Stop serving a pod and release its netns (nothing happens for an unknown uid).

        The agent has already stopped redirecting the pod's new connections; the ones this
        tunnel carries run to their end (up to `drain` seconds, default `release_drain`)
        before the pod's proxy stops, so leaving the mesh breaks nothing that is running.
        The workers drain theirs at the same time."""
        seconds = self.release_drain if drain is None else drain
        pod = self.pods.get(uid)
        if pod is not None and seconds > 0:
            pod.stop_accepting()
            if self.workers is not None:
                await asyncio.gather(
                    self._wait_idle([pod], seconds), self.workers.release(uid, seconds)
                )
            else:
                await self._wait_idle([pod], seconds)
        async with self._lock:
            await self._forget(uid)

    async def keep_only(self, uids: set[str] | frozenset[str]) -> None:
        """Stop every pod not in `uids` (ZDS SnapshotSent: the agent's snapshot is the
        truth, anything else was deleted while the agent and the tunnel were apart)."""
        async with self._lock:
            for uid in [u for u in set(self.desired) | set(self.pods) if u not in uids]:
                log.info("pod not in the agent's snapshot; draining", uid=uid)
                await self._forget(uid)

    async def _forget(self, uid: str) -> None:
        """Drop a pod from every map, stopping it first. The caller holds the lock."""
        enrolment = self.desired.pop(uid, None)
        self.pending.pop(uid, None)
        if uid in self.pods:
            await self._stop_pod(uid)
        if enrolment is not None:
            enrolment.release()

    async def _wait_for_workload(self, enrolment: Enrolment) -> None:
        # One full wait per config version: a snapshot of many pods whose workloads are
        # missing must not wait once per pod (the ZDS stream is handled one at a time).
        if self.state is self._waited_in_vain:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.workload_wait
        while self.workload_for(enrolment) is None:
            remaining = deadline - loop.time()
            changed = self._state_changed
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                self._waited_in_vain = self.state
                return

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self.reconcile()

    async def reconcile(self) -> None:
        async with self._lock:
            for uid in [u for u in self.pods if u not in self.desired]:
                await self._stop_pod(uid)
            for uid in [u for u in self.pending if u not in self.desired]:
                del self.pending[uid]
            for uid, enrolment in list(self.desired.items()):
                running = self.pods.get(uid)
                if running is not None and running.enrolment == enrolment:
                    continue
                if running is not None:
                    await self._stop_pod(uid)
                await self._start_pod(enrolment)

    async def _start_pod(self, enrolment: Enrolment) -> str | None:
        """Start one pod; None once it runs, else why not (it is then marked pending)."""
        workload = self.workload_for(enrolment)
        if workload is None:
            self.pending[enrolment.uid] = NO_WORKLOAD
            return NO_WORKLOAD
        pod = PodProxy(
            enrolment,
            workload,
            lambda: self.state,
            self.certs,
            self.trust_domain,
            self.authorize,
            connection_table=self.connection_table,
            local=self.local_inbound,
            guard=self.guard,
            dns_upstreams=self.dns_upstreams,
            dns_metrics=self.dns_metrics,
            dns_limits=self.dns_limits,
            dns_listen=self.dns_listen,
            processes=self.processes,
            pods_served=lambda: len(self.pods),
        )
        try:
            await pod.start()
            if self.workers is not None:
                # Started only once every process serves it: the ack, readiness and the
                # release drain then mean what they mean with one process.
                await self.workers.add(enrolment, workload)
        except Exception as e:
            await pod.stop()
            if self.workers is not None:
                await self.workers.release(enrolment.uid, 0.0)  # those that did start it
            why = f"{type(e).__name__}: {e}"
            self.pending[enrolment.uid] = why
            log.error("pod start failed", uid=enrolment.uid, error=str(e))
            # Retry later: the cause (CA away, netns not yet there) is usually passing.
            asyncio.get_running_loop().call_later(1.0, self._dirty.set)
            return why
        self.pending.pop(enrolment.uid, None)
        self.pods[enrolment.uid] = pod
        self._by_workload = None
        log.info("pod enrolled", uid=enrolment.uid, identity=str(pod.identity))
        return None

    async def _stop_pod(self, uid: str) -> None:
        pod = self.pods.pop(uid)
        self._by_workload = None
        await pod.stop()
        if self.workers is not None:
            await self.workers.release(uid, 0.0)
        if not any(p.identity == pod.identity for p in self.pods.values()):
            self.certs.forget(pod.identity)
        log.info("pod removed", uid=uid)

    @property
    def ready(self) -> bool:
        return (
            self.state_loaded
            and self.enrolment_synced
            and not self.pending
            and set(self.pods) == set(self.desired)
            and (self.workers is None or self.workers.all_up)
        )

    def status(self) -> dict[str, Any]:
        pods: dict[str, str] = {uid: p.state.value for uid, p in self.pods.items()}
        pods.update({uid: f"pending: {why}" for uid, why in self.pending.items()})
        for uid in self.desired:
            pods.setdefault(uid, "pending: not reconciled yet")
        enrolment = self.enrolment_source
        if self.enrolment_detail:
            enrolment += f": {self.enrolment_detail}"
        out: dict[str, Any] = {
            "node": self.node_name,
            "ready": self.ready,
            "pods": pods,
            "enrolment": enrolment,
        }
        if self.config_status is not None:
            out["config"] = self.config_status().to_json()
        if self.workers is not None:
            out["workers"] = self.workers.status()
        return out

    # ---- AdminSource ---------------------------------------------------------------------

    def config_dump(self) -> dict[str, Any]:
        pods = []
        for uid, enrolment in sorted(self.desired.items()):
            running = self.pods.get(uid)
            w = self.workload_of(uid)
            pods.append(
                {
                    "uid": uid,
                    "workload": f"{w.namespace}/{w.name}" if w is not None else None,
                    "netns": enrolment.netns,
                    "status": running.state.value
                    if running is not None
                    else f"pending: {self.pending.get(uid, 'not reconciled yet')}",
                    "listeners": running.listeners() if running is not None else {},
                    # Its outbound HBONE pool: connections open, and those drained because
                    # a certificate they were made with was about to expire (rotation).
                    "hbonePool": (
                        {"connections": len(pool.connections()), "retired": pool.retired}
                        if running is not None and (pool := running.pool) is not None
                        else None
                    ),
                }
            )
        dump: dict[str, Any] = {
            "node": self.node_name,
            **views.mesh_json(self.state, self.policies),
            "certificates": views.certificates_json(
                self.certs.snapshot(), (pod.identity for pod in self.pods.values())
            ),
            "pods": pods,
            "openConnections": len(self.connection_table),
        }
        if self.workers is not None:
            # Per process, so an operator sees connections spread (or not) over them.
            # Per process, what it serves and carries: an operator sees each pod in every
            # process, and connections spread (or not) over them.
            own = {uid: p.state.value for uid, p in self.pods.items()}
            per: list[dict[str, Any]] = [
                {
                    "worker": 0,
                    "pid": os.getpid(),
                    "pods": own,
                    "openConnections": len(self.connection_table),
                }
            ]
            for index, report in self.workers.reports():
                per.append(
                    {
                        "worker": index,
                        "pid": report.get("pid"),
                        "pods": report.get("pods", {}),
                        "openConnections": len(report.get("connections", ())),
                    }
                )
            dump["workers"] = per
            dump["openConnections"] = sum(int(w["openConnections"]) for w in per)
        if self.config_status is not None:
            dump["config"] = self.config_status().to_json()
        return dump

    def activity(self) -> tuple[int, int]:
        """Connections opened and closed so far, at every layer: the relayed ones, and the
        TLS connections of the HBONE listeners and transports (an attack may make only
        these, and what they held is freed as they close). While it does not change, the
        node is quiet."""
        t, gate = self.connection_table, self.guard.gate
        return (
            t.opened_total + gate.accepted,
            t.closed_total + gate.finished + H2Transport.closed_total,
        )

    def connections(self) -> list[dict[str, Any]]:
        rows = self.connection_table.connections()
        if self.workers is None:
            return rows
        # Every process's table (as of the last `refresh`), each row saying whose it is.
        out = [{**row, "worker": 0} for row in rows]
        for index, report in self.workers.reports():
            out.extend({**row, "worker": index} for row in report.get("connections", ()))
        out.sort(key=lambda row: row.get("startedAt", 0.0))
        return out

    async def refresh(self) -> None:
        """Gather the workers' tables and counters (the admin and metrics servers await it
        before the views that show them)."""
        if self.workers is not None:
            await self.workers.refresh()

    def render_metrics(self) -> bytes:
        """The TCP metrics of the whole tunnel: each series summed over its processes."""
        metrics = self.connection_table.metrics
        if self.workers is None:
            return metrics.render()
        exports = [r.get("metrics", {}) for _, r in self.workers.reports()]
        try:
            return metrics.render(exports)
        except ValueError as e:
            log.error("a worker's counters were refused; serving the owner's only", error=str(e))
            return metrics.render()

    def explain(self, source: str, destination: str) -> dict[str, Any]:
        return explain(self.state, self.policies, source, destination, in_process=self._in_process)

    def _in_process(self, source: Workload, destination: Workload) -> bool:
        return source.node == self.node_name and self.local_inbound(destination) is not None

    def request_quit(self) -> None:
        log.info("quit requested through the admin port")
        self.quit_requested.set()

    async def drain(self, seconds: float) -> int:
        """Stop accepting on every pod, then wait up to `seconds` for open connections to
        end. Returns how many pods still had connections at the deadline."""
        for pod in self.pods.values():
            pod.stop_accepting()
        if self.workers is not None:
            own, theirs = await asyncio.gather(
                self._wait_idle(list(self.pods.values()), seconds), self.workers.drain(seconds)
            )
            left = own + theirs
        else:
            left = await self._wait_idle(list(self.pods.values()), seconds)
        log.info("drained", pods=len(self.pods), pods_with_open_connections=left)
        return left

    @staticmethod
    async def _wait_idle(pods: list[PodProxy], seconds: float) -> int:
        """Wait until no pod of `pods` has an open connection, at most `seconds`; how
        many still had one then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        # Polled: connections end in many places (three proxies, relays, handshakes), and
        # a 100 ms look bounded by the deadline is all a drain needs.
        while loop.time() < deadline and any(p.busy for p in pods):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        return sum(1 for p in pods if p.busy)

    async def close(self) -> None:
        await self.tasks.cancel_all()
        for uid in list(self.pods):
            await self._stop_pod(uid)
        for enrolment in self.desired.values():
            enrolment.release()
