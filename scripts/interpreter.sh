# Sourced by scripts/setup.sh and scripts/lock.sh: sets PY, the interpreter .venv is built
# from and constraints are resolved on. Debian's own python3, the one the mesh's image runs
# (daemonset/Containerfile), not whichever python3 comes first on PATH: Debian builds it with
# profile-guided and link-time optimisation, and a python3 built from source without them
# (pyenv's default) ran the mesh's Python about an eighth slower per request and per new
# connection (benchmarks/README.md, "The interpreter"). PYTHON=... chooses another; without
# Debian's, the one on PATH.
PY=${PYTHON:-/usr/bin/python3}
if [ -z "${PYTHON:-}" ] && [ ! -x "$PY" ]; then
    PY=python3
fi
