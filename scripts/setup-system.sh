#!/usr/bin/env bash
# The system part of setup: the Debian packages of every program in scripts/programs.txt, and
# for the eBPF capture mode bcc (python3-bpfcc) with the kernel headers it compiles against.
#
# As root it installs what is missing, then checks that every listed program is on PATH.
# As any other user it installs nothing: it names what is missing and that root must install
# it, and exits 0 (the Python part needs no root; the tests that need the missing programs
# will say so). Once every listed program is on PATH it touches .setup-stamp.
#
# PROGRAMS_LIST overrides the list (for the tests of this script).
set -euo pipefail
cd "$(dirname "$0")/.."

list=${PROGRAMS_LIST:-scripts/programs.txt}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# One "program package" line for each listed program not on PATH, and "- package" for each
# listed package with no program that is not installed.
missing() {
    local prog pkg
    while read -r prog pkg _; do
        case "$prog" in '' | '#'*) continue ;; esac
        # "=script": built by that script of ours (setup.sh runs it), not a Debian package.
        case "$pkg" in =*) continue ;; esac
        if [ "$prog" = - ]; then
            installed "$pkg" || echo "- $pkg"
        elif ! command -v "$prog" >/dev/null 2>&1; then
            echo "$prog $pkg"
        fi
    done <"$list"
}

# bcc and the running kernel's headers, for --redirect-mode ebpf.
ebpf_ready() {
    [ -d "/lib/modules/$(uname -r)/build/include" ] && installed python3-bpfcc
}

report() {  # what is missing, as "program (package)" words
    local prog pkg
    while read -r prog pkg; do
        if [ "$prog" = - ]; then printf ' %s' "$pkg"; else printf ' %s (%s)' "$prog" "$pkg"; fi
    done <<<"$1"
}

if [ "$(id -u)" != 0 ]; then
    gaps=$(missing)
    if [ -n "$gaps" ]; then
        echo "setup: warning: missing:$(report "$gaps")." >&2
        echo "setup: warning: installing system packages needs root: run 'sudo scripts/setup.sh';" \
            "the tests that need them will fail or be skipped until then." >&2
    else
        touch .setup-stamp
    fi
    ebpf_ready || echo "setup: warning: the eBPF capture mode needs python3-bpfcc and the kernel" \
        "headers; run 'sudo scripts/setup.sh' to install them." >&2
    exit 0
fi

gaps=$(missing)
if [ -n "$gaps" ]; then
    mapfile -t packages < <(awk '{print $2}' <<<"$gaps" | sort -u)
    echo "setup: installing ${packages[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"
    gaps=$(missing)
    if [ -n "$gaps" ]; then
        echo "setup: still missing after the install:$(report "$gaps"); is every directory" \
            "holding them (/usr/sbin, /sbin) on PATH ($PATH)?" >&2
        exit 1
    fi
fi
touch .setup-stamp

# eBPF capture mode (--redirect-mode ebpf): bcc (Debian's python3-bpfcc) compiles the
# capture programs against the kernel headers at /lib/modules/$(uname -r)/build. Debian has
# headers only for its own kernels: the running kernel's when it is one of them, otherwise
# Debian's current ones, linked there (build -> the arch header dir, source -> the matching
# -common dir, as the versioned package links them under its own /lib/modules entry).
kver=$(uname -r)
if ! ebpf_ready; then
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
