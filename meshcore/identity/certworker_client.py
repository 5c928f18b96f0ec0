"""The tunnel's end of the certificate worker (`python -m meshcore.identity.certworker`).

Why a child process: keys, CSRs and chain checks need `cryptography`, which would add
about 10 MB to the tunnel's resident memory for work done once per identity and
half-life. The worker holds it only while there is work.

Invariants:
- At most one worker accepts requests at a time. Every request made while it runs goes to
  it, so a node starting with many pods pays one process start, not one per identity.
- The worker's stdin is closed once it has had nothing to do for `idle_exit` seconds; it
  then exits and is reaped. The next request starts a new one.
- Every request ends: with the answer, or with `CertWorkerError` when the worker sends
  something malformed, exits, or gives no answer within `timeout` (it is then killed by
  its PID). Any of these fails every request still owed by that worker, with a message
  that carries the worker's exit status and the tail of its stderr.
- The private key travels once, child to parent, over the pipe; nothing is written to disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from meshcore.runtime.tasks import TaskSet

WORKER_TIMEOUT = 15.0  # generous: a cold node may need seconds to start Python
WORKER_IDLE_EXIT = 2.0  # outlives a CA round trip between the CSR and the chain check
EXIT_GRACE = 2.0  # after stdin is closed (or stdout ended), before the worker is killed
STDERR_DRAIN = 1.0  # how long to wait for the rest of stderr once the worker is gone
MAX_LINE = 1 << 20  # an answer is a few KB; a longer line means the stream is broken
STDERR_TAIL = 2000
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds ztunnel/


class CertWorkerError(Exception):
    """A request to the certificate worker failed; the message says why."""


@dataclass(frozen=True, slots=True)
class NewKey:
    key_pem: bytes
    public_key_pem: bytes
    csr_pem: bytes


@dataclass(frozen=True, slots=True)
class LeafFacts:
    serial: int
    not_before: datetime
    not_after: datetime


def default_command() -> list[str]:
    return [sys.executable, "-m", "meshcore.identity.certworker"]


class CertWorkerClient:
    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        timeout: float = WORKER_TIMEOUT,
        idle_exit: float = WORKER_IDLE_EXIT,
    ) -> None:
        self._command = list(command) if command is not None else default_command()
        self._timeout = timeout
        self._idle_exit = idle_exit
        self._current: _Worker | None = None
        self._workers: set[_Worker] = set()  # running or exiting, until reaped
        self._spawn_lock = asyncio.Lock()
        self._tasks = TaskSet("certworker")
        self._next_id = 0
        self._closed = False
        self.started = 0  # worker processes started so far

    async def new_key_and_csr(self, identity: str) -> NewKey:
        a = await self._call({"op": "key_and_csr", "identity": identity}, _check_new_key)
        return NewKey(a["key"].encode(), a["public_key"].encode(), a["csr"].encode())

    async def check_chain(
        self, identity: str, public_key_pem: bytes, chain_pem: list[bytes]
    ) -> LeafFacts:
        request = {
            "op": "check_chain",
            "identity": identity,
            "public_key": public_key_pem.decode(),
            # Undecodable bytes are kept visible; the worker then reports an unreadable PEM.
            "chain": [pem.decode("utf-8", errors="replace") for pem in chain_pem],
        }
        a = await self._call(request, _check_leaf_facts)
        return LeafFacts(
            a["serial"],
            datetime.fromisoformat(a["not_before"]),
            datetime.fromisoformat(a["not_after"]),
        )

    async def sign_grpc(
        self,
        address: str,
        root_cert: str,
        token_path: str,
        csr_pem: bytes,
        ttl_seconds: int,
        *,
        impersonate: bool,
        call_timeout: float,
    ) -> list[bytes]:
        """The chain an Istio-compatible CA issues for `csr_pem`, asked by the worker over
        gRPC (so the tunnel never loads grpcio); the CA's refusal is a `CertWorkerError`."""
        request = {
            "op": "sign_grpc",
            "address": address,
            "root_cert": root_cert,
            "token_path": token_path,
            "csr": csr_pem.decode(),
            "ttl_seconds": ttl_seconds,
            "impersonate": impersonate,
            # The gRPC deadline, inside the worker; shorter than the worker's own timeout.
            "timeout": call_timeout,
        }
        a = await self._call(request, _check_chain)
        chain = a["chain"]
        if not all(isinstance(c, str) for c in chain):
            raise CertWorkerError("certificate worker sent a chain that is not a list of PEMs")
        return [c.encode() for c in chain]

    @property
    def running(self) -> int:
        """Worker processes not yet reaped."""
        return len(self._workers)

    async def close(self) -> None:
        async with self._spawn_lock:  # a worker being started is then in _workers
            self._closed = True
        self._current = None
        for worker in list(self._workers):
            if worker.pending:
                worker.abort("was stopped: the certificate manager is closing")
            else:
                worker.retire()
        await asyncio.gather(*(w.reaped for w in list(self._workers)), return_exceptions=True)

    async def _call(self, request: dict[str, Any], check: _AnswerCheck) -> dict[str, Any]:
        worker = await self._worker()
        self._next_id += 1
        fut = worker.submit(self._next_id, request, check)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            # A stuck worker stops reading, so even the write must be bounded.
            try:
                await asyncio.wait_for(worker.drain(), self._timeout)
                drained = True
            except TimeoutError:
                drained = False
            # asyncio.wait, not wait_for: the future must stay pending so the worker's own
            # task can fail it with the full story (exit status, stderr) after the kill.
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, deadline - loop.time()))
            if not (drained and done):
                worker.abort(f"gave no answer within {self._timeout:g} s and was killed")
                # The worker's task fails `fut` once the process is reaped; that is
                # bounded, and so is this wait, in case it were not.
                done, _ = await asyncio.wait({fut}, timeout=EXIT_GRACE + STDERR_DRAIN + 1)
                if not done:
                    raise CertWorkerError(
                        f"certificate worker (pid {worker.proc.pid}) gave no answer within "
                        f"{self._timeout:g} s and could not be reaped"
                    )
            return await fut
        except asyncio.CancelledError:
            fut.cancel()  # its answer, if it comes, is dropped
            raise

    async def _worker(self) -> _Worker:
        async with self._spawn_lock:
            if self._closed:
                raise CertWorkerError("certificate worker client is closed")
            if self._current is None or not self._current.accepting:
                self._current = await self._spawn()
            return self._current

    async def _spawn(self) -> _Worker:
        env = dict(os.environ)
        # The worker must run this same ztunnel, whatever the working directory or install.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                limit=MAX_LINE,
            )
        except OSError as e:
            raise CertWorkerError(
                f"cannot start the certificate worker {' '.join(self._command)}: {e}"
            ) from e
        self.started += 1
        worker = _Worker(proc, self._idle_exit, self._tasks, self._gone)
        self._workers.add(worker)
        return worker

    def _gone(self, worker: _Worker) -> None:
        self._workers.discard(worker)
        if self._current is worker:
            self._current = None


class _AnswerCheck:
    """Checks the fields of one kind of answer; a bad answer means a broken worker."""

    def __init__(self, fields: dict[str, type]) -> None:
        self.fields = fields

    def __call__(self, answer: dict[str, Any]) -> str:
        for name, kind in self.fields.items():
            if type(answer.get(name)) is not kind:
                return f"{name} is not a {kind.__name__}"
        return ""


_check_new_key = _AnswerCheck({"key": str, "public_key": str, "csr": str})
_check_leaf_facts = _AnswerCheck({"serial": int, "not_before": str, "not_after": str})
_check_chain = _AnswerCheck({"chain": list})


@dataclass(slots=True)
class _Call:
    future: asyncio.Future[dict[str, Any]]
    check: _AnswerCheck


class _Worker:
    """One worker process: its requests in flight and the task that reads its answers."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        idle_exit: float,
        tasks: TaskSet,
        on_reaped: Callable[[_Worker], None],
    ) -> None:
        self.proc = proc
        self._on_reaped = on_reaped
        self.pending: dict[int, _Call] = {}
        self.accepting = True
        self._idle_exit = idle_exit
        self._idle_timer: asyncio.TimerHandle | None = None
        self._problem = ""  # why the worker is being killed, once it is
        self._stderr = bytearray()
        self._stderr_task = tasks.spawn(self._read_stderr(), f"stderr {proc.pid}")
        self._reader = tasks.spawn(self._read_answers(), f"answers {proc.pid}")
        self.reaped: asyncio.Task[None] = tasks.spawn(self._run(), f"worker {proc.pid}")

    def submit(
        self, rid: int, request: dict[str, Any], check: _AnswerCheck
    ) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = _Call(fut, check)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        stdin = self.proc.stdin
        assert stdin is not None  # created with stdin=PIPE
        stdin.write(json.dumps({"id": rid, **request}).encode() + b"\n")
        return fut

    async def drain(self) -> None:
        """Wait until the worker has taken our requests (the pipe has room again)."""
        stdin = self.proc.stdin
        assert stdin is not None
        # ConnectionError/OSError: the worker is gone; its reader sees the end of stdout and
        # fails the requests with the exit status and stderr, which say more than EPIPE.
        with contextlib.suppress(ConnectionError, OSError):
            await stdin.drain()

    def retire(self) -> None:
        """Close stdin: the worker answers what it has, then exits."""
        self.accepting = False
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()

    def abort(self, problem: str) -> None:
        """Kill the worker; every request it owes fails with `problem` in the message."""
        self.accepting = False
        if not self._problem:
            self._problem = problem
        if self.proc.returncode is None:
            self.proc.kill()  # by its PID (SIGKILL)
        self._reader.cancel()

    async def _read_answers(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None  # created with stdout=PIPE
        while True:
            try:
                line = await stdout.readline()
            except ValueError:  # LimitOverrunError: no newline within MAX_LINE bytes
                self.abort(f"sent an answer longer than {MAX_LINE} bytes")
                return
            if not line:
                self.accepting = False
                return
            problem = self._deliver(line)
            if problem:
                self.abort(f"sent a malformed answer ({problem}): {line[:200]!r}")
                return
            if not self.pending and self.accepting:
                self._idle_timer = asyncio.get_running_loop().call_later(
                    self._idle_exit, self._retire_if_idle
                )

    def _deliver(self, line: bytes) -> str:
        """Resolve the request this answer is for; what is wrong with it, if anything."""
        try:
            answer = json.loads(line)
        except ValueError:
            return "not JSON"
        if not isinstance(answer, dict):
            return "not a JSON object"
        rid = answer.get("id")
        if type(rid) is not int or rid not in self.pending:
            return "no request has this id"
        call = self.pending[rid]
        # A request stays pending until its answer is known good: on a problem, the
        # worker's task fails it with the others.
        error = answer.get("error")
        problem = call.check(answer) if error is None else ""
        if error is not None and not isinstance(error, str):
            problem = "error is not a string"
        if problem:
            return problem
        del self.pending[rid]
        if isinstance(error, str):
            _settle(call.future, CertWorkerError(error))
        elif not call.future.done():  # done: its caller gave up and cancelled it
            call.future.set_result(answer)
        return ""

    def _retire_if_idle(self) -> None:
        self._idle_timer = None
        if not self.pending:
            self.retire()

    async def _read_stderr(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None  # created with stderr=PIPE
        while chunk := await stderr.read(4096):
            self._stderr += chunk
            del self._stderr[:-STDERR_TAIL]  # keep the tail: that is where the reason is

    async def _run(self) -> None:
        await asyncio.wait({self._reader})  # the answers end: EOF, malformed, or abort
        self.accepting = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        try:
            await asyncio.wait_for(self.proc.wait(), EXIT_GRACE)
        except TimeoutError:
            if not self._problem and self.pending:
                self._problem = f"closed its output but did not exit within {EXIT_GRACE:g} s"
            self.proc.kill()
            await self.proc.wait()
        await asyncio.wait({self._stderr_task}, timeout=STDERR_DRAIN)
        self._stderr_task.cancel()
        self._on_reaped(self)  # before the errors: a caller that sees one finds it gone
        if self.pending:
            error = CertWorkerError(self._story())
            for call in self.pending.values():
                _settle(call.future, error)
            self.pending.clear()

    def _story(self) -> str:
        status = self.proc.returncode
        if self._problem:
            what = self._problem
        elif status is not None and status < 0:
            what = f"was killed by signal {-status} before answering"
        else:
            what = f"exited with status {status} before answering"
        text = f"certificate worker (pid {self.proc.pid}) {what}"
        tail = self._stderr.decode("utf-8", errors="replace").strip()
        return f"{text}; stderr: {tail}" if tail else f"{text}; it wrote nothing to stderr"


def _settle(fut: asyncio.Future[dict[str, Any]], error: CertWorkerError) -> None:
    if fut.done():
        return
    fut.set_exception(error)
    # Retrieved now: a caller that gave up is not waiting, and asyncio would otherwise log
    # "exception was never retrieved" for an error that was already reported another way.
    fut.exception()


__all__ = ["CertWorkerClient", "CertWorkerError", "LeafFacts", "NewKey", "default_command"]
