#!/usr/bin/env bash
# unprivileged.sh PYTHON ARGS...: runs PYTHON ARGS... as an unprivileged user, so that a test
# that needs root fails instead of passing by accident.
#
# Not root: runs it as is. Root: runs it as nobody (uid and gid 65534, no supplementary
# groups, no capabilities, no_new_privs), with a new TMPDIR (removed afterwards) and a HOME
# of its own beside PYTHON's venv (`.venv/nobody`), kept so that its caches outlive a run:
# compiled modules (PYTHONPYCACHEPREFIX: nothing is written into the checkout, and a warm
# cache saves each pytest process rewriting every test module's asserts, about 5 s of CPU),
# matplotlib's font list, Hypothesis's examples (a failure replays).
#
# nobody must be able to read the checkout and run PYTHON. Where it cannot (a clone under a
# 0700 directory such as `mktemp -d` makes, or a python installed under /root), nobody keeps
# one capability, CAP_DAC_READ_SEARCH: it may read any file and search any directory, and
# nothing else (no root uid, no network or namespace privilege, no write to what is not its
# own). This says so when it happens.
set -euo pipefail

python=$1
shift
if [ "$(id -u)" != 0 ]; then
    exec "$python" "$@"
fi

home="$(cd "$(dirname "$python")/.." && pwd)/nobody"
mkdir -p "$home"
chown 65534:65534 "$home"
chmod 0700 "$home"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chown 65534:65534 "$tmp"
env=(
    -u PYTHONDONTWRITEBYTECODE HOME="$home" TMPDIR="$tmp" USER=nobody LOGNAME=nobody
    PYTHONPYCACHEPREFIX="$home/.pycache" HYPOTHESIS_STORAGE_DIRECTORY="$home/.hypothesis"
)
as_nobody=(setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs)
none=(--inh-caps=-all --ambient-caps=-all --bounding-set=-all)
read_only=(--inh-caps=-all,+dac_read_search --ambient-caps=-all,+dac_read_search
    --bounding-set=-all,+dac_read_search)

# Can nobody, without any capability, run PYTHON on the checkout as root would? (The shell's
# `exec` makes the kernel check the path as nobody; a python whose own files it cannot read
# may still start, on the system's library, so the answers are compared.)
probe='import sys, os; os.listdir("."); print(sys.version, sys.prefix, sys.base_prefix)'
want=$("$python" -c "$probe")
got=$("${as_nobody[@]}" "${none[@]}" -- env "${env[@]}" sh -c 'exec "$0" -c "$1"' \
    "$python" "$probe" 2>/dev/null || true)
caps=("${none[@]}")
if [ "$got" != "$want" ]; then
    echo "unprivileged: nobody cannot read $PWD or run $python; running as nobody with" \
        "CAP_DAC_READ_SEARCH (read and search anything) and no other privilege" >&2
    caps=("${read_only[@]}")
    # Hypothesis judges its example store with access(2), which ignores capabilities: a
    # home beyond a directory nobody cannot search is "unusable" (a warning per test
    # module). The run's own TMPDIR is nobody's: examples last for this run only.
    env+=(HYPOTHESIS_STORAGE_DIRECTORY="$tmp/.hypothesis")
fi
"${as_nobody[@]}" "${caps[@]}" -- env "${env[@]}" "$python" "$@"
