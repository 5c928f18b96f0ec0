"""Running waypoints: each waypoint Gateway's pod (a netns on its node) and its process.

The process is `python -m waypoint` in the pod's netns, with the node's CA token (the CA
issues identities of the workloads on that node, and the waypoint pod is one of them). Its
pidfile is `waypoint-<ns>-<name>.pid` and its netns is recorded in the cluster's state
before it is created, so `down` removes both exactly, as it removes every pod.

Readiness is asked of the waypoint itself (`GET /healthz/ready` on POD_IP:15021 from inside
its pod), once and with a short timeout: a status question is answered at once, ready or
why not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from localcluster import gateways as gw
from localcluster import netnshttp
from localcluster.apps import INHERITED_ENV
from localcluster.meshconfig import MeshPaths
from localcluster.network import NetworkLayout, build_pod, remove_pod_netns, waypoint_layout
from localcluster.processes import (
    ManagedProcess,
    ProcessError,
    proc_stat,
    read_records,
    spawn_in_netns,
)
from localcluster.processes import terminate as terminate_processes
from localcluster.spec import ClusterSpec
from localcluster.state import ClusterState

READY_PORT = 15021
PROBE_TIMEOUT = 1.0


def process_name(g: gw.GatewaySpec) -> str:
    return f"waypoint-{g.namespace}-{g.name}"


def waypoint_env(spec: ClusterSpec, paths: MeshPaths, g: gw.GatewaySpec) -> dict[str, str]:
    """The process contract of `python -m waypoint`."""
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    p = g.placed()
    env.update(
        PYTHONUNBUFFERED="1",
        NODE_NAME=p.node,
        LOCAL_XDS_PATH=str(paths.xds),
        CA_ADDRESS=str(paths.ca_socket),
        CA_TOKEN_PATH=str(paths.token(p.node)),
        TRUST_DOMAIN=spec.trust_domain,
        WAYPOINT_NAME=g.name,
        POD_NAMESPACE=g.namespace,
        POD_NAME=g.pod_name,
        SERVICE_ACCOUNT=g.service_account,
        POD_IP=str(p.ip),
        LOG_LEVEL=os.environ.get("WAYPOINT_LOG_LEVEL", "info"),
    )
    if os.environ.get("OTLP_ENDPOINT"):
        env["OTLP_ENDPOINT"] = os.environ["OTLP_ENDPOINT"]
    return env


def start(
    spec: ClusterSpec, state: ClusterState, paths: MeshPaths, g: gw.GatewaySpec
) -> ManagedProcess:
    """Start the waypoint's process in its pod (which must exist)."""
    name = process_name(g)
    return spawn_in_netns(
        waypoint_layout(spec, g).netns_path,
        [sys.executable, "-m", "waypoint"],
        waypoint_env(spec, paths, g),
        Path.cwd(),
        state.log_dir / f"{name}.log",
        state.pidfile_dir,
        name,
    )


def restart(
    spec: ClusterSpec,
    state: ClusterState,
    paths: MeshPaths,
    g: gw.GatewaySpec,
    timeout: float = 30.0,
) -> ManagedProcess:
    """Replace the waypoint's process without refusing a connection, as a rolling update
    does: the new process starts beside the old one (both listen on 15008 with
    SO_REUSEPORT) with the old one's environment, and once its log says it started, the
    old one gets SIGTERM and drains (GOAWAY; open streams finish). The new process then
    holds the waypoint's record. Raises ProcessError if the new one does not start."""
    name = process_name(g)
    old = [r for r in read_records(state.pidfile_dir) if r.name == name]
    env = _environ(old[0].pid) if old else {}
    log = state.log_dir / f"{name}.log"
    mark = log.stat().st_size if log.exists() else 0
    new = spawn_in_netns(
        waypoint_layout(spec, g).netns_path,
        [sys.executable, "-m", "waypoint"],
        env or waypoint_env(spec, paths, g),
        Path.cwd(),
        log,
        state.pidfile_dir,
        f"{name}-next",
    )
    deadline = time.monotonic() + timeout
    while not _started(_read_from(log, mark), new.record.pid):
        if new.popen.poll() is not None or time.monotonic() > deadline:
            terminate_processes([new.record])
            new.pidfile.unlink(missing_ok=True)
            raise ProcessError(f"the new process of {name} did not start (its log: {log})")
        time.sleep(0.05)
    terminate_processes(old, timeout=timeout)
    record = dataclasses.replace(new.record, name=name)
    pidfile = state.pidfile_dir / f"{name}.pid"
    tmp = pidfile.with_suffix(".tmp")
    tmp.write_text(record.to_json())
    tmp.replace(pidfile)
    new.pidfile.unlink(missing_ok=True)
    return ManagedProcess(record, new.popen, pidfile)


def _environ(pid: int) -> dict[str, str]:
    """A process's environment ({} once it has gone)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
    except (OSError, UnicodeDecodeError):
        return {}
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def _started(log: str, pid: int) -> bool:
    """Whether the log holds the "waypoint started" line of process `pid` (JSON lines)."""
    for line in log.splitlines():
        if '"waypoint started"' in line:
            with contextlib.suppress(ValueError):
                if json.loads(line).get("pid") == pid:
                    return True
    return False


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def create(
    spec: ClusterSpec, layout: NetworkLayout, state: ClusterState, g: gw.GatewaySpec
) -> None:
    """The waypoint's pod: its netns (recorded first), veth and address on its node.
    `spec` must already hold `g` (placed)."""
    pod = waypoint_layout(spec, g)
    build_pod(layout.node(pod.node), pod, state)


def remove(spec: ClusterSpec, state: ClusterState, g: gw.GatewaySpec) -> None:
    """Stop the waypoint's process (by its record) and remove its pod; idempotent."""
    stop(state, g)
    pod = waypoint_layout(spec, g)
    remove_pod_netns(pod)
    state.forget_netns(pod.netns)


def stop(state: ClusterState, g: gw.GatewaySpec) -> bool:
    name = process_name(g)
    records = [r for r in read_records(state.pidfile_dir) if r.name == name]
    running = terminate_processes(records)
    with contextlib.suppress(OSError):
        (state.pidfile_dir / f"{name}.pid").unlink()
    return running > 0


def running(state: ClusterState, g: gw.GatewaySpec) -> bool:
    for r in read_records(state.pidfile_dir):
        if r.name == process_name(g):
            st = proc_stat(r.pid)
            return st is not None and st[2] == r.start_time and st[0] != "Z"
    return False


def readiness(spec: ClusterSpec, state: ClusterState, g: gw.GatewaySpec) -> gw.Readiness:
    """Programmed or why not, answered at once (one probe, PROBE_TIMEOUT at most)."""
    pod = waypoint_layout(spec, g)
    if not os.path.exists(pod.netns_path):
        return gw.Readiness(False, "NoPod", f"the waypoint pod {g.pod_name} does not exist")
    if not running(state, g):
        log = state.log_dir / f"{process_name(g)}.log"
        return gw.Readiness(
            False, "NotRunning", f"the waypoint process is not running (its log: {log})"
        )
    try:
        status, body = probe(pod.netns_path, str(pod.ip), READY_PORT, "/healthz/ready")
    except OSError as e:
        return gw.Readiness(
            False,
            "NotReady",
            f"the waypoint does not answer on {pod.ip}:{READY_PORT} ({e.strerror or e})",
        )
    if status != 200:
        detail = body[:200].decode(errors="replace").strip()
        return gw.Readiness(
            False,
            "NotReady",
            f"/healthz/ready answered {status}" + (f": {detail}" if detail else ""),
        )
    return gw.Readiness(True, "Programmed", "the waypoint answers /healthz/ready")


def probe(netns_path: str, ip: str, port: int, path: str) -> tuple[int, bytes]:
    """One HTTP/1.0 GET to `ip:port` from inside a netns: (status, body). Raises OSError."""
    return netnshttp.request(netns_path, port, path, ip=ip, timeout=PROBE_TIMEOUT, max_body=65536)


def status_view(
    g: gw.GatewaySpec, readiness_: gw.Readiness, extra: Mapping[str, str] | None = None
) -> dict[str, object]:
    """The Gateway as `waypoint list -o json` shows it: the resource and its status."""
    doc = g.resource()
    doc["status"] = gw.status(g, readiness_)
    if extra:
        doc.setdefault("metadata", {}).setdefault("annotations", {}).update(extra)
    return json.loads(json.dumps(doc))  # type: ignore[no-any-return]
