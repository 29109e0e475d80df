"""The per-forward state of a reduced ViT (replaces ToMe's shared dict).

One ReductionContext is made by the model at the start of each forward and
passed to every block; it holds the token sizes and masks that attention needs,
and records each stage's pattern. After the forward it stays on the model as
``model.reduction_state`` for the trainer (DynamicViT losses), the evaluator
(patterns) and the user (``tokens_kept``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ..reduction.base import BlockFeatures, ReductionOutput, TokenReducer
from .budget import StageBudget


@dataclass
class StageRecord:
    """One reduction stage of one forward.

    assignment: (B, N_in) output patch-token index of each input patch token
    (-1 dropped); weights: (B, N_in, M) for soft methods. tokens_out: an int,
    or for methods with a per-image count (ATS, DynamicViT training) the
    largest count over the batch as a 0-dim tensor (``int()`` reads both).
    """

    block: int
    method: str
    kind: str
    tokens_in: int
    tokens_out: Union[int, torch.Tensor]
    target: int
    assignment: torch.Tensor
    weights: Optional[torch.Tensor] = None
    kept_per_image: Optional[torch.Tensor] = None


@dataclass
class ReductionContext:
    """size: (B, T) token sizes (prefix included); mask: (B, T) bool or None;
    keep_score: (B, T) DynamicViT soft policy during training or None."""

    num_prefix: int
    size: torch.Tensor
    prop_attn: bool = False
    mask: Optional[torch.Tensor] = None
    keep_score: Optional[torch.Tensor] = None
    attn_received: Optional[torch.Tensor] = None
    stages: list = field(default_factory=list)
    aux: list = field(default_factory=list)
    merged: bool = False
    #: CLS token after every reduction block, kept when the model asks (CLCA)
    cls_per_stage: list = field(default_factory=list)
    #: (B, T, C) final normed tokens of the forward (DynamicViT distillation)
    features: Optional[torch.Tensor] = None
    #: patches of the actual input and their grid (h, w); None = the model's
    #: build-time ones (they differ under timm's ``dynamic_img_size``)
    num_patches: Optional[int] = None
    grid: Optional[tuple] = None

    @property
    def tokens_kept(self) -> list[int]:
        """Patch tokens kept after each stage (the largest count over the
        batch for methods with a variable count)."""
        return [int(s.tokens_out) for s in self.stages]

    def attn_bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """(B, 1, 1, T) additive attention bias: log(size) for proportional
        attention, -inf on masked keys; None when neither applies."""
        bias = None
        if self.prop_attn and self.merged:
            bias = self.size.to(dtype).log()
        if self.mask is not None:
            masked = torch.zeros_like(self.size, dtype=dtype) if bias is None else bias
            bias = masked.masked_fill(~self.mask, float("-inf"))
        return None if bias is None else bias[:, None, None, :]

    def reduce(
        self,
        reducer: TokenReducer,
        block: int,
        stage: int,
        budget: StageBudget,
        x: torch.Tensor,
        feats: BlockFeatures,
    ) -> torch.Tensor:
        """Apply `reducer` to the patch tokens of x (B, T, C); prefix tokens
        pass through. Updates sizes, masks and the record; returns the new x."""
        p = self.num_prefix
        prefix, patches = x[:, :p], x[:, p:]
        feats.num_prefix = p
        if self.mask is not None:
            feats.mask = self.mask[:, p:]
        if self.keep_score is not None:
            feats.keep_score = self.keep_score[:, p:]
        out: ReductionOutput = reducer(patches, self.size[:, p:], feats, budget)
        self.size = torch.cat([self.size[:, :p], out.size.to(self.size.dtype)], dim=1)
        if out.mask is not None or self.mask is not None:
            out_mask = out.mask if out.mask is not None else torch.ones_like(out.size, dtype=torch.bool)
            prefix_mask = torch.ones(x.shape[0], p, dtype=torch.bool, device=x.device)
            self.mask = torch.cat([prefix_mask, out_mask], dim=1)
        if out.keep_score is not None:
            prefix_keep = torch.ones(x.shape[0], p, dtype=out.keep_score.dtype, device=x.device)
            self.keep_score = torch.cat([prefix_keep, out.keep_score], dim=1)
        if reducer.uses_sizes and out.x.shape[1] < patches.shape[1]:
            self.merged = True  # sizes differ from 1 from here on
        kept = None
        if out.mask is not None:
            kept = out.mask.sum(1)
        self.stages.append(
            StageRecord(
                block=block,
                method=getattr(reducer, "method_name", type(reducer).__name__),
                kind=reducer.kind,
                tokens_in=patches.shape[1],
                # the largest count over the batch stays a 0-dim tensor (no
                # host sync, no graph break under torch.compile); int() reads it
                tokens_out=out.x.shape[1] if kept is None else kept.max(),
                target=budget.target,
                assignment=out.assignment.detach(),
                weights=None if out.weights is None else out.weights.detach(),
                kept_per_image=kept,
            )
        )
        if out.aux:
            self.aux.append(out.aux)
        return torch.cat([prefix, out.x], dim=1)
