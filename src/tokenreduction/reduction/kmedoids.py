"""K-Medoids: cluster the patch tokens around K of them, weighted by attention.

Weights w (B, N): the attention each token received in the previous block
(``attn_received``: summed over heads and queries), or none (``equal_weight``,
or block 0 where there is no previous attention). Distances d are Euclidean.

Default rules = the reference (JoakimHaurum/TokenReduction ``k_medoids_fit``):

* ``init="reference"``: with weights, the K tokens of largest weight (slot
  order = descending weight). Without, a first medoid drawn at random (shared
  by the batch; from the module's seeded generator, ``seed``, or fixed by
  ``init_index``), then repeatedly the token whose *maximum* distance to the
  medoids chosen so far is largest (chosen medoids count as distance 0): the
  reference's farthest-point rule uses the max, not the usual min.
* ``medoid_update="reference"``: each of ``cluster_iters`` rounds assigns
  every token to its nearest medoid (first slot on ties), then the new medoid
  of slot j is the member i of cluster j minimising ``w_i * sum_j' d(i, j')``
  summed over ALL tokens j' (w = 1 without weights), lowest index on ties; a
  slot left without members takes token 0, as the reference's masked argmin
  does. The slots are updated one after another in the reference but from the
  same assignment, so here they are updated together.

Named options, off by default (the project's earlier rules):

* ``init="farthest"``: deterministic; without weights (or when all weights
  are equal) start from the 1-medoid of all tokens, then add the token
  *farthest from its nearest* chosen medoid (textbook max-min).
* ``medoid_update="textbook"``: the member j minimising ``sum_i w_i d(i, j)``
  over the cluster's members i; a medoid is forced into its own cluster.

After the last round the tokens are assigned once more. The output tokens
are the medoid features themselves (no averaging), one per slot; sizes are
the summed member sizes. float64 inputs are clustered in float64, others in
float32. The loops run over K (init) and the rounds only; there is no
data-dependent Python control flow.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import batch_gather, sum_by_assignment
from .options import KMEDOIDS_INITS as INITS
from .options import KMEDOIDS_UPDATES as UPDATES
from .options import METHODS
from .registry import register


def _rows(dist: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """dist (B, N, N), idx (B,) -> (B, N) = dist[b, idx[b], :]."""
    B, N, _ = dist.shape
    return dist.gather(1, idx.view(B, 1, 1).expand(B, 1, N)).squeeze(1)


def reference_init(dist: torch.Tensor, k: int, first: torch.Tensor) -> torch.Tensor:
    """dist (B, N, N), first (B,) long -> (B, k): `first`, then repeatedly
    the token whose maximum distance to the chosen medoids is largest (rows of
    chosen medoids count as 0)."""
    B, N, _ = dist.shape
    chosen = [first]
    farthest = _rows(dist, first)  # (B, N) max distance of each token to the chosen medoids
    is_chosen = torch.zeros(B, N, dtype=torch.bool, device=dist.device)
    is_chosen.scatter_(1, first.view(B, 1), True)
    for _ in range(1, k):
        nxt = farthest.masked_fill(is_chosen, 0).argmax(dim=1)
        chosen.append(nxt)
        is_chosen.scatter_(1, nxt.view(B, 1), True)
        farthest = torch.maximum(farthest, _rows(dist, nxt))
    return torch.stack(chosen, dim=1)


def farthest_point_init(dist: torch.Tensor, k: int) -> torch.Tensor:
    """``init="farthest"``: dist (B, N, N) -> (B, k) indices: the 1-medoid
    of all tokens, then greedily the token farthest from its nearest chosen one."""
    B, N, _ = dist.shape
    chosen = [dist.sum(dim=2).argmin(dim=1)]
    nearest = _rows(dist, chosen[0])
    for _ in range(1, k):
        nxt = nearest.argmax(dim=1)
        chosen.append(nxt)
        nearest = torch.minimum(nearest, _rows(dist, nxt))
    return torch.stack(chosen, dim=1)


def nearest_medoid(dist: torch.Tensor, medoids: torch.Tensor, force_own: bool = False) -> torch.Tensor:
    """dist (B, N, N), medoids (B, K) -> (B, N) slot of each token's nearest
    medoid (first slot on ties); `force_own` puts each medoid in its own slot."""
    B, N, _ = dist.shape
    K = medoids.shape[1]
    labels = dist.gather(2, medoids.unsqueeze(1).expand(B, N, K)).argmin(dim=2)
    if force_own:
        labels = labels.scatter(1, medoids, torch.arange(K, device=dist.device).expand(B, K))
    return labels


def assign_to_medoids(dist: torch.Tensor, medoids: torch.Tensor) -> torch.Tensor:
    """The textbook assignment: nearest medoid, each medoid in its own slot."""
    return nearest_medoid(dist, medoids, force_own=True)


def reference_update(dist: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """dist (B, N, N), labels (B, N) in [0, k), weight (B, N) -> (B, k): per
    slot the member i minimising w_i * sum over all j of d(i, j); non-members
    cost N * 1e6 as in the reference (so an empty slot gets token 0)."""
    B, N, _ = dist.shape
    total = (dist * weight.unsqueeze(2)).sum(dim=2)  # (B, N)
    member = labels.unsqueeze(1) == torch.arange(k, device=dist.device).view(1, k, 1)  # (B, k, N)
    masked = torch.where(member, total.unsqueeze(1), torch.full_like(total.unsqueeze(1), 1e6 * N))
    return masked.argmin(dim=2)


def update_medoids(dist: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """``medoid_update="textbook"``: dist (B, N, N), labels (B, N) in [0, k),
    weight (B, N) -> (B, k) new medoids: per cluster the member j minimising
    sum_i w_i dist_ij over the members i (lowest index on ties). Every cluster
    must be non-empty."""
    same = labels.unsqueeze(2) == labels.unsqueeze(1)  # (B, N_i, N_j)
    cost = ((weight.unsqueeze(2) * dist) * same).sum(dim=1)  # (B, N_j)
    member = labels.unsqueeze(1) == torch.arange(k, device=dist.device).view(1, k, 1)  # (B, k, N)
    masked = torch.where(member, cost.unsqueeze(1), torch.full_like(cost.unsqueeze(1), float("inf")))
    return masked.argmin(dim=2)


def kmedoids_cluster(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    k: int,
    iters: int = 3,
    init: str = "reference",
    medoid_update: str = "reference",
    first: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, C), weight (B, N) or None, k, iters -> (medoids (B, k)
    indices in slot order, labels (B, N) slot of each token).

    `first` (B,) long: the first medoid of the reference init without
    weights (required then). float64 stays float64, other dtypes run in float32."""
    if init not in INITS:
        raise ValueError(f"unknown K-Medoids init {init!r}; use one of {', '.join(INITS)}")
    if medoid_update not in UPDATES:
        raise ValueError(f"unknown K-Medoids medoid_update {medoid_update!r}; use one of {', '.join(UPDATES)}")
    B, N, _ = x.shape
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.detach().to(dt)
    dist = torch.cdist(xf, xf)
    w = None if weight is None else weight.detach().to(dt)
    if init == "reference":
        if w is not None:
            medoids = w.topk(k, dim=1).indices
        else:
            if first is None:
                raise ValueError("the reference K-Medoids init without weights needs the first medoid")
            medoids = reference_init(dist, k, first.to(device=x.device, dtype=torch.long).expand(B))
    else:
        ww = torch.ones(B, N, dtype=dt, device=x.device) if w is None else w
        top = ww.topk(k, dim=1).indices
        equal = (ww == ww[:, :1]).all(dim=1, keepdim=True)
        medoids = torch.where(equal, farthest_point_init(dist, k), top).sort(dim=1).values
    if w is None:
        w = torch.ones(B, N, dtype=dt, device=x.device)
    textbook = medoid_update == "textbook"
    for _ in range(iters):
        labels = nearest_medoid(dist, medoids, force_own=textbook)
        medoids = update_medoids(dist, labels, w, k) if textbook else reference_update(dist, labels, w, k)
    return medoids, nearest_medoid(dist, medoids, force_own=textbook)


@register("kmedoids")
class KMedoids(TokenReducer):
    """Options: ``cluster_iters`` (3), ``equal_weight`` (False), ``init``
    ("reference" | "farthest"), ``medoid_update`` ("reference" | "textbook"),
    ``seed`` (of the generator drawing the random first medoid), ``init_index``
    (fix the first medoid instead of drawing it)."""

    kind = "merge"
    position = "pre"
    needs = frozenset({"attn_received"})
    option_spec = METHODS["kmedoids"]

    def __init__(
        self,
        dim: int,
        cluster_iters: int = 3,
        equal_weight: bool = False,
        init: str = "reference",
        medoid_update: str = "reference",
        seed: int = 0,
        init_index: Optional[int] = None,
        **kwargs,
    ) -> None:
        super().__init__(dim, **kwargs)
        self.option_spec.check(cluster_iters=cluster_iters, equal_weight=equal_weight, init=init,
                               medoid_update=medoid_update, seed=seed, init_index=init_index)
        self.cluster_iters = int(cluster_iters)
        self.equal_weight = bool(equal_weight)
        self.init = init
        self.medoid_update = medoid_update
        self.init_index = None if init_index is None else int(init_index)
        self.generator = torch.Generator().manual_seed(int(seed))

    def first_medoid(self, num_tokens: int, device) -> torch.Tensor:
        """(1,) long: ``init_index`` if set, else a draw from the seeded
        generator (one per call, shared by the batch, as the reference's)."""
        if self.init_index is not None:
            if self.init_index >= num_tokens:
                raise ValueError(f"init_index {self.init_index} is out of range for {num_tokens} tokens")
            return torch.full((1,), self.init_index, dtype=torch.long, device=device)
        return torch.randint(num_tokens, (1,), generator=self.generator).to(device)

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        N = x.shape[1]
        k = min(budget.target, N)
        weight = None if self.equal_weight else feats.attn_received
        first = None
        if weight is None and self.init == "reference":
            first = self.first_medoid(N, x.device)
        medoids, labels = kmedoids_cluster(
            x, weight, k, self.cluster_iters, self.init, self.medoid_update, first
        )
        # aux "centres" (B, k): the medoid behind each output token (the study
        # counted the medoids as kept tokens; the evaluator records them)
        return ReductionOutput(
            x=batch_gather(x, medoids), size=sum_by_assignment(size, labels, k), assignment=labels,
            aux={"centres": medoids},
        )
