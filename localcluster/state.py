"""A cluster's record of what it created, and the teardown that removes all of it.

Invariants:
- the record (state.json) names a netns BEFORE that netns is created, so a crash at any
  point leaves a record that covers everything that exists;
- ownership is exact: teardown removes the namespaces the record names and nothing else
  (never by name prefix: `<cluster>-*` may match another cluster's namespaces, as `uxq-n1-*`
  matches the pods of node n1 of cluster `uxq`), stops the processes with a pidfile and
  every process still inside one of the recorded namespaces (a process spawned but not yet
  recorded when a crash hit has no pidfile, but it lives in a cluster netns);
- teardown is idempotent, runs shielded from SIGINT/SIGTERM (`localcluster.interrupt`), and
  never touches `ca/` in the state directory (the mesh keeps its CA there) nor the logs a
  failed `up` kept (`failed-up-logs/`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import netns as pr_netns

import nsutil
from localcluster import registry
from localcluster.interrupt import TornDown, note_teardown, shielded
from localcluster.processes import ProcessRecord, proc_stat, stop_recorded, terminate
from localcluster.spec import valid_cluster_name

DEFAULT_STATE_ROOT = Path("/var/lib/ambientctl")
STATE_FILE = registry.STATE_FILE
FAILED_UP_LOGS = "failed-up-logs"
SPEC_RECORD = "spec.json"  # a copy of the cluster file `up` read, and where it was
KEEP_DIRS = frozenset({"ca", FAILED_UP_LOGS})


class StateError(RuntimeError):
    """The state directory is unusable (bad cluster name, unreadable record)."""


@dataclass(slots=True)
class ClusterState:
    """The on-disk record of one cluster. Mutable by design: it grows as things are made."""

    cluster: str
    dir: Path
    netns: list[str] = field(default_factory=list)

    @property
    def pidfile_dir(self) -> Path:
        return self.dir / "pids"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def path(self) -> Path:
        return self.dir / STATE_FILE

    @classmethod
    def open(cls, cluster: str, state_root: Path | str | None = None) -> ClusterState:
        """The cluster's record, loaded if it exists, else a new empty one written to disk."""
        d = state_dir(cluster, state_root)
        d.mkdir(parents=True, exist_ok=True)
        st = cls.load(cluster, state_root)
        if st is None:
            st = cls(cluster, d)
            st.save()
        st.pidfile_dir.mkdir(exist_ok=True)
        st.log_dir.mkdir(exist_ok=True)
        return st

    @classmethod
    def load(cls, cluster: str, state_root: Path | str | None = None) -> ClusterState | None:
        d = state_dir(cluster, state_root)
        try:
            doc = json.loads((d / STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            # A torn write is impossible (atomic replace), so this is outside interference.
            raise StateError(f"cannot read {d / STATE_FILE}: {e}; remove it to start over") from e
        return cls(cluster, d, [str(n) for n in doc.get("netns", [])])

    def record_netns(self, name: str) -> None:
        """Call BEFORE creating the netns."""
        with self._locked():
            if name not in self.netns:
                self.netns.append(name)
                self.save()

    def forget_netns(self, name: str) -> None:
        """Call AFTER removing the netns (a waypoint or pod deleted while the cluster runs)."""
        with self._locked():
            if name in self.netns:
                self.netns.remove(name)
                self.save()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The record is shared by processes (the CLI and a Kubernetes-mode kubelet both
        add namespaces): change it under a lock, starting from what is on disk, so no
        writer loses another's entry."""
        with open(self.dir / ".state.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = ClusterState.load(self.cluster, self.dir.parent)
            if on_disk is not None:
                self.netns = on_disk.netns
            yield

    def save(self) -> None:
        doc = {
            "cluster": self.cluster,
            "netns": self.netns,
            "pidfileDir": str(self.pidfile_dir),
            "logDir": str(self.log_dir),
        }
        tmp = self.dir / f".{STATE_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def keep_spec(state: ClusterState, cluster_file: Path | str) -> None:
    """Remember the cluster file this cluster was built from (its path and a copy of its
    text), so that later commands can name the cluster alone: the copy is what runs, even
    if the file is edited or moved afterwards. Teardown removes it with the rest."""
    path = Path(cluster_file).resolve()
    doc = {"file": str(path), "text": path.read_text(encoding="utf-8")}
    tmp = state.dir / f".{SPEC_RECORD}.tmp"
    tmp.write_text(json.dumps(doc), encoding="utf-8")
    os.replace(tmp, state.dir / SPEC_RECORD)


def kept_spec(cluster: str, state_root: Path | str | None = None) -> tuple[Path, str] | None:
    """(the cluster file's path, its text as `up` read it), or None when the cluster has
    no such record (not up, or brought up before the record existed)."""
    try:
        doc = json.loads((state_dir(cluster, state_root) / SPEC_RECORD).read_text("utf-8"))
        return Path(str(doc["file"])), str(doc["text"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def state_dir(cluster: str, state_root: Path | str | None = None) -> Path:
    if not valid_cluster_name(cluster):
        raise StateError(f"invalid cluster name {cluster!r}: 1-10 characters of [a-z0-9-]")
    return Path(state_root if state_root is not None else DEFAULT_STATE_ROOT) / cluster


@dataclass(frozen=True, slots=True)
class TeardownReport:
    processes_stopped: int
    netns_removed: tuple[str, ...]
    found: bool = True  # whether there was a record of the cluster at all


def teardown(
    cluster_name: str,
    state_root: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> TeardownReport:
    """Remove everything the cluster's record names; succeed when nothing exists.
    Idempotent. A signal arriving meanwhile is raised once it is done. Each step is
    reported to `progress` as it starts."""

    def say(text: str) -> None:
        if progress is not None:
            progress(text)

    d = state_dir(cluster_name, state_root)
    with shielded():
        recorded = ClusterState.load(cluster_name, state_root) if d.is_dir() else None
        say(f"stopping the processes of cluster {cluster_name}")
        stopped = stop_recorded(d / "pids") if d.is_dir() else 0
        names = set(recorded.netns if recorded else [])
        # A process stopped just now (a kubelet) may have recorded more namespaces meanwhile.
        again = ClusterState.load(cluster_name, state_root) if d.is_dir() else None
        names |= set(again.netns if again else [])
        stopped += terminate(_processes_inside(names))
        say(f"removing {len(names)} network namespaces")
        removed: list[str] = []
        for name in sorted(names):
            if _remove_netns(name):
                removed.append(name)
        _remove_runtime_files(d)
        # A Memory emptyDir of the cluster's pods (the kubelet keeps them on /dev/shm).
        shutil.rmtree(kubelet_shm_dir(cluster_name), ignore_errors=True)
        registry.release(cluster_name, d)
        report = TeardownReport(stopped, tuple(removed), found=recorded is not None)
        note_teardown(TornDown(cluster_name, len(removed), stopped))
    return report


def kubelet_shm_dir(cluster_name: str) -> Path:
    """Where the local kubelet keeps the cluster's Memory emptyDir volumes (a tmpfs)."""
    return Path("/dev/shm") / f"ambient-kubelet-{cluster_name}"


def _processes_inside(netns_names: set[str]) -> list[ProcessRecord]:
    """Every process whose network namespace is one of `netns_names` (matched by inode)."""
    inodes: dict[tuple[int, int], str] = {}
    for name in netns_names:
        try:
            st = os.stat(nsutil.netns_path(name))
        except OSError:
            continue
        inodes[(st.st_dev, st.st_ino)] = name
    if not inodes:
        return []
    me = os.getpid()
    out: list[ProcessRecord] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        owner = inodes.get((st.st_dev, st.st_ino))
        ps = proc_stat(pid) if owner is not None else None
        if owner is None or ps is None:
            continue
        out.append(ProcessRecord(f"netns:{owner}", pid, ps[2], (), nsutil.netns_path(owner), ""))
    return out


def _remove_netns(name: str) -> bool:
    if not os.path.exists(nsutil.netns_path(name)):
        return False
    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        return False
    return True


def _remove_runtime_files(d: Path) -> None:
    if not d.is_dir():
        return
    for child in d.iterdir():
        if child.name in KEEP_DIRS:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        d.rmdir()  # only succeeds when nothing (no ca/) is left


def live_netns(cluster_name: str) -> list[str]:
    """The network namespaces named like the cluster's (`<cluster>-*`) that exist now: the
    ones a new cluster of that name must not be built over (never a list to delete)."""
    prefix = f"{cluster_name}-"
    return sorted(n for n in pr_netns.listnetns() if n.startswith(prefix))
