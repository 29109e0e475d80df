"""PatchMerger: K learned queries attend over the (layer-normed) tokens.

Before the block at the reduction location: X' = LayerNorm(X), weights =
softmax over the N tokens of Q X'^T (Q: K learnable queries of C channels,
drawn from a standard normal as the reference does), output k = sum_n w_kn X'_n,
i.e. weighted sums of the *normed* tokens (the PatchMerger paper; the
"Which Tokens to Use?" code follows lucidrains' implementation).

Scale: the reference code has an option for a C**-0.5 factor on the logits
(``scaled_attention``) but leaves it off, and the paper writes softmax(W X^T)
without one; so no scale by default, ``scaled_attention=True`` adds it.

``weights`` (B, N, K) are the mixing coefficients (columns sum to one over N);
argmax over K is the hard assignment the reference visualises. Sizes: each
token's size is shared among the outputs in proportion to its row of weights
(:func:`~tokenreduction.reduction.ops.soft_assignment_output`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import soft_assignment_output
from .options import METHODS
from .registry import register


def merger_weights(x_normed: torch.Tensor, queries: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x_normed (B, N, C), queries (K, C) -> weights (B, N, K): softmax over
    the N tokens of scale * <q_k, x_n> (computed in float32; float64 kept)."""
    dt = torch.float64 if x_normed.dtype == torch.float64 else torch.float32
    logits = torch.einsum("bnc,kc->bnk", x_normed.to(dt), queries.to(dt)) * scale
    return logits.softmax(dim=1)


@register("patchmerger")
class PatchMerger(TokenReducer):
    """PatchMerger with K = ``num_out`` learned queries (set at build time)."""

    kind = "soft"
    position = "pre"
    fixed_output = True
    option_spec = METHODS["patchmerger"]

    def __init__(
        self, dim: int, num_out: int, num_in: Optional[int] = None, scaled_attention: bool = False, **kwargs
    ) -> None:
        super().__init__(dim, **kwargs)
        self.option_spec.check(num_out=num_out, num_in=num_in, scaled_attention=scaled_attention)
        self.num_out = num_out
        self.num_in = num_in  # informational: K is fixed, N may vary with the image size
        self.scale = dim ** -0.5 if scaled_attention else 1.0
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(num_out, dim))

    def output_count(self, num_tokens: int, budget) -> int:
        return self.num_out

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        xn = self.norm(x)
        weights = merger_weights(xn, self.queries, self.scale)
        out = torch.einsum("bnk,bnc->bkc", weights.to(xn.dtype), xn)
        return soft_assignment_output(out.to(x.dtype), weights, size)
