"""The pod supervisor of a local cluster: it runs the pods' apps and notices when one ends.

`python -m localcluster.supervisor --cluster-file F [--state-root R]`, one per cluster,
started by `mesh.up` in the cluster netns and recorded like every other process. It plays
the part of a kubelet's container runtime for the local cluster:
- it starts every pod's app (`localcluster.apps.start_app`: the pod's netns, env and
  resolver) and so is their parent: it alone can learn an exit status. The apps used to be
  children of the short-lived `ambientctl up`, so an app's death went unnoticed (its
  workload stayed Healthy and its Services kept it as an endpoint);
- it polls its children every POLL_S (as the local kubelet polls its containers: no
  SIGCHLD handler, whose races with Popen's own reaping are not worth a quarter second);
- when an app exits it records how (`localcluster.appstatus`, `<state>/app-status.json`),
  regenerates the mesh config under the records lock (the workload becomes Unhealthy, so
  every tunnel and waypoint stops choosing it) and the nodes' service DNAT (as kube-proxy
  drops a not-ready endpoint);
- it restarts an app by the pod's `restartPolicy` (Never by default; OnFailure, Always),
  with the local kubelet's back-off, and the pod becomes Healthy again once it runs.

On SIGTERM it stops without touching the apps, as a stopped kubelet leaves its pods
running; `ambientctl down` stops everything the cluster records.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from localcluster import appstatus, meshconfig
from localcluster.apps import start_app
from localcluster.appstatus import AppState
from localcluster.kube.podstatus import restart_delay
from localcluster.processes import ManagedProcess, ProcessError
from localcluster.spec import PodSpec
from meshcore.runtime.stopsignals import on_stop_signal

POLL_S = 0.25
log = logging.getLogger("supervisor")


@dataclass(slots=True)
class Slot:
    """One pod's app as the supervisor holds it."""

    pod: PodSpec
    state: AppState
    proc: ManagedProcess | None = None
    restart_at: float = 0.0


def exited(state: AppState, returncode: int, now: float, policy: str) -> tuple[AppState, float]:
    """The record after the app ended with `returncode` (Popen's), and when to start it
    again (0: never). Pure."""
    code = appstatus.exit_code(returncode)
    again = appstatus.should_restart(policy, code)
    after = replace(
        state,
        running=False,
        pid=None,
        finished_at=now,
        exit_code=code,
        reason=appstatus.exit_reason(code),
        message="",
        waiting_restart=again,
    )
    return after, (now + restart_delay(state.restarts) if again else 0.0)


class Supervisor:
    def __init__(
        self,
        slots: list[Slot],
        start: Callable[[PodSpec], ManagedProcess],
        publish: Callable[[dict[str, AppState], bool], None],
    ) -> None:
        self.slots = slots
        self._start = start
        self._publish = publish  # (the records, whether health changed)

    def _run(self, slot: Slot, now: float, restart: bool) -> None:
        try:
            proc = self._start(slot.pod)
        except ProcessError as e:
            slot.proc = None
            slot.state = replace(
                slot.state, running=False, reason="StartError", message=str(e), pid=None
            )
            return
        slot.proc = proc
        slot.state = AppState(
            running=True,
            pid=proc.pid,
            started_at=now,
            restarts=slot.state.restarts + (1 if restart else 0),
            created_at=now if slot.state.created_at is None else slot.state.created_at,
        )

    def start_all(self, now: float) -> None:
        for slot in self.slots:
            self._run(slot, now, restart=False)
        self._publish(self.records(), True)

    def step(self, now: float) -> None:
        """Notice exits, start the restarts that are due, publish what changed."""
        health_changed = changed = False
        for slot in self.slots:
            if slot.proc is not None:
                code = slot.proc.popen.poll()
                if code is None:
                    continue
                slot.proc.pidfile.unlink(missing_ok=True)
                slot.proc = None
                slot.state, slot.restart_at = exited(slot.state, code, now, slot.pod.restart_policy)
                log.info(
                    "app of pod %s/%s exited with code %s%s",
                    slot.pod.namespace,
                    slot.pod.name,
                    slot.state.exit_code,
                    "; restart due" if slot.restart_at else "",
                )
                health_changed = changed = True
            if slot.proc is None and slot.restart_at and now >= slot.restart_at:
                slot.restart_at = 0.0
                self._run(slot, now, restart=True)
                health_changed = changed = True
        if changed:
            self._publish(self.records(), health_changed)

    def records(self) -> dict[str, AppState]:
        return {appstatus.key(s.pod.namespace, s.pod.name): s.state for s in self.slots}


def main(argv: list[str] | None = None) -> int:
    # Imported here: `mesh` starts this module as a process and never imports it.
    from localcluster import mesh

    p = argparse.ArgumentParser(prog="python -m localcluster.supervisor")
    p.add_argument("--cluster-file", required=True)
    p.add_argument("--state-root")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout
    )
    cluster = mesh.attach(args.cluster_file, args.state_root)
    stop = False

    def on_signal(signum: int) -> None:
        nonlocal stop
        stop = True

    # A child this process forks (pyroute2's netns helpers) dies of SIGTERM, not of this.
    on_stop_signal(on_signal)
    state_dir: Path = cluster.state.dir

    def publish(records: dict[str, AppState], health_changed: bool) -> None:
        if not cluster.mesh:
            appstatus.write(state_dir, records, os.getpid())
            if health_changed:
                mesh.service_rules(cluster)
            return
        # Under the records lock: a `label` or `apply` meanwhile regenerates from the same
        # record, so neither undoes the other's change.
        with meshconfig.records_lock(cluster.paths):
            appstatus.write(state_dir, records, os.getpid())
            if health_changed:
                meshconfig.regenerate(cluster.spec, cluster.paths)
                mesh.service_rules(cluster)

    spec = cluster.spec
    sup = Supervisor(
        [Slot(pod, AppState(running=False)) for pod in spec.pods],
        lambda pod: start_app(spec, cluster.layout, cluster.state, pod),
        publish,
    )
    sup.start_all(time.time())
    log.info("started %d apps", len(sup.slots))
    while not stop:
        time.sleep(POLL_S)
        sup.step(time.time())
    log.info("stopping (the apps keep running)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
