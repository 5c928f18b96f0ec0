"""The mesh's container image: daemonset/Containerfile's shape (no root), and the image that
scripts/image-build.sh put in the local image store (root: its rootfs is run with chroot in a
private mount namespace, read-only, as the local kubelet runs a container from it).

The image is built by setup (as root) or `make image`; under CI a missing image fails."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "daemonset" / "Containerfile"
UNDER_CI = os.environ.get("CI", "").lower() == "true"

REPOSITORY = "ambient-mesh/mesh"
TAG = "0.13.0"
NEXT_TAG = "0.13.0-next"
VENV = "/opt/ambient-mesh/venv"
CONTRACT_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Installed by the [dev] extra only: none may be in the image.
DEV_ONLY = ("pytest", "mypy", "ruff", "hypothesis", "scapy", "matplotlib", "grpc_tools")


# --- the Containerfile (no root) -----------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """The Containerfile's instructions, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append(Instruction(keyword.upper(), " ".join(args.split())))
    return out


def stages(ins: Sequence[Instruction]) -> list[list[Instruction]]:
    out: list[list[Instruction]] = []
    for i in ins:
        if i.keyword == "FROM":
            out.append([])
        if out:
            out[-1].append(i)
    return out


@pytest.fixture(scope="module")
def containerfile() -> list[Instruction]:
    return instructions(CONTAINERFILE.read_text())


def test_the_base_is_an_argument_both_stages_start_from(containerfile):
    before_from = containerfile[
        : next(i for i, x in enumerate(containerfile) if x.keyword == "FROM")
    ]
    assert Instruction("ARG", "BASE=debian:bookworm-slim") in before_from
    froms = [i.args for i in containerfile if i.keyword == "FROM"]
    assert froms == ["${BASE} AS build", "${BASE}"]


def test_the_final_stage_runs_as_istio_proxy_with_the_contract_environment(containerfile):
    final = stages(containerfile)[-1]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users and users[-1] == "1337"  # non-root, by number (no name lookup needed)
    assert final[-1] == Instruction("USER", "1337")
    assert Instruction("ENV", f"PATH={CONTRACT_PATH}") in final
    assert [i.args for i in final if i.keyword == "WORKDIR"][-1] == "/opt/ambient-mesh"
    assert not [i for i in final if i.keyword in ("ENTRYPOINT", "CMD")]
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert "useradd --uid 1337 --gid 1337" in runs and "groupadd --gid 1337 istio-proxy" in runs


def test_the_final_stage_installs_runtime_packages_only_and_copies_the_venv(containerfile):
    build, final = stages(containerfile)
    installs = [i.args for i in final if i.keyword == "RUN" and "apt-get install" in i.args]
    assert len(installs) == 1
    words = set(installs[0].split())
    assert "--no-install-recommends" in words
    assert {"python3", "iptables", "nftables", "ipset", "iproute2"} <= words
    assert not words & {"python3-venv", "python3-pip", "gcc", "python3-dev"}
    assert "rm -rf /var/lib/apt/lists/*" in installs[0]
    assert Instruction("COPY", f"--from=build {VENV} {VENV}") in final
    # The venv is built in the first stage, non-editable, at the pins, without [dev].
    pip = " ".join(i.args for i in build if i.keyword == "RUN" and "pip install" in i.args)
    assert "-c constraints.txt" in pip and " -e " not in pip and "[dev]" not in pip


def test_ebpf_is_a_build_argument_off_by_default(containerfile):
    final = stages(containerfile)[-1]
    assert Instruction("ARG", "WITH_EBPF=false") in final
    install = next(i.args for i in final if "apt-get install" in i.args)
    assert '"$WITH_EBPF" = true' in install and "python3-bpfcc" in install


def test_the_version_is_the_last_layer(containerfile):
    # Two builds that differ only in VERSION share every other layer.
    final = stages(containerfile)[-1]
    version_arg = final.index(Instruction("ARG", "VERSION=0.13.0"))
    assert [i.keyword for i in final[version_arg:]] == ["ARG", "RUN", "USER"]
    assert '"$VERSION" >/opt/ambient-mesh/VERSION' in final[version_arg + 1].args


def test_the_context_leaves_out_what_the_image_does_not_need():
    ignore = (ROOT / ".containerignore").read_text()
    patterns = {line.strip() for line in ignore.splitlines() if line.strip()[:1] not in ("", "#")}
    assert {".git", ".venv", "**/__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"} <= (
        patterns
    )
    assert {"tests", "benchmarks", "demo", "fuzz"} <= patterns
    # Docker reads .dockerignore: the same file.
    assert (ROOT / ".dockerignore").resolve() == (ROOT / ".containerignore").resolve()
    # What the build copies must stay in.
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "ztunnel", "meshcore"):
        assert needed not in patterns and not any(p.startswith(needed) for p in patterns)


def test_the_instruction_reader_joins_continuations_and_skips_comments():
    text = "# c\nARG A=1\nRUN a \\\n    && b\n\nFROM x AS y\n"
    assert instructions(text) == [
        Instruction("ARG", "A=1"),
        Instruction("RUN", "a && b"),
        Instruction("FROM", "x AS y"),
    ]


# --- the built image (root) ---------------------------------------------------------------


def store_root() -> Path:
    default = Path(os.environ.get("HOME", "/root")) / ".cache" / "ambient-mesh" / "images"
    return Path(os.environ.get("AMBIENT_IMAGE_STORE", str(default)))


def image_dir(tag: str) -> Path:
    return store_root() / REPOSITORY / tag


def _require(tag: str) -> Path:
    d = image_dir(tag)
    if not (d / "image.json").is_file():
        msg = f"no image {REPOSITORY}:{tag} in {store_root()}: run scripts/image-build.sh"
        if UNDER_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="module")
def image() -> Path:
    return _require(TAG)


@pytest.fixture(scope="module")
def config(image: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((image / "image.json").read_text())
    return doc


def run_in_image(
    image: Path, config: dict[str, Any], argv: Sequence[str], user: str | None = None
) -> subprocess.CompletedProcess[str]:
    """argv in the image's rootfs as a container would run: a private mount namespace, the
    rootfs read-only as /, /proc and /dev mounted, the image's Env, WorkingDir and User. The
    store's rootfs is not changed (read-only; every mount goes with the namespace)."""
    cfg = config["config"]
    uid = user or cfg["User"] or "0"
    spec = uid if ":" in uid else f"{uid}:{uid}"
    script = (
        'set -e; m="$1"; rootfs="$2"; spec="$3"; wd="$4"; shift 4; '
        'mount --bind "$rootfs" "$m"; mount -o remount,bind,ro "$m"; '
        'mount -t proc proc "$m/proc"; mount --rbind /dev "$m/dev"; '
        'exec chroot --userspec="$spec" "$m" "$@"'
    )
    # The image's command line, in its own environment only, from its working directory.
    inner = ["/usr/bin/env", "-i", *cfg["Env"], "/bin/sh", "-c", 'cd "$0" && exec "$@"']
    with tempfile.TemporaryDirectory(prefix="mesh-image-") as tmp:
        argv_all = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "/bin/sh",
            "-c",
            script,
            "sh",
            tmp,
            str(image / "rootfs"),
            spec,
            cfg["WorkingDir"],
            *inner,
            cfg["WorkingDir"],
            *argv,
        ]
        return subprocess.run(argv_all, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.netns
def test_image_json_is_the_ready_mark_of_a_complete_entry(image, config):
    assert set(config) == {"ref", "digest", "config"}
    assert config["ref"] == f"{REPOSITORY}:{TAG}"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", config["digest"])
    cfg = config["config"]
    assert set(cfg) >= {"Env", "Entrypoint", "Cmd", "WorkingDir", "User"}
    assert f"PATH={CONTRACT_PATH}" in cfg["Env"]
    assert cfg["WorkingDir"] == "/opt/ambient-mesh"
    assert cfg["User"] == "1337"
    assert cfg["Entrypoint"] is None
    # The rootfs is there, owned as in the image (root's /, the venv root's).
    st = (image / "rootfs" / "opt" / "ambient-mesh" / "venv").stat()
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert (image / "rootfs" / "usr" / "bin" / "python3").exists()


@pytest.mark.netns
def test_the_oci_archive_holds_the_image_the_store_names(image, config):
    cache = Path(os.environ.get("HOME", "/root")) / ".cache" / "ambient-mesh"
    cache = Path(os.environ.get("AMBIENT_IMAGE_CACHE", str(cache)))
    archive = cache / "images" / "archives" / f"mesh-{TAG}.tar"
    if "AMBIENT_IMAGE_STORE" in os.environ and not archive.exists():
        pytest.skip("a store of its own: its archive is wherever that build kept it")
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        index = json.load(member)
    [manifest] = index["manifests"]
    assert manifest["digest"] == config["digest"]
    assert manifest["annotations"]["org.opencontainers.image.ref.name"] == f"{REPOSITORY}:{TAG}"


@pytest.mark.netns
def test_the_version_file_and_istio_proxy(image):
    rootfs = image / "rootfs"
    assert (rootfs / "opt" / "ambient-mesh" / "VERSION").read_text() == f"{TAG}\n"
    passwd = (rootfs / "etc" / "passwd").read_text().splitlines()
    group = (rootfs / "etc" / "group").read_text().splitlines()
    assert any(line.startswith("istio-proxy:x:1337:1337:") for line in passwd)
    assert any(line.startswith("istio-proxy:x:1337:") for line in group)


@pytest.mark.netns
def test_the_next_version_differs_only_in_its_version_file():
    _require(TAG)
    # Built here when missing, as the helm upgrade test would (its later call is then a
    # no-op): only the last layer, VERSION, differs, so this takes seconds.
    r = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "image-build.sh"),
            "--tag",
            NEXT_TAG,
            "--version",
            NEXT_TAG,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert r.returncode == 0, f"image-build {NEXT_TAG}: {r.stderr[-3000:]}"
    d = _require(NEXT_TAG)
    assert (d / "rootfs" / "opt" / "ambient-mesh" / "VERSION").read_text() == f"{NEXT_TAG}\n"
    doc = json.loads((d / "image.json").read_text())
    assert doc["ref"] == f"{REPOSITORY}:{NEXT_TAG}"
    base = json.loads((image_dir(TAG) / "image.json").read_text())
    assert doc["config"] == base["config"] and doc["digest"] != base["digest"]


@pytest.mark.netns
def test_the_venv_holds_the_project_and_no_dev_only_package(image):
    site = image / "rootfs" / VENV.lstrip("/") / "lib" / "python3.11" / "site-packages"
    names = {p.name.lower() for p in site.iterdir()}
    for dev in DEV_ONLY:
        assert dev not in names
        assert not [n for n in names if n.startswith(f"{dev}-") and n.endswith(".dist-info")]
    # Installed as a wheel (its packages are in site-packages, no editable finder or .pth).
    assert {"ztunnel", "redirect", "controlplane", "waypoint", "meshcore"} <= names
    assert any(n.startswith("ambient_mesh-") and n.endswith(".dist-info") for n in names)
    assert not [n for n in names if "__editable__" in n or n.endswith(".pth")]
    # The runtime dependencies are, at constraints.txt's pins.
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for dist in ("cryptography", "grpcio", "uvloop", "aiohttp"):
        assert f"{dist}-{pins[dist]}.dist-info" in names


@pytest.mark.netns
def test_every_component_imports_with_the_venvs_python(image, config):
    code = (
        "import sys, ztunnel.__main__, redirect.agent, controlplane.__main__, "
        "waypoint.__main__, meshcore.identity.certworker, ctypes.util; "
        "print(sys.prefix); print(ztunnel.__main__.__file__); "
        "print(ctypes.util.find_library('c'))"
    )
    done = run_in_image(image, config, ["python3", "-c", code])
    assert done.returncode == 0, done.stderr
    prefix, module, libc = done.stdout.split()
    assert prefix == VENV  # `python3` on the image's PATH is the venv's
    assert module.startswith(f"{VENV}/lib/python3.11/site-packages/ztunnel/")
    assert libc == "libc.so.6"  # nsutil and the malloc trim find libc through ldconfig


@pytest.mark.netns
@pytest.mark.parametrize("module", ["redirect.agent", "controlplane"])
def test_the_argument_parsing_components_print_their_usage(image, config, module):
    done = run_in_image(image, config, ["python3", "-m", module, "--help"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {module}")


@pytest.mark.netns
@pytest.mark.parametrize("module", ["ztunnel", "waypoint"])
def test_the_environment_configured_proxies_refuse_an_empty_environment(image, config, module):
    # Their configuration is the environment only: with none they stop before doing
    # anything, with the settings' exit status (2) and one line naming what is missing.
    done = run_in_image(image, config, ["python3", "-m", module])
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"{module}: ") and "must be set" in done.stderr


@pytest.mark.netns
def test_the_programs_the_components_run_are_in_the_image(image, config):
    # As root, as the node agent and the tunnel run.
    argv = [
        "/bin/sh",
        "-c",
        "iptables-restore --version && iptables-save --version && nft --version && "
        "ipset --version && ip -V && id -un 1337",
    ]
    done = run_in_image(image, config, argv, user="0")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.match(r"iptables-restore v1\.8\.\d+ \(nf_tables\)", lines[0]), lines
    assert lines[-1] == "istio-proxy"


@pytest.mark.netns
def test_a_container_runs_as_the_images_user_by_default(image, config):
    done = run_in_image(image, config, ["/bin/sh", "-c", "id -u; id -g; pwd"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1337", "1337", "/opt/ambient-mesh"]
