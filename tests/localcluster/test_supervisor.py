"""The pod supervisor's decisions and its step, with real child processes (no netns)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from localcluster import appstatus
from localcluster.appstatus import AppState
from localcluster.processes import ManagedProcess, ProcessRecord
from localcluster.spec import PodSpec
from localcluster.supervisor import Slot, Supervisor, exited

from .test_spec import travel


def test_exit_codes_as_a_runtime_reports_them():
    assert appstatus.exit_code(0) == 0
    assert appstatus.exit_code(3) == 3
    assert appstatus.exit_code(-9) == 137
    assert appstatus.exit_reason(137) == "Killed"
    assert appstatus.exit_reason(1) == "Error"
    assert appstatus.exit_reason(0) == "Completed"


def test_exited_follows_the_restart_policy():
    running = AppState(running=True, pid=10, started_at=1.0, restarts=2, created_at=0.5)
    after, at = exited(running, -9, 100.0, "Never")
    assert (after.running, after.exit_code, after.reason, at) == (False, 137, "Killed", 0.0)
    assert after.created_at == 0.5 and after.restarts == 2
    after, at = exited(running, 0, 100.0, "OnFailure")
    assert at == 0.0 and not after.waiting_restart
    after, at = exited(running, 1, 100.0, "OnFailure")
    assert after.waiting_restart and at == 104.0  # the kubelet's back-off: 1, 2, 4 s ...


def test_record_round_trip(tmp_path: Path):
    apps = {
        "a/x": AppState(running=True, pid=5, started_at=1.5, created_at=1.0),
        "a/y": AppState(running=False, exit_code=137, reason="Killed", restarts=1),
    }
    appstatus.write(tmp_path, apps, 42)
    assert appstatus.read(tmp_path) == apps
    assert appstatus.not_ready(apps) == {("a", "y")}
    assert appstatus.read(tmp_path / "nowhere") == {}


def _spawn(argv: list[str], tmp: Path, name: str) -> ManagedProcess:
    popen = subprocess.Popen(argv)
    rec = ProcessRecord(name, popen.pid, 0, tuple(argv), "", "")
    pidfile = tmp / f"{name}.pid"
    pidfile.write_text("{}")
    return ManagedProcess(rec, popen, pidfile)


def test_step_notices_an_exit_and_restarts_by_policy(tmp_path: Path):
    spec = travel()
    pods = [
        spec.pod("travel", "frontend-0"),
        dataclasses.replace(spec.pod("travel", "backend-0"), restart_policy="Always"),
    ]
    published: list[tuple[dict[str, AppState], bool]] = []
    started: list[str] = []

    def start(pod: PodSpec) -> ManagedProcess:
        started.append(pod.name)
        # The first start of each exits at once; a restart sleeps.
        code = (
            "import time; time.sleep(30)" if started.count(pod.name) > 1 else "raise SystemExit(3)"
        )
        return _spawn([sys.executable, "-c", code], tmp_path, pod.name)

    sup = Supervisor(
        [Slot(p, AppState(running=False)) for p in pods],
        start,
        lambda records, health: published.append((dict(records), health)),
    )
    sup.start_all(0.0)
    assert all(a.running for a in published[-1][0].values())
    for slot in sup.slots:
        assert slot.proc is not None
        slot.proc.popen.wait()
    sup.step(10.0)
    records, health = published[-1]
    assert health
    front, back = records["travel/frontend-0"], records["travel/backend-0"]
    assert (front.running, front.exit_code, front.reason, front.waiting_restart) == (
        False, 3, "Error", False,
    )  # fmt: skip
    assert back.waiting_restart and not back.running
    assert not (tmp_path / "frontend-0.pid").exists()  # an ended app keeps no record
    sup.step(10.5)  # the back-off (1 s) is not over
    assert started == ["frontend-0", "backend-0"]
    sup.step(11.0)
    records, health = published[-1]
    assert started == ["frontend-0", "backend-0", "backend-0"]
    assert records["travel/backend-0"].running and records["travel/backend-0"].restarts == 1
    assert records["travel/backend-0"].created_at == 0.0
    assert not records["travel/frontend-0"].running
    n = len(published)
    sup.step(12.0)
    assert len(published) == n  # nothing changed: nothing published
    proc = sup.slots[1].proc
    assert proc is not None
    proc.popen.kill()
    proc.popen.wait()
