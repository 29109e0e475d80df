"""DPC-KNN: density-peaks clustering with k nearest neighbours (TCFormer's CTM,
as JoakimHaurum/TokenReduction ``cluster_dpc_knn`` + ``merge_tokens``).

Distances d_ij = ||x_i - x_j|| / sqrt(C). Local density rho_i =
exp(-mean of d_ij^2 over the ``k_neighbors`` nearest j, the token itself
included) plus a deterministic tie-breaker 1e-6 * i / N (the reference adds
uniform noise of that size). delta_i = distance to the nearest token of higher
density (the largest distance in the image for the densest token). The K =
``budget.target`` tokens of largest rho * delta are the centres (kept in their
original order here; the reference orders them by score, which only renames
the output slots); every token joins its nearest centre (ties to the lower
slot; centres join themselves).

A merged token is the weighted mean of its members. Default (the reference):
weights exp(s_i), s = Linear(C, 1) a learned score, or equal weights with
``equal_weight=True``. ``size_weighted=True`` (off by default) multiplies the
weights by the token sizes, so a merged token of merged tokens is the mean
over the original patches. The reference divides by (sum of weights + 1e-6);
here the mean is exact (relative difference ~1e-6). Sizes are summed.

The clustering runs without gradients, in float64 for float64 input and in
float32 otherwise; gradients reach the tokens and the score through the means.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import pool_by_assignment, sum_by_assignment
from .options import METHODS
from .registry import register


def dpc_knn_cluster(x: torch.Tensor, k: int, k_neighbors: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, C), k clusters -> (centres (B, k) ascending indices, labels
    (B, N) centre slot of each token)."""
    B, N, C = x.shape
    xf = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    dist = torch.cdist(xf, xf) / math.sqrt(C)
    nn_dist = dist.topk(min(k_neighbors, N), dim=-1, largest=False).values
    density = (-(nn_dist**2).mean(dim=-1)).exp()
    density = density + 1e-6 * torch.arange(N, device=x.device, dtype=density.dtype) / N
    denser = density.unsqueeze(1) > density.unsqueeze(2)  # [b, i, j]: j denser than i
    dist_max = dist.flatten(1).max(dim=1).values.view(B, 1, 1)
    delta = torch.where(denser, dist, dist_max).min(dim=-1).values
    centres = (density * delta).topk(k, dim=-1).indices.sort(dim=-1).values
    to_centre = dist.gather(2, centres.unsqueeze(1).expand(B, N, k))  # (B, N, k)
    labels = to_centre.argmin(dim=-1)
    labels.scatter_(1, centres, torch.arange(k, device=x.device).expand(B, k))
    return centres, labels


def merge_by_log_weight(
    x: torch.Tensor, labels: torch.Tensor, k: int, log_weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x (B, N, C), labels (B, N) in [0, k), log_weight (B, N) or None (equal)
    -> (B, k, C): per cluster sum_i e^{l_i} x_i / sum_i e^{l_i}, computed with
    the cluster's largest l subtracted (no overflow; the mean is unchanged).
    Working precision float64 for float64 x, else float32."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = None
    if log_weight is not None:
        lw = log_weight.to(dt)
        top = torch.full((x.shape[0], k), float("-inf"), dtype=dt, device=x.device)
        top = top.scatter_reduce(1, labels, lw.detach(), reduce="amax")
        weight = (lw - top.gather(1, labels)).exp()
    pooled, _ = pool_by_assignment(x.to(dt), labels, k, weight)
    return pooled.to(x.dtype)


@register("dpcknn")
class DPCKNN(TokenReducer):
    kind = "merge"
    position = "pre"
    option_spec = METHODS["dpcknn"]

    def __init__(
        self, dim: int, k_neighbors: int = 5, equal_weight: bool = False, size_weighted: bool = False, **kwargs
    ) -> None:
        super().__init__(dim, **kwargs)
        self.option_spec.check(k_neighbors=k_neighbors, equal_weight=equal_weight, size_weighted=size_weighted)
        self.k_neighbors = int(k_neighbors)
        self.size_weighted = bool(size_weighted)
        self.score = None if equal_weight else nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        k = min(budget.target, x.shape[1])
        centres, labels = dpc_knn_cluster(x, k, self.k_neighbors)
        log_weight = None if self.score is None else self.score(x).squeeze(-1)
        if self.size_weighted:
            log_size = size.to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny).log()
            log_weight = log_size if log_weight is None else log_weight + log_size
        pooled = merge_by_log_weight(x, labels, k, log_weight)
        # aux "centres" (B, k): the input token behind each output token (the
        # study counted the centres as kept tokens; the evaluator records them)
        return ReductionOutput(x=pooled, size=sum_by_assignment(size, labels, k), assignment=labels,
                               aux={"centres": centres})
