"""ATC: Agglomerative Token Clustering (Haurum et al., ECCV 2024).

After the attention of the block, the patch tokens are clustered bottom-up on
the cosine distance ``1 - cos(k_i, k_j)`` of their head-mean keys (ToMe's
metric) with single, complete or average linkage until ``budget.target``
clusters remain; each cluster becomes one token, the size-weighted mean of
its members, and sizes add up (proportional attention uses them). The class
token is never clustered. No learnable parameters.

The reference clusters each image with scikit-learn on the CPU; here
:func:`~tokenreduction.reduction.clustering.agglomerative_labels` gives the
same partition (SciPy's linkage cut at K clusters): on the CPU a compiled
kernel running SciPy's algorithms over the whole batch (SciPy itself where
no C compiler is found), batched tensor rounds on a GPU. Output tokens are ordered by
the smallest patch index of their cluster.

Budgets: under the keep-rate budgets the number of clusters is the stage
target. Under the ``r`` budget the target is ``N - r`` of the N patch tokens
present, so a block removes exactly r tokens, as ToMe does; the published
off-the-shelf ATC code counts the class token in N and so removes only r - 1.

``linkage`` is "single", "complete" or "average"; it defaults to "average"
(the published examples use each of the three; pass the one a study used).
"""
from __future__ import annotations

import torch

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .clustering import LINKAGES, agglomerative_labels, check_linkage
from .ops import labels_to_assignment, pool_by_assignment, sum_by_assignment
from .registry import register


def cosine_distance(metric: torch.Tensor) -> torch.Tensor:
    """metric (B, N, D) -> (B, N, N) cosine distance 1 - cos, in float32
    (float64 metrics stay float64)."""
    m = metric.double() if metric.dtype == torch.float64 else metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 - m @ m.transpose(1, 2)


def atc_merge(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, num_clusters: int, linkage: str = "average"
) -> ReductionOutput:
    """Cluster x (B, N, C) with sizes (B, N) by the cosine distance of metric
    (B, N, D) into M = min(num_clusters, N) tokens (B, M, C): size-weighted
    means, sizes summed, assignment (B, N) to the output index."""
    with torch.no_grad():
        labels = agglomerative_labels(cosine_distance(metric), num_clusters, linkage)
    # the clustering yields exactly min(K, N) clusters per image
    assignment, num_out = labels_to_assignment(labels, num_out=min(int(num_clusters), x.shape[1]))
    merged, _ = pool_by_assignment(x, assignment, num_out, weight=size)
    return ReductionOutput(x=merged, size=sum_by_assignment(size, assignment, num_out), assignment=assignment)


@register("atc")
class ATC(TokenReducer):
    """Options: ``linkage`` in single / complete / average (default average)."""

    kind = "merge"
    position = "mid"
    needs = frozenset({"metric"})
    uses_sizes = True

    def __init__(self, dim: int, linkage: str = "average", **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.linkage = check_linkage(linkage)

    def extra_repr(self) -> str:
        return f"linkage={self.linkage!r}"

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        if feats.metric is None:
            raise ValueError("ATC needs the head-mean keys (BlockFeatures.metric)")
        return atc_merge(x, size, feats.metric, min(budget.target, x.shape[1]), self.linkage)


__all__ = ["ATC", "LINKAGES", "atc_merge", "cosine_distance"]
