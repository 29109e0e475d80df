"""Heuristic: keep the patches nearest the image centre (data independent).

On the model's h x w patch grid, patch (r, c) (raster index r * w + c) lies
at distance d((r, c), centre) with centre ((h - 1) / 2, (w - 1) / 2) under the
L1, L2 or L-infinity norm (``pattern``). All patches are ranked by (distance,
raster index), so ties go to the earlier patch. A stage keeps the
``budget.target`` best-ranked patches, in their original order.

Because every stage keeps a best-ranked prefix, the n tokens entering any
stage are the n best-ranked patches in raster order; the stage therefore needs
no state, only the grid, which ``patch_model`` passes as ``grid_size``
(``needs_grid``). Used on its own without ``grid_size``, the input of the call
is taken as the full, square grid.

Unlike the reference, which masks tokens in attention, the tokens are removed;
its shrinking-radius and non-contiguous options are not implemented.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

import torch

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import batch_gather
from .registry import register

PATTERNS = ("l1", "l2", "linf")


def centre_rank(grid_size: Sequence[int], pattern: str = "l2") -> torch.Tensor:
    """(h, w), pattern -> (h * w,) long rank of each raster-ordered patch by
    distance to the grid centre (0 = nearest), ties by raster index.

    Distances are computed exactly on doubled integer coordinates."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown heuristic pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    h, w = int(grid_size[0]), int(grid_size[1])
    dr = (2 * torch.arange(h) - (h - 1)).abs().view(h, 1).expand(h, w)
    dc = (2 * torch.arange(w) - (w - 1)).abs().view(1, w).expand(h, w)
    if pattern == "l1":
        dist = dr + dc
    elif pattern == "l2":
        dist = dr * dr + dc * dc
    else:
        dist = torch.maximum(dr, dc)
    n = h * w
    key = dist.reshape(-1) * n + torch.arange(n)
    order = key.argsort()
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    return rank


@lru_cache(maxsize=64)
def heuristic_keep_index(grid_size: tuple[int, int], num_tokens: int, k: int, pattern: str = "l2") -> torch.Tensor:
    """Indices (k,), ascending, among the `num_tokens` current tokens (the
    `num_tokens` best-ranked patches in raster order) of the k to keep.
    Cached (the result is a CPU tensor: do not modify it in place)."""
    rank = centre_rank(grid_size, pattern)
    if not 1 <= num_tokens <= rank.numel():
        raise ValueError(f"heuristic got {num_tokens} tokens for a grid of {rank.numel()} patches")
    current = rank[rank < num_tokens]  # ranks of the current tokens, raster order
    return (current < k).nonzero().flatten()


@register("heuristic")
class Heuristic(TokenReducer):
    kind = "prune"
    position = "pre"
    needs_grid = True

    def __init__(self, dim: int, pattern: str = "l2", grid_size: Optional[Sequence[int]] = None, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        if pattern not in PATTERNS:
            raise ValueError(f"unknown heuristic pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
        self.pattern = pattern
        self.grid_size = None if grid_size is None else (int(grid_size[0]), int(grid_size[1]))

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        B, N, _ = x.shape
        k = min(budget.target, N)
        grid = self.grid_size
        if grid is None:
            side = math.isqrt(N)
            if side * side != N:
                raise ValueError(f"heuristic without grid_size needs a square grid of tokens, got {N}")
            grid = (side, side)
        keep = heuristic_keep_index(tuple(grid), N, k, self.pattern).to(x.device)
        keep_idx = keep.expand(B, k)
        assignment = torch.full((B, N), -1, dtype=torch.long, device=x.device)
        assignment[:, keep] = torch.arange(k, device=x.device)
        return ReductionOutput(x=batch_gather(x, keep_idx), size=size.gather(1, keep_idx), assignment=assignment)
