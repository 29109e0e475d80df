"""Batched agglomerative (hierarchical) clustering on precomputed distances.

ATC (Haurum et al., ECCV 2024) clusters the patch tokens of every image with
single, complete or average linkage until K clusters remain. The reference
runs scikit-learn once per image on the CPU; here all images of a batch are
clustered at once in tensor code, on the device the distances live on.

Algorithm (the "generic" agglomerative scheme with a nearest-neighbour list):
every row keeps its nearest active neighbour and that distance. A merge step
takes, per image, the row with the smallest nearest-neighbour distance, which
with its neighbour is the closest pair of clusters; it merges the pair (i < j)
into i, updating row and column i by the Lance-Williams formula of the
linkage (single: min, complete: max, average: size-weighted mean) and
removing j. Only rows whose nearest neighbour was i or j can change: under
single linkage their distance to the merged cluster equals their old minimum,
so they just point to i; under complete and average linkage the distance to
the merged cluster can only grow, so those rows (and row i) are recomputed,
gathered across the batch, O(R x N) for R such rows. No N x N search is done
after the first one. Each step merges the globally closest pair, as SciPy's
``linkage`` does, so cutting after N - K merges gives the partition of
``fcluster(linkage(d, method), K, criterion="maxclust")`` when the merge
distances are distinct (these three linkages are monotone).

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
    labels = torch.arange(N, device=device).expand(B, N).contiguous()
    steps = N - min(int(num_clusters), N)
    if steps == 0 or B == 0:
        return labels

    dtype = torch.float64 if distance.dtype == torch.float64 else torch.float32
    inf = float("inf")
    D = distance.detach().to(dtype).clone()
    D.diagonal(dim1=1, dim2=2).fill_(inf)
    flat = D.view(B * N, N)  # row b * N + r of the batch
    row_base = torch.arange(B, device=device) * N  # (B,)
    col_offsets = torch.arange(N, device=device) * N  # (N,) offsets of column entries
    size = torch.ones(B, N, dtype=dtype, device=device)
    nn_dist, nn_idx = D.min(dim=2)  # (B, N)
    batch = torch.arange(B, device=device)
    single = linkage == "single"

    for _ in range(steps):
        # the closest pair of each image: the row with the smallest NN distance
        a = nn_dist.argmin(dim=1)  # (B,)
        b = nn_idx.gather(1, a[:, None]).squeeze(1)
        i, j = torch.minimum(a, b), torch.maximum(a, b)
        ri, rj = row_base + i, row_base + j  # flat row ids
        di, dj = flat.index_select(0, ri), flat.index_select(0, rj)  # (B, N)
        if single:
            new = torch.minimum(di, dj)
        elif linkage == "complete":
            new = torch.maximum(di, dj)
        else:
            si = size.gather(1, i[:, None])
            sj = size.gather(1, j[:, None])
            new = (si * di + sj * dj) / (si + sj)
        ij = torch.stack([i, j], dim=1)  # (B, 2)
        new.scatter_(1, ij, inf)  # no self-distance, j is gone
        # row i and column i get the merged distances; row and column j go
        flat.index_copy_(0, ri, new)
        flat.index_fill_(0, rj, inf)
        col_i = row_base[:, None] * N + col_offsets + i[:, None]  # flat ids of D[b, :, i]
        col_j = row_base[:, None] * N + col_offsets + j[:, None]
        D.view(-1).index_copy_(0, col_i.reshape(-1), new.reshape(-1))
        D.view(-1).index_fill_(0, col_j.reshape(-1), inf)
        size.scatter_add_(1, i[:, None], size.gather(1, j[:, None]))
        size.scatter_(1, j[:, None], 0.0)
        labels = torch.where(labels == j[:, None], i[:, None], labels)

        # nearest-neighbour bookkeeping
        stale = ((nn_idx == i[:, None]) | (nn_idx == j[:, None])) & (nn_dist < inf)  # active rows only
        if single:
            # min(d(r, i), d(r, j)) is r's old NN distance: r now points to i
            nn_idx = torch.where(stale, i[:, None], nn_idx)
            # a row may now be closer to the merged cluster than to its NN
            closer = new < nn_dist
            nn_dist = torch.where(closer, new, nn_dist)
            nn_idx = torch.where(closer, i[:, None], nn_idx)
            best, arg = new.min(dim=1)
            nn_dist[batch, i] = best
            nn_idx[batch, i] = arg
        else:
            closer = (new < nn_dist) & ~stale
            nn_dist = torch.where(closer, new, nn_dist)
            nn_idx = torch.where(closer, i[:, None], nn_idx)
            stale[batch, i] = True
            stale[batch, j] = False
            rows = stale.view(-1).nonzero().squeeze(1)  # flat ids b * N + r
            best, arg = flat.index_select(0, rows).min(dim=1)
            nn_dist.view(-1).index_copy_(0, rows, best)
            nn_idx.view(-1).index_copy_(0, rows, arg)
        nn_dist[batch, j] = inf
    return labels
