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

from typing import Tuple

import torch
import torch.nn.functional as F

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .clustering import LINKAGES, agglomerative_labels
from .ops import labels_to_assignment
from .options import METHODS
from .registry import register


def cosine_distance(metric: torch.Tensor) -> torch.Tensor:
    """metric (B, N, D) -> (B, N, N) cosine distance 1 - cos, in float32
    (float64 metrics stay float64). ``1 - s`` is formed in place on the
    product s, as ``-s + 1`` (the same bits: negation is exact), sparing a
    second (B, N, N) tensor."""
    m = metric.double() if metric.dtype == torch.float64 else metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.bmm(m, m.transpose(1, 2)).neg_().add_(1.0)


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
    merged, total = pool_clusters(x, assignment, num_out, size)
    return ReductionOutput(x=merged, size=total.to(size.dtype), assignment=assignment)


def pool_clusters(
    x: torch.Tensor, assignment: torch.Tensor, num_out: int, weight: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted cluster means: x (B, N, C), assignment (B, N) in
    [0, num_out) with every slot used, weight (B, N) -> (pooled (B, M, C),
    total weight (B, M)), M = num_out; ``pooled[b, m] = sum_n w_n x_n /
    sum_n w_n`` over the n assigned to m. The same values as
    :func:`~tokenreduction.reduction.ops.pool_by_assignment`, members
    summed in index order, but as one ``embedding_bag`` over the tokens
    sorted by cluster: the weights are applied inside the sum and no
    (B, N, C) index or product is formed (about 3x faster forward and
    backward on the CPU at B=64, N=196, C=384; benchmarks/speed_table.py).
    Differentiable in x and weight."""
    B, N, C = x.shape
    w = weight.to(x.dtype)
    order = assignment.argsort(dim=1, stable=True)  # members of slot 0, then of slot 1, ... (index order)
    counts = torch.zeros(B, num_out, dtype=torch.long, device=x.device)
    counts.scatter_add_(1, assignment, torch.ones_like(assignment))
    counts = counts.view(-1)
    rows, step = _token_rows(x)
    image = torch.arange(B, device=x.device).unsqueeze(1)
    summed = F.embedding_bag((order + step * image).view(-1), rows, counts.cumsum(0) - counts, mode="sum",
                             per_sample_weights=w.gather(1, order).view(-1))
    total = torch.zeros(B, num_out, dtype=x.dtype, device=x.device).scatter_add_(1, assignment, w)
    return summed.view(B, num_out, C).div_(total.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)), total


def _token_rows(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """x (B, N, C) -> (rows (R, C), step): token (b, n) is row b * step + n.
    A view where x's tokens lie at one row stride (the patch tokens x[:, p:]
    of a model's (B, p + N, C) tokens: no copy of x), else a contiguous copy."""
    B, N, C = x.shape
    sb, sn, sc = x.stride()
    if B > 0 and sc == 1 and sn >= C > 0 and sb % sn == 0 and sb >= N * sn:
        step = sb // sn
        return x.as_strided(((B - 1) * step + N, C), (sn, 1)), step
    return x.reshape(B * N, C), N


@register("atc")
class ATC(TokenReducer):
    """Options: ``linkage`` in single / complete / average (default average)."""

    kind = "merge"
    position = "mid"
    needs = frozenset({"metric"})
    uses_sizes = True

    option_spec = METHODS["atc"]

    def __init__(self, dim: int, linkage: str = "average", **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.option_spec.check(linkage=linkage)
        self.linkage = linkage

    def extra_repr(self) -> str:
        return f"linkage={self.linkage!r}"

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        if feats.metric is None:
            raise ValueError("ATC needs the head-mean keys (BlockFeatures.metric)")
        return atc_merge(x, size, feats.metric, min(budget.target, x.shape[1]), self.linkage)


__all__ = ["ATC", "LINKAGES", "atc_merge", "cosine_distance", "pool_clusters"]
