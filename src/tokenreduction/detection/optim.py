"""Layer-wise learning-rate decay for the ViT-Adapter detector (mmengine).

ViT layer ids: the patch and position embeddings are layer 0, block i is
layer i + 1, everything else (adapter, neck, heads) is layer L + 1 with the
full learning rate. A parameter of layer l gets ``lr * rate ** (L + 1 - l)``.
Biases, 1-d parameters (norms, ``gamma``) and names containing a
``no_decay_keys`` entry get no weight decay (the study's ``custom_keys``
``decay_mult=0`` for level_embed, pos_embed, norm and bias).

    optim_wrapper = dict(
        type="OptimWrapper", constructor="LayerDecayOptimWrapperConstructor",
        optimizer=dict(type="AdamW", lr=1e-5, weight_decay=1e-6),
        paramwise_cfg=dict(num_layers=12, layer_decay_rate=0.9))
"""
from __future__ import annotations

import re

from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

try:
    from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS
except ImportError:  # pragma: no cover - mmdet absent
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

NO_DECAY_KEYS = ("pos_embed", "level_embed", "cls_token", "norm", "bias")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer id of parameter `name` (e.g. ``backbone.blocks.3.attn.qkv.weight``
    -> 4) in a ViT of `num_layers` blocks."""
    local = name[len("backbone.") :] if name.startswith("backbone.") else name
    if local in ("pos_embed", "cls_token") or local.startswith("patch_embed."):
        return 0
    match = _BLOCK.match(local) if local.startswith("blocks.") else None
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """paramwise_cfg: num_layers (12), layer_decay_rate (1.0 = none),
    no_decay_keys (default :data:`NO_DECAY_KEYS`)."""

    def add_params(self, params: list, module: nn.Module, *args, **kwargs) -> None:
        cfg = self.paramwise_cfg
        num_layers = int(cfg.get("num_layers", 12))
        rate = float(cfg.get("layer_decay_rate", 1.0))
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"layer_decay_rate must lie in (0, 1], got {rate}")
        no_decay = tuple(cfg.get("no_decay_keys", NO_DECAY_KEYS))
        wd = self.base_wd or 0.0
        groups: dict = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            layer = vit_layer_id(name, num_layers)
            decay = param.ndim > 1 and not any(key in name for key in no_decay)
            group = groups.setdefault(
                (layer, decay),
                {
                    "params": [],
                    "lr": self.base_lr * rate ** (num_layers + 1 - layer),
                    "weight_decay": wd if decay else 0.0,
                },
            )
            group["params"].append(param)
        params.extend(groups[key] for key in sorted(groups))
