#!/usr/bin/env bash
# Builds a real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler v1.20.2) from Debian's own source package, once, and caches the binaries.
#
# Why from source: no container engine and no release download can be reached here, but
# Debian 12 ships the Kubernetes source with every Go dependency vendored, so Debian's Go
# builds it offline (GOPROXY=off).
#
# The cache: $KUBE_CACHE (default ~/.cache/ambient-mesh/k8s-1.20.2). A later run with the three
# binaries present does nothing. Needs root only for the Debian packages it installs
# (golang-go, rsync, etcd-server); the build itself runs as anyone.
#
# deb-src is not enabled on these machines and /etc/apt is not ours to change: a private
# sources list, derived from the machine's own apt sources (same mirror, `deb-src`), is passed
# to apt with its own state and cache directories.
set -euo pipefail

KUBE_VERSION_TAG=1.20.2
cache=${KUBE_CACHE:-${HOME:-/root}/.cache/ambient-mesh/k8s-$KUBE_VERSION_TAG}
bins=(kube-apiserver kube-controller-manager kube-scheduler)

have_all() {
    local b
    for b in "${bins[@]}"; do [ -x "$cache/bin/$b" ] || return 1; done
}

# The three servers go on PATH (copies in /usr/local/bin, as root), as every program the
# project runs is (scripts/programs.txt). Copies, not links: root's cache is not readable by
# the unprivileged test user.
link_bins() {
    local b
    [ "$(id -u)" = 0 ] || return 0
    for b in "${bins[@]}"; do
        if [ -L "/usr/local/bin/$b" ] || ! cmp -s "$cache/bin/$b" "/usr/local/bin/$b"; then
            rm -f "/usr/local/bin/$b"
            install -m 0755 "$cache/bin/$b" "/usr/local/bin/$b"
        fi
    done
}

if have_all && [ -x "$cache/bin/kubectl" ]; then
    link_bins
    echo "kube-build: cached in $cache/bin"
    exit 0
fi

need_pkgs=()
for p in golang-go rsync etcd-server; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "kube-build: needs root to install: ${need_pkgs[*]}" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >/dev/null
fi

work="$cache/work"
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/src"

# The machine's mirror(s), as deb and deb-src lines (binary lists: Debian's reflect2 below). Both the deb822 (.sources) and the one-line forms.
srclist="$work/apt/sources.list"
{
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        python3 - "$f" <<'EOF'
import sys
text = open(sys.argv[1]).read()
for stanza in text.split("\n\n"):
    fields = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line:
            continue
        k, v = line.split(":", 1)
        fields[k.strip().lower()] = v.strip()
    if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
        continue
    signed = fields.get("signed-by")
    opt = f"[signed-by={signed}] " if signed else ""
    for uri in fields.get("uris", "").split():
        for suite in fields.get("suites", "").split():
            for kind in ("deb", "deb-src"):
                print(f"{kind} {opt}{uri} {suite} {fields.get('components', '')}")
EOF
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        sed -n 's/^deb \(.*\)$/deb \1\ndeb-src \1/p' "$f"
    done
} | awk 'NF' | sort -u >"$srclist"
if [ ! -s "$srclist" ]; then
    echo "kube-build: no apt source found to derive a deb-src entry from" >&2
    exit 1
fi

aptopts=(-o "Dir::Etc::SourceList=$srclist" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache"
    -o "Debug::NoLocking=1" -o APT::Sandbox::User=root)
apt-get "${aptopts[@]}" update -q >/dev/null

# kubectl of the same line: Debian's kubernetes-client, unpacked (not installed: it conflicts
# with other kubectl packages a machine may have).
if [ ! -x "$cache/bin/kubectl" ]; then
    (cd "$work" && rm -rf kcdeb && mkdir kcdeb && cd kcdeb &&
        apt-get "${aptopts[@]}" download -q kubernetes-client >/dev/null && dpkg -x ./*.deb x)
    mkdir -p "$cache/bin"
    install -m 0755 "$work/kcdeb/x/usr/bin/kubectl" "$cache/bin/kubectl"
    rm -rf "$work/kcdeb"
fi
if have_all; then
    link_bins
    echo "kube-build: cached in $cache/bin"
    exit 0
fi

# The newest source of the 1.20.2 line that the mirror has.
version=$(apt-cache "${aptopts[@]}" showsrc kubernetes | awk '/^Version:/ {print $2}' |
    grep -F "$KUBE_VERSION_TAG" | sort -V | tail -1)
if [ -z "$version" ]; then
    echo "kube-build: the mirror has no kubernetes source of $KUBE_VERSION_TAG" >&2
    exit 1
fi
echo "kube-build: building kubernetes $version from Debian's source package (about 8 minutes)"

cd "$work/src"
if ! ls kubernetes_*.orig.tar.* >/dev/null 2>&1; then
    apt-get "${aptopts[@]}" source --download-only -q "kubernetes=$version" >/dev/null
fi
tree="$work/tree"
if [ ! -f "$tree/Makefile" ]; then
    rm -rf "$tree" && mkdir -p "$tree"
    tar -C "$tree" --strip-components=1 -xf "$(ls kubernetes_*.orig.tar.* | head -1)"
fi

# The one required fix: vendored modern-go/reflect2 v1.0.1 crashes (SIGSEGV in
# unsafe_map.go) under Go 1.19 on the first custom-resource write. Debian's 1.0.2 replaces it.
r2="$tree/vendor/github.com/modern-go/reflect2"
if [ ! -f "$r2/.from-debian" ]; then
    (cd "$work" && rm -rf r2deb && mkdir r2deb && cd r2deb &&
        apt-get "${aptopts[@]}" download -q golang-github-modern-go-reflect2-dev >/dev/null &&
        dpkg -x ./*.deb x)
    src=$(dirname "$(find "$work/r2deb/x" -name reflect2.go | head -1)")
    find "$r2" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
    find "$src" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
        -exec cp {} "$r2/" \;
    touch "$r2/.from-debian"
fi

gopath="$work/gopath"
mkdir -p "$gopath/src/k8s.io"
ln -sfn "$tree" "$gopath/src/k8s.io/kubernetes"
(cd "$gopath/src/k8s.io/kubernetes" &&
    GOPATH="$gopath" GOCACHE="$work/gocache" CGO_ENABLED=0 GOPROXY=off GOFLAGS=-mod=vendor \
        make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >"$work/build.log" 2>&1) || {
    tail -30 "$work/build.log" >&2
    echo "kube-build: build failed; the whole log is $work/build.log" >&2
    exit 1
}
mkdir -p "$cache/bin"
for b in "${bins[@]}"; do
    install -m 0755 "$tree/_output/bin/$b" "$cache/bin/$b.tmp"
    mv "$cache/bin/$b.tmp" "$cache/bin/$b"
done
# The source tree, Go cache and apt scratch are 3+ GB: only the binaries are kept.
rm -rf "$tree" "$gopath" "$work/gocache" "$work/r2deb"
link_bins
echo "kube-build: built, cached in $cache/bin"
