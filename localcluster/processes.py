"""Processes started inside network namespaces, recorded so that any later process can stop them.

Invariants:
- every spawned process leads its own session (pid == pgid == sid), so a signal to its
  group reaches helpers it forks, and nothing of ours shares the caller's terminal;
- its pidfile `<name>.pid` holds the pid AND the kernel start time (/proc/<pid>/stat field
  22); a pid is signalled only while that pair still matches, so a pid reused by an
  unrelated process is never touched, even after a crash and a long pause;
- stopping is graceful-then-forced: SIGTERM, wait, SIGKILL, wait. Never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nsutil

PIDFILE_SUFFIX = ".pid"
DEFAULT_STOP_TIMEOUT = 3.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ProcessError(RuntimeError):
    """A process could not be started or its record is unusable."""


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    name: str
    pid: int
    start_time: int  # clock ticks since boot; with pid, identifies the process uniquely
    argv: tuple[str, ...]
    netns_path: str
    log_path: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "pid": self.pid,
                "startTime": self.start_time,
                "argv": list(self.argv),
                "netns": self.netns_path,
                "log": self.log_path,
            }
        )

    @staticmethod
    def from_json(text: str) -> ProcessRecord:
        d = json.loads(text)
        return ProcessRecord(
            name=str(d["name"]),
            pid=int(d["pid"]),
            start_time=int(d["startTime"]),
            argv=tuple(str(a) for a in d["argv"]),
            netns_path=str(d["netns"]),
            log_path=str(d["log"]),
        )


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, start_time) of a live pid, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and ')': split after the LAST ')'.
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field n is rest[n - 3]: pgrp is field 5, starttime 22.
    return rest[0], int(rest[5 - 3]), int(rest[22 - 3])


def is_running(pid: int, start_time: int) -> bool:
    """True while `pid` is the very process recorded with `start_time` and not a zombie."""
    st = proc_stat(pid)
    return st is not None and st[2] == start_time and st[0] != "Z"


@dataclass(slots=True)
class ManagedProcess:
    """A process we spawned; `popen` lets the spawner reap it, `record` lets anyone stop it."""

    record: ProcessRecord
    popen: subprocess.Popen[bytes]
    pidfile: Path

    @property
    def pid(self) -> int:
        return self.record.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        terminate([self.record], timeout)
        # terminate() already escalated; a zombie left now is reaped on the next poll.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=1.0)
        self.pidfile.unlink(missing_ok=True)


def spawn_in_netns(
    netns_path: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: Path | str,
    log_path: Path | str,
    pidfile_dir: Path | str,
    name: str,
    after_enter: Callable[[], None] | None = None,
) -> ManagedProcess:
    """Start `argv` inside the namespace at `netns_path`, output appended to `log_path`.
    `after_enter` runs in the child once it is in the namespace, before the exec (a pod's
    own mount namespace and files, `localcluster.apps`)."""
    if not _NAME.match(name):
        raise ProcessError(f"process name {name!r} must match {_NAME.pattern} (used as filename)")
    if not argv:
        raise ProcessError(f"process {name}: empty command")
    if not os.path.exists(netns_path):
        raise ProcessError(f"process {name}: network namespace {netns_path} does not exist")
    pid_dir = Path(pidfile_dir)
    pid_dir.mkdir(parents=True, exist_ok=True)
    log = Path(log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        try:
            popen = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=str(cwd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_preexec(netns_path, after_enter),
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise ProcessError(
                f"process {name}: cannot start {argv[0]!r} in {netns_path}: {e}; check the "
                "command, its working directory and the log at " + str(log)
            ) from e
    # The child is unreaped until we wait, so its pid cannot have been reused yet.
    st = proc_stat(popen.pid)
    record = ProcessRecord(
        name=name,
        pid=popen.pid,
        start_time=st[2] if st is not None else 0,
        argv=tuple(argv),
        netns_path=netns_path,
        log_path=str(log),
    )
    pidfile = pid_dir / f"{name}{PIDFILE_SUFFIX}"
    _write_atomic(pidfile, record.to_json())
    return ManagedProcess(record, popen, pidfile)


def _preexec(netns_path: str, after: Callable[[], None] | None) -> Callable[[], None]:
    enter = nsutil.preexec_enter(netns_path)
    if after is None:
        return enter

    def run() -> None:
        enter()
        after()

    return run


def read_records(pidfile_dir: Path | str) -> list[ProcessRecord]:
    """All readable records; a corrupt pidfile (crash mid-write) is skipped, not fatal."""
    d = Path(pidfile_dir)
    if not d.is_dir():
        return []
    out: list[ProcessRecord] = []
    for p in sorted(d.glob(f"*{PIDFILE_SUFFIX}")):
        try:
            out.append(ProcessRecord.from_json(p.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def stop_recorded(pidfile_dir: Path | str, timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
    """Stop every recorded process still alive; remove the pidfiles. Returns how many were
    running. Safe to call from any process, any number of times."""
    records = read_records(pidfile_dir)
    running = terminate(records, timeout)
    d = Path(pidfile_dir)
    if d.is_dir():
        for p in d.glob(f"*{PIDFILE_SUFFIX}"):
            p.unlink(missing_ok=True)
    return running


def terminate(records: Iterable[ProcessRecord], timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
    """Graceful-then-forced stop of the given processes (those still matching their record).
    Returns how many were running when called."""
    targets = [r for r in records if is_running(r.pid, r.start_time)]
    for r in targets:
        _signal(r, signal.SIGTERM)
    left = _wait_gone(targets, timeout)
    for r in left:
        _signal(r, signal.SIGKILL)
    left = _wait_gone(left, 2.0)
    if left:
        pids = ", ".join(str(r.pid) for r in left)
        raise ProcessError(
            f"processes {pids} survived SIGKILL; check for D-state (uninterruptible) I/O"
        )
    return len(targets)


def _signal(r: ProcessRecord, sig: signal.Signals) -> None:
    # Re-check identity right before signalling: the window for pid reuse is this one line.
    st = proc_stat(r.pid)
    if st is None or st[2] != r.start_time or st[0] == "Z":
        return
    try:
        if st[1] == r.pid:
            os.killpg(r.pid, sig)  # still its own group leader: reach its helpers too
        else:
            os.kill(r.pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(records: list[ProcessRecord], timeout: float) -> list[ProcessRecord]:
    deadline = time.monotonic() + timeout
    # A zombie counts as gone: its owner (a Popen, if any) reaps it and keeps the status.
    left = list(records)
    while left:
        left = [r for r in left if is_running(r.pid, r.start_time)]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return left


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
