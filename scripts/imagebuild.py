"""The decisions of scripts/image-build.sh that are more than plumbing, as pure functions
with a small command line (the script calls it with the machine's python3):

- `pip-args`: the machine's pip configuration (`pip config list` on stdin) as the
  `buildah bud` arguments that let pip inside the build reach the same package index:
  `--build-arg=PIP_...=value` lines, and `--volume=PATH:/mnt/host/PATH:ro` lines for the
  local paths those values name (a `file://` index, a find-links directory, a CA bundle),
  mounted for the build's RUN steps only (their content lands in no layer).
- `base-sources CODENAME`: the machine's apt sources (deb822 `.sources` and one-line
  `.list` files, paths as arguments) as the one-line `sources.list` of the image's base:
  only the Debian suites of CODENAME (a third-party repository's key is not in the base).
- `image-json REF DIGEST`: the local store's `image.json` from `buildah inspect --type image`
  (on stdin): the image config's `config` object as OCI writes it.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# pip settings that decide where packages come from and how they are fetched, with the
# variable pip reads each from. `constraint` is left out on purpose: the build pins with the
# project's constraints.txt, not with whatever a machine caps.
PIP_KEYS: Mapping[str, str] = {
    "index-url": "PIP_INDEX_URL",
    "extra-index-url": "PIP_EXTRA_INDEX_URL",
    "find-links": "PIP_FIND_LINKS",
    "trusted-host": "PIP_TRUSTED_HOST",
    "cert": "PIP_CERT",
    "client-cert": "PIP_CLIENT_CERT",
    "default-timeout": "PIP_DEFAULT_TIMEOUT",
    "retries": "PIP_RETRIES",
    "proxy": "PIP_PROXY",
}
# The keys whose values are paths or URLs that may point at this machine's disk.
PATH_KEYS = frozenset({"index-url", "extra-index-url", "find-links", "cert", "client-cert"})
# Later wins: a config file's [global], then its [install] (the command the build runs),
# then the environment (pip reads PIP_* over any file).
SECTION_RANK: Mapping[str, int] = {"global": 0, "install": 1, ":env:": 2}


def parse_pip_config(text: str) -> dict[str, str]:
    """`pip config list` lines (`section.key='value'`) -> key -> the value pip uses."""
    best: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        name, sep, raw = line.partition("=")
        if not sep or "." not in name:
            continue
        section, key = name.rsplit(".", 1)
        rank = SECTION_RANK.get(section)
        if rank is None or key not in PIP_KEYS:
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw.strip("'\"")
        if not isinstance(value, str):
            continue
        if key not in best or rank >= best[key][0]:
            best[key] = (rank, value)
    return {k: v for k, (_, v) in best.items()}


# Where the build sees this machine's paths: under /mnt (empty in a Debian image), never at
# their own path, which may be one a package of the build installs (the CA bundle is).
MOUNT_ROOT = "/mnt/host"


def local_path(value: str) -> str | None:
    """The path on this machine a pip value names (`file://` URL or absolute path), or None
    for a remote URL."""
    if value.startswith("file://"):
        path = value[len("file://") :]
    elif value.startswith("/"):
        path = value
    else:
        return None
    return os.path.normpath(path)


def mount_source(path: str, is_file: bool) -> str:
    """What to mount for a path: a PEP 503 index (`.../simple`) links to its files by
    relative URLs (`../../files/x.whl`), so the directory above `simple` must be visible."""
    if not is_file and os.path.basename(path) == "simple":
        return os.path.dirname(path)
    return path


def pip_build_args(settings: Mapping[str, str], exists: Any = os.path.exists) -> list[str]:
    """`buildah bud` arguments for the settings: one build arg each, its local paths moved
    under MOUNT_ROOT, and a read-only bind mount there for each such path that exists here.
    A local path that does not exist is passed as it is (pip ignores it, as here)."""
    args: list[str] = []
    mounts: list[str] = []
    for key in sorted(settings):
        words = []
        for word in settings[key].split() if key in PATH_KEYS else [settings[key]]:
            path = local_path(word)
            if path is None or path == "/" or not exists(path):
                words.append(word)
                continue
            source = mount_source(path, key in ("cert", "client-cert"))
            if source not in mounts:
                mounts.append(source)
            words.append(word.replace(path, MOUNT_ROOT + path, 1))
        args.append(f"--build-arg={PIP_KEYS[key]}={' '.join(words)}")
    return args + [f"--volume={p}:{MOUNT_ROOT}{p}:ro" for p in mounts]


def deb822_lines(text: str) -> list[tuple[str, str, str]]:
    """(uri, suite, components) of every enabled `Types: deb` stanza of a .sources file."""
    out: list[tuple[str, str, str]] = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                out.append((uri, suite, fields.get("components", "main")))
    return out


def one_line_entries(text: str) -> list[tuple[str, str, str]]:
    """(uri, suite, components) of every `deb` line of a one-line sources.list."""
    out: list[tuple[str, str, str]] = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # options: [arch=... signed-by=...]
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            out.append((words[0], words[1], " ".join(words[2:]) or "main"))
    return out


def base_sources(files: Mapping[str, str], codename: str) -> list[str]:
    """The base image's sources.list lines: the machine's entries of CODENAME's suites
    (`bookworm`, `bookworm-updates`, `bookworm-security`, ...), in order, without
    duplicates. Options (signed-by) are dropped: the base trusts Debian's keyring through
    /etc/apt/trusted.gpg.d, and the machine's key paths need not exist in it."""
    lines: list[str] = []
    for name, text in files.items():
        entries = deb822_lines(text) if name.endswith(".sources") else one_line_entries(text)
        for uri, suite, comps in entries:
            if suite != codename and not suite.startswith(codename + "-"):
                continue
            line = f"deb {uri} {suite} {comps}"
            if line not in lines:
                lines.append(line)
    return lines


def mirror(lines: Sequence[str], codename: str) -> str | None:
    """The URI of the first entry for CODENAME itself: what debootstrap fetches from."""
    for line in lines:
        words = line.split()
        if len(words) >= 3 and words[2] == codename:
            return words[1]
    return None


def image_json(ref: str, digest: str, inspect: Mapping[str, Any]) -> dict[str, Any]:
    """The store's image.json from `buildah inspect --type image` output."""
    config = dict(inspect.get("OCIv1", {}).get("config") or {})
    return {
        "ref": ref,
        "digest": digest,
        "config": {
            "Env": list(config.get("Env") or []),
            "Entrypoint": config.get("Entrypoint") or None,
            "Cmd": config.get("Cmd") or None,
            "WorkingDir": config.get("WorkingDir") or "",
            "User": config.get("User") or "",
        },
    }


def _read_files(paths: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in paths:
        path = Path(p)
        if path.is_file():
            out[p] = path.read_text(errors="replace")
    return out


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, rest = argv[0], list(argv[1:])
    if cmd == "pip-args":
        for arg in pip_build_args(parse_pip_config(sys.stdin.read())):
            print(arg)
        return 0
    if cmd == "base-sources" and rest:
        lines = base_sources(_read_files(rest[1:]), rest[0])
        if mirror(lines, rest[0]) is None:
            print(f"imagebuild: no apt source of {rest[0]} on this machine", file=sys.stderr)
            return 1
        print("\n".join(lines))
        return 0
    if cmd == "mirror" and rest:
        found = mirror(sys.stdin.read().splitlines(), rest[0])
        if found is None:
            return 1
        print(found)
        return 0
    if cmd == "image-json" and len(rest) == 2:
        doc = image_json(rest[0], rest[1], json.load(sys.stdin))
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    print(f"imagebuild: unknown command {argv!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
