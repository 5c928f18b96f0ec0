"""The owner's side: start the worker processes, keep them in step, gather their views.

The owner sends each worker the mesh state whenever it changes, every pod it starts
(`add`, with the pod's netns fd) and stops (`release`), the certificates they ask for and
every rotation of those, and `drain`. A pod counts as started only once every worker
serves it too, so the node agent's ack, readiness and the release drain mean the same with
workers as without. What the admin and metrics show of the workers is asked of them at the
moment (`refresh`, bounded by REPORT_TIMEOUT) and kept for the sync views.

A worker that dies (its channel closes, or its process exits) is logged with its exit
status, shown in readiness (the tunnel is not ready without it) and restarted after
RESTART_DELAY with the current state and pods; its connections were lost with it, as a
single-process tunnel's are in a crash. Workers die with the owner: each has
PR_SET_PDEATHSIG, and an owner gone is the end of its channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from meshcore.identity.certs import CertificateError, CertificateManager, WorkloadCertificate
from meshcore.identity.spiffe import IdentityError, SpiffeId
from meshcore.runtime.tasks import TaskSet
from meshcore.state import MeshState, Workload
from meshcore.xds import convert
from ztunnel.inpod import Enrolment
from ztunnel.workers import codec
from ztunnel.workers.certs import to_message
from ztunnel.workers.channel import Channel, socket_pair

log = structlog.get_logger(__name__)

HELLO_TIMEOUT = 30.0  # a worker's start: interpreter, imports, its event loop
ANSWER_TIMEOUT = 60.0  # a pod's start in a worker (its certificate may wait for the CA)
REPORT_TIMEOUT = 2.0  # the admin and a scrape wait no longer for a worker's part
RESTART_DELAY = 1.0
STOP_TIMEOUT = 5.0  # after its channel closed, a worker is killed if it still runs


class WorkerError(Exception):
    """A worker could not do what it was asked; the message names the worker and why."""


def state_message(state: MeshState) -> codec.State:
    """The mesh state as the workers get it: every resource as the xDS server sends it
    (meshcore.xds.convert, whose round trip is lossless)."""
    resources = convert.resources_of(state)
    return codec.State(
        tuple((type_url, name, body) for type_url, items in resources.items()
              for name, body in items.items())
    )  # fmt: skip


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.up = asyncio.Event()  # said hello, and is in step
        self.down: str | None = "starting"  # why not up; None when up
        self.answers: dict[int, asyncio.Future[codec.Done | codec.Report]] = {}
        self.wants: set[SpiffeId] = set()  # identities it asked for: it gets their rotations
        self.report: dict[str, Any] = {}
        self.restarts = 0


class WorkerPool:
    """Worker processes 1..count-1 of one tunnel (the owner is worker 0)."""

    def __init__(
        self,
        count: int,
        certs: CertificateManager,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`env`: the workers' environment (default: ours; they parse the same Config)."""
        self.count = count
        self._certs = certs
        self._env = dict(env) if env is not None else None
        self._workers = [_Worker(i) for i in range(1, count)]
        self.processes = count  # the owner and its workers
        self._state: codec.State | None = None
        self._log_level: codec.LogLevel | None = None  # set on the admin port, if ever
        self._pods: dict[str, tuple[Enrolment, Workload]] = {}
        self._seq = itertools.count(1)
        self._stopping = False
        self.tasks = TaskSet("workers")
        self._unsubscribe = certs.on_update(self._on_cert)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; WorkerError if one does not say hello in time."""
        await asyncio.gather(*(self._spawn(w) for w in self._workers))

    async def _spawn(self, w: _Worker) -> None:
        ours, theirs = socket_pair()
        try:
            w.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ztunnel.workers.child",
                "--fd", str(theirs.fileno()),
                "--index", str(w.index),
                "--processes", str(self.processes),
                "--owner", str(os.getpid()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=self._env,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        w.up.clear()
        w.down = "starting"
        channel = Channel(ours, f"worker {w.index}")
        channel.on_message = lambda msg, fd: self._on_message(w, msg, fd)
        channel.on_closed = lambda why: self._lost(w, channel, why)
        w.channel = channel
        channel.start()
        self.tasks.spawn(self._watch(w, w.process, channel), f"worker-{w.index}-exit")
        try:
            await asyncio.wait_for(w.up.wait(), HELLO_TIMEOUT)
        except TimeoutError:
            channel.close("no hello in time")
            raise WorkerError(f"worker {w.index} did not start in {HELLO_TIMEOUT:.0f} s") from None
        # In step: the current state, then every pod (in this order on the one channel).
        if self._log_level is not None:
            channel.send(self._log_level)
        if self._state is not None:
            channel.send(self._state)
        # Pods added or released while this one was not in step are caught up too.
        sent: set[str] = set()
        while todo := [e for uid, (e, _) in self._pods.items() if uid not in sent]:
            for enrolment in todo:
                sent.add(enrolment.uid)
                await self._add_one(w, enrolment)
        for uid in sent - set(self._pods):
            seq = next(self._seq)
            await self._ask(w, codec.Release(seq, uid, 0.0), seq)
        w.down = None
        log.info("worker started", worker=w.index, pid=w.process.pid)

    async def _watch(
        self, w: _Worker, process: asyncio.subprocess.Process, channel: Channel
    ) -> None:
        code = await process.wait()
        channel.close(f"its process exited with status {code}")

    def _lost(self, w: _Worker, channel: Channel, why: str) -> None:
        if w.channel is not channel:
            return
        w.up.clear()
        for fut in w.answers.values():
            if not fut.done():
                fut.set_exception(WorkerError(f"worker {w.index} went away: {why}"))
        w.answers.clear()
        w.wants.clear()
        if self._stopping:
            w.down = f"stopped: {why}"
            return
        w.down = f"down: {why}"
        pid = w.process.pid if w.process is not None else None
        log.error("worker lost; restarting it", worker=w.index, pid=pid, reason=why)
        self.tasks.spawn(self._restart(w), f"worker-{w.index}-restart")

    async def _restart(self, w: _Worker) -> None:
        if w.process is not None:
            if w.process.returncode is None:
                # Its channel is gone: whatever it still does, it does for nobody.
                with contextlib.suppress(ProcessLookupError):
                    w.process.kill()  # by the pid we started
            status = await w.process.wait()
            w.down = f"down: exited with status {status}; restarting"
            log.error("worker exited", worker=w.index, pid=w.process.pid, status=status)
        await asyncio.sleep(RESTART_DELAY)
        if self._stopping:
            return
        w.restarts += 1
        try:
            await self._spawn(w)
        except (WorkerError, OSError) as e:
            log.error("worker restart failed; retrying", worker=w.index, error=str(e))
            if w.channel is not None:
                w.channel.close(f"restart failed: {e}")

    async def close(self) -> None:
        """Stop every worker: its channel closes (it stops its pods and exits), then it is
        killed if it has not exited in STOP_TIMEOUT."""
        self._stopping = True
        self._unsubscribe()
        for w in self._workers:
            if w.channel is not None:
                w.channel.close("the tunnel is stopping")
        for w in self._workers:
            p = w.process
            if p is None or p.returncode is not None:
                continue
            try:
                await asyncio.wait_for(p.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.error("worker did not stop; killing it", worker=w.index, pid=p.pid)
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGKILL)
                await p.wait()
        await self.tasks.cancel_all()

    # -- what the node asks ----------------------------------------------------------------

    @property
    def all_up(self) -> bool:
        return all(w.down is None for w in self._workers)

    def status(self) -> dict[str, str]:
        out = {"0": f"ready (pid {os.getpid()}, the owner)"}
        for w in self._workers:
            pid = w.process.pid if w.process is not None else "-"
            out[str(w.index)] = f"ready (pid {pid})" if w.down is None else w.down
        return out

    def set_log_level(self, level: str) -> None:
        """The admin port's /logging, for every worker (and those restarted later)."""
        self._log_level = codec.LogLevel(level)
        for w in self._workers:
            if w.channel is not None and w.up.is_set():
                w.channel.send(self._log_level)

    def push_state(self, state: MeshState) -> None:
        self._state = state_message(state)
        for w in self._workers:
            if w.channel is not None and w.up.is_set():
                w.channel.send(self._state)

    async def add(self, enrolment: Enrolment, workload: Workload) -> None:
        """Every worker serves the pod; WorkerError naming the first that could not."""
        self._pods[enrolment.uid] = (enrolment, workload)
        results = await asyncio.gather(
            *(self._add_one(w, enrolment) for w in self._workers if w.down is None),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _add_one(self, w: _Worker, enrolment: Enrolment) -> None:
        info = enrolment.info
        msg = codec.Enrol(
            next(self._seq),
            enrolment.uid,
            info.name if info else "",
            info.namespace if info else "",
            info.service_account if info else "",
        )
        fd = enrolment.open_netns()
        try:
            done = await self._ask(w, msg, msg.seq, fd)
        finally:
            os.close(fd)
        if isinstance(done, codec.Done) and done.error:
            raise WorkerError(f"worker {w.index}: {done.error}")

    async def release(self, uid: str, drain: float) -> None:
        """Every worker stops serving the pod, after letting its connections run for up to
        `drain` seconds (0: at once). A worker that is down has nothing to release: its
        pods went with it, and its restart does not bring this one back."""
        self._pods.pop(uid, None)
        await self._ask_all(lambda seq: codec.Release(seq, uid, drain), drain + ANSWER_TIMEOUT)

    async def drain(self, seconds: float) -> int:
        """Every worker stops accepting and waits up to `seconds` for its connections; how
        many pods, summed over the workers, still had some at the deadline."""
        answers = await self._ask_all(
            lambda seq: codec.Drain(seq, seconds), seconds + ANSWER_TIMEOUT
        )
        return sum(a.value for a in answers if isinstance(a, codec.Done))

    async def _ask_all(
        self, make: Callable[[int], codec.Message], wait: float
    ) -> list[codec.Done | codec.Report]:
        """The answers of every running worker to the message `make(seq)` builds for it; a
        worker that fails or goes away meanwhile is logged and left out."""

        async def one(w: _Worker) -> codec.Done | codec.Report | None:
            seq = next(self._seq)
            try:
                return await self._ask(w, make(seq), seq, wait=wait)
            except WorkerError as e:
                log.warning("worker did not answer", worker=w.index, error=str(e))
                return None

        answers = await asyncio.gather(*(one(w) for w in self._workers if w.down is None))
        return [a for a in answers if a is not None]

    async def refresh(self) -> None:
        """Ask every worker for its connections and counters (kept in `reports`)."""

        async def one(w: _Worker) -> None:
            seq = next(self._seq)
            try:
                answer = await self._ask(w, codec.ReportRequest(seq), seq, wait=REPORT_TIMEOUT)
            except (WorkerError, TimeoutError) as e:
                log.warning("worker did not report", worker=w.index, error=str(e))
                w.report = {}
                return
            if isinstance(answer, codec.Report):
                w.report = answer.body

        await asyncio.gather(*(one(w) for w in self._workers if w.down is None))

    def reports(self) -> list[tuple[int, dict[str, Any]]]:
        """(worker index, its last report) of every worker that answered the last refresh."""
        return [(w.index, w.report) for w in self._workers if w.down is None and w.report]

    # -- the channel -----------------------------------------------------------------------

    async def _ask(
        self,
        w: _Worker,
        msg: codec.Message,
        seq: int,
        fd: int | None = None,
        wait: float = ANSWER_TIMEOUT,
    ) -> codec.Done | codec.Report:
        channel = w.channel
        if channel is None or channel.closed is not None:
            raise WorkerError(f"worker {w.index} is not running")
        fut: asyncio.Future[codec.Done | codec.Report] = asyncio.get_running_loop().create_future()
        w.answers[seq] = fut
        channel.send(msg, fd)
        try:
            return await asyncio.wait_for(fut, wait)
        except TimeoutError:
            raise WorkerError(f"worker {w.index} did not answer in {wait:.0f} s") from None
        finally:
            w.answers.pop(seq, None)

    def _on_message(self, w: _Worker, msg: codec.Message, fd: int | None) -> None:
        if fd is not None:
            os.close(fd)  # the codec lets no worker message carry one; never kept
        if isinstance(msg, codec.Hello):
            if msg.index != w.index:
                assert w.channel is not None
                w.channel.close(f"said it is worker {msg.index}")
                return
            w.up.set()
        elif isinstance(msg, (codec.Done, codec.Report)):
            fut = w.answers.get(msg.seq)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, codec.CertRequest):
            self.tasks.spawn(self._answer_cert(w, msg.identity), f"worker-{w.index}-cert")
        else:
            assert w.channel is not None
            w.channel.close(f"sent {msg.KIND.name}, which only the owner sends")

    async def _answer_cert(self, w: _Worker, raw: str) -> None:
        channel = w.channel
        assert channel is not None
        try:
            identity = SpiffeId.parse(raw)
        except IdentityError as e:
            channel.close(f"asked for a certificate of {raw!r}: {e}")
            return
        try:
            cert = await self._certs.get(identity)
        except CertificateError as e:
            channel.send(codec.CertFailed(raw, str(e)))
            return
        w.wants.add(identity)
        channel.send(to_message(cert))

    def _on_cert(self, cert: WorkloadCertificate) -> None:
        msg: codec.Cert | None = None
        for w in self._workers:
            if cert.identity in w.wants and w.channel is not None:
                msg = msg or to_message(cert)
                w.channel.send(msg)
