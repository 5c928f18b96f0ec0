"""The record of each pod's app in a local cluster: running, or how it ended.

Written by the cluster's pod supervisor (`localcluster.supervisor`, the parent of every
app, so it alone learns an exit status) to `<state>/app-status.json`, read by the mesh
config generator (an app that is not running makes its workload Unhealthy, as Kubernetes
drops a not-ready pod from a Service's endpoints) and by `ambientctl get pods`.

Only the decisions and the document's shape live here (pure), plus one atomic write and a
tolerant read: a missing or unreadable file means "nothing known", i.e. every app healthy,
which is what a cluster started before the supervisor existed always said.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_NAME = "app-status.json"
RESTART_POLICIES = ("Never", "OnFailure", "Always")
DEFAULT_RESTART_POLICY = "Never"  # a local cluster has always left an exited app exited


@dataclass(frozen=True, slots=True)
class AppState:
    """One pod's app. `pid` is set while it runs; `exit_code` once it ended (a signal is
    128 + its number, as a container runtime reports it)."""

    running: bool
    pid: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    reason: str = ""  # Completed | Error | Killed | StartError, or "" while running
    message: str = ""
    restarts: int = 0
    created_at: float | None = None
    waiting_restart: bool = False  # exited, a restart is due (CrashLoopBackOff)

    def to_json(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "pid": self.pid,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "exitCode": self.exit_code,
            "reason": self.reason,
            "message": self.message,
            "restarts": self.restarts,
            "createdAt": self.created_at,
            "waitingRestart": self.waiting_restart,
        }

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> AppState:
        def num(key: str) -> float | None:
            v = d.get(key)
            return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

        def integer(key: str) -> int | None:
            v = d.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        return AppState(
            running=d.get("running") is True,
            pid=integer("pid"),
            started_at=num("startedAt"),
            finished_at=num("finishedAt"),
            exit_code=integer("exitCode"),
            reason=str(d.get("reason") or ""),
            message=str(d.get("message") or ""),
            restarts=integer("restarts") or 0,
            created_at=num("createdAt"),
            waiting_restart=d.get("waitingRestart") is True,
        )


def exit_code(returncode: int) -> int:
    """Popen's returncode (-N for signal N) as a container runtime reports it (128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def exit_reason(code: int) -> str:
    """kubectl's words for a terminated container: Completed, Error; a SIGKILL is shown by
    its code (137) under Error too, but said here so a user sees it was killed."""
    if code == 0:
        return "Completed"
    if code == 128 + signal.SIGKILL:
        return "Killed"
    return "Error"


def should_restart(policy: str, code: int) -> bool:
    """The kubelet's rule for a pod's `restartPolicy`."""
    return policy == "Always" or (policy == "OnFailure" and code != 0)


def key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def path(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def document(apps: Mapping[str, AppState], supervisor_pid: int) -> dict[str, Any]:
    return {
        "version": 1,
        "supervisorPid": supervisor_pid,
        "pods": {k: apps[k].to_json() for k in sorted(apps)},
    }


def parse(doc: Any) -> dict[str, AppState]:
    """ns/name -> AppState from the document; anything malformed is skipped."""
    pods = doc.get("pods") if isinstance(doc, dict) else None
    if not isinstance(pods, dict):
        return {}
    return {str(k): AppState.from_json(v) for k, v in pods.items() if isinstance(v, dict)}


def read(state_dir: Path) -> dict[str, AppState]:
    try:
        return parse(json.loads(path(state_dir).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def write(state_dir: Path, apps: Mapping[str, AppState], supervisor_pid: int) -> None:
    target = path(state_dir)
    tmp = target.with_name(f".{FILE_NAME}.tmp")
    tmp.write_text(json.dumps(document(apps, supervisor_pid), indent=1) + "\n", "utf-8")
    os.replace(tmp, target)  # atomic: a reader never sees half a file


def not_ready(apps: Mapping[str, AppState]) -> frozenset[tuple[str, str]]:
    """(namespace, name) of every pod whose app is known not to run now."""
    out = set()
    for k, a in apps.items():
        if not a.running:
            ns, _, name = k.partition("/")
            out.add((ns, name))
    return frozenset(out)
