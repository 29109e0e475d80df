"""Reduction patterns from composed assignments.

A stage's assignment (B, N_s) maps each of its input patch tokens to an output
token (or -1). Composing the stages maps every original patch to the token it
ended in after each stage; pruning masks, cluster maps, token depth and
heatmaps are all read from that.
"""
from __future__ import annotations

from typing import Sequence

import torch


def compose_assignments(assignments: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[(B, N_0), (B, N_1), ...] -> [(B, N_0)] * stages: for each original
    patch, the index of its token after stage s (-1 once dropped)."""
    if not assignments:
        return []
    B, N = assignments[0].shape
    current = torch.arange(N, device=assignments[0].device).expand(B, N)
    composed = []
    for a in assignments:
        alive = current >= 0
        current = torch.where(alive, a.gather(1, current.clamp_min(0)), torch.full_like(current, -1))
        composed.append(current)
    return composed


def token_depth(composed: Sequence[torch.Tensor], blocks: Sequence[int], depth: int) -> torch.Tensor:
    """The block at which each original patch was dropped (`depth` if it
    survives), from composed assignments: (B, P) long."""
    B, P = composed[0].shape
    result = torch.full((B, P), depth, dtype=torch.long, device=composed[0].device)
    for comp, block in zip(reversed(composed), reversed(list(blocks))):
        result = torch.where(comp < 0, torch.full_like(result, block), result)
    return result


def model_patterns(model) -> list[torch.Tensor]:
    """Composed assignments of the model's last forward (see compose_assignments)."""
    state = model.reduction_state
    if state is None:
        raise RuntimeError("run a forward pass first")
    return compose_assignments([s.assignment for s in state.stages])
