"""ATS (Adaptive Token Sampler): inverse-transform sampling of the patch tokens.

Significance of patch n: S_n = sum_h A_h[CLS, n] * ||v_{h,n}||_2 (CLS
attention of head h times the norm of that head's value vector).

Default rule, ``quantile_rule="reference"`` (JoakimHaurum/TokenReduction
``AdaptiveTokenSampling``): with K = ``budget.target + 1`` (the reference's
``sample_count = int(keep_rate^(s+1) * patches) + 1``),

1. normalise S / (sum S + 1e-6) and take the cumulative sum F; padded tokens
   (``feats.mask`` False) get F + 0.1;
2. the quantile steps are the float32 grid ``arange(1/(2K), (2K-1)/(2K), 1/K)``
   (usually K - 1 steps, K for some K through rounding, e.g. K = 3, 35, 60);
3. each step picks the token whose F is *nearest* (argmin |step - F|, computed
   with ``torch.cdist`` as the reference does, first index on ties);
4. the distinct picks, in ascending order, are kept.

``quantile_rule="midpoint"`` (the textbook inverse transform, off by
default): S normalised to sum 1 over the valid tokens, K = ``budget.target``
steps q_i = (i + 0.5) / K, token i the first n with F_n >= q_i.

Either way between 1 and the number of steps M tokens survive per image. The
output has M slots: the survivors in their original order, then padding (zero
features, size 0, ``mask`` False) that later blocks mask out of attention.
Computation keeps float64 inputs in float64 (float32 otherwise).
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import batch_gather
from .options import METHODS, QUANTILE_RULES
from .registry import register



def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def ats_sample_steps(sample_count: int, device=None) -> torch.Tensor:
    """The reference's quantile grid for K = `sample_count`: float32
    ``arange(1/(2K), (2K-1)/(2K), 2/(2K))``, shape (S,), S = K - 1 or K."""
    if sample_count < 1:
        raise ValueError(f"ATS needs a sample count >= 1, got {sample_count}")
    k = int(sample_count)
    return torch.arange(1 / (2 * k), (2 * k - 1) / (2 * k), 2 / (2 * k), dtype=torch.float32, device=device)


def ats_reference_significance(cls_attn: torch.Tensor, value: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """cls_attn (B, H, N), value (B, H, N, Dh) -> (B, N) significance
    normalised as the reference does, S / (sum S + eps) (float64 kept)."""
    dt = _work_dtype(value)
    score = (cls_attn.to(dt) * value.to(dt).norm(dim=-1)).sum(dim=1)
    return score / (score.sum(dim=-1, keepdim=True) + eps)


def ats_reference_pick(score: torch.Tensor, steps: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """score (B, N) normalised significance, steps (S,), mask (B, N) bool or
    None -> (B, S) index of the token whose CDF value is nearest each step
    (padded tokens' CDF + 0.1)."""
    cdf = score.cumsum(dim=1)
    if mask is not None:
        cdf = cdf + 0.1 * (~mask).to(cdf.dtype)
    B = cdf.shape[0]
    grid = steps.to(device=cdf.device, dtype=cdf.dtype).view(1, -1, 1).expand(B, -1, 1)
    return torch.cdist(grid, cdf.unsqueeze(2)).argmin(dim=-1)


def unique_sorted(picked: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """picked (B, S) indices -> (index (B, slots), valid (B, slots)): per row
    the distinct values ascending, then padding (index 0, invalid). `slots`
    must be at least the number of distinct values of every row."""
    B, S = picked.shape
    picked = picked.sort(dim=1).values
    new = torch.ones_like(picked, dtype=torch.bool)
    new[:, 1:] = picked[:, 1:] != picked[:, :-1]
    slot = new.long().cumsum(dim=1) - 1  # slot of each distinct pick
    slot = torch.where(new, slot, torch.full_like(slot, slots))  # duplicates to a dump slot
    index = torch.zeros(B, slots + 1, dtype=torch.long, device=picked.device)
    index.scatter_(1, slot, picked)
    valid = torch.arange(slots, device=picked.device) < new.sum(dim=1, keepdim=True)
    return index[:, :slots], valid


def ats_significance(
    cls_attn: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Midpoint rule's score: cls_attn (B, H, N), value (B, H, N, Dh), mask
    (B, N) bool or None -> (B, N) scores summing to 1 over the valid tokens
    (uniform over them if every score is zero); float64 kept."""
    dt = _work_dtype(value)
    score = (cls_attn.to(dt) * value.to(dt).norm(dim=-1)).sum(dim=1)
    valid = torch.ones_like(score, dtype=torch.bool) if mask is None else mask
    score = score * valid
    total = score.sum(dim=1, keepdim=True)
    score = torch.where(total > 0, score, valid.to(score.dtype))
    return score / score.sum(dim=1, keepdim=True)


def ats_sample(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoint rule: score (B, N) >= 0 with positive row sums, k -> (indices
    (B, k) of the picked tokens, sorted, duplicates replaced by padding at the
    end, valid (B, k) bool). Padding indices are 0 and invalid."""
    B, N = score.shape
    cdf = score.cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]  # exactly 1 at the end
    q = (torch.arange(k, device=score.device, dtype=cdf.dtype) + 0.5) / k
    picked = torch.searchsorted(cdf.contiguous(), q.expand(B, k).contiguous(), right=False)
    picked = picked.clamp_max(N - 1)
    return unique_sorted(picked, k)


@register("ats")
class ATS(TokenReducer):
    """``quantile_rule``: "reference" (default) or "midpoint" (see the module)."""

    kind = "prune"
    position = "mid"
    needs = frozenset({"cls_attn", "value"})
    needs_class_token = True
    option_spec = METHODS["ats"]

    def __init__(self, dim: int, quantile_rule: str = "reference", **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.option_spec.check(quantile_rule=quantile_rule)
        self.quantile_rule = quantile_rule

    def output_count(self, num_tokens: int, budget) -> int:
        if self.quantile_rule == "midpoint":
            return min(budget.target, num_tokens)
        return min(ats_sample_steps(budget.target + 1).numel(), num_tokens)

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        B, N, _ = x.shape
        if self.quantile_rule == "reference":
            steps = ats_sample_steps(budget.target + 1, device=x.device)
            score = ats_reference_significance(feats.cls_attn, feats.value)
            index, valid = unique_sorted(ats_reference_pick(score, steps, feats.mask), min(steps.numel(), N))
        else:
            index, valid = ats_sample(
                ats_significance(feats.cls_attn, feats.value, feats.mask), min(budget.target, N)
            )
        k = index.shape[1]
        out_x = batch_gather(x, index) * valid.unsqueeze(-1).to(x.dtype)
        out_size = size.gather(1, index) * valid.to(size.dtype)
        assignment = torch.full((B, N + 1), -1, dtype=torch.long, device=x.device)
        slots = torch.arange(k, device=x.device).expand(B, k)
        # padding slots write to the dump column N
        assignment.scatter_(1, torch.where(valid, index, torch.full_like(index, N)), slots)
        return ReductionOutput(x=out_x, size=out_size, assignment=assignment[:, :N], mask=valid)
