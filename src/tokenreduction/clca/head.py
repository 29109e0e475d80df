"""The cross-layer aggregation (CLA) head of CLCA (code name ``ifa_head``)."""
from __future__ import annotations

import torch
from torch import nn


class CLAHead(nn.Module):
    """Classify from the CLS token of L layers.

    Input (B, D, L): the CLS token after each reduction block and after the
    last block, stacked on the last axis. With ``groups`` g > 0: BatchNorm1d,
    a depthwise Conv1d across the layers (D -> g*D channels, kernel = stride
    = L, D groups), BatchNorm1d, GELU, a pointwise Conv1d to the classes.
    With g = 0 (the reference's alternative): Linear over the L layers, ReLU,
    LayerNorm(D), Linear to the classes. Output (B, num_classes).
    """

    def __init__(self, dim: int, num_layers: int, num_classes: int, groups: int = 2) -> None:
        super().__init__()
        if dim < 1 or num_layers < 1 or num_classes < 1:
            raise ValueError(
                f"the CLA head needs dim, num_layers and num_classes >= 1, got {dim}, {num_layers}, {num_classes}"
            )
        if groups < 0:
            raise ValueError(f"ifa_dws_conv_groups must be >= 0, got {groups}")
        self.num_layers = num_layers
        self.groups = groups
        if groups:
            self.net = nn.Sequential(
                nn.BatchNorm1d(dim),
                nn.Conv1d(dim, dim * groups, num_layers, num_layers, groups=dim),
                nn.BatchNorm1d(dim * groups),
                nn.GELU(),
                nn.Conv1d(dim * groups, num_classes, 1),
            )
        else:
            self.mix = nn.Linear(num_layers, 1)
            self.net = nn.Sequential(nn.ReLU(), nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim != 3 or feats.shape[2] != self.num_layers:
            raise ValueError(f"the CLA head takes (B, D, {self.num_layers}), got {tuple(feats.shape)}")
        if self.groups:
            return self.net(feats).flatten(1)
        return self.net(self.mix(feats).squeeze(-1))
