"""Heuristic: keep the patches nearest the image centre (data independent).

Default, ``rule="reference"`` (JoakimHaurum/TokenReduction
``prep_pattern_stage_subset``, its ``--not_contiguous`` mode): on the h x w
patch grid the coordinates are the float32 ``torch.linspace(-h//2, h//2, h)``
(rows) and ``linspace(-w//2, w//2, w)`` (columns), with Python floor division,
so for an odd side the origin is NOT the middle patch; z is |x| + |y| (l1),
sqrt(x^2 + y^2) (l2) or max(|x|, |y|) (linf), in float32. Whole distance
shells are kept: for each distinct z value u count the patches with z <= u,
and keep z <= the u whose count is closest to ``budget.target`` (ties to the
smaller radius). The kept count is generally not the target (the model
records it). float32 rounding splits some mathematically equal shells, as in
the reference.

``rule="exact"`` (off by default): patches ranked by their exact distance to
the true grid centre ((h - 1) / 2, (w - 1) / 2), ties by raster index, and
exactly ``budget.target`` kept.

Either way a stage keeps a best-ranked prefix (ranked by (distance, raster
index)), so the n tokens entering any stage are the n best-ranked patches in
raster order; the stage needs no state, only the grid, which ``patch_model``
passes as ``grid_size`` (``needs_grid``). Used on its own without
``grid_size``, the input of the call is taken as the full, square grid.
The kept positions depend only on (grid, token count, requested count,
pattern, rule): they are computed once in plain Python (cached) and, under
torch.compile, baked into the graph as a constant index (no graph break).

Unlike the reference, which masks the other tokens out of attention (as keys
and as queries), the tokens are removed: for the kept tokens this is the same.
Its contiguous mode (a radius shrinking over consecutive blocks) is not
implemented.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

import torch

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import batch_gather
from .options import HEURISTIC_PATTERNS as PATTERNS
from .options import HEURISTIC_RULES as RULES
from .options import METHODS
from .registry import register


def _check_pattern(pattern: str) -> None:
    if pattern not in PATTERNS:
        raise ValueError(f"unknown heuristic pattern {pattern!r}; use one of {', '.join(PATTERNS)}")


def centre_rank(grid_size: Sequence[int], pattern: str = "l2") -> torch.Tensor:
    """``rule="exact"``: (h, w), pattern -> (h * w,) long rank of each
    raster-ordered patch by distance to the grid centre (0 = nearest), ties by
    raster index. Distances are computed exactly on doubled integer coordinates."""
    _check_pattern(pattern)
    h, w = int(grid_size[0]), int(grid_size[1])
    dr = (2 * torch.arange(h) - (h - 1)).abs().view(h, 1).expand(h, w)
    dc = (2 * torch.arange(w) - (w - 1)).abs().view(1, w).expand(h, w)
    if pattern == "l1":
        dist = dr + dc
    elif pattern == "l2":
        dist = dr * dr + dc * dc
    else:
        dist = torch.maximum(dr, dc)
    return _rank(dist.reshape(-1))


def _rank(z: torch.Tensor) -> torch.Tensor:
    """(n,) distances -> (n,) long rank by (distance, index)."""
    order = torch.sort(z, stable=True).indices
    rank = torch.empty(z.numel(), dtype=torch.long)
    rank[order] = torch.arange(z.numel())
    return rank


def reference_distances(grid_size: Sequence[int], pattern: str = "l2") -> torch.Tensor:
    """(h, w), pattern -> (h * w,) float32 z of the reference, raster order:
    coordinates ``linspace(-h//2, h//2, h)`` x ``linspace(-w//2, w//2, w)``."""
    _check_pattern(pattern)
    h, w = int(grid_size[0]), int(grid_size[1])
    rows = torch.linspace(-h // 2, h // 2, steps=h, dtype=torch.float32)
    cols = torch.linspace(-w // 2, w // 2, steps=w, dtype=torch.float32)
    x, y = torch.meshgrid(rows, cols, indexing="ij")
    if pattern == "l1":
        z = torch.abs(x) + torch.abs(y)
    elif pattern == "l2":
        z = torch.sqrt(x * x + y * y)
    else:
        z = torch.max(torch.abs(x), torch.abs(y))
    return z.reshape(-1)


def shell_count(z: torch.Tensor, requested: int) -> int:
    """Patches kept by the reference for `requested`: the count of z <= u for
    the distinct value u whose count is closest to `requested` (ties to the
    smaller u)."""
    shells = torch.unique(z)  # ascending
    counts = (z.unsqueeze(0) <= shells.unsqueeze(1)).sum(dim=1)
    best = (counts - int(requested)).abs().argmin()  # first minimum = smaller radius
    return int(counts[best])


@lru_cache(maxsize=64)
def _plan(grid_size: tuple[int, int], pattern: str, rule: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if rule == "exact":
        return centre_rank(grid_size, pattern), None
    z = reference_distances(grid_size, pattern)
    return _rank(z), z


def heuristic_kept_count(grid_size: Sequence[int], num_tokens: int, k: int, pattern: str = "l2", rule: str = "reference") -> int:
    """Tokens a stage keeps of the `num_tokens` present when `k` are asked."""
    if rule not in RULES:
        raise ValueError(f"unknown heuristic rule {rule!r}; use one of {', '.join(RULES)}")
    _, z = _plan((int(grid_size[0]), int(grid_size[1])), pattern, rule)
    kept = k if z is None else shell_count(z, k)
    return max(0, min(kept, num_tokens))


@lru_cache(maxsize=256)
def _keep_positions(
    grid_size: tuple[int, int], num_tokens: int, k: int, pattern: str, rule: str
) -> tuple[int, ...]:
    """Plain-Python, cached: the ascending positions (among the `num_tokens`
    current tokens) of the tokens a stage keeps, as a tuple of ints."""
    rank, _ = _plan(grid_size, pattern, rule)
    if not 1 <= num_tokens <= rank.numel():
        raise ValueError(f"heuristic got {num_tokens} tokens for a grid of {rank.numel()} patches")
    m = heuristic_kept_count(grid_size, num_tokens, k, pattern, rule)
    current = rank[rank < num_tokens]  # ranks of the current tokens, raster order
    return tuple((current < m).nonzero().flatten().tolist())


def heuristic_keep_index(
    grid_size: Sequence[int], num_tokens: int, k: int, pattern: str = "l2", rule: str = "reference"
) -> torch.Tensor:
    """Indices (M,), ascending, long, CPU, among the `num_tokens` current
    tokens (the `num_tokens` best-ranked patches in raster order) of the M
    tokens to keep (M = k for ``rule="exact"``, whole shells for the
    reference). The ranking is cached per (grid, num_tokens, k, pattern, rule)."""
    if rule not in RULES:
        raise ValueError(f"unknown heuristic rule {rule!r}; use one of {', '.join(RULES)}")
    _check_pattern(pattern)
    grid = (int(grid_size[0]), int(grid_size[1]))
    return torch.tensor(_keep_positions(grid, int(num_tokens), int(k), pattern, rule), dtype=torch.long)


@torch.compiler.assume_constant_result
def _constant_keep_positions(
    grid_size: tuple[int, int], num_tokens: int, k: int, pattern: str, rule: str
) -> tuple[int, ...]:
    """The forward's entry point: under torch.compile it is evaluated eagerly
    while tracing and its result baked in as a constant (its inputs are
    Python ints and strings that the traced forward specialises on: the token
    count is a static dimension, the rest are module/budget attributes), so
    the shell ranking (torch.unique, .item()) never enters the graph."""
    return _keep_positions(grid_size, num_tokens, k, pattern, rule)


@register("heuristic")
class Heuristic(TokenReducer):
    """Options: ``pattern`` ("l1" | "l2" | "linf"), ``rule`` ("reference" |
    "exact"), ``grid_size`` (h, w) of the patch grid."""

    kind = "prune"
    position = "pre"
    needs_grid = True
    option_spec = METHODS["heuristic"]

    def __init__(
        self, dim: int, pattern: str = "l2", grid_size: Optional[Sequence[int]] = None, rule: str = "reference", **kwargs
    ) -> None:
        super().__init__(dim, **kwargs)
        self.option_spec.check(pattern=pattern, grid_size=grid_size, rule=rule)
        self.pattern = pattern
        self.rule = rule
        self.grid_size = None if grid_size is None else (int(grid_size[0]), int(grid_size[1]))

    def _grid(self, n: int) -> tuple[int, int]:
        if self.grid_size is not None:
            return self.grid_size
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"heuristic without grid_size needs a square grid of tokens, got {n}")
        return (side, side)

    def output_count(self, num_tokens: int, budget) -> int:
        grid = self.grid_size if self.grid_size is not None else self._grid(num_tokens)
        return heuristic_kept_count(grid, num_tokens, budget.target, self.pattern, self.rule)

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        B, N, _ = x.shape
        positions = _constant_keep_positions(self._grid(N), N, int(budget.target), self.pattern, self.rule)
        keep = torch.tensor(positions, dtype=torch.long, device=x.device)  # constant index, no graph break
        k = len(positions)
        keep_idx = keep.expand(B, k)
        assignment = torch.full((B, N), -1, dtype=torch.long, device=x.device)
        assignment[:, keep] = torch.arange(k, device=x.device)
        return ReductionOutput(x=batch_gather(x, keep_idx), size=size.gather(1, keep_idx), assignment=assignment)
