"""Batched tensor helpers shared by the methods (no per-image loops).

Shapes: B images, N input tokens, M output tokens, C channels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import ReductionOutput


def batch_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) gathered along dim 1 at index (B, K) -> (B, K, ...)."""
    expand = index.reshape(*index.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, expand.expand(*index.shape, *x.shape[2:]))


def keep_by_score(
    x: torch.Tensor, size: torch.Tensor, score: torch.Tensor, k: int
) -> Tuple[ReductionOutput, torch.Tensor]:
    """Keep the k tokens with the highest score, in their original order.

    x (B, N, C), size (B, N), score (B, N) -> ReductionOutput with M = k, and
    the (B, N - k) indices of the dropped tokens (in descending score order).
    """
    B, N, _ = x.shape
    order = score.argsort(dim=1, descending=True)
    keep_idx = order[:, :k].sort(dim=1).values
    dropped_idx = order[:, k:]
    assignment = torch.full((B, N), -1, dtype=torch.long, device=x.device)
    ranks = torch.arange(k, device=x.device).expand(B, k)
    assignment.scatter_(1, keep_idx, ranks)
    out = ReductionOutput(
        x=batch_gather(x, keep_idx),
        size=size.gather(1, keep_idx),
        assignment=assignment,
    )
    return out, dropped_idx


def pool_by_assignment(
    x: torch.Tensor,
    assignment: torch.Tensor,
    num_out: int,
    weight: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of the tokens that share an output index.

    x (B, N, C), assignment (B, N) in [0, num_out) (no -1), weight (B, N)
    (None = 1) -> (pooled (B, M, C), total weight (B, M)). Output slots that
    receive no token are zero with zero weight.
    """
    B, N, C = x.shape
    if weight is None:
        weight = torch.ones(B, N, dtype=x.dtype, device=x.device)
    weight = weight.to(x.dtype)
    total = torch.zeros(B, num_out, dtype=x.dtype, device=x.device)
    total.scatter_add_(1, assignment, weight)
    summed = torch.zeros(B, num_out, C, dtype=x.dtype, device=x.device)
    summed.scatter_add_(1, assignment.unsqueeze(-1).expand(B, N, C), x * weight.unsqueeze(-1))
    pooled = summed / total.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)
    return pooled, total


def sum_by_assignment(
    values: torch.Tensor, assignment: torch.Tensor, num_out: int
) -> torch.Tensor:
    """values (B, N) summed into (B, M) slots given by assignment (B, N)."""
    out = torch.zeros(values.shape[0], num_out, dtype=values.dtype, device=values.device)
    return out.scatter_add_(1, assignment, values)


def labels_to_assignment(
    labels: torch.Tensor, num_out: Optional[int] = None
) -> Tuple[torch.Tensor, int]:
    """Relabel cluster ids (B, N), each cluster named by any of its members'
    indices in [0, N), to ranks 0..M-1 ordered by that name; every image must
    have the same number of clusters M. Returns (assignment (B, N), M).
    A caller that knows M (a clustering with exactly M clusters) passes it:
    then nothing is read back from the tensors (no sync, no graph break)."""
    B, N = labels.shape
    present = torch.zeros(B, N, dtype=torch.long, device=labels.device)
    present.scatter_(1, labels, 1)
    if num_out is None:
        counts = present.sum(1)
        num_out = int(counts[0])
        if not bool((counts == num_out).all()):
            raise RuntimeError("cluster counts differ between images")
    rank = present.cumsum(1) - 1
    return rank.gather(1, labels), num_out


def soft_assignment_output(
    x_out: torch.Tensor, weights: torch.Tensor, size: torch.Tensor
) -> ReductionOutput:
    """Wrap a soft merge: weights (B, N, M), w_nm the coefficient of input n in
    output m (columns sum to one over N for SiT and PatchMerger, whose outputs
    are convex combinations; rows sum to one for Sinkhorn); the size of output
    m is the size mass it draws, sum_n size_n * w_nm / sum_m' w_nm', so sizes
    still sum to the input total. The assignment is the argmax over M."""
    share = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    out_size = torch.einsum("bn,bnm->bm", size.to(share.dtype), share)
    return ReductionOutput(
        x=x_out, size=out_size.to(size.dtype), assignment=weights.argmax(-1), weights=weights
    )
