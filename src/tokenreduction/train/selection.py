"""Which weights become ``final.pth``: the study's rule and two that do not
select on the validation set.

``best`` (the study's, the default)
    every epoch both the plain and the EMA model are validated; the best of
    all of them so far is kept (plain checked first, then EMA; a candidate
    must be strictly better than the best so far, as the reference's
    ``best_checkpoint.pth`` with its ``ema_best`` flag).
``last``
    the plain model at the end of training.
``last_ema``
    the EMA model at the end of training (needs ``model_ema``).
"""
from __future__ import annotations

from typing import Any, Optional

from .config import SELECTIONS


def update_best(
    best: dict[str, Any], epoch: int, step: int, val: dict[str, float], val_ema: Optional[dict[str, float]]
) -> tuple[dict[str, Any], Optional[str]]:
    """One epoch's validations against the best so far.

    best: ``{}`` or ``{"metric", "epoch", "step", "weights", "val"}``;
    val / val_ema: the validation dicts of the plain and EMA model (``metric``
    is the headline number). Returns the new best and which weights
    ("model" or "ema") became the best at this epoch (None if neither)."""
    improved = None
    for which, v in (("model", val), ("ema", val_ema)):
        if v is None:
            continue
        if best.get("metric") is None or v["metric"] > best["metric"]:
            best = {"metric": float(v["metric"]), "epoch": int(epoch), "step": int(step), "weights": which, "val": dict(v)}
            improved = which
    return best, improved


def selected(rule: str, best: dict[str, Any], last_val: dict[str, Any]) -> tuple[str, Optional[dict[str, float]], Optional[int]]:
    """(weights "model" or "ema", their validation metrics, their epoch) under `rule`."""
    if rule not in SELECTIONS:
        raise ValueError(f"select_weights must be one of {', '.join(SELECTIONS)}, got {rule!r}")
    if rule == "best":
        return best.get("weights", "model"), best.get("val"), best.get("epoch")
    which = "ema" if rule == "last_ema" else "model"
    return which, last_val.get(which), last_val.get("epoch")
