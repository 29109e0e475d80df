"""Batched agglomerative (hierarchical) clustering on precomputed distances.

ATC (Haurum et al., ECCV 2024) clusters the patch tokens of every image with
single, complete or average linkage until K clusters remain. The reference
runs scikit-learn once per image on the CPU; here all images of a batch are
clustered at once in tensor code, on the device the distances live on.

Algorithm (the greedy scheme with a nearest-neighbour list): every row keeps
its nearest active neighbour and that distance, (B, N) each; only the first
search is over N x N. A step takes, per image, the row with the smallest
nearest-neighbour distance, which with its neighbour is the closest pair of
clusters, merges the pair (i < j) into i, writes row and column i by the
Lance-Williams formula of the linkage (single: min, complete: max, average:
size-weighted mean) and removes column j. Only rows whose nearest neighbour
was i or j can change it: under single linkage their distance to the merged
cluster equals their old minimum, so they just point to i; under complete and
average linkage it can only grow, so those rows (and row i) are recomputed,
gathered across the batch with ``nonzero``, O(R x N) for R rows. Every other
row keeps its neighbour, since d(r, i u j) >= min(d(r, i), d(r, j)) for these
three linkages. Each step merges the globally closest pair, as SciPy's
``linkage`` does, so cutting after N - K merges gives the partition of
``fcluster(linkage(d, method), K, criterion="maxclust")`` when the merge
distances are distinct (the three linkages are monotone). With exact ties the
result is still a valid partition into K clusters. Membership is a (B, N)
parent array (j points to i when j merges into i), resolved at the end by
pointer jumping.

Shapes: B images, N points (tokens).
"""
from __future__ import annotations

import torch

LINKAGES = ("single", "complete", "average")


def check_linkage(linkage: str) -> str:
    """Return `linkage` if known, else raise a ValueError listing the known ones."""
    if linkage not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage!r}; use one of {', '.join(LINKAGES)}")
    return linkage


def agglomerative_labels(distance: torch.Tensor, num_clusters: int, linkage: str = "average") -> torch.Tensor:
    """Cluster each image's points bottom-up until `num_clusters` remain.

    distance:     (B, N, N) symmetric pairwise distances (the diagonal is
                  ignored); any float dtype, computed in float32 (float64
                  stays float64).
    num_clusters: K in [1, N]; K >= N leaves every point on its own.
    linkage:      "single", "complete" or "average".
    Returns (B, N) long labels: each point's cluster, named by the smallest
    point index in that cluster (so ``labels[b, n] <= n``). Exactly K distinct
    labels per image. The labels carry no gradient.
    """
    check_linkage(linkage)
    if distance.dim() != 3 or distance.shape[1] != distance.shape[2]:
        raise ValueError(f"distance must have shape (B, N, N), got {tuple(distance.shape)}")
    if int(num_clusters) < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    B, N, _ = distance.shape
    device = distance.device
    steps = N - min(int(num_clusters), N)
    if steps == 0 or B == 0:
        return torch.arange(N, device=device).expand(B, N).contiguous()

    dtype = torch.float64 if distance.dtype == torch.float64 else torch.float32
    inf = float("inf")
    D = distance.detach().to(dtype=dtype, copy=True).contiguous()
    D.diagonal(dim1=1, dim2=2).fill_(inf)
    size = torch.ones(B, N, dtype=dtype, device=device)
    nn_dist, nn_idx = D.min(dim=2)  # (B, N) nearest neighbour of every row
    parent = torch.arange(N, device=device).expand(B, N).contiguous()
    # The loop runs many small ops (B x N elements): on the CPU intra-op
    # threads only add start-up latency (and stall badly when the cores are
    # shared), so it runs on one thread and restores the setting after.
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
    try:
        _merge_steps(D, steps, linkage, size, nn_dist, nn_idx, parent)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    # every merge points j to i < j: follow the pointers to the cluster root,
    # the smallest index of the cluster
    labels = parent
    while True:
        nxt = labels.gather(1, labels)
        if torch.equal(nxt, labels):
            return labels
        labels = nxt


def _merge_steps(
    D: torch.Tensor,
    steps: int,
    linkage: str,
    size: torch.Tensor,
    nn_dist: torch.Tensor,
    nn_idx: torch.Tensor,
    parent: torch.Tensor,
) -> None:
    """Run `steps` greedy merges: D (B, N, N) distances with inf on the
    diagonal, size / nn_dist / nn_idx (B, N) its cluster sizes and nearest
    neighbours (all scratch, overwritten); parent (B, N) receives j -> i for
    every merge of j into i."""
    B, N, _ = D.shape
    device, dtype = D.device, D.dtype
    inf = float("inf")
    flat = D.view(B * N, N)  # row r of image b is flat row b * N + r
    cells = D.view(-1)
    row_base = (torch.arange(B, device=device) * N)[:, None]  # (B, 1)
    col_base = (row_base * N + torch.arange(N, device=device) * N)[:, None, :]  # (B, 1, N): flat id of D[b, r, 0]
    inf_cols = torch.full((B, N), inf, dtype=dtype, device=device)
    keep_i = torch.tensor([True, False], device=device).expand(B, 2)
    for _ in range(steps):
        # the closest pair of each image: the row with the smallest NN distance
        a = nn_dist.argmin(dim=1, keepdim=True)  # (B, 1)
        ij = torch.cat([a, nn_idx.gather(1, a)], dim=1).sort(dim=1).values  # (B, 2): i < j
        i, j = ij[:, :1], ij[:, 1:]
        rows = flat.index_select(0, (row_base + ij).view(-1)).view(B, 2, N)  # rows i and j
        if linkage == "single":
            new = rows.amin(dim=1)
        elif linkage == "complete":
            new = rows.amax(dim=1)
        else:
            w = size.gather(1, ij)  # (B, 2) cluster sizes
            si, sj = w[:, :1], w[:, 1:]
            new = torch.addcmul(rows[:, 0] * si, rows[:, 1], sj).div_(si + sj)
            size.scatter_add_(1, i, sj)
        new.scatter_(1, ij, inf)  # no self-distance; j is gone
        # row i and column i take the merged distances, column j is removed
        # (row j is never read again: no row points to j and j is never picked)
        flat.index_copy_(0, (row_base + i).view(-1), new)
        cells.scatter_(0, (col_base + ij[:, :, None]).view(-1), torch.stack([new, inf_cols], 1).view(-1))
        parent.scatter_(1, j, i)

        # nearest neighbours: only rows that pointed to i or j can change
        stale = (nn_idx == i).logical_or_(nn_idx == j)  # (B, N)
        if linkage == "single":
            # min(d(r, i), d(r, j)) is r's old NN distance: r now points to i
            nn_idx = torch.where(stale, i, nn_idx)
            best, arg = new.min(dim=1, keepdim=True)
            nn_dist.scatter_(1, ij, torch.cat([best, inf_cols[:, :1]], dim=1))
            nn_idx.scatter_(1, ij, torch.cat([arg, torch.full_like(arg, -1)], dim=1))
        else:
            # the distance to the merged cluster can only grow: recompute those
            # rows and row i, gathered over the batch (R rows, O(R x N))
            stale.scatter_(1, ij, keep_i)
            flagged = stale.view(-1).nonzero().squeeze(1)  # flat row ids b * N + r
            best, arg = flat.index_select(0, flagged).min(dim=1)
            nn_dist.view(-1).index_copy_(0, flagged, best)
            nn_idx.view(-1).index_copy_(0, flagged, arg)
            nn_dist.scatter_(1, j, inf)
            nn_idx.scatter_(1, j, -1)
