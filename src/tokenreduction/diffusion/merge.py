"""Merge functions for the spatial tokens of a diffusion UNet (ToMe for SD, ATC).

Each function turns a metric (B, N, C) (the hidden states entering a
transformer block) into an assignment: for every token the merged token it
goes to. :func:`merge_closures` makes the pair used around attention and the
MLP from it:

* ``merge(x)``   (B, N, C) -> (B, M, C): unweighted mean of the tokens that
  share a merged token (ToMe-SD averages a destination with its sources the
  same way, ``scatter_reduce(mean)``).
* ``unmerge(y)`` (B, M, C) -> (B, N, C): every token takes its merged token's
  value, so the full token count is restored.

Unlike a ViT, SD has no positional information inside attention and the MLP
is per token, so the order of the merged tokens does not matter.

Shapes: B images, N = h x w tokens of one resolution (row-major), M merged.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..reduction.clustering import check_linkage, cosine_agglomerative_labels, cosine_distance_from_unit, unit_rows
from ..reduction.ops import labels_to_assignment

MergeFn = Callable[[torch.Tensor], torch.Tensor]

MERGE_FUNCTIONS = ("tome", "atc")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def identity_closures() -> Tuple[MergeFn, MergeFn]:
    """(merge, unmerge) that leave the tokens as they are."""
    return _identity, _identity


def tokens_to_remove(num_tokens: int, ratio: float) -> int:
    """r = int(N x ratio) tokens removed (ToMe-SD's count; ratio in [0, 1))."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio (fraction of tokens removed) must be in [0, 1), got {ratio}")
    return int(num_tokens * ratio)


def max_tome_ratio(sx: int, sy: int) -> float:
    """The largest ratio ToMe-SD can remove with one destination per sy x sx
    cell: 1 - 1 / (sx x sy) (every source merged). tomesd caps larger ratios
    without a word; :func:`bipartite_grid_assignment` refuses them."""
    return 1.0 - 1.0 / (sx * sy)


def grid_destinations(
    h: int,
    w: int,
    sx: int,
    sy: int,
    use_rand: bool = True,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split an h x w token grid into sources and destinations, ToMe-SD style:
    one destination per full sy x sx cell (random within the cell if
    `use_rand`, drawn on `device` from `generator`, which must be a generator
    of that device; else the top-left token). Rows/columns beyond the last
    full cell are all sources.

    Returns (src_idx (N - D,), dst_idx (D,)) row-major token indices on
    `device`, sorted, with D = (h // sy) x (w // sx). Everything is made on
    the device and every size is known on the host: no host-device copy and
    no synchronisation (``torch.compile(fullgraph=True)`` traces it).
    """
    if sx < 1 or sy < 1:
        raise ValueError(f"strides sx, sy must be >= 1, got sx={sx}, sy={sy}")
    hsy, wsx = h // sy, w // sx
    n_dst = hsy * wsx
    if use_rand:
        choice = torch.randint(sy * sx, (hsy, wsx), generator=generator, device=device)
    else:
        choice = torch.zeros(hsy, wsx, dtype=torch.long, device=device)
    rows = torch.arange(hsy, device=device)[:, None] * sy + torch.div(choice, sx, rounding_mode="floor")
    cols = torch.arange(wsx, device=device)[None, :] * sx + choice % sx
    is_dst = torch.zeros(h * w, dtype=torch.uint8, device=device)
    is_dst.scatter_(0, (rows * w + cols).reshape(-1), 1)
    # a stable sort puts the sources first and the destinations last, each in index order
    order = torch.sort(is_dst, stable=True).indices
    return order[: h * w - n_dst], order[h * w - n_dst:]


def bipartite_grid_assignment(
    metric: torch.Tensor,
    h: int,
    w: int,
    r: int,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, int]:
    """ToMe for SD: bipartite soft matching with 2-D strided destinations.

    metric (B, N = h*w, C). Every source proposes its most similar destination
    (cosine); the r best proposals merge into their destination (the same
    src/dst split is used for every image). r larger than the number of
    sources is refused (ValueError; tomesd caps it silently); a grid smaller
    than one cell has no destination and merges nothing.
    Returns (assignment (B, N) into M = N - r outputs, M): the unmerged
    sources in index order, then the destinations in index order.
    No host synchronisation: M is known from the shapes.
    """
    B, N, _ = metric.shape
    if N != h * w:
        raise ValueError(f"metric has {N} tokens but the grid is {h} x {w}")
    device = metric.device
    n_dst = (h // sy) * (w // sx)
    n_src = N - n_dst
    r = int(r)
    if r > n_src and n_dst:
        raise ValueError(
            f"cannot remove {r} of {N} tokens with ToMe-SD on a {h} x {w} grid with sx={sx}, sy={sy}: "
            f"only its {n_src} sources can merge (ratio at most 1 - 1/(sx*sy) = {max_tome_ratio(sx, sy):.4g})"
        )
    if r <= 0 or n_dst == 0:
        return torch.arange(N, device=device).expand(B, N).contiguous(), N
    src_idx, dst_idx = grid_destinations(h, w, sx, sy, use_rand, generator, device)
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    a, b = m[:, src_idx], m[:, dst_idx]
    best, best_dst = (a @ b.transpose(1, 2)).max(dim=-1)  # (B, n_src)
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values
    n_kept = n_src - r
    src_target = torch.empty(B, n_src, dtype=torch.long, device=device)
    src_target.scatter_(1, kept, torch.arange(n_kept, device=device).expand(B, n_kept))
    src_target.scatter_(1, merged, n_kept + best_dst.gather(1, merged))
    assignment = torch.empty(B, N, dtype=torch.long, device=device)
    assignment.scatter_(1, src_idx.expand(B, n_src), src_target)
    assignment.scatter_(1, dst_idx.expand(B, n_dst), (n_kept + torch.arange(n_dst, device=device)).expand(B, n_dst))
    return assignment, n_kept + n_dst


def cosine_distance(metric: torch.Tensor) -> torch.Tensor:
    """metric (B, N, C) -> (B, N, N) cosine distances max(1 - cos, 0), in
    float32, exactly symmetric (the upper triangle mirrored; see
    :func:`tokenreduction.reduction.clustering.cosine_distance_from_unit`)."""
    return cosine_distance_from_unit(unit_rows(metric))


def atc_assignment(metric: torch.Tensor, r: int, linkage: str = "average") -> Tuple[torch.Tensor, int]:
    """ATC: agglomerative clustering of the tokens (cosine distance of the
    metric (B, N, C)) down to N - r clusters with the given linkage.
    Returns (assignment (B, N) into M = N - r clusters, M), clusters ordered
    by their smallest member. The partition is SciPy's on
    :func:`cosine_distance` (on the CPU the compiled kernel forms that
    distance from the similarities while filling its work matrix)."""
    check_linkage(linkage)
    B, N, _ = metric.shape
    r = max(0, min(int(r), N - 1))
    if r == 0:
        return torch.arange(N, device=metric.device).expand(B, N).contiguous(), N
    labels = cosine_agglomerative_labels(metric, N - r, linkage)
    # exactly N - r clusters per image: the relabelling reads nothing back
    return labels_to_assignment(labels, N - r)


def merge_closures(assignment: torch.Tensor, num_out: int) -> Tuple[MergeFn, MergeFn]:
    """(merge, unmerge) for an assignment (B, N) into num_out tokens (see the
    module docstring). Inputs must have the assignment's (B, N).

    Both work on whole token rows of the flattened batch: merge adds rows
    into their slot (``index_add_``) and scales by 1 / count, unmerge copies
    rows (``index_select``); the counts are computed once per assignment."""
    B, N = assignment.shape
    device = assignment.device
    flat = (assignment + torch.arange(B, device=device)[:, None] * num_out).reshape(-1)  # (B * N,) rows
    counts = torch.zeros(B * num_out, device=device).index_add_(0, flat, torch.ones(B * N, device=device))
    inv_count = (1.0 / counts.clamp_min(1.0))[:, None]  # (B * M, 1) float32
    cast: dict = {}

    def merge(x: torch.Tensor) -> torch.Tensor:
        if x.shape[:2] != (B, N):
            raise ValueError(f"merge expects tokens of shape ({B}, {N}, C), got {tuple(x.shape)}")
        C = x.shape[-1]
        scale = cast.get(x.dtype)
        if scale is None:
            scale = cast[x.dtype] = inv_count.to(x.dtype)
        out = torch.zeros(B * num_out, C, dtype=x.dtype, device=x.device)
        out.index_add_(0, flat, x.reshape(B * N, C))
        return (out * scale).view(B, num_out, C)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        if y.shape[:2] != (B, num_out):
            raise ValueError(f"unmerge expects tokens of shape ({B}, {num_out}, C), got {tuple(y.shape)}")
        C = y.shape[-1]
        return y.reshape(B * num_out, C).index_select(0, flat).view(B, N, C)

    return merge, unmerge


def compute_merge(
    metric: torch.Tensor,
    h: int,
    w: int,
    ratio: float,
    merge_fn: str = "tome",
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    generator: Optional[torch.Generator] = None,
    linkage: str = "average",
) -> Tuple[MergeFn, MergeFn, int]:
    """Merge and unmerge closures for one block call: metric (B, h*w, C),
    ratio = fraction of tokens removed. Returns (merge, unmerge, M); the
    identity pair (and M = N) when nothing is removed."""
    N = metric.shape[1]
    r = tokens_to_remove(N, ratio)
    if r == 0:
        return _identity, _identity, N
    if merge_fn == "tome":
        assignment, num_out = bipartite_grid_assignment(metric, h, w, r, sx, sy, use_rand, generator)
    elif merge_fn == "atc":
        assignment, num_out = atc_assignment(metric, r, linkage)
    else:
        raise ValueError(f"unknown merge_fn {merge_fn!r}; use one of {', '.join(MERGE_FUNCTIONS)}")
    if num_out == N:
        return _identity, _identity, N
    merge, unmerge = merge_closures(assignment, num_out)
    return merge, unmerge, num_out
