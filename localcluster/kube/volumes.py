"""A pod's volumes on the machine: the directories and files the kubelet provides (I/O).

Every volume source lives under the pod's own directory (`<state>/pods/<uid>/volumes/<name>`)
except hostPath (the machine's path, or the node's host directory: see
`containerplan.host_path_source`) and a Memory emptyDir (a directory on the machine's
/dev/shm tmpfs, so it is memory-backed and outlives a container restart without a mount of
ours in the root namespace). Nothing here mounts anything: the launcher bind-mounts these in
the container's own mount namespace, which dies with it.

Files volumes are written as the kubelet's AtomicWriter does: the files in a fresh
`..<timestamp>` directory, then the `..data` symlink swapped to it with one rename, and each
top-level name a symlink through `..data`, so a reader never sees half an update.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from localcluster.kube.containerplan import Volume, host_path_source
from localcluster.kube.volumecontent import Files, VolumeNotReady
from localcluster.state import kubelet_shm_dir

DATA = "..data"


def pod_dir(state_dir: Path, uid: str) -> Path:
    return state_dir / "pods" / uid


def node_host_dir(state_dir: Path, node: str) -> Path:
    return state_dir / "nodes" / node / "host"


def shm_dir(cluster: str, uid: str) -> Path:
    return kubelet_shm_dir(cluster) / uid


def object_data(kind: str, obj: Mapping[str, Any]) -> dict[str, bytes]:
    """A Secret's or ConfigMap's keys as bytes (Secret data is base64 in the API)."""
    out: dict[str, bytes] = {}
    if kind == "secret":
        for k, v in (obj.get("data") or {}).items():
            out[str(k)] = base64.b64decode(str(v))
        for k, v in (obj.get("stringData") or {}).items():
            out[str(k)] = str(v).encode()
        return out
    for k, v in (obj.get("data") or {}).items():
        out[str(k)] = str(v).encode()
    for k, v in (obj.get("binaryData") or {}).items():
        out[str(k)] = base64.b64decode(str(v))
    return out


def read_files(target: Path) -> Files:
    """What `write_files` last wrote into `target` (empty when nothing yet)."""
    data = target / DATA
    out: Files = {}
    if not data.is_dir():
        return out
    for dirpath, _, names in os.walk(data, followlinks=True):
        for n in names:
            p = Path(dirpath) / n
            rel = str(p.relative_to(data))
            out[rel] = (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
    return out


def write_files(target: Path, files: Files) -> bool:
    """Make `target` hold exactly `files`, atomically; False when it already did."""
    if read_files(target) == files:
        return False
    target.mkdir(parents=True, exist_ok=True)
    stamp = target / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    for rel, (content, mode) in files.items():
        p = stamp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
        os.chmod(p, mode)
    old = os.readlink(target / DATA) if (target / DATA).is_symlink() else None
    tmp = target / "..data_tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(stamp.name, tmp)
    os.replace(tmp, target / DATA)
    tops = {rel.split("/", 1)[0] for rel in files}
    for top in tops:
        link = target / top
        if not link.is_symlink():
            if link.exists():
                shutil.rmtree(link) if link.is_dir() else link.unlink()
            os.symlink(f"{DATA}/{top}", link)
    for entry in target.iterdir():
        if entry.name.startswith(".."):
            continue
        if entry.name not in tops:
            entry.unlink()
    if old is not None and old != stamp.name:
        shutil.rmtree(target / old, ignore_errors=True)
    return True


def host_path(volume: Volume, node_dir: Path) -> Path:
    """The hostPath's source on this machine, created or checked per its type."""
    src = host_path_source(volume.path, node_dir)
    t = volume.host_type
    if t in ("", "DirectoryOrCreate"):
        # An untyped missing path is created as a directory, as containerd and Docker do.
        if not src.exists():
            src.mkdir(parents=True, exist_ok=True, mode=0o755)
        elif t == "DirectoryOrCreate" and not src.is_dir():
            raise VolumeNotReady(f"hostPath {volume.path} ({src}) is not a directory")
        return src
    if t == "FileOrCreate":
        if not src.exists():
            src.parent.mkdir(parents=True, exist_ok=True)
            src.touch(mode=0o644)
        elif not src.is_file():
            raise VolumeNotReady(f"hostPath {volume.path} ({src}) is not a file")
        return src
    checks = {
        "Directory": stat.S_ISDIR,
        "File": stat.S_ISREG,
        "Socket": stat.S_ISSOCK,
        "CharDevice": stat.S_ISCHR,
    }
    try:
        mode = src.stat().st_mode
    except OSError:
        raise VolumeNotReady(f"hostPath {volume.path} ({src}) does not exist") from None
    if not checks[t](mode):
        raise VolumeNotReady(f"hostPath {volume.path} ({src}) is not a {t}")
    return src


def empty_dir(volume: Volume, pdir: Path, shm: Path) -> Path:
    if volume.memory:  # the cluster's directory on /dev/shm is root's alone, as pod dirs are
        shm.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    d = (shm if volume.memory else pdir / "volumes") / volume.name
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o777)  # as the kubelet makes it: any container user may write
    return d


def files_dir(volume: Volume, pdir: Path) -> Path:
    return pdir / "volumes" / volume.name


def remove_pod(pdir: Path, shm: Path) -> None:
    """Everything of the pod's volumes and root filesystem layer (no mount is left to
    stop this: they were all in the container's own namespace)."""
    for d in (pdir, shm):
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
        if d.exists():
            raise OSError(f"cannot remove {d}")
