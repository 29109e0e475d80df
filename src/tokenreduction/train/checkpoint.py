"""Files the trainer writes and the evaluator reads.

``final.pth`` holds ``{"model": state_dict, "spec": spec, "config": ...,
"metrics": ...}``; the *spec* is everything needed to rebuild the network
(timm name and keyword arguments, number of classes, reduction arguments), so
evaluation never needs the training config.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

SPEC_KEYS = (
    "model",
    "model_kwargs",
    "num_classes",
    "method",
    "keep_rate",
    "reduction_loc",
    "budget",
    "r",
    "r_schedule",
    "prop_attn",
    "method_kwargs",
    "clca",
    "tuning",
    "tuning_kwargs",
)


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """torch.save to a temporary name beside `path`, then rename over it, so
    an interrupted write never leaves a file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def build_model_from_spec(spec: dict[str, Any], **overrides: Any) -> nn.Module:
    """Rebuild the (untrained) network a spec describes; `overrides` go to
    timm (e.g. drop_path_rate)."""
    from .. import create_model

    missing = [k for k in ("model", "num_classes") if k not in spec]
    if missing:
        raise ValueError(f"model spec lacks {missing}")
    kwargs = dict(spec.get("model_kwargs") or {})
    kwargs.update(overrides)
    model = create_model(
        spec["model"],
        method=spec.get("method"),
        keep_rate=spec.get("keep_rate"),
        reduction_loc=spec.get("reduction_loc"),
        budget=spec.get("budget"),
        r=spec.get("r"),
        r_schedule=spec.get("r_schedule", "constant"),
        prop_attn=spec.get("prop_attn"),
        method_kwargs=spec.get("method_kwargs") or None,
        pretrained=False,
        num_classes=spec["num_classes"],
        clca=spec.get("clca") or None,
        **kwargs,
    )
    tuning = spec.get("tuning") or "full"
    if tuning != "full":
        from ..clca import apply_tuning

        model = apply_tuning(model, tuning, **(spec.get("tuning_kwargs") or {}))
    return model


def load_trained_model(path: Union[str, Path], map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode with the trained weights, spec) from a final.pth."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trained checkpoint not found: {path}")
    raw = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(raw, dict) or "spec" not in raw or "model" not in raw:
        raise ValueError(f"{path} is not a tokenreduction training result (needs keys 'model' and 'spec')")
    spec = raw["spec"]
    model = build_model_from_spec(spec)
    model.load_state_dict(raw["model"], strict=True)
    return model.eval(), spec
