"""EViT: keep the attentive tokens; optionally fuse the inattentive ones.

Attentive = highest head-mean CLS attention (as Top-K). With ``fuse_token``
the dropped tokens are fused into one extra token appended last: the sum of
their features weighted by their CLS attention, *not* renormalised (as the
reference does). The fused token takes part in later stages as a normal token.
This is the reference rule (the only one); the kept tokens stay in their
original order (the reference orders them by descending score).
"""
from __future__ import annotations

import torch

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import batch_gather, keep_by_score
from .options import METHODS
from .registry import register
from .topk import cls_attention_score


def fuse_inattentive(x: torch.Tensor, size: torch.Tensor, score: torch.Tensor, dropped: torch.Tensor):
    """x (B, N, C), size (B, N), score (B, N), dropped (B, D) indices ->
    (fused token (B, 1, C) = sum_d score_d x_d, its size (B, 1))."""
    w = score.gather(1, dropped).to(x.dtype)
    fused = torch.einsum("bd,bdc->bc", w, batch_gather(x, dropped)).unsqueeze(1)
    return fused, size.gather(1, dropped).sum(1, keepdim=True)


@register("evit")
class EViT(TokenReducer):
    kind = "prune"
    position = "mid"
    needs = frozenset({"cls_attn"})
    needs_class_token = True
    option_spec = METHODS["evit"]

    def __init__(self, dim: int, fuse_token: bool = True, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.option_spec.check(fuse_token=fuse_token)
        self.fuse_token = fuse_token

    def output_count(self, num_tokens: int, budget) -> int:
        kept = min(budget.target, num_tokens)
        return kept + int(self.fuse_token and kept < num_tokens)

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        N = x.shape[1]
        k = min(budget.target, N)
        score = cls_attention_score(feats.cls_attn)
        out, dropped = keep_by_score(x, size, score, k)
        if not self.fuse_token or k == N:
            return out
        fused, fused_size = fuse_inattentive(x, size, score, dropped)
        out.assignment.scatter_(1, dropped, k)
        out.x = torch.cat([out.x, fused], dim=1)
        out.size = torch.cat([out.size, fused_size], dim=1)
        return out
