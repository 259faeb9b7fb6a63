#!/usr/bin/env bash
# The declared versions, tested: builds a virtual environment with the oldest release of each dependency
# that pyproject.toml admits (each ">=X" read as "==X") or with the newest releases on the registry, prints
# the versions it got and runs the not-slow suite there.
#
#   bash tools/test_versions.sh oldest    # .venv-oldest
#   bash tools/test_versions.sh newest    # .venv-newest
#
# Not part of .ci/run: the registry's torch wheels are CUDA builds that bring several GB of packages, and
# the newest torch may be above this machine's local cap (PIP_CONSTRAINT=/dev/null lifts it here).
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:?usage: tools/test_versions.sh oldest|newest}"
PYTHON="${PYTHON:-python3}"
venv=".venv-$which"

case "$which" in
oldest)
    # One pin per declared dependency, from pyproject.toml itself so the two cannot drift apart.
    mapfile -t pins < <("$PYTHON" - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    name, floor = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*", dep).groups()
    print(f"{name}=={floor}")
PY
    )
    ;;
newest)
    pins=(--upgrade torch lightning torchmetrics tensorboard)
    ;;
*)
    echo "unknown version set '$which': say oldest or newest" >&2
    exit 2
    ;;
esac

if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
# No constraints file here on purpose: the point is to take what the declared ranges admit.
PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install -q "${pins[@]}"
PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install -q -e ".[dev]"
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|lightning|torchmetrics|tensorboard|numpy|pytest) '
"$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider
