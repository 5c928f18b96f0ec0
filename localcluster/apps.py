"""Starting the pods' own programs: each pod's command runs inside its pod netns.

The environment is deliberately small and explicit, like a container's: a few host
variables a program needs to run at all (PATH, locale, PYTHONPATH), then what
`localcluster.podenv` gives a pod (its own and its namespace's service variables, as a
kubelet sets them, and the cluster file's `env`). When the cluster captures DNS, the
process also gets the pod's resolv.conf, bind-mounted over /etc/resolv.conf in a mount
namespace of its own (as `ip netns exec` does with /etc/netns/<name>/resolv.conf): the
machine's file is never touched. `ambientctl exec` runs commands the same way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nsutil
from localcluster.kube import container
from localcluster.network import NetworkLayout
from localcluster.podenv import pod_env, pod_resolv_conf
from localcluster.processes import ManagedProcess, spawn_in_netns
from localcluster.spec import ClusterSpec, PodSpec
from localcluster.state import ClusterState

# MESH_PROFILE: a benchmark's profiling run (meshcore.runtime.profile) covers its proxies.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "MESH_PROFILE")
RESOLV_CONF = "/etc/resolv.conf"


def app_env(spec: ClusterSpec, namespace: str, name: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"  # logs appear as they happen, not at exit
    env.update(pod_env(spec, spec.pod(namespace, name)))
    return env


def pod_dir(state: ClusterState, pod: PodSpec) -> Path:
    """Where a pod's own files live (its resolv.conf)."""
    return state.dir / "podfiles" / pod.namespace / pod.name


def write_pod_files(spec: ClusterSpec, state: ClusterState, pod: PodSpec) -> Path | None:
    """Write the pod's resolv.conf (rewritten each time: the cluster file may have changed);
    its path, or None when the pod keeps the machine's resolver."""
    text = pod_resolv_conf(spec, pod)
    if text is None:
        return None
    d = pod_dir(state, pod)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "resolv.conf"
    tmp = path.with_name(".resolv.conf.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def pod_mounts(resolv: Path | None) -> Callable[[], None] | None:
    """For the child, after it entered the pod netns: its own mount namespace (slave to the
    machine's, so nothing it mounts propagates back) with the pod's resolv.conf."""
    if resolv is None:
        return None
    source = str(resolv)

    def run() -> None:
        container.unshare(container.CLONE_NEWNS)
        container.mount(None, "/", None, container.MS_REC | container.MS_SLAVE)
        container.mount(source, RESOLV_CONF, None, container.MS_BIND)

    return run


def exec_context(
    spec: ClusterSpec, layout: NetworkLayout, state: ClusterState, pod: PodSpec
) -> tuple[dict[str, str], Callable[[], None]]:
    """For `ambientctl exec`: the environment and the child's entry into the pod (netns,
    and its resolver when the cluster has one), the same as the pod's app gets. The
    caller's TERM is kept, as `kubectl exec -t` passes it, so a shell behaves."""
    env = app_env(spec, pod.namespace, pod.name)
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    enter = nsutil.preexec_enter(layout.pod(pod.namespace, pod.name).netns_path)
    mounts = pod_mounts(write_pod_files(spec, state, pod))

    def run() -> None:
        enter()
        if mounts is not None:
            mounts()

    return env, run


def missing_commands(spec: ClusterSpec) -> list[str]:
    """Each pod whose program does not exist or cannot be run, said plainly: checked before
    anything is built, so a typo costs nothing to tear down."""
    out = []
    for pod in spec.pods:
        prog = pod.command[0]
        where = f"pod {pod.namespace}/{pod.name}: command {prog!r}"
        if "/" in prog:
            path = spec.base_dir / prog  # absolute stays absolute
            if not path.is_file():
                out.append(f"{where} does not exist")
            elif not os.access(path, os.X_OK):
                out.append(f"{where} is not executable")
        elif shutil.which(prog, path=app_env(spec, pod.namespace, pod.name).get("PATH")) is None:
            out.append(f"{where} is not on PATH (nor a path relative to {spec.base_dir})")
    return out


def process_name(namespace: str, name: str) -> str:
    return f"app-{namespace}-{name}"


def start_apps(
    spec: ClusterSpec, layout: NetworkLayout, state: ClusterState
) -> list[ManagedProcess]:
    """Start every pod's command; on a failure, stop the ones already started and re-raise."""
    started: list[ManagedProcess] = []
    try:
        for pod in spec.pods:
            started.append(start_app(spec, layout, state, pod))
    except BaseException:
        for proc in started:
            proc.stop()
        raise
    return started


def start_app(
    spec: ClusterSpec, layout: NetworkLayout, state: ClusterState, pod: PodSpec
) -> ManagedProcess:
    """Start one pod's command (at `up`, and again when its supervisor restarts it)."""
    pname = process_name(pod.namespace, pod.name)
    return spawn_in_netns(
        layout.pod(pod.namespace, pod.name).netns_path,
        pod.command,
        app_env(spec, pod.namespace, pod.name),
        spec.base_dir,
        state.log_dir / f"{pname}.log",
        state.pidfile_dir,
        pname,
        pod_mounts(write_pod_files(spec, state, pod)),
    )
