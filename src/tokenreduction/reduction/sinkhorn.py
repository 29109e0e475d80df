"""Sinkhorn clustering (MSHViT, as in "Which Tokens to Use?"): soft assignment
of the tokens to K learned centres by entropic optimal transport.

Before the block at the reduction location:

1. tokens and centres are L2-normalised; scores S (N x K) are their cosines;
2. log-space Sinkhorn-Knopp on S / eps with uniform marginals, ``cluster_iters``
   rounds, each first matching the centre marginal (1/K each) and then the
   token marginal (1/N each), starting from zero potentials; the result is the
   transport plan P (B, N, K), whose token marginal is exact and whose centre
   marginal approaches 1/K as the rounds grow;
3. the soft assignment is W = N * P: each token's row sums to one, each
   centre's column to about N / K;
4. output k = sum_n W_nk x_n / ||x_n||: weighted *sums* of the
   **L2-normalised** tokens, not of the tokens and not averages, as the
   reference does (its outputs have norm up to about N / K).

The reference gives both marginals the same entry 1/(N + K) (unequal total
masses) and rescales by N + K; since a Sinkhorn round is invariant to
rescaling a marginal up to a factor on the plan, that is exactly W above.

Centres: the reference keeps them unit-norm by renormalising the parameter
in place at each forward. Here the forward normalises them functionally
(the parameter is unit-norm at initialisation and never mutated by a
forward): the forward values are identical, the gradient is the reference's
projected onto the sphere's tangent plane (the radial part, which the
reference's renormalisation discards, is dropped), and the forward stays pure
(no_grad/inference, DDP, repeated evaluation all see the same parameter).

``weights`` (B, N, K) = W; its argmax over K is the hard assignment. Sizes:
each token's size is shared among the centres in proportion to its row of W
(:func:`~tokenreduction.reduction.ops.soft_assignment_output`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .ops import soft_assignment_output
from .options import METHODS
from .registry import register


def log_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Entropic OT plan in log space with uniform marginals.

    scores (B, N, K) -> log P (B, N, K) in float32 (float64 kept), P the plan of
    Sinkhorn-Knopp on exp(scores / eps) with token marginal 1/N (exact: the
    token side is matched last) and centre marginal 1/K (approximate after
    `iters` rounds)."""
    if eps <= 0:
        raise ValueError(f"sinkhorn_eps must be > 0, got {eps}")
    if iters < 1:
        raise ValueError(f"cluster_iters must be >= 1, got {iters}")
    z = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32) / eps
    B, N, K = z.shape
    log_tok = -math.log(N)
    log_ctr = -math.log(K)
    f = z.new_zeros(B, N, 1)  # token potentials
    g = z.new_zeros(B, 1, K)  # centre potentials
    for _ in range(iters):
        g = log_ctr - torch.logsumexp(z + f, dim=1, keepdim=True)
        f = log_tok - torch.logsumexp(z + g, dim=2, keepdim=True)
    return z + f + g


def sinkhorn_assignment(x: torch.Tensor, centres: torch.Tensor, eps: float, iters: int):
    """x (B, N, C), centres (K, C) -> (normalised tokens (B, N, C),
    soft assignment W = N * P (B, N, K), rows summing to one), in float32
    (float64 kept)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xn = F.normalize(x.to(dt), p=2, dim=-1)
    cn = F.normalize(centres.to(dt), p=2, dim=-1)
    scores = torch.einsum("bnc,kc->bnk", xn, cn)
    log_plan = log_sinkhorn(scores, eps, iters)
    return xn, (log_plan + math.log(x.shape[1])).exp()


@register("sinkhorn")
class Sinkhorn(TokenReducer):
    """Sinkhorn clustering into K = ``num_out`` learned centres."""

    kind = "soft"
    position = "pre"
    fixed_output = True
    option_spec = METHODS["sinkhorn"]

    def __init__(
        self,
        dim: int,
        num_out: int,
        num_in: Optional[int] = None,
        sinkhorn_eps: float = 1.0,
        cluster_iters: int = 3,
        **kwargs,
    ) -> None:
        super().__init__(dim, **kwargs)
        self.option_spec.check(num_out=num_out, num_in=num_in, sinkhorn_eps=sinkhorn_eps, cluster_iters=cluster_iters)
        self.num_out = num_out
        self.num_in = num_in  # informational: K is fixed, N may vary with the image size
        self.eps = float(sinkhorn_eps)
        self.iters = int(cluster_iters)
        self.centres = nn.Parameter(F.normalize(torch.randn(num_out, dim), dim=-1))

    def output_count(self, num_tokens: int, budget) -> int:
        return self.num_out

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        xn, weights = sinkhorn_assignment(x, self.centres, self.eps, self.iters)
        out = torch.einsum("bnk,bnc->bkc", weights, xn)
        return soft_assignment_output(out.to(x.dtype), weights, size)
