"""A pod's status as the local kubelet reports it, and what a container's exit leads to (pure).

Phases follow the kubelet: Pending until the container first starts; Running while it runs or
waits to be restarted (`restartPolicy` Always, or OnFailure after a failure); Succeeded or
Failed once it exited for good. Restarts back off exponentially (`restart_delay`), and the
waiting container says `CrashLoopBackOff` meanwhile, as `kubectl get pods` shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from localcluster.kube.podplan import PodPlan

# The real kubelet starts at 10 s and caps at 5 min; a local cluster restarts sooner so a
# crashing demo app shows up quickly, with the same doubling.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0


@dataclass(frozen=True, slots=True)
class ContainerState:
    kind: str  # "waiting" | "running" | "terminated"
    reason: str = ""
    message: str = ""
    started_at: str = ""
    finished_at: str = ""
    exit_code: int = 0

    def to_api(self) -> dict[str, Any]:
        if self.kind == "running":
            return {"running": {"startedAt": self.started_at}}
        if self.kind == "terminated":
            out: dict[str, Any] = {
                "exitCode": self.exit_code,
                "reason": self.reason or ("Completed" if self.exit_code == 0 else "Error"),
                "startedAt": self.started_at or None,
                "finishedAt": self.finished_at or None,
            }
            if self.message:
                out["message"] = self.message
            return {"terminated": out}
        waiting: dict[str, Any] = {"reason": self.reason or "ContainerCreating"}
        if self.message:
            waiting["message"] = self.message
        return {"waiting": waiting}


@dataclass(frozen=True, slots=True)
class Exit:
    """What happens after the container exited with `code`."""

    restart: bool
    phase: str  # the pod's phase meanwhile (Running while a restart is due)


def after_exit(restart_policy: str, code: int) -> Exit:
    if restart_policy == "Always" or (restart_policy == "OnFailure" and code != 0):
        return Exit(True, "Running")
    return Exit(False, "Succeeded" if code == 0 else "Failed")


def restart_delay(restarts: int) -> float:
    """Seconds before restart number `restarts + 1`: 1, 2, 4, ... capped at 60."""
    return float(min(BACKOFF_FIRST_S * (2 ** min(restarts, 16)), BACKOFF_MAX_S))


@dataclass(frozen=True, slots=True)
class PodView:
    """Everything the status is made of, taken from the kubelet's record of the pod."""

    plan: PodPlan
    phase: str
    pod_ip: str
    host_ip: str
    start_time: str
    state: ContainerState
    last_state: ContainerState | None
    ready: bool
    restarts: int
    message: str = ""
    image_id: str = ""  # `<repository>@<digest>` for a container run from an image


def pod_status(v: PodView) -> dict[str, Any]:
    """The `status` a merge patch writes (lists are replaced whole by a merge patch)."""
    ready = "True" if v.ready and v.state.kind == "running" else "False"
    started = v.state.kind != "waiting" or v.restarts > 0

    def cond(kind: str, status: str) -> dict[str, Any]:
        return {"type": kind, "status": status, "lastProbeTime": None}

    status: dict[str, Any] = {
        "phase": v.phase,
        "hostIP": v.host_ip or None,
        "podIP": v.pod_ip or None,
        "podIPs": [{"ip": v.pod_ip}] if v.pod_ip else None,
        "startTime": v.start_time or None,
        "conditions": [
            cond("Initialized", "True"),
            cond("Ready", ready),
            cond("ContainersReady", ready),
            cond("PodScheduled", "True"),
        ],
        "containerStatuses": [
            {
                "name": v.plan.container,
                "image": v.plan.image,
                "imageID": v.image_id,
                "ready": ready == "True",
                "started": started and v.state.kind == "running",
                "restartCount": v.restarts,
                "state": v.state.to_api(),
                "lastState": v.last_state.to_api() if v.last_state is not None else {},
            }
        ],
        "message": v.message or None,
        "reason": None,
    }
    if v.plan.problem:
        status["reason"] = "CreateContainerError"
    return {"status": status}
