#!/usr/bin/env bash
# Installs everything the mesh, its demo and its tests need on a fresh Debian 12 machine
# (run as root): system packages, then a virtualenv with the project installed editable.
# Safe to run again; it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (network namespaces, iptables and tcpdump need it)" >&2
    exit 1
fi

apt_pkgs=(iptables nftables ipset iproute2 tcpdump haproxy procps python3-venv python3-dev gcc make)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# eBPF capture mode (--redirect-mode ebpf): bcc (Debian's python3-bpfcc) compiles the
# capture programs against the kernel headers at /lib/modules/$(uname -r)/build. Debian has
# headers only for its own kernels: the running kernel's when it is one of them, otherwise
# Debian's current ones, linked there (build -> the arch header dir, source -> the matching
# -common dir, as the versioned package links them under its own /lib/modules entry).
kver=$(uname -r)
if [ ! -d "/lib/modules/$kver/build/include" ] \
    || ! dpkg-query -W -f='${Status}' python3-bpfcc 2>/dev/null | grep -q "install ok installed"; then
    apt-get update -q
    headers="linux-headers-$kver"
    apt-cache show "$headers" >/dev/null 2>&1 || headers="linux-headers-$(dpkg --print-architecture)"
    echo "setup: installing python3-bpfcc $headers"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-bpfcc "$headers"
    if [ ! -d "/lib/modules/$kver/build/include" ]; then
        versioned=$(dpkg-query -W -f='${Depends}' "$headers" | grep -o 'linux-headers-[^ ,]*' || true)
        debver=${versioned%%$'\n'*}
        debver=${debver#linux-headers-}
        if [ -z "$debver" ] || [ ! -d "/lib/modules/$debver/build" ]; then
            echo "setup: $headers names no versioned headers to link for $kver" >&2
            exit 1
        fi
        mkdir -p "/lib/modules/$kver"
        ln -sfn "$(readlink -f "/lib/modules/$debver/build")" "/lib/modules/$kver/build"
        ln -sfn "$(readlink -f "/lib/modules/$debver/source")" "/lib/modules/$kver/source"
        echo "setup: kernel headers for $kver are Debian's $debver"
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
# bcc is pure Python over libbcc: link only its package into the venv (not all of Debian's
# dist-packages, whose other modules would shadow the venv's).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
bcc_pkg=/usr/lib/python3/dist-packages/bcc
[ "$(readlink "$site/bcc")" = "$bcc_pkg" ] || ln -sfn "$bcc_pkg" "$site/bcc"
echo "setup: ready (.venv)"
