"""SiT's Token Slimming Module: learned soft merging of N tokens into K.

Before the block at the reduction location, an MLP (LayerNorm, Linear(C, C/2),
GELU, Linear(C/2, K)) scores every token against each of the K outputs; the
N x K logits are multiplied by a learnable scalar (initialised to 1) and
softmaxed over the N tokens, so output k is a convex combination of the
tokens. As in the "Which Tokens to Use?" code, SiT's distillation loss is not
used. The Linear layers are initialised as timm initialises a ViT (truncated
normal, std 0.02, zero bias), so the first outputs are near the token mean.

``weights`` (B, N, K) are the mixing coefficients (columns sum to one over N);
their argmax over K is each token's hard assignment (the reference's
``Assignment_Maps``). Output sizes: each token's size is shared among the
outputs in proportion to its row of weights
(:func:`~tokenreduction.reduction.ops.soft_assignment_output`), so the sizes
still sum to the number of patches.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import soft_assignment_output
from .options import METHODS
from .registry import register


def slimming_weights(logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """logits (B, N, K), scale (scalar tensor) -> weights (B, N, K) = softmax
    over the N tokens of scale * logits (float32 for stability; float64 kept)."""
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (logits.to(dt) * scale.to(dt)).softmax(dim=1)


def weighted_sums(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), weights (B, N, K) -> (B, K, C), out_k = sum_n w_nk x_n."""
    return torch.einsum("bnk,bnc->bkc", weights.to(x.dtype), x)


@register("sit")
class SiT(TokenReducer):
    """Token Slimming Module with K = ``num_out`` outputs (set at build time)."""

    kind = "soft"
    position = "pre"
    fixed_output = True
    option_spec = METHODS["sit"]

    def __init__(self, dim: int, num_out: int, num_in: Optional[int] = None, hidden_ratio: float = 0.5, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.option_spec.check(dim=dim, num_out=num_out, num_in=num_in, hidden_ratio=hidden_ratio)
        hidden = int(dim * hidden_ratio)
        self.num_out = num_out
        self.num_in = num_in  # informational: K is fixed, N may vary with the image size
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_out)
        )
        self.scale = nn.Parameter(torch.ones(1))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def output_count(self, num_tokens: int, budget) -> int:
        return self.num_out

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        weights = slimming_weights(self.mlp(x), self.scale)
        return soft_assignment_output(weighted_sums(x, weights).to(x.dtype), weights, size)
