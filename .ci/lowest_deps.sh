#!/usr/bin/env bash
# The lowest declared dependency versions, tested.
#
# Builds a second virtual environment ($LOWEST_VENV, default
# /tmp/tokenreduction-lowest) holding, for every requirement of
# pyproject.toml's [project] dependencies and of its `diffusion` extra that
# declares a lower bound (`name>=X`), exactly version X; requirements without a
# lower bound get what pip resolves. The project is installed there (editable,
# no dependencies of its own), and the library's fast tests run in it: methods,
# API, conformance, compile, dependency ranges, the diffusion tests that are
# not marked slow, CLCA, and the analysis and pattern-figure tests (pandas,
# SciPy, scikit-learn, matplotlib). It prints the versions it tested and exits with
# pytest's status.
#
# torch: PyPI ships Linux torch only as CUDA builds, which also run on a CPU;
# CPU-only builds are on download.pytorch.org, which this CI cannot reach.
# torch and torchvision must be the same build: a `+cpu` torch wheel found
# elsewhere (this machine's pip find-links hold torch 2.13.0+cpu) fails to load
# PyPI's torchvision ops ("operator torchvision::nms does not exist"), so the
# `+cpu` build is excluded and PyPI's pair installed.
#
# Usage: .ci/lowest_deps.sh   (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LOWEST_VENV:-/tmp/tokenreduction-lowest}
PYTHON=${PYTHON:-python3}
start=$(date +%s)
stamp() { echo "[lowest-deps $(( $(date +%s) - start )) s] $*"; }

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PY=$VENV/bin/python

# every "name>=X" as "name==X"; anything else as declared
mapfile -t LOWEST < <("$PY" - <<'EOF'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["diffusion"]:
    bound = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9][0-9.]*)", requirement.replace(" ", ""))
    if bound is None:
        print(requirement)
    elif bound[1] == "torch":
        print(f"torch=={bound[2]},!={bound[2]}+cpu")
    else:
        print(f"{bound[1]}=={bound[2]}")
EOF
)
stamp "installing: ${LOWEST[*]}"
pip_install() {  # pip's status kept; the notes on local index folders it skips left out
  "$PY" -m pip install --quiet "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
pip_install --upgrade pip
pip_install "${LOWEST[@]}" pytest fastcluster "tomesd>=0.1.3,<0.2"
pip_install --no-deps -e .
"$PY" -m pip check
stamp "installed"

echo "tested versions (lowest declared):"
"$PY" - <<'EOF'
from importlib.metadata import version

for name in ("torch", "torchvision", "timm", "numpy", "scipy", "pandas", "scikit-learn", "matplotlib", "pyyaml",
             "tqdm", "pillow", "POT", "diffusers", "transformers", "tokenizers", "clean-fid"):
    print(f"  {name:<13} {version(name)}")
EOF

set +e
"$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_methods_a.py tests/test_methods_common.py tests/test_api.py tests/test_conformance.py \
  tests/test_compile.py tests/test_dependency_ranges.py tests/test_diffusion.py \
  tests/test_clca.py tests/test_analysis_metrics.py tests/test_analysis_conventions.py tests/test_visualize.py \
  tests/test_emd.py
status=$?
set -e
stamp "lowest-deps tests done, pytest exit $status"
exit "$status"
