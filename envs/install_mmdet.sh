#!/usr/bin/env bash
# Creates the second environment the detection rules run in (default
# .venv-mmdet; pass another path as $1 or MMDET_VENV). The OpenMMLab stack pins
# older versions than the rest of the project: mmdet 3.3.0 asserts mmcv<2.2.0,
# so mmcv 2.1.0 + mmengine 0.10.7, with mmcv's compiled ops built from source
# against torch 2.13.0 (CPU build; ~11 min on 2 cores). No torchvision/timm
# here: tokenreduction.detection imports only torch, mmcv, mmengine and mmdet.
# Idempotent: every step is skipped when what it installs is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${MMDET_VENV:-.venv-mmdet}}
PYTHON=${PYTHON:-python3}
start=$(date +%s)
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
has torch==2.13.0 || "${PIP[@]}" "torch==2.13.0"
# mmcv's setup.py imports pkg_resources (removed in setuptools 81).
has mmengine==0.10.7 ninja wheel || "${PIP[@]}" "setuptools>=77.0.3,<81" wheel ninja "numpy<2" "mmengine==0.10.7"
if ! has mmcv==2.1.0 || ! "$PY" -c "import mmcv.ops" 2>/dev/null; then
  # No cache: a cached wheel would be reused against another torch.
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
    "${PIP[@]}" --no-build-isolation --no-cache-dir "mmcv==2.1.0"
fi
has mmdet==3.3.0 pycocotools || "${PIP[@]}" "mmdet==3.3.0" pycocotools "numpy<2"
has tokenreduction || "${PIP[@]}" --no-deps -e .
"$PY" -c "import torch, mmcv, mmcv.ops, mmengine, mmdet, tokenreduction.detection; print('mmdet env:', 'torch', torch.__version__, 'mmcv', mmcv.__version__, 'mmengine', mmengine.__version__, 'mmdet', mmdet.__version__)"
echo "mmdet env install took $(( $(date +%s) - start )) s"
