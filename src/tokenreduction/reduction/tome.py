"""ToMe: bipartite soft matching on the head-mean keys, size-weighted merges.

Under the geometric budget the reference removes ``r = nominal[s-1] -
nominal[s]`` at each stage and cannot remove more than half: the model records
the count actually kept.
"""
from __future__ import annotations

import torch

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .bipartite import bipartite_assignment, merge_tokens
from .registry import register


@register("tome")
class ToMe(TokenReducer):
    kind = "merge"
    position = "mid"
    needs = frozenset({"metric"})
    uses_sizes = True

    def output_count(self, num_tokens: int, budget) -> int:
        return num_tokens - min(budget.r, num_tokens // 2)

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        assignment, num_out = bipartite_assignment(feats.metric, budget.r, feats.num_prefix)
        return merge_tokens(x, size, assignment, num_out)
