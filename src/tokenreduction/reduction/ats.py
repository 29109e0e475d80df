"""ATS (Adaptive Token Sampler): inverse-transform sampling of the patch tokens.

Significance of patch n: S_n = sum_h A_h[CLS, n] * ||v_{h,n}||_2 (CLS
attention of head h times the norm of that head's value vector), normalised
to sum 1 over the valid patches (padding, ``feats.mask`` False, scores 0).
With the cumulative sum F (F_{N-1} = 1), K = ``budget.target`` tokens are
picked deterministically at the evenly spaced quantiles

    q_i = (i + 0.5) / K,   i = 0 .. K-1,

token i being the first n with F_n >= q_i (inverse transform; a token with
zero significance is never picked). Tokens picked more than once are kept
once, so between 1 and K tokens survive per image. The output has K slots:
the survivors in their original order, then padding (zero features, size 0,
``mask`` False) that later blocks mask out of attention.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import batch_gather
from .registry import register


def ats_significance(
    cls_attn: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """cls_attn (B, H, N), value (B, H, N, Dh), mask (B, N) bool or None ->
    (B, N) float32 scores summing to 1 over the valid tokens (uniform over
    them if every score is zero)."""
    score = (cls_attn.float() * value.float().norm(dim=-1)).sum(dim=1)
    valid = torch.ones_like(score, dtype=torch.bool) if mask is None else mask
    score = score * valid
    total = score.sum(dim=1, keepdim=True)
    score = torch.where(total > 0, score, valid.to(score.dtype))
    return score / score.sum(dim=1, keepdim=True)


def ats_sample(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """score (B, N) >= 0 with positive row sums, k -> (indices (B, k) of the
    picked tokens, sorted, duplicates replaced by padding at the end,
    valid (B, k) bool). Padding indices are 0 and invalid."""
    B, N = score.shape
    cdf = score.cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]  # exactly 1 at the end
    q = (torch.arange(k, device=score.device, dtype=cdf.dtype) + 0.5) / k
    picked = torch.searchsorted(cdf.contiguous(), q.expand(B, k).contiguous(), right=False)
    picked = picked.clamp_max(N - 1)  # non-decreasing along k
    new = torch.ones_like(picked, dtype=torch.bool)
    new[:, 1:] = picked[:, 1:] != picked[:, :-1]
    slot = new.long().cumsum(dim=1) - 1  # slot of each unique pick
    slot = torch.where(new, slot, torch.full_like(slot, k))  # duplicates to a dump slot
    index = torch.zeros(B, k + 1, dtype=torch.long, device=score.device)
    index.scatter_(1, slot, picked)
    valid = torch.arange(k, device=score.device) < new.sum(dim=1, keepdim=True)
    return index[:, :k], valid


@register("ats")
class ATS(TokenReducer):
    kind = "prune"
    position = "mid"
    needs = frozenset({"cls_attn", "value"})
    needs_class_token = True

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        B, N, _ = x.shape
        k = min(budget.target, N)
        score = ats_significance(feats.cls_attn, feats.value, feats.mask)
        index, valid = ats_sample(score, k)
        out_x = batch_gather(x, index) * valid.unsqueeze(-1).to(x.dtype)
        out_size = size.gather(1, index) * valid.to(size.dtype)
        assignment = torch.full((B, N + 1), -1, dtype=torch.long, device=x.device)
        slots = torch.arange(k, device=x.device).expand(B, k)
        # padding slots write to the dump column N
        assignment.scatter_(1, torch.where(valid, index, torch.full_like(index, N)), slots)
        return ReductionOutput(x=out_x, size=out_size, assignment=assignment[:, :N], mask=valid)
