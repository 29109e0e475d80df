"""Array conversion shared by the analysis modules (numpy in, numpy out)."""
from __future__ import annotations

import numpy as np


def as_numpy(x, dtype=None) -> np.ndarray:
    """numpy array of ``x`` (numpy, torch tensor of any dtype incl. bfloat16,
    or a nested sequence), optionally cast to ``dtype``."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr
