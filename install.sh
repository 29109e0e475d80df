#!/usr/bin/env bash
# Creates .venv with everything the library, the workflow and the tests need.
# torch 2.14.1 + torchvision 0.29.1 are the pinned pair (clean-fid and the
# image datasets need torchvision); pip takes them from the local wheel cache
# where one exists. Re-running it is cheap: installed packages are kept.
#
# The detection stage's environment (.venv-mmdet, older OpenMMLab pins) is not
# installed here: the workflow builds it as its job `detection_env`
# (envs/install_mmdet.sh, which can also be run by hand).
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
# the library declares ranges (pyproject.toml); the workflow's environment pins
# the diffusion stack it was run with, as envs/diffusion.yaml does
.venv/bin/python -m pip install --quiet -e ".[workflow,diffusion,test]" \
  "diffusers==0.42.1" "transformers==5.23.0" "tokenizers==0.23.3" "clean-fid==0.1.35"
echo "installed: $(.venv/bin/python -c 'import torch, timm, snakemake; print("torch", torch.__version__, "timm", timm.__version__, "snakemake", snakemake.__version__)')"
echo "install took $(( $(date +%s) - start )) s"
