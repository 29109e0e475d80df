"""Files the trainer writes and the evaluator reads.

``final.pth`` holds ``{"model": state_dict, "spec": spec, "config": ...,
"metrics": ...}``; the *spec* is everything needed to rebuild the network
(the fields of :class:`~.spec.ModelSpec`: timm name and keyword arguments,
number of classes, reduction, CLCA, tuning) plus what the evaluator reads
(img_size, dataset, multilabel, eval_split), so evaluation never needs the
training config. A ``config`` is :meth:`TrainConfig.to_dict`'s flat mapping.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..safe_load import load_checkpoint_file
from .spec import ModelSpec

#: prefix of the temporary files :func:`atomic_save` writes beside their target
TMP_PREFIX = "."
TMP_MARK = ".tmp"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """torch.save to a temporary name beside `path`, flushed to disk (fsync),
    then renamed over `path` and the folder synced: a write interrupted at any
    moment (even by SIGKILL or a power cut) leaves either the old complete
    file or the new one under `path`, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: Union[str, Path]) -> list[Path]:
    """Delete the temporary files a killed process left in `folder` (names
    ``.<file>.tmp<pid>`` of :func:`atomic_save`); returns them."""
    removed = []
    for p in Path(folder).glob(f"{TMP_PREFIX}*{TMP_MARK}*"):
        if p.is_file() and p.name.rsplit(TMP_MARK, 1)[-1].isdigit():
            p.unlink()
            removed.append(p)
    return removed


def build_model_from_spec(spec: dict[str, Any], **overrides: Any) -> nn.Module:
    """Rebuild the (untrained) network a stored spec describes
    (:meth:`ModelSpec.from_dict` then :meth:`ModelSpec.build`); `overrides`
    go to timm (e.g. drop_path_rate)."""
    return ModelSpec.from_dict(spec).build(**overrides)


def load_trained_model(path: Union[str, Path], map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode with the trained weights, spec) from a final.pth."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trained checkpoint not found: {path}")
    raw = load_checkpoint_file(path, map_location=map_location)  # weights_only, allow-listed types
    if not isinstance(raw, dict) or "spec" not in raw or "model" not in raw:
        raise ValueError(f"{path} is not a tokenreduction training result (needs keys 'model' and 'spec')")
    spec = raw["spec"]
    model = build_model_from_spec(spec)
    model.load_state_dict(raw["model"], strict=True)
    return model.eval(), spec
