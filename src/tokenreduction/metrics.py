"""Classification metrics shared by the trainer and the evaluator (top-1/top-5
accuracy, average precision and mAP as ASL computes them)."""
from __future__ import annotations

from typing import Sequence

import torch


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """logits (N, K), targets (N,) int -> [% of rows whose target is among the
    top-k scores] per k; k is capped at K."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, K) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no predictions to score")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == targets[:, None]
    return [100.0 * hit[:, : min(k, kmax)].any(1).float().mean().item() for k in ks]


def average_precision_per_class(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (N, K), targets (N, K) in {0, 1} -> (K,) average precision
    (mean over the positives of the precision at their rank, ranking by
    descending score, as ASL's ``average_precision``); NaN for a class with
    no positive."""
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores and targets must both be (N, K), got {tuple(scores.shape)} and {tuple(targets.shape)}")
    order = scores.double().argsort(dim=0, descending=True, stable=True)
    t = targets.double().gather(0, order) > 0.5
    hits = t.double().cumsum(0)
    rank = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64, device=scores.device)[:, None]
    precision = hits / rank
    npos = t.sum(0).double()
    ap = (precision * t).sum(0) / npos
    return torch.where(npos > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP x 100 over the classes that have at least one positive."""
    ap = average_precision_per_class(scores, targets)
    valid = ~ap.isnan()
    if not valid.any():
        raise ValueError("no class has a positive example: mAP is undefined")
    return 100.0 * ap[valid].mean().item()
