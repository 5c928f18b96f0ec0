"""Which cluster a command is for: the one seam every local-cluster command goes through,
so that how a cluster is named is decided in one place.

In order: the positional cluster file (or a cluster's name where it cannot be mistaken for
the command's next argument), `--cluster NAME|FILE`, then the current cluster remembered
by `ambientctl use` (`<state_root>/current`). A cluster named alone is found by its record:
`up` keeps a copy of the cluster file it read (`localcluster.state.keep_spec`).

The current cluster may be a Kubernetes cluster instead (`use --kubeconfig F [--context
C]`, or `use NAME` of a cluster up in Kubernetes mode): then the commands that work on a
Kubernetes cluster (`kube_target`) use it without flags, as kubectl uses its context.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ambientctl.kubefetch import KubeTarget, KubeUsage, choose
from localcluster import mesh
from localcluster.kube.cluster import kubeconfig_path
from localcluster.spec import SpecError, load_cluster, parse_cluster, valid_cluster_name
from localcluster.state import DEFAULT_STATE_ROOT, ClusterState, StateError, kept_spec

CURRENT_FILE = "current"
# What may follow the cluster file among a command's positionals: (dest, nargs) where
# nargs is "1", "?", "*" or "+" (argparse.REMAINDER counts as "*").
Positionals = Sequence[tuple[str, str]]


class NoCluster(Exception):
    """No cluster given and none to default to, or given twice (exit 2: the command line
    is incomplete)."""


@dataclass(frozen=True, slots=True)
class Current:
    """What `ambientctl use` remembered: a local cluster (`cluster`, with `file` when it was
    chosen by its file), a Kubernetes cluster (`kubeconfig`, `context`), or a local
    cluster up in Kubernetes mode (both), and the default namespace for views."""

    cluster: str | None = None
    file: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None

    def to_json(self) -> dict[str, str]:
        return {
            k: v
            for k, v in (
                ("cluster", self.cluster),
                ("file", self.file),
                ("kubeconfig", self.kubeconfig),
                ("context", self.context),
                ("namespace", self.namespace),
            )
            if v is not None
        }

    def describe(self) -> str:
        if self.cluster is not None and self.kubeconfig is not None:
            text = f"{self.cluster} (Kubernetes mode; kubeconfig {self.kubeconfig})"
        elif self.cluster is not None:
            text = self.cluster + (f" (file {self.file})" if self.file else "")
        else:
            text = f"Kubernetes cluster of {self.kubeconfig}"
            if self.context:
                text += f" (context {self.context})"
        if self.namespace:
            text += f", namespace {self.namespace}"
        return text


def root(state_root: str | Path | None) -> Path:
    return Path(state_root) if state_root else DEFAULT_STATE_ROOT


# ---- the command line ---------------------------------------------------------------------


def add_cluster_arg(p: argparse.ArgumentParser, then: Positionals = ()) -> None:
    """The local cluster a command acts on: the optional positional `cluster_file` and
    `--cluster`. `then` lists the positionals the command declares after it, so that
    `settle` can tell a cluster file from the command's own first argument."""
    p.add_argument(
        "cluster_file",
        nargs="?",
        metavar="CLUSTER_FILE",
        help="a local cluster's file (default: --cluster, else the current cluster: "
        "ambientctl use)",
    )
    add_cluster_option(p, argparse.SUPPRESS)
    p.set_defaults(cluster_then=tuple(then))


def add_cluster_option(p: argparse.ArgumentParser, default: str | None) -> None:
    """`--cluster NAME`: before the subcommand (`default` None) or after it (SUPPRESS: the
    one given before stays)."""
    p.add_argument(
        "--cluster",
        dest="cluster_name",
        metavar="NAME",
        default=default,
        help="a local cluster by name (or its file), instead of the current one",
    )


def _file_like(word: str) -> bool:
    """A word that can only be a cluster file, never a pod, kind or label."""
    return Path(word).suffix in (".yaml", ".yml", ".json") or Path(word).is_file()


def reassign(words: Sequence[object], fields: Positionals) -> dict[str, object] | None:
    """`words` dealt to `fields` as argparse deals positionals (left to right, optional
    ones only when enough words remain), or None when they do not fit. Pure."""
    out: dict[str, object] = {}
    rest = list(words)
    for i, (dest, nargs) in enumerate(fields):
        needed = sum(1 for _, n in fields[i + 1 :] if n in ("1", "+"))
        if nargs == "1":
            if not rest:
                return None
            out[dest] = rest.pop(0)
        elif nargs == "?":
            out[dest] = rest.pop(0) if len(rest) > needed else None
        else:
            take = max(0, len(rest) - needed)
            if nargs == "+" and take == 0:
                return None
            out[dest], rest = rest[:take], rest[take:]
    return out if not rest else None


def settle(args: argparse.Namespace, extra: Sequence[str] = ()) -> list[str]:
    """Call once after parsing; returns the words it could not place. argparse gives the
    optional cluster file the first positional whenever there are more than the command
    needs (`label namespace NS a=b c=d`, `delete ap NS/NAME`), and leaves a positional after
    an option unparsed (`get ap -n NS NAME`): the words are dealt again here, the first
    kept as the cluster only when it is a file or when they do not fit without it."""
    fields: Positionals = getattr(args, "cluster_then", ())
    if not fields:
        return list(extra)
    first = getattr(args, "cluster_file", None)
    words: list[object] = []
    for dest, nargs in fields:
        value = getattr(args, dest, None)
        if nargs in ("*", "+"):
            words.extend(value or [])
        elif value is not None:
            words.append(value)
    words.extend(extra)
    tries: list[tuple[str | None, list[object]]] = []
    if first is None or _file_like(first):
        tries.append((first, words))
    else:
        tries += [(None, [first, *words]), (first, words)]
    for cluster, dealt_words in tries:
        dealt = reassign(dealt_words, fields)
        if dealt is not None:
            args.cluster_file = cluster
            for dest, value in dealt.items():
                setattr(args, dest, value)
            return []
    return list(extra)


# ---- the current cluster ------------------------------------------------------------------


def read_current(state_root: str | Path | None) -> Current | None:
    path = root(state_root) / CURRENT_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StateError(f"cannot read {path}: {e}; `ambientctl use` another cluster") from e
    if not isinstance(doc, dict):
        raise StateError(f"{path} is not what `ambientctl use` writes; `use` another cluster")
    fields = ("cluster", "file", "kubeconfig", "context", "namespace")
    return Current(**{k: str(doc[k]) for k in fields if doc.get(k) is not None})


def write_current(state_root: str | Path | None, current: Current | None) -> None:
    d = root(state_root)
    path = d / CURRENT_FILE
    if current is None:
        path.unlink(missing_ok=True)
        return
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{CURRENT_FILE}.tmp"
    tmp.write_text(json.dumps(current.to_json()) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def forget(state_root: str | Path | None, cluster: str) -> bool:
    """After `down`: the current cluster is no longer `cluster` (True when it was)."""
    try:
        current = read_current(state_root)
    except StateError:
        return False
    if current is None or current.cluster != cluster:
        return False
    write_current(state_root, None)
    return True


def kube_mode_kubeconfig(name: str, state_root: str | Path | None) -> Path | None:
    """The kubeconfig of cluster `name` when it is up in Kubernetes mode, else None."""
    try:
        path = kubeconfig_path(name, state_root)
    except StateError:
        return None
    return path if path.is_file() else None


def choose_current(
    state_root: str | Path | None,
    ref: str | None,
    kubeconfig: str | None,
    context: str | None,
    namespace: str | None,
) -> Current:
    """What `ambientctl use REF | --kubeconfig F [--context C]` remembers. A name must be a
    cluster with a record under the state root; a file is remembered with its path."""
    if ref is not None and (kubeconfig is not None or context is not None):
        raise NoCluster("give a local cluster (NAME or FILE) or --kubeconfig/--context, not both")
    if ref is None:
        if kubeconfig is None and context is None:
            raise NoCluster("give a cluster NAME or FILE, or --kubeconfig F [--context C]")
        target = choose(None, kubeconfig, context, os.environ)
        assert target is not None
        if not target.kubeconfig.is_file():
            raise NoCluster(f"no kubeconfig {target.kubeconfig}")
        return Current(
            kubeconfig=str(target.kubeconfig.resolve()), context=context, namespace=namespace
        )
    if _file_like(ref) or not valid_cluster_name(ref):
        spec = load_cluster(ref)
        name, file = spec.name, str(Path(ref).resolve())
    else:
        name, file = ref, None
        if ClusterState.load(name, state_root) is None:
            known = ", ".join(known_clusters(state_root)) or "none"
            raise mesh.NotRunning(
                f"no cluster {name} under {root(state_root)} (clusters there: {known})"
            )
    kube = kube_mode_kubeconfig(name, state_root)
    return Current(
        cluster=name,
        file=file,
        kubeconfig=str(kube) if kube is not None else None,
        namespace=namespace,
    )


def known_clusters(state_root: str | Path | None) -> list[str]:
    """The clusters with a record under the state root (up, or left by a crash)."""
    d = root(state_root)
    if not d.is_dir():
        return []
    return sorted(
        c.name for c in d.iterdir() if valid_cluster_name(c.name) and (c / "state.json").is_file()
    )


# ---- which cluster ------------------------------------------------------------------------


def _local_ref(args: argparse.Namespace) -> str | None:
    """The local cluster the command line names (a file or a name), if it names one."""
    positional = getattr(args, "cluster_file", None)
    option = getattr(args, "cluster_name", None)
    if positional is not None and option is not None:
        raise NoCluster(f"give the cluster once: {positional} or --cluster {option}")
    return positional if positional is not None else option


def _is_name(ref: str) -> bool:
    return valid_cluster_name(ref) and not Path(ref).is_file()


class NeedsRoot(Exception):
    """The command would enter a cluster's network namespaces, and only root can (exit 1)."""


NEEDS_ROOT = "run as root (network namespaces need it)"


def require_root() -> None:
    if os.geteuid() != 0:
        raise NeedsRoot(NEEDS_ROOT)


def attach(args: argparse.Namespace) -> mesh.Cluster:
    """The running local cluster `args` name, else the current one (raises NotRunning,
    NoCluster, NeedsRoot). Root is asked for only once the cluster is found running, so that
    what is wrong with the command line or the cluster is said first, to anyone."""
    cluster = _attach(args)
    require_root()
    return cluster


def _attach(args: argparse.Namespace) -> mesh.Cluster:
    ref = _local_ref(args)
    if ref is None:
        current = read_current(args.state_root)
        if current is None:
            raise NoCluster(
                "no cluster given: name its cluster file, --cluster NAME, or remember one "
                "with `ambientctl use NAME`"
            )
        if current.cluster is None:
            raise NoCluster(
                f"the current cluster is a Kubernetes cluster ({current.describe()}); this "
                "command works on a local cluster: give its file or --cluster NAME"
            )
        # The record's copy is what runs; the file remembered is for a cluster not up yet.
        has_copy = kept_spec(current.cluster, args.state_root) is not None
        ref = current.cluster if has_copy or current.file is None else current.file
    if not _is_name(ref):
        return mesh.attach(ref, args.state_root)
    return attach_name(ref, args.state_root)


def attach_name(name: str, state_root: str | Path | None) -> mesh.Cluster:
    """A running cluster named alone, from the copy of its cluster file its record keeps."""
    if ClusterState.load(name, state_root) is None:
        known = ", ".join(known_clusters(state_root)) or "none"
        raise mesh.NotRunning(
            f"cluster {name} is not running under {root(state_root)} (clusters there: {known})"
        )
    kept = kept_spec(name, state_root)
    if kept is None:
        raise mesh.NotRunning(
            f"cluster {name} keeps no copy of its cluster file (brought up by an older "
            "ambientctl): give the file"
        )
    file, text = kept
    return mesh.attach_spec(parse_cluster(text, file.parent), state_root, file)


def namespace(args: argparse.Namespace, default: str) -> str:
    """`-n`, else the current context's namespace, else `default`."""
    ns = getattr(args, "namespace", None)
    if ns:
        return str(ns)
    try:
        current = read_current(args.state_root)
    except StateError:
        current = None
    return current.namespace if current is not None and current.namespace else default


def kube_target(args: argparse.Namespace, env: Mapping[str, str]) -> KubeTarget | None:
    """The Kubernetes cluster a kube-capable command is for, or None for a local cluster.

    A local cluster named on the command line wins (one up in Kubernetes mode is reached
    through its kubeconfig); then --kubeconfig/--context; then the current cluster; then,
    as kubectl, $KUBECONFIG and ~/.kube/config."""
    kubeconfig, context = getattr(args, "kubeconfig", None), getattr(args, "context", None)
    ref = _local_ref(args)
    if ref is not None:
        if kubeconfig is not None or context is not None:
            raise KubeUsage(
                f"give either a local cluster ({ref}) or --kubeconfig/--context (a "
                "Kubernetes cluster), not both"
            )
        name = ref if _is_name(ref) else _name_of_file(ref)
        kube = kube_mode_kubeconfig(name, args.state_root) if name else None
        return KubeTarget(kube, None) if kube is not None else None
    if kubeconfig is not None or context is not None:
        return choose(None, kubeconfig, context, env)
    current = read_current(args.state_root)
    if current is not None:
        if current.kubeconfig is not None:
            return KubeTarget(Path(current.kubeconfig), current.context)
        return None
    try:
        return choose(None, None, None, env)
    except KubeUsage:
        raise KubeUsage(
            "no cluster given: a cluster file, --cluster NAME, `ambientctl use NAME`, or "
            "--kubeconfig PATH [--context NAME] (a Kubernetes cluster; KUBECONFIG and "
            "~/.kube/config are read too)"
        ) from None


def _name_of_file(ref: str) -> str | None:
    """The cluster name a file declares (None when it cannot be read: `attach` says why)."""
    try:
        return load_cluster(ref).name
    except (SpecError, OSError):
        return None
