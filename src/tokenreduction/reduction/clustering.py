"""Batched agglomerative (hierarchical) clustering on precomputed distances.

ATC (Haurum et al., ECCV 2024) clusters the patch tokens of every image with
single, complete or average linkage until K clusters remain. The reference
runs scikit-learn once per image on the CPU; here all images of a batch are
clustered at once in tensor code, on the device the distances live on.

Algorithm: rounds of reciprocal nearest neighbours (RNN). Every active
cluster keeps its nearest active neighbour and that distance, (B, N) each.
Single, complete and average linkage are *reducible*: merging two clusters
never brings the merged cluster closer to a third one than the nearer of the
two was, ``d(r, i u j) >= min(d(r, i), d(r, j))``. Hence a pair of clusters
that are each other's nearest neighbour is merged, at exactly their
distance, in the dendrogram that the greedy "merge the closest pair" scheme
(SciPy's ``linkage``) builds, whatever else is merged first; so each round
merges *every* reciprocal pair of every image at once (a few dozen rounds
instead of N - K sequential steps). A merge of j into i (i < j) writes row
and column i by the Lance-Williams formula of the linkage (single: min,
complete: max, average: size-weighted mean; where two pairs of one round
meet, both sides are combined) and removes row and column j. Only rows whose
nearest neighbour was merged need a new one: under single linkage their
distance is unchanged and they point to the merged cluster; under complete
and average linkage they (and the merged rows) are searched again, gathered
over the batch, O(R x N) for R rows.

Reading off the cut: merges are recorded with their height (distance) and
round. Merges from later rounds are never lower than the smallest current
nearest-neighbour distance L, so an image is finished once N - K recorded
merges lie strictly below L. The partition at K clusters is then the one of
the N - K lowest merges, ordered by (height, round): with distinct merge
heights this is exactly SciPy's ``fcluster(linkage(d, method), K,
criterion="maxclust")`` and scikit-learn's ``AgglomerativeClustering(K)``
(both keep the first N - K merges of the same dendrogram). With ties it is
still a dendrogram cut into exactly K clusters (a merge is only kept with
the merges below it). Merges point j to i < j; labels are resolved by
pointer jumping, so a cluster is named by its smallest member.

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
    labels per image, the partition of SciPy's ``linkage`` cut at K clusters
    (see the module docstring for ties). The labels carry no gradient.
    """
    check_linkage(linkage)
    if distance.dim() != 3 or distance.shape[1] != distance.shape[2]:
        raise ValueError(f"distance must have shape (B, N, N), got {tuple(distance.shape)}")
    if not distance.is_floating_point():
        raise ValueError(f"distance must be a float tensor, got {distance.dtype}")
    if int(num_clusters) < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    B, N, _ = distance.shape
    device = distance.device
    need = N - min(int(num_clusters), N)
    if need == 0 or B == 0:
        return torch.arange(N, device=device).expand(B, N).contiguous()
    dtype = torch.float64 if distance.dtype == torch.float64 else torch.float32
    D = distance.detach().to(dtype=dtype, copy=True).contiguous()
    D.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    into, height, rounds = _rnn_merges(D, need, linkage)
    return _cut(into, height, rounds, need)


def _rnn_merges(D: torch.Tensor, need: int, linkage: str):
    """Merge reciprocal nearest neighbours in rounds until every image has
    `need` merges below every later one. D (B, N, N) with inf on the diagonal
    (scratch, overwritten). Returns, per absorbed point j, (B, N) each: the
    point it was merged into (i < j; j itself when never absorbed), the
    merge height (inf when none) and the round."""
    B, N, _ = D.shape
    device, dtype = D.device, D.dtype
    inf = float("inf")
    flat = D.view(B * N, N)  # row r of image b is flat row b * N + r
    ar = torch.arange(N, device=device)
    ar_b = ar.expand(B, N)
    row_base = torch.arange(B, device=device) * N
    into = ar_b.contiguous()
    height = torch.full((B, N), inf, dtype=dtype, device=device)
    rounds = torch.zeros(B, N, dtype=torch.long, device=device)
    size = torch.ones(B, N, dtype=dtype, device=device) if linkage == "average" else None
    nn_dist, nn_idx = D.min(dim=2)  # (B, N); an inactive row has inf and points to itself
    step = 0
    while True:
        low = nn_dist.amin(dim=1, keepdim=True)  # no later merge is lower than this
        todo = (height < low).sum(dim=1) < need  # (B,) images still merging
        if not bool(todo.any()):
            break
        pairs = _reciprocal(nn_dist, nn_idx, ar) & todo[:, None]
        stuck = todo & ~pairs.any(dim=1)
        if bool(stuck.any()):
            # incremental neighbours may break ties inconsistently (a cycle of
            # equal distances without a reciprocal pair): search those images
            # afresh, first index first, which always yields a pair
            fresh_dist, fresh_idx = D[stuck].min(dim=2)
            nn_dist[stuck], nn_idx[stuck] = fresh_dist, fresh_idx
            pairs = _reciprocal(nn_dist, nn_idx, ar) & todo[:, None]
            if bool((todo & ~pairs.any(dim=1)).any()):
                bad = (todo & ~pairs.any(dim=1)).nonzero()[0].item()
                raise ValueError(f"distance must be finite: image {bad} has no finite pair left to merge")
        bi, i = pairs.nonzero(as_tuple=True)  # (P,) image and row of the pair's smaller index
        j = nn_idx[bi, i]
        height[bi, j] = nn_dist[bi, i]
        into[bi, j] = i
        rounds[bi, j] = step
        fi, fj = row_base[bi] + i, row_base[bi] + j
        ri, rj = flat.index_select(0, fi), flat.index_select(0, fj)  # (P, N) rows i and j
        # rows of the merged clusters against the old columns ...
        merged_col = torch.zeros(B, N, dtype=torch.bool, device=device)
        merged_col[bi, i] = True
        partner = ar_b.clone()
        partner[bi, i] = j  # column i reads column j too
        if linkage == "single":
            new = torch.minimum(ri, rj)
            new = torch.minimum(new, new.gather(1, partner[bi]))
        elif linkage == "complete":
            new = torch.maximum(ri, rj)
            new = torch.maximum(new, new.gather(1, partner[bi]))
        else:
            si, sj = size[bi, i][:, None], size[bi, j][:, None]
            new = (ri * si + rj * sj) / (si + sj)  # SciPy's form; inf stays inf
            # ... and, where two pairs of this round meet, against the merged columns
            col_si = torch.ones(B, N, dtype=dtype, device=device)
            col_sj = torch.zeros(B, N, dtype=dtype, device=device)
            col_si[bi, i], col_sj[bi, i] = si.squeeze(1), sj.squeeze(1)  # sizes of column i and its partner j
            csi, csj = col_si[bi], col_sj[bi]
            both = (new * csi + new.gather(1, partner[bi]) * csj) / (csi + csj)
            new = torch.where(merged_col[bi], both, new)
            size[bi, i] = (si + sj).squeeze(1)
        gone = torch.zeros(B, N, dtype=torch.bool, device=device)
        gone[bi, j] = True
        new.masked_fill_(gone[bi], inf)  # absorbed columns
        rows = torch.arange(bi.numel(), device=device)
        new[rows, i] = inf  # diagonal
        flat.index_copy_(0, fi, new)
        D[bi[:, None], ar[None, :], i[:, None]] = new  # column i
        flat.index_fill_(0, fj, inf)
        D[bi[:, None], ar[None, :], j[:, None]] = inf  # column j
        # nearest neighbours: only rows that pointed into a merged pair change
        target = ar_b.clone()
        target[bi, j] = i  # where a row pointing to j now points
        stale = merged_col.gather(1, nn_idx) | gone.gather(1, nn_idx)
        nn_dist[bi, j] = inf
        nn_idx[bi, j] = j
        stale &= ~gone
        if linkage == "single":
            # min(d(r, i), d(r, j)) is r's old distance: r now points to i
            nn_idx = target.gather(1, nn_idx)
            best, arg = new.min(dim=1)
            nn_dist[bi, i], nn_idx[bi, i] = best, arg
        else:
            # the distance to the merged cluster can only grow: search those
            # rows and the merged rows again, gathered over the batch
            stale |= merged_col
            flagged = stale.view(-1).nonzero().squeeze(1)
            best, arg = flat.index_select(0, flagged).min(dim=1)
            nn_dist.view(-1)[flagged] = best
            nn_idx.view(-1)[flagged] = arg
        step += 1
    return into, height, rounds


def _reciprocal(nn_dist: torch.Tensor, nn_idx: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    """(B, N) mask of the rows i that are the smaller index of a reciprocal
    nearest-neighbour pair (i, nn(i)) at finite distance."""
    return (nn_idx.gather(1, nn_idx) == ar) & (ar < nn_idx) & (nn_dist < float("inf"))


def _cut(into: torch.Tensor, height: torch.Tensor, rounds: torch.Tensor, need: int) -> torch.Tensor:
    """Labels (B, N) of the partition made by the `need` lowest merges,
    ordered by (height, round), of each image."""
    B, N = into.shape
    by_round = rounds.argsort(dim=1, stable=True)
    order = by_round.gather(1, height.gather(1, by_round).argsort(dim=1, stable=True))
    keep = torch.zeros(B, N, dtype=torch.bool, device=into.device)
    keep.scatter_(1, order[:, :need], True)
    labels = torch.where(keep, into, torch.arange(N, device=into.device).expand(B, N))
    # every kept merge points j to i < j: follow the pointers to the root,
    # the smallest index of the cluster
    while True:
        nxt = labels.gather(1, labels)
        if torch.equal(nxt, labels):
            return labels
        labels = nxt
