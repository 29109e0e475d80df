"""Bipartite soft matching (ToMe), shared by ToMe and ToMeCIS.

Patch tokens alternate into sets A (even positions) and B (odd positions);
each A token proposes its most similar B token (cosine of the metric); the r
most similar proposals are merged into their B token. At most half the tokens
can go in one step: r is capped at N // 2.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import ReductionOutput
from .ops import pool_by_assignment, sum_by_assignment


def bipartite_assignment(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, int]:
    """metric (B, N, D), r -> (assignment (B, N) into M = N - r outputs, M).

    Output order: the unmerged A tokens in their original order, then the B
    tokens in theirs (each B token absorbs the A tokens merged into it)."""
    B, N, _ = metric.shape
    r = max(0, min(r, N // 2))
    device = metric.device
    if r == 0:  # nothing to merge: keep the order, so r=0 is the unreduced model
        return torch.arange(N, device=device).expand(B, N).clone(), N
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    n_a, n_b = a.shape[1], b.shape[1]
    best, best_b = (a @ b.transpose(1, 2)).max(dim=-1)  # (B, Na)
    order = best.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:].sort(dim=-1).values
    n_kept = n_a - r
    a_target = torch.empty(B, n_a, dtype=torch.long, device=device)
    a_target.scatter_(1, kept_a, torch.arange(n_kept, device=device).expand(B, n_kept))
    a_target.scatter_(1, merged_a, n_kept + best_b.gather(1, merged_a))
    assignment = torch.empty(B, N, dtype=torch.long, device=device)
    assignment[:, ::2] = a_target
    assignment[:, 1::2] = n_kept + torch.arange(n_b, device=device)
    return assignment, n_kept + n_b


def merge_tokens(
    x: torch.Tensor, size: torch.Tensor, assignment: torch.Tensor, num_out: int, weight: Optional[torch.Tensor] = None
) -> ReductionOutput:
    """Merge x (B, N, C) into num_out tokens given assignment (B, N): weighted
    mean with `weight` (B, N) (default: the sizes, ToMe's size-weighted
    average); sizes are summed."""
    pooled, _ = pool_by_assignment(x, assignment, num_out, size if weight is None else weight)
    return ReductionOutput(x=pooled, size=sum_by_assignment(size, assignment, num_out), assignment=assignment)
