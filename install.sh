#!/usr/bin/env bash
# Creates .venv with everything the library, the workflow and the tests need.
# torch 2.14.1 + torchvision 0.29.1 are the pinned pair (clean-fid and the
# image datasets need torchvision); pip takes them from the local wheel cache
# where one exists. Re-running it is cheap: installed packages are kept.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[workflow,diffusion,test]"
# the detection stage's own environment (OpenMMLab pins older versions):
# .venv-mmdet, compiled once (~11 min on 2 cores), skipped when present
if [ "${TOKENREDUCTION_SKIP_MMDET:-0}" != 1 ]; then
  bash envs/install_mmdet.sh
fi
echo "installed: $(.venv/bin/python -c 'import torch, timm, snakemake; print("torch", torch.__version__, "timm", timm.__version__, "snakemake", snakemake.__version__)')"
