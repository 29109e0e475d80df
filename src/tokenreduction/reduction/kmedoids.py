"""K-Medoids: cluster the patch tokens around K of them, weighted by attention.

Weights w (B, N): the attention each token received in the previous block
(``attn_received``), or equal weights where there is none (block 0).
Initial medoids: the K tokens of largest weight; when an image's weights are
all equal, farthest-point initialisation instead (start from the token with
the smallest summed distance to all others, then repeatedly add the token
farthest from the chosen ones). Then ``cluster_iters`` rounds of

  1. assign every token to its nearest medoid (Euclidean; ties to the lower
     slot; a medoid always belongs to its own cluster),
  2. replace each medoid by the member j minimising sum_i w_i ||x_i - x_j||
     over the cluster's members i (ties to the lower index),

and a final assignment to the final medoids. The output tokens are the
medoid features themselves (no averaging), ordered by the initial medoids'
positions; sizes are the summed member sizes.
"""
from __future__ import annotations

import torch

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import batch_gather, sum_by_assignment
from .registry import register


def farthest_point_init(dist: torch.Tensor, k: int) -> torch.Tensor:
    """dist (B, N, N) -> (B, k) indices: the 1-medoid of all tokens, then
    greedily the token farthest from those chosen."""
    B, N, _ = dist.shape
    chosen = torch.empty(B, k, dtype=torch.long, device=dist.device)
    chosen[:, 0] = dist.sum(dim=2).argmin(dim=1)
    nearest = dist.gather(1, chosen[:, :1, None].expand(B, 1, N)).squeeze(1)  # (B, N)
    for i in range(1, k):
        chosen[:, i] = nearest.argmax(dim=1)
        d_new = dist.gather(1, chosen[:, i, None, None].expand(B, 1, N)).squeeze(1)
        nearest = torch.minimum(nearest, d_new)
    return chosen


def assign_to_medoids(dist: torch.Tensor, medoids: torch.Tensor) -> torch.Tensor:
    """dist (B, N, N), medoids (B, K) distinct indices -> (B, N) cluster slot
    of each token (nearest medoid, ties to the lower slot; medoids to their own)."""
    B, N, _ = dist.shape
    K = medoids.shape[1]
    to_medoid = dist.gather(2, medoids.unsqueeze(1).expand(B, N, K))  # (B, N, K)
    labels = to_medoid.argmin(dim=2)
    labels.scatter_(1, medoids, torch.arange(K, device=dist.device).expand(B, K))
    return labels


def update_medoids(dist: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """dist (B, N, N), labels (B, N) in [0, k), weight (B, N) -> (B, k) new
    medoids: per cluster the member j minimising sum_i w_i dist_ij over the
    members i (lowest index on ties). Every cluster must be non-empty."""
    B, N, _ = dist.shape
    same = labels.unsqueeze(2) == labels.unsqueeze(1)  # (B, N_i, N_j)
    cost = ((weight.unsqueeze(2) * dist) * same).sum(dim=1)  # (B, N_j)
    member = labels.unsqueeze(1) == torch.arange(k, device=dist.device).view(1, k, 1)  # (B, k, N)
    masked = torch.where(member, cost.unsqueeze(1), torch.full_like(cost.unsqueeze(1), float("inf")))
    return masked.argmin(dim=2)


def kmedoids_cluster(
    x: torch.Tensor, weight: torch.Tensor | None, k: int, iters: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, C), weight (B, N) or None (equal), k, iters ->
    (medoids (B, k) indices, labels (B, N) cluster slot). Computed in float32."""
    B, N, _ = x.shape
    xf = x.detach().float()
    dist = torch.cdist(xf, xf)
    if weight is None:
        weight = torch.ones(B, N, device=x.device)
    weight = weight.detach().float()
    top = weight.topk(k, dim=1).indices
    equal = (weight == weight[:, :1]).all(dim=1, keepdim=True)
    if bool(equal.any()):
        top = torch.where(equal, farthest_point_init(dist, k), top)
    medoids = top.sort(dim=1).values
    for _ in range(iters):
        labels = assign_to_medoids(dist, medoids)
        medoids = update_medoids(dist, labels, weight, k)
    return medoids, assign_to_medoids(dist, medoids)


@register("kmedoids")
class KMedoids(TokenReducer):
    kind = "merge"
    position = "pre"
    needs = frozenset({"attn_received"})

    def __init__(self, dim: int, cluster_iters: int = 3, equal_weight: bool = False, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        if cluster_iters < 0:
            raise ValueError(f"cluster_iters must be >= 0, got {cluster_iters}")
        self.cluster_iters = int(cluster_iters)
        self.equal_weight = bool(equal_weight)

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        k = min(budget.target, x.shape[1])
        weight = None if self.equal_weight else feats.attn_received
        medoids, labels = kmedoids_cluster(x, weight, k, self.cluster_iters)
        return ReductionOutput(
            x=batch_gather(x, medoids), size=sum_by_assignment(size, labels, k), assignment=labels
        )
