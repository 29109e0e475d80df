"""CLCA (Rios et al., ICASSP 2025) as a plug-in of a reduced ViT.

:func:`apply_clca` extends a model built by :func:`tokenreduction.create_model`
(any method, or none) in place, through the two extension points of
:class:`~tokenreduction.models.vit.ReducedViTMixin` (``_before_blocks``,
``_after_block``). It registers itself as the model extension ``clca``
(:mod:`tokenreduction.models.extensions`), so ``create_model(...,
clca=dict(...))`` finds it by name: this package depends on the models
layer, never the reverse.

* **CLA head** (``ifa_head``): the CLS token after each CLCA layer (the
  reduction locations) and after the last block, stacked (B, D, L), goes
  through :class:`~tokenreduction.clca.head.CLAHead`; the final LayerNorm,
  ``fc_norm`` and the linear head become ``Identity`` (as the reference does).
* **CLC cache** (``clc``): ``num_clr`` carrier tokens, initialised from the
  CLS token, with their own learnable positional embeddings, enter before
  block 0. After every block before the last recovery layer, the cache
  receives the mean of the current patch tokens (``clc_include_gap``;
  with CLS when ``clc_pool_cls``, with the carriers when ``clc_pool_clr``;
  masked tokens excluded, an unweighted mean over the tokens present as
  the reference computes it) and the current state of each carrier. After
  each recovery layer (the CLCA layers, plus ``depth - 2`` when
  ``clc_recover_at_last``) everything cached enters the sequence and the
  cache is cleared. Order within one block: recover, then cache, then take
  the CLS token.

Extra tokens (carriers, recovered cache) are non-patch tokens placed between
the model's prefix and the patches (:mod:`.cache`): reductions never drop or
merge them, the stage assignments still describe the original patches, and
average pooling ignores them. Deviation from the reference: there the
reduction methods treat carriers and cached tokens as patches (so EViT can
drop a carrier and the reference then reads the wrong tokens as carriers),
and carriers get no positional embedding on models without a class-token
position (DeiT-III); here carriers always have their own.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..models.context import ReductionContext
from ..models.extensions import register_extension
from .cache import gap_weights, insert_extra_tokens, masked_mean, recovery_layers
from .config import CLCAConfig
from .head import CLAHead

DEFAULT_LAYERS = (3, 6, 9)


class CLCAModule(nn.Module):
    """The parameters (``carriers``, ``carrier_pos``, ``head``) and the
    resolved layer plan of CLCA; lives at ``model.clca``."""

    def __init__(self, cfg: CLCAConfig, dim: int, depth: int, layers: list[int], num_classes: int,
                 cls_init: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.clc = cfg.clc
        self.num_clr = cfg.num_clr if cfg.clc else 0
        self.include_gap = cfg.clc_include_gap
        self.pool_cls = cfg.clc_pool_cls
        self.pool_clr = cfg.clc_pool_clr
        self.layers = list(layers)
        self.recovery = recovery_layers(layers, depth, cfg.clc_recover_at_last) if cfg.clc else []
        self.cls_layers = sorted(set(layers) | {depth - 1})
        if self.num_clr:
            init = torch.zeros(1, self.num_clr, dim)
            if cls_init is not None:
                init.copy_(cls_init.detach().reshape(1, 1, dim).expand(1, self.num_clr, dim))
            else:
                nn.init.normal_(init, std=1e-6)
            self.carriers = nn.Parameter(init)
            self.carrier_pos = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, self.num_clr, dim), std=0.02))
        else:
            self.carriers = None
            self.carrier_pos = None
        self.head = (
            CLAHead(dim, len(self.cls_layers), num_classes, cfg.ifa_dws_conv_groups) if cfg.ifa_head else None
        )


@dataclass
class _CacheState:
    """Per-forward state, kept on the ReductionContext as ``ctx.clca``."""

    carrier_start: int
    cache: list


class CLCAViTMixin:
    """Methods of a model with CLCA (put before the patched model class by
    :func:`tokenreduction.models.vit.add_mixin`)."""

    class_prefix = "CLCA"

    clca: CLCAModule

    def _before_blocks(self, x: torch.Tensor, ctx: ReductionContext) -> torch.Tensor:
        x = super()._before_blocks(x, ctx)
        m = self.clca
        ctx.clca = _CacheState(carrier_start=ctx.num_prefix, cache=[])
        if m.num_clr:
            carriers = (m.carriers + m.carrier_pos).to(x.dtype).expand(x.shape[0], -1, -1)
            x = insert_extra_tokens(x, ctx, self.norm_pre(carriers))
        return x

    def _after_block(self, index: int, x: torch.Tensor, ctx: ReductionContext) -> torch.Tensor:
        x = super()._after_block(index, x, ctx)
        m = self.clca
        state: _CacheState = ctx.clca
        if m.clc:
            if index in m.recovery and state.cache:
                x = insert_extra_tokens(x, ctx, torch.cat(state.cache, dim=1))
                state.cache = []
            if index < m.recovery[-1]:
                parts = []
                if m.include_gap:
                    w = gap_weights(ctx, x.shape[1], state.carrier_start, m.num_clr, m.pool_cls, m.pool_clr,
                                    self.has_class_token, x.device)
                    parts.append(masked_mean(x, w))
                if m.num_clr:
                    parts.append(x[:, state.carrier_start:state.carrier_start + m.num_clr])
                state.cache.append(torch.cat(parts, dim=1))
        if m.head is not None and index in m.cls_layers:
            ctx.cls_per_stage.append(x[:, 0])
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        head = self.clca.head
        if head is None:
            return super().forward_head(x, pre_logits=pre_logits)
        feats = torch.stack(self.reduction_state.cls_per_stage, dim=-1)  # (B, D, L)
        return feats.flatten(1) if pre_logits else head(feats)

    def no_weight_decay(self) -> set:
        base = set(super().no_weight_decay()) if hasattr(super(), "no_weight_decay") else set()
        return base | {"clca.carriers", "clca.carrier_pos"}

    @property
    def clca_extra_tokens(self) -> int:
        """Extra (non-patch) tokens present at the end of the last forward."""
        ctx = self.reduction_state
        return 0 if ctx is None else ctx.num_prefix - self.num_prefix_tokens


@register_extension("clca")
def apply_clca(model: nn.Module, **options: Any) -> nn.Module:
    """Add CLCA to a model from :func:`tokenreduction.create_model` (in place;
    returns it). Options: the fields of :class:`CLCAConfig`. With neither
    ``ifa_head`` nor ``clc`` the model is returned untouched. Records the
    resolved options as ``model.reduction_config["clca"]``."""
    from ..models.vit import ReducedViTMixin, add_mixin

    unknown = sorted(set(options) - set(CLCAConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown CLCA option(s): {', '.join(unknown)}; known: {', '.join(CLCAConfig.__dataclass_fields__)}")
    cfg = CLCAConfig(**options)
    cfg.validate()
    if not isinstance(model, ReducedViTMixin):
        raise ValueError("apply_clca takes a model built by tokenreduction.create_model or patch_model")
    if isinstance(model, CLCAViTMixin):
        raise ValueError("this model already has CLCA")
    if not cfg.enabled:
        return model
    depth = len(model.blocks)
    locs = list(model.reduction_config.get("reduction_loc") or [])
    if locs and cfg.reduction_loc is not None and [int(v) for v in cfg.reduction_loc] != locs:
        raise ValueError(
            f"CLCA reduction_loc {list(cfg.reduction_loc)} differs from the model's reduction locations {locs}"
        )
    if not locs:
        locs = [int(v) for v in (cfg.reduction_loc if cfg.reduction_loc is not None else DEFAULT_LAYERS) if v < depth]
        for v in locs:
            if not 0 <= v < depth:
                raise ValueError(f"CLCA layer {v} is beyond the model's depth: blocks are 0..{depth - 1}")
    if cfg.clc and not locs:
        raise ValueError("clc needs at least one CLCA layer (reduction_loc)")
    has_cls = bool(getattr(model, "has_class_token", model.num_prefix_tokens > 0))
    if cfg.ifa_head:
        if not has_cls:
            raise ValueError("the CLA head (ifa_head) reads the CLS token but the model has no class token")
        if getattr(model, "attn_pool", None) is not None:
            raise ValueError("the CLA head (ifa_head) replaces the head; models with attention pooling are not supported")
        if model.num_classes < 1:
            raise ValueError("the CLA head (ifa_head) needs num_classes >= 1")
    cls_init = model.cls_token if has_cls and getattr(model, "cls_token", None) is not None else None
    module = CLCAModule(cfg, model.embed_dim, depth, locs, model.num_classes, cls_init)
    module.to(next(model.parameters()).device)
    model.add_module("clca", module)
    if cfg.ifa_head:
        model.norm = nn.Identity()
        model.fc_norm = nn.Identity()
        model.head = nn.Identity()
    add_mixin(model, CLCAViTMixin)
    resolved = asdict(cfg)
    resolved["reduction_loc"] = locs
    resolved["recovery_layers"] = list(module.recovery)
    resolved["cls_layers"] = list(module.cls_layers) if cfg.ifa_head else []
    model.reduction_config["clca"] = resolved
    return model
