"""Top-K: keep the patch tokens the CLS token attends to most.

Score = CLS attention averaged over heads (EViT's attentiveness); the top
``budget.target`` are kept, as ``torch.topk`` in the reference (the only
rule). The kept tokens stay in their original order (the reference orders them
by descending score; the kept set is the same).
"""
from __future__ import annotations

import torch

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import keep_by_score
from .options import METHODS
from .registry import register


def cls_attention_score(cls_attn: torch.Tensor) -> torch.Tensor:
    """(B, H, N) CLS attention -> (B, N) head-mean score."""
    return cls_attn.mean(dim=1)


@register("topk")
class TopK(TokenReducer):
    kind = "prune"
    option_spec = METHODS["topk"]
    position = "mid"
    needs = frozenset({"cls_attn"})
    needs_class_token = True

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        k = min(budget.target, x.shape[1])
        out, _ = keep_by_score(x, size, cls_attention_score(feats.cls_attn), k)
        return out
