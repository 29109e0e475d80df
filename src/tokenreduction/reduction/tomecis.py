"""ToMeCIS: ToMe's matching, merges weighted by the class importance score.

Score of token j: S_j = (CLS attention to j, averaged over heads) x
||value of j averaged over heads||_2 (not normalised). A merged token is
sum_j S_j x_j / sum_j S_j (earlier sizes do not weight it, as in the
reference); sizes are still summed, for proportional attention. The matching
is ToMe's reference split (:mod:`~tokenreduction.reduction.bipartite`), the
only rule.
"""
from __future__ import annotations

import torch

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .bipartite import bipartite_assignment, merge_tokens
from .options import METHODS
from .registry import register


def class_importance_score(cls_attn: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """cls_attn (B, H, N), value (B, H, N, Dh) -> (B, N)."""
    return cls_attn.mean(dim=1) * value.mean(dim=1).norm(dim=-1)


@register("tomecis")
class ToMeCIS(TokenReducer):
    kind = "merge"
    option_spec = METHODS["tomecis"]
    position = "mid"
    needs = frozenset({"metric", "cls_attn", "value"})
    needs_class_token = True
    uses_sizes = True

    def output_count(self, num_tokens: int, budget) -> int:
        return num_tokens - min(budget.r, num_tokens // 2)

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        assignment, num_out = bipartite_assignment(feats.metric, budget.r, feats.num_prefix)
        score = class_importance_score(feats.cls_attn, feats.value)
        return merge_tokens(x, size, assignment, num_out, weight=score)
