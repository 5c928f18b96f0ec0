"""Starting the pods' own programs: each pod's command runs inside its pod netns.

The environment is deliberately small and explicit, like a container's: a few host
variables a program needs to run at all (PATH, locale, PYTHONPATH), then the
Kubernetes-style variables from the spec, then the pod's own `env`.
"""

from __future__ import annotations

import os
import shutil

from localcluster.network import NetworkLayout
from localcluster.processes import ManagedProcess, spawn_in_netns
from localcluster.spec import ClusterSpec, pod_env
from localcluster.state import ClusterState

INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "PYTHONPATH")


def app_env(spec: ClusterSpec, namespace: str, name: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"  # logs appear as they happen, not at exit
    env.update(pod_env(spec, spec.pod(namespace, name)))
    return env


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
            where = layout.pod(pod.namespace, pod.name)
            pname = process_name(pod.namespace, pod.name)
            started.append(
                spawn_in_netns(
                    where.netns_path,
                    pod.command,
                    app_env(spec, pod.namespace, pod.name),
                    spec.base_dir,
                    state.log_dir / f"{pname}.log",
                    state.pidfile_dir,
                    pname,
                )
            )
    except BaseException:
        for proc in started:
            proc.stop()
        raise
    return started
