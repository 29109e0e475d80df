"""Batched agglomerative (hierarchical) clustering on precomputed distances.

ATC (Haurum et al., ECCV 2024) clusters the patch tokens of every image with
single, complete or average linkage until K clusters remain. The reference
runs scikit-learn once per image; :func:`agglomerative_labels` returns the
same partition (SciPy's ``fcluster(linkage(d, method), K, "maxclust")``,
i.e. the first N - K merges of the dendrogram) with one of three back ends:

``"native"`` (the default on the CPU where a C compiler is found): a small C
kernel (:mod:`._native_clustering`, compiled on first use) that runs SciPy's
own algorithms with SciPy's arithmetic and tie-breaking (Prim's minimum
spanning tree for single linkage, the nearest-neighbour chain for complete
and average) on a float64 copy of each image's upper triangle, cuts each
dendrogram in C, stops the chain as soon as the N - K lowest merges are
known, and spreads the images over threads (the GIL is released). At
N >= 1024 it first tries a sparse path on the graph of point pairs below a
threshold near the cut height (single linkage: Kruskal's unions; complete
and average: the closest pair of clusters merged, with exact cluster
distances), checked to be clear of ties (by a relative 1e-9), else the
dense code runs: the same partition, about 5x faster on Stable Diffusion
hidden states. Measured by ``benchmarks/speed_table.py`` it
is several times faster than SciPy at N=196 and at N=4096.

``"scipy"`` (the CPU fallback): SciPy's compiled dendrogram routine per
image (the minimum spanning tree for single linkage, the nearest-neighbour
chain for complete and average), called on the condensed distances of the
whole batch cut out at once, without ``linkage``'s input checks (done once
for the batch) or ``fcluster``; the partition is read off the first N - K
merges in batched tensor code. The merges are inherently sequential; one
compiled pass per image beats the batched tensor rounds below on the CPU.

``"rnn"`` (the default on other devices): rounds of reciprocal nearest
neighbours in float64 tensor code, all images at once, on the distances'
device. Single, complete and average linkage are *reducible*: merging two
clusters never brings the merged cluster closer to a third one than the
nearer of the two was, ``d(r, i u j) >= min(d(r, i), d(r, j))``. Hence a
pair of clusters that are each other's nearest neighbour is merged, at
exactly their distance, in the dendrogram that the greedy "merge the
closest pair" scheme builds, whatever else is merged first; so each round
merges *every* reciprocal pair of every image at once (a handful of rounds
instead of N - K sequential steps). A round is dense, O(B N^2) on the
device: nearest neighbours searched afresh (the first index among equal
distances, so a reciprocal pair always exists), the rows and then the
columns of each pair combined by the Lance-Williams formula of the linkage
(where two pairs of a round meet, the column step combines the row step's
results), absorbed rows and columns set to +inf. Merges are recorded with
their height and round; later rounds never merge below the smallest
current neighbour distance L, so an image is finished once N - K recorded
merges lie strictly below L, and the partition is the one of its N - K
lowest merges by (height, round). Float64 heights computed in another order
than SciPy's chain differ from SciPy's by a few ulps, so an image whose
merges are not all clear of their clusters' other neighbours, or whose cut
is not clear of the next merge, by ``RNN_TIE_MARGIN`` (1e-9) of its largest
distance, is clustered by the exact path on the CPU instead: every image
gets SciPy's partition. No host synchronisation inside a round: at most
``rnn_sync_bound(N)`` = bit_length(N - 1) + 5 per call (13 at N = 196).

Exactness: every back end gives SciPy's partition, ties included (the
"scipy" back end *is* SciPy's dendrogram, "native" the same computation,
"rnn" decides only images clear of ties by the margin and hands the others
to one of these two).
Labels name each cluster by its smallest member.

Shapes: B images, N points (tokens).
"""
from __future__ import annotations

import threading
from typing import Optional

import numpy as np
import torch

from . import _native_clustering as _native

LINKAGES = ("single", "complete", "average")
BACKENDS = ("auto", "native", "scipy", "rnn")


def check_linkage(linkage: str) -> str:
    """Return `linkage` if known, else raise a ValueError listing the known ones."""
    if linkage not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage!r}; use one of {', '.join(LINKAGES)}")
    return linkage


def agglomerative_labels(
    distance: torch.Tensor, num_clusters: int, linkage: str = "average", backend: str = "auto"
) -> torch.Tensor:
    """Cluster each image's points bottom-up until `num_clusters` remain.

    distance:     (B, N, N) symmetric pairwise distances (the diagonal is
                  ignored; "native" and "scipy" read the upper triangle),
                  finite; any float dtype. Every back end computes in
                  float64.
    num_clusters: K in [1, N]; K >= N leaves every point on its own.
    linkage:      "single", "complete" or "average".
    backend:      "native" (compiled kernel, CPU), "scipy" (per-image
                  SciPy dendrogram, CPU), "rnn" (batched tensor rounds on
                  the distances' device) or "auto" (native for CPU tensors,
                  scipy when no compiler is available, else rnn).
    Returns (B, N) long labels on the distances' device: each point's
    cluster, named by the smallest point index in that cluster (so
    ``labels[b, n] <= n``). Exactly K distinct labels per image: the
    partition of SciPy's ``linkage`` cut at K clusters (see the module
    docstring). The labels carry no gradient.
    """
    check_linkage(linkage)
    if backend not in BACKENDS:
        raise ValueError(f"unknown clustering backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if distance.dim() != 3 or distance.shape[1] != distance.shape[2]:
        raise ValueError(f"distance must have shape (B, N, N), got {tuple(distance.shape)}")
    if not distance.is_floating_point():
        raise ValueError(f"distance must be a float tensor, got {distance.dtype}")
    if int(num_clusters) < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    # one opaque operator: torch.compile traces around it without a graph break
    return _labels_op(distance.detach(), int(num_clusters), linkage, backend)


def cosine_agglomerative_labels(metric: torch.Tensor, num_clusters: int, linkage: str = "average") -> torch.Tensor:
    """Labels of :func:`agglomerative_labels` on the float32 cosine distance
    ``max(1 - cos(m_i, m_j), 0)`` of metric (B, N, C) (each row scaled to
    unit norm, norms clamped at 1e-12), as ATC for Stable Diffusion uses it.

    On the CPU with the compiled kernel the distance is formed inside the
    kernel from the similarities ``m @ m^T``, saving two passes over the
    (B, N, N) matrix, and only their upper triangle is computed
    (:func:`upper_similarity`, the part the kernel reads, into a per-thread
    buffer for large N); the partition is the same as
    ``agglomerative_labels(distance, num_clusters, linkage)`` on the distance
    computed in torch. Returns (B, N) long labels (smallest member names a
    cluster).

    On the CPU, images of the batch that equal an earlier one exactly are
    clustered once and share its labels (the same input gives the same
    partition): with classifier-free guidance the two halves of a Stable
    Diffusion batch are the same latent, and so are their first merging
    block's hidden states. On other devices every image is clustered (the
    rounds run all images at once; comparing them would read values back to
    the host)."""
    check_linkage(linkage)
    if metric.dim() != 3:
        raise ValueError(f"metric must have shape (B, N, C), got {tuple(metric.shape)}")
    if int(num_clusters) < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    with torch.no_grad():
        metric = metric.detach()
        first = first_occurrences(metric) if metric.device.type == "cpu" else None
        if first is None:
            return _cosine_labels(metric, int(num_clusters), linkage)
        unique, representative = first
        return _cosine_labels(metric[unique], int(num_clusters), linkage)[representative]


def _cosine_labels(metric: torch.Tensor, num_clusters: int, linkage: str) -> torch.Tensor:
    """:func:`cosine_agglomerative_labels` on checked arguments, every image clustered."""
    m = unit_rows(metric)
    B, N, _ = m.shape
    need = N - min(num_clusters, N)
    if m.device.type == "cpu" and need > 0 and B > 0 and _native.library() is not None:
        # the kernel reads only the upper triangle: half the product suffices
        return _native.run(upper_similarity(m, _similarity_scratch(m)), need, linkage, similarity=True)
    return agglomerative_labels(cosine_distance_from_unit(m), num_clusters, linkage)


def first_occurrences(x: torch.Tensor):
    """For a batch x (B, ...) with repeated items: (unique (U,) indices of
    each distinct item's first occurrence, representative (B,) position in
    `unique` of each item's copy); None when all B items differ. Items are
    compared exactly (after a per-item sum narrows the candidates)."""
    B = x.shape[0]
    if B < 2:
        return None
    sums = x.reshape(B, -1).sum(dim=1).tolist()
    representative: list = []
    unique: list = []
    for b in range(B):
        for u, a in enumerate(unique):
            if sums[a] == sums[b] and torch.equal(x[a], x[b]):
                representative.append(u)
                break
        else:
            representative.append(len(unique))
            unique.append(b)
    if len(unique) == B:
        return None
    device = x.device
    return torch.tensor(unique, device=device), torch.tensor(representative, device=device)


#: row-tile height of :func:`upper_similarity` (CPU, N >= 2 tiles)
SIMILARITY_TILE = 512


def unit_rows(metric: torch.Tensor) -> torch.Tensor:
    """metric (B, N, C) -> float32 rows scaled to unit norm (norms clamped at 1e-12)."""
    m = metric.float()
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def upper_similarity(m: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unit rows m (B, N, C) -> (B, N, N) float32 whose upper triangle
    (j >= i) holds the dot products ``m_i . m_j``; below the diagonal it
    holds them only within the diagonal tiles (the rest is left unset).

    On the CPU for N >= 2 x :data:`SIMILARITY_TILE` the product is formed
    one row tile at a time against the columns from the tile's first row
    on, about half the work of ``m @ m^T``; otherwise it is ``m @ m^T``.
    Every consumer of the cosine distance (:func:`cosine_distance_from_unit`
    and the compiled kernel) reads these same upper-triangle values, so the
    partitions agree bit for bit. `out`: an optional contiguous (B, N, N)
    buffer of m's dtype to write into (tiled case only)."""
    B, N, _ = m.shape
    tile = int(SIMILARITY_TILE)
    if m.device.type != "cpu" or N < 2 * tile or m.requires_grad:
        return m @ m.transpose(1, 2)
    if out is None:
        out = torch.empty(B, N, N, dtype=m.dtype)
    for b in range(B):  # 2-D products write straight into the strided tiles
        rows, cols = m[b], m[b].t()
        for r0 in range(0, N, tile):
            torch.mm(rows[r0:r0 + tile], cols[:, r0:], out=out[b, r0:r0 + tile, r0:])
    return out


_scratch = threading.local()


def _similarity_scratch(m: torch.Tensor) -> Optional[torch.Tensor]:
    """A (B, N, N) float32 buffer kept per thread for the kernel's input
    (large N only): spares faulting in B x N x N x 4 fresh bytes per call
    (134 MB for two 64 x 64 latents)."""
    B, N, _ = m.shape
    if N < 2 * int(SIMILARITY_TILE) or m.dtype != torch.float32:
        return None
    size = B * N * N
    buf = getattr(_scratch, "buffer", None)
    if buf is None or buf.numel() < size:
        _scratch.buffer = None  # free the old one first
        buf = _scratch.buffer = torch.empty(size, dtype=torch.float32)
    return buf[:size].view(B, N, N)


def cosine_distance_from_unit(m: torch.Tensor) -> torch.Tensor:
    """Unit rows m (B, N, C) -> (B, N, N) float32 cosine distances
    ``max(1 - m_i . m_j, 0)``, exactly symmetric: the upper triangle of
    :func:`upper_similarity` mirrored below the diagonal."""
    s = upper_similarity(m)
    upper = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu_()
    s = torch.where(upper, s, s.transpose(1, 2))
    return (1.0 - s).clamp_min_(0.0)


@torch.library.custom_op("tokenreduction::agglomerative_labels", mutates_args=())
def _labels_op(distance: torch.Tensor, num_clusters: int, linkage: str, backend: str) -> torch.Tensor:
    """The clustering itself (arguments checked by agglomerative_labels)."""
    B, N, _ = distance.shape
    device = distance.device
    need = N - min(num_clusters, N)
    if need == 0 or B == 0:
        return torch.arange(N, device=device).expand(B, N).contiguous()
    if backend == "auto":
        if device.type != "cpu":
            backend = "rnn"
        else:
            backend = "native" if _native.library() is not None else "scipy"
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"the native clustering backend runs on CPU tensors, got a {device.type} tensor")
        if _native.library() is None:
            raise RuntimeError("the native clustering backend is not available here (no C compiler, or "
                               "TOKENREDUCTION_NATIVE=0); use backend='scipy'")
        return _native.run(distance.detach(), need, linkage)
    if backend == "scipy":
        return _scipy_labels(distance.detach(), need, linkage).to(device)
    return _rnn_labels(distance, need, linkage)


@_labels_op.register_fake
def _(distance, num_clusters, linkage, backend):
    return distance.new_empty(distance.shape[:2], dtype=torch.long)


# ------------------------------------------------------------------ SciPy back end


def _scipy_dendrogram(linkage: str):
    """y (N(N-1)/2,) float64 condensed, n -> Z (n - 1, 4) sorted by height.

    SciPy's compiled routine that ``scipy.cluster.hierarchy.linkage`` itself
    dispatches to, without its per-call input checks; the public function
    when the private one is not there (other SciPy versions)."""
    from scipy.cluster import hierarchy

    try:
        from scipy.cluster import _hierarchy

        if linkage == "single":
            core = _hierarchy.mst_single_linkage
            return lambda y, n: core(y, n)
        code = hierarchy._LINKAGE_METHODS[linkage]
        core = _hierarchy.nn_chain
        return lambda y, n: core(y, n, code)
    except (ImportError, AttributeError, KeyError):  # pragma: no cover - depends on the SciPy version
        return lambda y, n: hierarchy.linkage(y, method=linkage)


def _scipy_labels(distance: torch.Tensor, need: int, linkage: str) -> torch.Tensor:
    """(B, N, N) distances -> (B, N) labels of the first `need` merges of
    SciPy's dendrogram of each image (CPU, float64)."""
    B, N, _ = distance.shape
    square = distance.cpu()
    if square.dtype not in (torch.float32, torch.float64):
        square = square.double()
    square = square.numpy()
    condensed = np.empty((B, N * (N - 1) // 2), dtype=np.float64)
    start = 0
    for r in range(N - 1):  # row r's upper triangle, all images at once (a strided copy)
        condensed[:, start:start + N - 1 - r] = square[:, r, r + 1:]
        start += N - 1 - r
    if not np.isfinite(condensed.sum(axis=1)).all():  # one cheap pass; inf and nan propagate
        bad = np.nonzero(~np.isfinite(condensed).all(axis=1))[0]
        if bad.size:  # (else the sum merely overflowed)
            raise ValueError(f"distance must be finite: image {int(bad[0])} has inf or nan entries")
    dendrogram = _scipy_dendrogram(linkage)
    merged = np.stack([np.asarray(dendrogram(condensed[b], N))[:need, :2] for b in range(B)])
    return labels_from_merges(torch.from_numpy(merged.astype(np.int64)), N)


def labels_from_merges(merges: torch.Tensor, num_points: int) -> torch.Tensor:
    """Partition made by the first M merges of SciPy-style dendrograms.

    merges (B, M, 2) long: the two clusters joined by merge m, a point
    (< N) or the cluster made by merge c (N + c), as in the first two
    columns of a linkage matrix Z. Returns (B, N) labels, each cluster named
    by its smallest point, with N - M clusters per image."""
    B, M, _ = merges.shape
    N = int(num_points)
    nodes = N + M
    parent = torch.arange(nodes).expand(B, nodes).contiguous()
    made = (N + torch.arange(M)).repeat_interleave(2).expand(B, 2 * M)
    parent.scatter_(1, merges.reshape(B, 2 * M), made)
    while True:  # pointer jumping to each node's root
        nxt = parent.gather(1, parent)
        if torch.equal(nxt, parent):
            break
        parent = nxt
    root = parent[:, :N]
    smallest = torch.full((B, nodes), N, dtype=torch.long)
    smallest.scatter_reduce_(1, root, torch.arange(N).expand(B, N), reduce="amin")
    return smallest.gather(1, root)


# ------------------------------------------------------------------ tensor back end (RNN rounds)

#: an image whose merge decisions or cut lie within this fraction of its
#: largest |distance| of another choice goes to the exact path (SciPy's
#: algorithm on the CPU): float64 Lance-Williams heights computed in another
#: order differ from SciPy's by far less (a few ulps per merge level)
RNN_TIE_MARGIN = 1e-9

_rnn_counts = {"images": 0, "exact": 0}


def rnn_stats() -> dict:
    """Counts since the last call (which resets them) of the "rnn" back end:
    ``images`` clustered, ``exact`` of them handed to the exact path (a
    near-tie within :data:`RNN_TIE_MARGIN`)."""
    out = dict(_rnn_counts)
    _rnn_counts.update(images=0, exact=0)
    return out


def rnn_sync_bound(num_points: int) -> int:
    """Host synchronisations of one :func:`_rnn_labels` call on N points,
    at most ``L + 5`` with L the bit length of N - 1: one per check of
    whether every image is done, made after rounds 1, 2, 4, 8, ... (a round
    merges at least one pair of every unfinished image, so R <= N - 1
    rounds and at most ceil(log2 R) + 1 <= L + 1 checks, the last one made
    after round N at the latest); one read-back of which images are near
    ties or not finite; three more when some image goes to the exact path
    (its index to the device, its distances to the host, its labels back)."""
    return max(int(num_points) - 1, 1).bit_length() + 5


def _rnn_labels(distance: torch.Tensor, need: int, linkage: str) -> torch.Tensor:
    """(B, N, N) distances on any device -> (B, N) labels of SciPy's
    partition (the first `need` merges of its dendrogram), by rounds of
    reciprocal nearest neighbours in float64 tensor code on the distances'
    device, all images at once (see the module docstring).

    SciPy's partition, not only a valid one: the distances are read from the
    upper triangle as SciPy reads them, the Lance-Williams updates run in
    float64 as SciPy's; where two merges of a round meet, or merges run in
    another order than SciPy's chain, heights may differ from SciPy's by a
    few ulps. So an image is clustered here only when every merge is clear
    of the other neighbours of its two clusters, and the cut clear of the
    next merge, by :data:`RNN_TIE_MARGIN` times its largest |distance|: then
    both computations make the choices of exact arithmetic. Any other image
    (ties, duplicated tokens, near-ties) is clustered by the exact path
    (the compiled kernel, else SciPy) on the CPU.

    Host synchronisations: at most :func:`rnn_sync_bound` (N) per call
    (13 at N = 196, 17 at N = 4096), none of them inside a round. Raises
    ValueError naming an image with inf or nan distances (in the upper
    triangle). On MPS, which has no float64, every image takes the exact
    path on the CPU."""
    B, N, _ = distance.shape
    device = distance.device
    if device.type == "mps":
        host = distance.detach().cpu()
        exact_labels = (_native.run(host, need, linkage) if _native.library() is not None
                        else _scipy_labels(host, need, linkage))
        return exact_labels.to(device)
    upper = torch.ones(N, N, dtype=torch.bool, device=device).triu_(1)
    D = distance.detach().to(torch.float64)
    D = torch.where(upper, D, D.transpose(1, 2))  # SciPy reads the upper triangle
    D.diagonal(dim1=1, dim2=2).fill_(0.0)  # ignored
    finite = torch.isfinite(D).flatten(1).all(dim=1)  # (B,)
    tol = RNN_TIE_MARGIN * torch.where(torch.isfinite(D), D.abs(), 0.0).flatten(1).amax(dim=1)
    D.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    into, height, rounds, flagged, low = _rnn_merges(D, need, linkage, tol, finite)
    labels = _cut(into, height, rounds, need)
    # the cut: the need-th lowest merge clear of the next one (recorded, or later: at least `low`)
    ordered = height.sort(dim=1).values
    flagged |= torch.minimum(ordered[:, need], low) - ordered[:, need - 1] <= tol
    exact, not_finite = torch.stack([flagged & finite, ~finite]).tolist()  # one read-back after the rounds
    _rnn_counts["images"] += B
    if any(not_finite):
        raise ValueError(f"distance must be finite: image {not_finite.index(True)} has inf or nan entries")
    if any(exact):
        chosen = [b for b, flag in enumerate(exact) if flag]
        _rnn_counts["exact"] += len(chosen)
        index = torch.tensor(chosen, device=device)
        host = distance.detach()[index].cpu()
        exact_labels = (_native.run(host, need, linkage) if _native.library() is not None
                        else _scipy_labels(host, need, linkage))
        labels[index] = exact_labels.to(device)
    return labels


def _rnn_merges(D: torch.Tensor, need: int, linkage: str, tol: torch.Tensor, active: torch.Tensor):
    """Merge every reciprocal nearest-neighbour pair of every unfinished
    image, round after round, until each has `need` merges below every later
    one. D (B, N, N) float64, symmetric, inf on the diagonal (scratch,
    overwritten); tol (B,) the near-tie margin; active (B,) the images to
    cluster. Dense rounds, O(B N^2) each, with no host read-back inside: the
    nearest neighbours are searched afresh over all rows (the first index
    among equal distances, so every round has a reciprocal pair).

    Returns, per point j, (B, N) each: the point it was merged into (i < j;
    j when never absorbed), the merge height (inf when none) and the round;
    flagged (B,) images with a merge within tol of another choice; and low
    (B,) the smallest distance left between active clusters."""
    B, N, _ = D.shape
    device = D.device
    inf = float("inf")
    ar = torch.arange(N, device=device)
    into = ar.expand(B, N).clone()
    height = torch.full((B, N), inf, dtype=D.dtype, device=device)
    rounds = torch.zeros(B, N, dtype=torch.long, device=device)
    flagged = torch.zeros(B, dtype=torch.bool, device=device)
    size = torch.ones(B, N, dtype=D.dtype, device=device)
    step, check_at = 0, 1
    while True:
        nn_dist, nn_idx = D.min(dim=2)  # absorbed rows: inf
        low = nn_dist.amin(dim=1)  # no later merge is lower than this
        todo = active & ((height < low[:, None]).sum(dim=1) < need)
        if step == check_at or step == N:
            if not bool(todo.any()):  # host sync: after rounds 1, 2, 4, 8, ... (and N)
                return into, height, rounds, flagged, low
            if step == N:  # at most N - 1 rounds for finite distances
                raise RuntimeError("rnn clustering did not finish in N - 1 rounds")
            check_at *= 2
        mutual = (nn_idx.gather(1, nn_idx) == ar) & torch.isfinite(nn_dist) & todo[:, None]
        low_side = mutual & (ar < nn_idx)  # i of a pair (i, j), i < j: the merged cluster keeps i
        high_side = mutual & (nn_idx < ar)  # j: absorbed
        # a merge is made only when its two clusters have no other neighbour within tol
        rivals = (D <= (nn_dist + tol[:, None])[..., None]).sum(dim=2)
        flagged |= (mutual & (rivals > 1)).any(dim=1)
        height = torch.where(high_side, nn_dist, height)
        into = torch.where(high_side, nn_idx, into)
        rounds = torch.where(high_side, torch.full_like(rounds, step), rounds)
        partner = torch.where(mutual, nn_idx, ar)  # (B, N): the other cluster of a pair, else itself
        D = _lance_williams(D, partner, mutual, size, linkage)
        if linkage == "average":
            size = torch.where(mutual, size + size.gather(1, partner), size)
        dead = high_side.unsqueeze(1) | high_side.unsqueeze(2)
        D = D.masked_fill(dead, inf)
        D.diagonal(dim1=1, dim2=2).fill_(inf)
        step += 1


def _lance_williams(D: torch.Tensor, partner: torch.Tensor, mutual: torch.Tensor, size: torch.Tensor,
                    linkage: str) -> torch.Tensor:
    """One round's merges at once: for every pair (i, j) the rows and then
    the columns of i and j become the merged cluster's distances (single:
    min, complete: max, average: ``(n_i d_i + n_j d_j) / (n_i + n_j)``, in
    SciPy's form); where two pairs meet, the column step combines the row
    step's results. Rows and columns of unmerged clusters are kept as they
    are. D (B, N, N), partner (B, N), mutual (B, N) bool, size (B, N)."""
    B, N, _ = D.shape

    def combine(a, b, wa, wb):
        if linkage == "single":
            return torch.minimum(a, b)
        if linkage == "complete":
            return torch.maximum(a, b)
        return (a * wa + b * wb) / (wa + wb)

    other_row = D.gather(1, partner.unsqueeze(2).expand(B, N, N))
    s, s_partner = size.unsqueeze(2), size.gather(1, partner).unsqueeze(2)
    D = torch.where(mutual.unsqueeze(2), combine(D, other_row, s, s_partner), D)
    other_col = D.gather(2, partner.unsqueeze(1).expand(B, N, N))
    s, s_partner = size.unsqueeze(1), size.gather(1, partner).unsqueeze(1)
    return torch.where(mutual.unsqueeze(1), combine(D, other_col, s, s_partner), D)


def _cut(into: torch.Tensor, height: torch.Tensor, rounds: torch.Tensor, need: int) -> torch.Tensor:
    """Labels (B, N) of the partition made by the `need` lowest merges,
    ordered by (height, round), of each image (no host read-back)."""
    B, N = into.shape
    by_round = rounds.argsort(dim=1, stable=True)
    order = by_round.gather(1, height.gather(1, by_round).argsort(dim=1, stable=True))
    keep = torch.zeros(B, N, dtype=torch.bool, device=into.device)
    keep.scatter_(1, order[:, :need], True)
    labels = torch.where(keep, into, torch.arange(N, device=into.device).expand(B, N))
    # every kept merge points j to i < j: pointer jumping reaches the root,
    # the smallest index of the cluster, within ceil(log2 N) steps
    for _ in range(max(N - 1, 1).bit_length()):
        labels = labels.gather(1, labels)
    return labels
