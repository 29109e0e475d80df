"""The cross-layer cache (CLC) of CLCA as pure functions.

Token layout in a model with CLCA: ``[prefix (CLS, registers) | carriers |
cached tokens ... | patches]``. Carriers and recovered cache tokens are
*extra* non-patch tokens: they sit after the model's own prefix and count in
``ReductionContext.num_prefix``, so every reduction method (pruning, merging,
soft) sees only the patch tokens, never drops or merges an extra token, and
the stage records (assignments) keep describing the original patches. A ViT
block is permutation-equivariant once positions are embedded, so placing the
extras before the patches computes what the reference's "appended after the
patches" computes; only the order of rows differs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..models.context import ReductionContext


def recovery_layers(locations: Sequence[int], depth: int, recover_at_last: bool = True) -> list[int]:
    """Blocks after which the cache re-enters the sequence: the reduction
    locations, plus ``depth - 2`` when `recover_at_last` (sorted, distinct)."""
    layers = {int(v) for v in locations}
    if recover_at_last and depth >= 2:
        layers.add(depth - 2)
    return sorted(layers)


def cached_blocks(recovery: Sequence[int]) -> list[int]:
    """Number of blocks whose cache each recovery layer appends: the blocks
    in ``[previous recovery layer, this one)`` (from block 0 for the first)."""
    out, prev = [], 0
    for r in recovery:
        out.append(r - prev)
        prev = r
    return out


def tokens_per_block(num_carriers: int, include_gap: bool) -> int:
    """Tokens cached after one block: the GAP token (if included) and the
    current state of every carrier."""
    return int(include_gap) + int(num_carriers)


def masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean over tokens: x (B, T, C), weight (B, T) >= 0 -> (B, 1, C)."""
    w = weight.to(x.dtype)
    return (torch.einsum("btc,bt->bc", x, w) / w.sum(1, keepdim=True).clamp_min(1e-6))[:, None]


def gap_weights(
    ctx: ReductionContext,
    num_tokens: int,
    carrier_start: int,
    num_carriers: int,
    pool_cls: bool,
    pool_clr: bool,
    has_cls: bool,
    device: torch.device,
) -> torch.Tensor:
    """(B, T) 0/1 weights of the tokens the cache's GAP averages: the current
    patch tokens (valid under ``ctx.mask``), plus CLS (`pool_cls`) and the
    carriers (`pool_clr`). Recovered cache tokens are never pooled."""
    B = ctx.size.shape[0]
    w = torch.zeros(B, num_tokens, device=device, dtype=torch.bool)
    p = ctx.num_prefix
    w[:, p:] = True if ctx.mask is None else ctx.mask[:, p:]
    if pool_cls and has_cls:
        w[:, 0] = True
    if pool_clr and num_carriers:
        w[:, carrier_start:carrier_start + num_carriers] = True
    return w


def insert_extra_tokens(x: torch.Tensor, ctx: ReductionContext, new: torch.Tensor) -> torch.Tensor:
    """Insert `new` (B, K, C) as extra non-patch tokens right before the patch
    tokens of x (B, T, C); sizes 1, always valid, kept by DynamicViT's policy.
    Updates ctx in place (``num_prefix`` grows by K); returns (B, T + K, C)."""
    if new.shape[0] != x.shape[0] or new.shape[2] != x.shape[2]:
        raise ValueError(f"extra tokens {tuple(new.shape)} do not match the sequence {tuple(x.shape)}")
    K = new.shape[1]
    if K == 0:
        return x
    p = ctx.num_prefix
    B = x.shape[0]
    out = torch.cat([x[:, :p], new.to(x.dtype), x[:, p:]], dim=1)

    def widen(t: Optional[torch.Tensor], value) -> Optional[torch.Tensor]:
        if t is None:
            return None
        fill = torch.full((B, K), value, dtype=t.dtype, device=t.device)
        return torch.cat([t[:, :p], fill, t[:, p:]], dim=1)

    ctx.size = widen(ctx.size, 1)
    ctx.mask = widen(ctx.mask, True)
    ctx.keep_score = widen(ctx.keep_score, 1)
    ctx.num_prefix = p + K
    return out
