"""Bipartite soft matching (ToMe), shared by ToMe and ToMeCIS.

Default = the reference (facebookresearch/ToMe ``bipartite_soft_matching``):
the *whole* sequence, prefix tokens included, is split by position into set A
(even positions 0, 2, 4, ...) and set B (odd positions); each A token proposes
its most similar B token (cosine of the metric) and the r proposals with the
highest similarity are merged into their B token (several A tokens may go to
one B token). The prefix tokens are protected: the CLS (position 0, in A)
never merges and a prefix token in B (a distillation token at position 1)
receives nothing. Methods here see only the patch tokens, so the split is
taken over the patches with the parity the prefix gives them: with an odd
number of prefix tokens (a CLS; CLS + registers) the A patches are the odd
patch indices, with an even number (CLS + distillation, or none) the even
ones. r is capped at N // 2 for N patch tokens, which is the reference's
``(T - protected) // 2``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import ReductionOutput
from .ops import pool_by_assignment, sum_by_assignment


def bipartite_assignment(metric: torch.Tensor, r: int, num_prefix: int = 1) -> tuple[torch.Tensor, int]:
    """metric (B, N, D) of the N patch tokens, r, num_prefix (prefix tokens
    before the patches in the block's sequence) -> (assignment (B, N) into
    M = N - min(r, N // 2) outputs, M).

    Patch i is in set A when its position ``num_prefix + i`` in the whole
    sequence is even. Output order: the unmerged A tokens in their original
    order, then the B tokens in theirs (each B token absorbs the A tokens
    merged into it). The partition equals the reference's; the order of the
    outputs is not meaningful."""
    if num_prefix < 0:
        raise ValueError(f"num_prefix must be >= 0, got {num_prefix}")
    B, N, _ = metric.shape
    r = max(0, min(int(r), N // 2))
    device = metric.device
    if r == 0:  # nothing to merge: keep the order, so r=0 is the unreduced model
        return torch.arange(N, device=device).expand(B, N).clone(), N
    first_a = num_prefix % 2  # patch index of the first A patch
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, first_a::2], metric[:, 1 - first_a::2]
    n_a, n_b = a.shape[1], b.shape[1]
    best, best_b = (a @ b.transpose(1, 2)).max(dim=-1)  # (B, Na)
    order = best.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:].sort(dim=-1).values
    n_kept = n_a - r
    a_target = torch.empty(B, n_a, dtype=torch.long, device=device)
    a_target.scatter_(1, kept_a, torch.arange(n_kept, device=device).expand(B, n_kept))
    a_target.scatter_(1, merged_a, n_kept + best_b.gather(1, merged_a))
    assignment = torch.empty(B, N, dtype=torch.long, device=device)
    assignment[:, first_a::2] = a_target
    assignment[:, 1 - first_a::2] = n_kept + torch.arange(n_b, device=device)
    return assignment, n_kept + n_b


def merge_tokens(
    x: torch.Tensor, size: torch.Tensor, assignment: torch.Tensor, num_out: int, weight: Optional[torch.Tensor] = None
) -> ReductionOutput:
    """Merge x (B, N, C) into num_out tokens given assignment (B, N): weighted
    mean with `weight` (B, N) (default: the sizes, ToMe's size-weighted
    average); sizes are summed."""
    pooled, _ = pool_by_assignment(x, assignment, num_out, size if weight is None else weight)
    return ReductionOutput(x=pooled, size=sum_by_assignment(size, assignment, num_out), assignment=assignment)
