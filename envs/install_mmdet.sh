#!/usr/bin/env bash
# Creates the second environment the detection rules run in (default
# .venv-mmdet; pass another path as $1 or MMDET_VENV). The workflow runs it as
# its job `detection_env`, so nobody needs to call it by hand; calling it by
# hand is fine too.
#
# The OpenMMLab stack pins older versions than the rest of the project: mmdet
# 3.3.0 asserts mmcv<2.2.0, so mmcv 2.1.0 + mmengine 0.10.7, with mmcv's
# compiled ops built from source against torch 2.13.0 (without debug info;
# MAX_JOBS compilers at once). CUDA ops are built where this machine's torch
# has CUDA and nvcc is found (FORCE_CUDA and TORCH_CUDA_ARCH_LIST from
# envs/mmcv_build.py), else a CPU build. The compiled mmcv wheel is cached under
# ${TOKENREDUCTION_CACHE:-~/.cache/tokenreduction}/wheels/, keyed by the mmcv
# version, the torch version, the Python tag, the machine and the CUDA version
# (cpu for a CPU build), so a rebuild installs it in seconds; a fresh machine
# compiles. With TOKENREDUCTION_DETECTION_REQUIRE_CUDA=1 a CPU-only build fails. No torchvision/timm here:
# tokenreduction.detection imports only torch, mmcv, mmengine and mmdet.
# Idempotent: every step is skipped when what it installs is already there.
# Last, it writes <venv>/tokenreduction-env.json (the versions), the output
# the detection jobs wait for.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${MMDET_VENV:-.venv-mmdet}}
PYTHON=${PYTHON:-python3}
TORCH=2.13.0
MMCV=2.1.0
CACHE=${TOKENREDUCTION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tokenreduction}
start=$(date +%s)
# one build of an environment at a time (two workflow runs may both want it)
mkdir -p "$VENV"
exec 9> "$VENV/.install.lock"
if ! flock -n 9; then
  echo "waiting for another install_mmdet.sh building $VENV"
  flock 9
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet)
has() { "$PY" - "$@" <<'PYEOF'
import sys
from importlib import metadata
for spec in sys.argv[1:]:
    name, _, version = spec.partition("==")
    try:
        got = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if version and got.split("+")[0] != version:
        sys.exit(1)
PYEOF
}
has "torch==$TORCH" || "${PIP[@]}" "torch==$TORCH"
# mmcv's setup.py imports pkg_resources (removed in setuptools 81).
has mmengine==0.10.7 ninja wheel || "${PIP[@]}" "setuptools>=77.0.3,<81" wheel ninja "numpy<2" "mmengine==0.10.7"
# a GPU detection config rebuilds an mmcv that was built without CUDA
cpu_only_mmcv() {
  [ "${TOKENREDUCTION_DETECTION_REQUIRE_CUDA:-0}" = 1 ] && [ "$(cat "$VENV/.mmcv-build" 2>/dev/null || echo unknown)" != cu* ]
}
if ! has "mmcv==$MMCV" || ! "$PY" -c "import mmcv.ops" 2>/dev/null || cpu_only_mmcv; then
  # CUDA or CPU build, architectures and the cache key, from this machine's
  # torch and nvcc (envs/mmcv_build.py): sets FORCE_CUDA, MMCV_BUILD,
  # MMCV_CACHE_KEY and, for a CUDA build, TORCH_CUDA_ARCH_LIST and CUDA_HOME
  build_plan=$("$PY" envs/mmcv_build.py plan "$MMCV")
  eval "$build_plan"
  echo "mmcv build: $MMCV_BUILD (FORCE_CUDA=$FORCE_CUDA${TORCH_CUDA_ARCH_LIST:+, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST})"
  key=$MMCV_CACHE_KEY
  wheels="$CACHE/wheels/$key"
  mkdir -p "$CACHE/wheels"
  # one compile per key at a time: a second build waits, then takes the wheel
  exec 8> "$CACHE/wheels/$key.lock"
  flock 8
  if ! ls "$wheels"/mmcv-*.whl > /dev/null 2>&1; then
    echo "compiling mmcv $MMCV with its ops against torch $($PY -c 'import torch; print(torch.__version__)') (cached as $wheels)"
    tmp=$(mktemp -d "$CACHE/wheels/.build-XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    # pip's own cache is bypassed: its wheel would not say which torch it was built against.
    # CFLAGS=-g0: no debug info (Python's own flags say -g), which halves the
    # compile time (roi_align.cpp: 36 -> 17 s of CPU) and shrinks the objects 50x.
    CFLAGS="${CFLAGS:-} -g0" MMCV_WITH_OPS=1 FORCE_CUDA=$FORCE_CUDA MAX_JOBS=${MAX_JOBS:-2} \
      ${TORCH_CUDA_ARCH_LIST:+TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST"} ${CUDA_HOME:+CUDA_HOME="$CUDA_HOME"} \
      "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-cache-dir "mmcv==$MMCV" -w "$tmp"
    # atomic: another build of the same key may have finished meanwhile
    mv -T "$tmp" "$wheels" 2>/dev/null || rm -rf "$tmp"
    trap - EXIT
  else
    echo "mmcv $MMCV: cached wheel $wheels"
  fi
  flock -u 8
  "${PIP[@]}" --force-reinstall --no-deps "$wheels"/mmcv-*.whl
  "${PIP[@]}" "$wheels"/mmcv-*.whl "numpy<2"
fi
has mmdet==3.3.0 pycocotools || "${PIP[@]}" "mmdet==3.3.0" pycocotools "numpy<2"
has tokenreduction || "${PIP[@]}" --no-deps -e .
# which build the installed mmcv is: its wheel's cache folder (recorded at
# install), else a fresh plan (an mmcv installed by an older version of this script)
if [ -z "${MMCV_BUILD:-}" ]; then
  MMCV_BUILD=$(cat "$VENV/.mmcv-build" 2>/dev/null || echo unknown)
fi
printf '%s\n' "$MMCV_BUILD" > "$VENV/.mmcv-build"
versions=$("$PY" -c "import json, sys, torch, mmcv, mmcv.ops, mmengine, mmdet, tokenreduction.detection; print(json.dumps({'torch': torch.__version__, 'mmcv': mmcv.__version__, 'mmengine': mmengine.__version__, 'mmdet': mmdet.__version__, 'mmcv_build': sys.argv[1]}))" "$MMCV_BUILD")
echo "mmdet env: $versions"
printf '%s\n' "$versions" > "$VENV/tokenreduction-env.json.tmp"
# a GPU detection config (TOKENREDUCTION_DETECTION_REQUIRE_CUDA=1) refuses a CPU-only mmcv
"$PY" envs/mmcv_build.py check "$VENV/tokenreduction-env.json.tmp"
mv "$VENV/tokenreduction-env.json.tmp" "$VENV/tokenreduction-env.json"
echo "mmdet env install took $(( $(date +%s) - start )) s"
