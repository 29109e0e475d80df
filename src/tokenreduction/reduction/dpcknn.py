"""DPC-KNN: density-peaks clustering with k nearest neighbours (TCFormer).

Distances d_ij = ||x_i - x_j|| / sqrt(C). Local density rho_i =
exp(-mean of d_ij^2 over the ``k_neighbors`` nearest j, the token itself
included) plus a deterministic tie-breaker 1e-6 * i / N (the reference adds
uniform noise of that size). delta_i = distance to the nearest token of higher
density (the largest distance in the image for the densest token). The K =
``budget.target`` tokens of largest rho * delta are the centres (kept in their
original order); every token joins its nearest centre (ties to the lower
slot; centres join themselves). A merged token is the weighted mean of its
members with weights size_i * exp(s_i), s = Linear(C, 1) a learned score
(``equal_weight=True``: the sizes alone); sizes are summed.

The clustering itself runs in float32 without gradients; gradients reach the
tokens and the score through the weighted means.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import pool_by_assignment, sum_by_assignment
from .registry import register


def dpc_knn_cluster(x: torch.Tensor, k: int, k_neighbors: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, C), k clusters -> (centres (B, k) ascending indices, labels
    (B, N) centre slot of each token)."""
    B, N, C = x.shape
    xf = x.detach().float()
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


@register("dpcknn")
class DPCKNN(TokenReducer):
    kind = "merge"
    position = "pre"

    def __init__(self, dim: int, k_neighbors: int = 5, equal_weight: bool = False, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        if k_neighbors < 1:
            raise ValueError(f"k_neighbors must be >= 1, got {k_neighbors}")
        self.k_neighbors = int(k_neighbors)
        self.score = None if equal_weight else nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        k = min(budget.target, x.shape[1])
        _, labels = dpc_knn_cluster(x, k, self.k_neighbors)
        weight = size.float()
        if self.score is not None:
            s = self.score(x).squeeze(-1).float()
            # exp(s) up to a factor per cluster (which the mean cancels): no overflow
            top = torch.full((x.shape[0], k), float("-inf"), device=x.device)
            top = top.scatter_reduce(1, labels, s.detach(), reduce="amax")
            weight = weight * (s - top.gather(1, labels)).exp()
        pooled, _ = pool_by_assignment(x.float(), labels, k, weight)
        return ReductionOutput(x=pooled.to(x.dtype), size=sum_by_assignment(size, labels, k), assignment=labels)
