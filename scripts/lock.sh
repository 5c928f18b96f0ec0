#!/usr/bin/env bash
# `make lock`: rewrites constraints.txt with the newest releases that pyproject.toml allows.
#
# Resolves in a new temporary virtualenv (nothing of .venv carries over), installing the
# project's dependencies and dev extras, not the project, and pins every package exactly,
# pip and setuptools included (setup installs pip first, and setuptools builds the editable
# install). Then `make test` (setup sees the newer constraints.txt and reinstalls) and commit
# constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/interpreter.sh  # PY: the interpreter setup builds .venv from
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip setuptools
"$tmp/venv/bin/python" - >"$tmp/requirements.txt" <<'EOF'
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join([*project["dependencies"], *project["optional-dependencies"]["dev"]]))
EOF
"$tmp/venv/bin/python" -m pip install -q -r "$tmp/requirements.txt"
{
    echo "# Every Python package setup installs into .venv, at an exact version (pip and setuptools"
    echo "# too): a new release of a dependency cannot break an unchanged tree."
    echo "# Written by \`make lock\` (scripts/lock.sh) from the newest releases pyproject.toml"
    echo "# allows; refresh it that way, not by hand."
    "$tmp/venv/bin/python" -m pip freeze --all | LC_ALL=C sort -f
} >constraints.txt.new
mv constraints.txt.new constraints.txt
echo "lock: constraints.txt has $(grep -vc '^#' constraints.txt) pins"
