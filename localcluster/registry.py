"""Which clusters are up on this machine, whatever state root each one uses.

Network namespace names are global and every one of a cluster's is `<cluster>-...`, so a
cluster named `uxq-n1` would name its namespaces like the pods of node `n1` of a cluster
`uxq`. `up` therefore claims its name here first, and is refused when the name is taken,
or when it and a running cluster's name are such that one is the other plus `-...`.

One small JSON file per cluster under RUN_DIR (tmpfs: like the namespaces, it does not
survive a reboot), written under an exclusive lock: {name, stateDir, pid, startTime} of the
process that claimed it. An entry is stale, and dropped, once its claimer has exited and
none of the namespaces its record names exists any more.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nsutil
from localcluster.processes import is_running, proc_stat

RUN_DIR = Path(os.environ.get("AMBIENT_RUN_DIR", "/run/ambientctl"))
STATE_FILE = "state.json"  # the cluster's record in its state dir (localcluster.state)


class ClusterConflict(RuntimeError):
    """The cluster's name is taken, or collides with a running cluster's namespaces."""


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    state_dir: Path
    pid: int
    start_time: int


def conflict(name: str, running: list[str]) -> str | None:
    """Why `name` cannot be brought up beside the `running` clusters, or None. Pure."""
    for other in sorted(running):
        if other == name:
            return f"cluster {name} is already up"
        if other.startswith(f"{name}-") or name.startswith(f"{other}-"):
            return (
                f"cluster name {name!r} collides with running cluster {other!r}: network "
                "namespaces are named `<cluster>-...` and one name is the other followed by "
                "'-...', so their namespaces could have the same names; choose another name"
            )
    return None


def _dir() -> Path:
    return RUN_DIR / "clusters"


@contextlib.contextmanager
def _locked() -> Iterator[Path]:
    d = _dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield d


def _read(path: Path) -> Entry | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        name, state_dir = str(doc["name"]), Path(doc["stateDir"])
        return Entry(name, state_dir, int(doc["pid"]), int(doc["startTime"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(entry: Entry) -> bool:
    if is_running(entry.pid, entry.start_time):
        return True  # its `up` is still building (it may not have created a netns yet)
    try:
        record = json.loads((entry.state_dir / STATE_FILE).read_text(encoding="utf-8"))
        names = [str(n) for n in record.get("netns", [])]
    except (OSError, ValueError, AttributeError):
        return False
    return any(os.path.exists(nsutil.netns_path(n)) for n in names)


def _entries(d: Path) -> list[Entry]:
    """Live entries; stale and unreadable ones are removed. Caller holds the lock."""
    out = []
    for path in sorted(d.glob("*.json")):
        entry = _read(path)
        if entry is None or entry.name != path.stem or not _alive(entry):
            path.unlink(missing_ok=True)
            continue
        out.append(entry)
    return out


def running() -> list[Entry]:
    with _locked() as d:
        return _entries(d)


def claim(name: str, state_dir: Path) -> None:
    """Record `name` as up (its record in `state_dir`), or raise ClusterConflict."""
    with _locked() as d:
        why = conflict(name, [e.name for e in _entries(d)])
        if why is not None:
            raise ClusterConflict(why)
        st = proc_stat(os.getpid())
        doc = {
            "name": name,
            "stateDir": str(state_dir.resolve()),
            "pid": os.getpid(),
            "startTime": st[2] if st is not None else 0,
        }
        tmp = d / f".{name}.tmp"
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        tmp.replace(d / f"{name}.json")


def release(name: str, state_dir: Path) -> None:
    """Forget `name`, if it is the cluster recorded in `state_dir` (another state root's
    cluster of the same name is not this one)."""
    if not _dir().is_dir():
        return  # nothing was ever claimed here (and a teardown needs no write access)
    with _locked() as d:
        path = d / f"{name}.json"
        entry = _read(path)
        if entry is not None and entry.state_dir == state_dir.resolve():
            path.unlink(missing_ok=True)
