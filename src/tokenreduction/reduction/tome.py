"""ToMe: bipartite soft matching on the head-mean keys, size-weighted merges.

The matching is the reference's (facebookresearch/ToMe, the only rule): sets A
and B alternate by position over the whole sequence with the prefix tokens
included and protected (see :mod:`~tokenreduction.reduction.bipartite`), so
the same tokens merge as in ``tome.patch.timm``; only the output order differs.

Under the geometric budget the reference removes ``r = nominal[s-1] -
nominal[s]`` at each stage and cannot remove more than half: the model records
the count actually kept.
"""
from __future__ import annotations

import torch

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .bipartite import bipartite_assignment, merge_tokens
from .options import METHODS
from .registry import register


@register("tome")
class ToMe(TokenReducer):
    kind = "merge"
    option_spec = METHODS["tome"]
    position = "mid"
    needs = frozenset({"metric"})
    uses_sizes = True

    def output_count(self, num_tokens: int, budget) -> int:
        return num_tokens - min(budget.r, num_tokens // 2)

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        assignment, num_out = bipartite_assignment(feats.metric, budget.r, feats.num_prefix)
        return merge_tokens(x, size, assignment, num_out)
