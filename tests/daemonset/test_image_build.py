"""scripts/imagebuild.py: the decisions of scripts/image-build.sh (pip's index inside the
build, the base's apt sources, the store's image.json), and the script's own guards."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("imagebuild", ROOT / "scripts" / "imagebuild.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["imagebuild"] = module
    spec.loader.exec_module(module)
    return module


ib = _load()

PIP_CONFIG = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/other.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.index-url='https://mirror.invalid/simple'
install.index-url='https://install.invalid/simple'
"""


def test_the_environment_beats_install_beats_global_and_constraints_are_not_taken():
    settings = ib.parse_pip_config(PIP_CONFIG)
    assert settings == {
        "cert": "/etc/ssl/certs/ca-certificates.crt",
        "default-timeout": "180",
        "find-links": "/opt/wheels",
        "extra-index-url": "file:///opt/pypi/simple file:///opt/pypi-more/simple",
        "index-url": "https://install.invalid/simple",
    }


def test_local_paths_are_mounted_under_mnt_host_and_the_values_follow():
    settings = ib.parse_pip_config(PIP_CONFIG)
    present = {"/etc/ssl/certs/ca-certificates.crt", "/opt/pypi/simple", "/opt/wheels"}
    args = ib.pip_build_args(settings, exists=lambda p: p in present)
    assert args == [
        "--build-arg=PIP_CERT=/mnt/host/etc/ssl/certs/ca-certificates.crt",
        "--build-arg=PIP_DEFAULT_TIMEOUT=180",
        # An index that is not on this disk is passed unchanged (pip skips it, as here).
        "--build-arg=PIP_EXTRA_INDEX_URL=file:///mnt/host/opt/pypi/simple "
        "file:///opt/pypi-more/simple",
        "--build-arg=PIP_FIND_LINKS=/mnt/host/opt/wheels",
        "--build-arg=PIP_INDEX_URL=https://install.invalid/simple",
        "--volume=/etc/ssl/certs/ca-certificates.crt:/mnt/host/etc/ssl/certs/ca-certificates.crt:ro",
        # A PEP 503 index links to ../../files: the directory above simple/ is mounted.
        "--volume=/opt/pypi:/mnt/host/opt/pypi:ro",
        "--volume=/opt/wheels:/mnt/host/opt/wheels:ro",
    ]


def test_no_pip_configuration_means_pips_default_index():
    assert ib.pip_build_args(ib.parse_pip_config("")) == []


SOURCES = """\
Types: deb
# a comment
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main contrib

Types: deb
URIs: https://vendor.invalid/apt
Suites: nodistro
Components: main

Types: deb-src
URIs: http://mirror.invalid/debian
Suites: bookworm
Components: main
"""
ONE_LINE = """\
deb [arch=amd64 signed-by=/k.gpg] http://other.invalid/debian bookworm main
deb https://vendor.invalid/cloud cloud-sdk-bookworm main
# deb http://commented.invalid/debian bookworm main
deb http://old.invalid/debian bullseye main
"""


def test_the_base_takes_the_machines_debian_suites_of_its_codename_only():
    lines = ib.base_sources({"a.sources": SOURCES, "b.list": ONE_LINE}, "bookworm")
    assert lines == [
        "deb http://mirror.invalid/debian bookworm main",
        "deb http://mirror.invalid/debian bookworm-updates main",
        "deb http://mirror.invalid/debian-security bookworm-security main contrib",
        "deb http://other.invalid/debian bookworm main",
    ]
    assert ib.mirror(lines, "bookworm") == "http://mirror.invalid/debian"
    assert ib.mirror(lines, "trixie") is None


def test_image_json_is_the_oci_config_object():
    inspect = {
        "OCIv1": {
            "config": {
                "Env": ["PATH=/x"],
                "Cmd": ["bash"],
                "WorkingDir": "/opt/ambient-mesh",
                "User": "1337",
                "Labels": {"a": "b"},
            }
        }
    }
    assert ib.image_json("ambient-mesh/mesh:1", "sha256:ab", inspect) == {
        "ref": "ambient-mesh/mesh:1",
        "digest": "sha256:ab",
        "config": {
            "Env": ["PATH=/x"],
            "Entrypoint": None,
            "Cmd": ["bash"],
            "WorkingDir": "/opt/ambient-mesh",
            "User": "1337",
        },
    }


def test_the_build_script_refuses_to_run_without_root_and_unknown_arguments():
    script = ROOT / "scripts" / "image-build.sh"
    done = subprocess.run(
        ["bash", str(script), "--bogus"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2 and "unknown argument --bogus" in done.stderr
    if os.geteuid() == 0:
        pytest.skip("the root check is seen only as another user")
    done = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1 and "needs root" in done.stderr


def test_setup_and_make_build_the_image():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert setup.index("scripts/kube-build.sh") < setup.index("scripts/image-build.sh")
    makefile = (ROOT / "Makefile").read_text()
    assert "\nimage:" in makefile and "scripts/image-build.sh" in makefile
    programs = (ROOT / "scripts" / "programs.txt").read_text().split()
    assert {"buildah", "debootstrap", "flock", "unshare", "chroot"} <= set(programs)
