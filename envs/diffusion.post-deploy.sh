#!/usr/bin/env bash
# Snakemake (--sdm conda) runs this inside the environment of envs/diffusion.yaml
# right after creating it, from a copy under .snakemake/conda/: the repository
# to install is named by TOKENREDUCTION_ROOT, which the workflow sets to its
# own base directory (workflow/rules/software.smk).
set -euo pipefail
root=${TOKENREDUCTION_ROOT:?"not set: run this through snakemake --sdm conda, or set it to the repository"}
if [ ! -f "$root/pyproject.toml" ]; then
  echo "TOKENREDUCTION_ROOT=$root is not the tokenreduction repository (no pyproject.toml)" >&2
  exit 1
fi
python -m pip install --quiet -e "$root"
