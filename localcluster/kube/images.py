"""The local image store: what `scripts/image-build.sh` writes and the local kubelet reads (pure
lookup, reads files only).

Layout: `${AMBIENT_IMAGE_STORE:-$HOME/.cache/ambient-mesh/images}/<repository>/<tag>/` with
`rootfs/` (the unpacked filesystem) and `image.json` (`ref`, `digest`, and the image config's
`config` object as OCI writes it: Env, Entrypoint, Cmd, WorkingDir, User). `image.json` is
written last, so an image without it is not ready and is not found.

A reference is normalised as a container runtime would for local images: a leading
`docker.io/`, `docker.io/library/` or `localhost/` is dropped, no tag means `latest`, and a
digest reference (`name@sha256:...`) is found by the digest its image.json records.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORE_ENV = "AMBIENT_IMAGE_STORE"
IMAGE_JSON = "image.json"
ROOTFS = "rootfs"
DEFAULT_TAG = "latest"
_DROPPED_PREFIXES = ("docker.io/library/", "docker.io/", "localhost/")


@dataclass(frozen=True, slots=True)
class ImageBundle:
    ref: str
    digest: str
    rootfs: Path
    env: tuple[str, ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    working_dir: str
    user: str

    @property
    def image_id(self) -> str:
        """What a pod's containerStatuses[].imageID says: `<repository>@<digest>`."""
        repo, _ = normalise(self.ref)
        return f"{repo}@{self.digest}" if self.digest else ""


def store_root() -> Path:
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "ambient-mesh" / "images"


def normalise(ref: str) -> tuple[str, str]:
    """(repository, tag) of a reference; a digest reference keeps its digest as the tag
    (`sha256:...`), which `lookup` then searches for."""
    name = ref.strip()
    for prefix in _DROPPED_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if "@" in name:
        repo, digest = name.split("@", 1)
        # A tag before the digest (`repo:tag@sha256:...`) is ignored, as runtimes do.
        repo = _strip_tag(repo)[0]
        return repo, digest
    return _strip_tag(name)


def _strip_tag(name: str) -> tuple[str, str]:
    # A ':' after the last '/' is a tag; one before it belongs to a registry host:port.
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :] or DEFAULT_TAG
    return name, DEFAULT_TAG


def lookup(ref: str, store: Path | None = None) -> ImageBundle | None:
    """The ready image `ref` names in the store, or None (not there, or not complete)."""
    root = store if store is not None else store_root()
    repo, tag = normalise(ref)
    if not repo or ".." in repo.split("/") or tag == "..":
        return None
    if tag.startswith("sha256:"):
        return _by_digest(root / repo, tag)
    return _read(root / repo / tag)


def _by_digest(repo_dir: Path, digest: str) -> ImageBundle | None:
    try:
        tags = sorted(p for p in repo_dir.iterdir() if p.is_dir())
    except OSError:
        return None
    for d in tags:
        bundle = _read(d)
        if bundle is not None and bundle.digest == digest:
            return bundle
    return None


def _read(d: Path) -> ImageBundle | None:
    try:
        meta = json.loads((d / IMAGE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rootfs = d / ROOTFS
    if not isinstance(meta, dict) or not rootfs.is_dir():
        return None
    config = meta.get("config")
    cfg: dict[str, Any] = config if isinstance(config, dict) else {}
    return ImageBundle(
        ref=str(meta.get("ref", "")),
        digest=str(meta.get("digest", "")),
        rootfs=rootfs,
        env=_strings(cfg.get("Env")),
        entrypoint=_strings(cfg.get("Entrypoint")),
        cmd=_strings(cfg.get("Cmd")),
        working_dir=str(cfg.get("WorkingDir") or ""),
        user=str(cfg.get("User") or ""),
    )


def _strings(v: Any) -> tuple[str, ...]:
    return tuple(str(x) for x in v) if isinstance(v, list) else ()
