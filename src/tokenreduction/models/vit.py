"""Build timm ViTs with a reduction method inserted at chosen blocks.

``create_model`` wraps ``timm.create_model`` and patches the model in place
(:func:`patch_model`): every ``Block`` becomes a :class:`TokenBlock`, the model
class gets a ``forward_features`` that threads one
:class:`~tokenreduction.models.context.ReductionContext` through the blocks,
and reducers are attached at ``reduction_loc``. Pretrained weights and
parameter names stay as timm has them, so timm checkpoints load unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..reduction import get_method
from .blocks import TokenBlock
from .budget import BUDGETS, TokenBudget, r_schedule
from .context import ReductionContext


class ReducedViTMixin:
    """Methods added to the patched model class."""

    reduction_state: Optional[ReductionContext] = None
    keep_cls_per_stage: bool = False

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a reduced ViT takes no external attention mask")
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        B, T, _ = x.shape
        ctx = ReductionContext(
            num_prefix=self.num_prefix_tokens,
            size=torch.ones(B, T, dtype=x.dtype, device=x.device),
            prop_attn=self.reduction_config["prop_attn"],
        )
        x = self._before_blocks(x, ctx)
        stage_blocks = set(self.reduction_config["reduction_loc"])
        for i, blk in enumerate(self.blocks):
            x = blk(x, ctx)
            if self.keep_cls_per_stage and i in stage_blocks and self.num_prefix_tokens:
                ctx.cls_per_stage.append(x[:, 0])
            x = self._after_block(i, x, ctx)
        x = self.norm(x)
        ctx.features = x
        self.reduction_state = ctx
        return x

    def _before_blocks(self, x: torch.Tensor, ctx: ReductionContext) -> torch.Tensor:
        """Extension point (CLCA, :mod:`tokenreduction.clca`): the embedded
        tokens before block 0; extra non-patch tokens go after the prefix
        and count in ``ctx.num_prefix``. The plain model returns x."""
        return x

    def _after_block(self, index: int, x: torch.Tensor, ctx: ReductionContext) -> torch.Tensor:
        """Extension point: the output of block `index` (CLCA's cache and
        recovery). The plain model returns x."""
        return x

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        ctx = self.reduction_state
        extra = ctx is not None and ctx.num_prefix != self.num_prefix_tokens  # CLCA's extra tokens
        if pool_type == "avg" and self.attn_pool is None and ctx is not None and (ctx.stages or extra):
            # mean over the original patches: each token counts by its size
            p = ctx.num_prefix
            start = 0 if self.pool_include_prefix else p
            weight = ctx.size[:, start:].to(x.dtype)
            if ctx.mask is not None:
                weight = weight * ctx.mask[:, start:].to(x.dtype)
            weight = weight / weight.sum(1, keepdim=True)
            return torch.einsum("btc,bt->bc", x[:, start:], weight)
        return super().pool(x, pool_type)

    def reduction_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the learnable reduction modules, for their own
        optimizer parameter group."""
        return [(n, q) for n, q in self.named_parameters() if ".reduction." in n]

    @property
    def tokens_kept(self) -> list[int]:
        """Patch tokens kept after each stage in the last forward."""
        return [] if self.reduction_state is None else self.reduction_state.tokens_kept


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if issubclass(cls, ReducedViTMixin):
        return cls
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"Reduced{cls.__name__}", (ReducedViTMixin, cls), {})
    return _PATCHED_CLASSES[cls]


def _check_locations(reduction_loc: Sequence[int], depth: int) -> list[int]:
    locs = [int(v) for v in reduction_loc]
    for loc in locs:
        if not 0 <= loc < depth:
            raise ValueError(
                f"reduction location {loc} is beyond the model's depth: blocks are 0..{depth - 1}"
            )
    if sorted(set(locs)) != locs:
        raise ValueError(f"reduction locations must be increasing and distinct, got {locs}")
    return locs


def patch_model(
    model: nn.Module,
    method: Optional[str] = None,
    keep_rate: Optional[Union[float, Sequence[float]]] = None,
    reduction_loc: Optional[Sequence[int]] = None,
    budget: Optional[str] = None,
    r: Optional[Union[int, Sequence[int]]] = None,
    r_schedule_name: Union[str, float] = "constant",
    prop_attn: Optional[bool] = None,
    method_kwargs: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """Patch a timm VisionTransformer in place to reduce tokens; returns it.

    method None (or "none") gives the unreduced model through the same code,
    which the baselines use. See :mod:`tokenreduction.models.budget` for the
    budgets; ``budget`` defaults to "r" when r is given, else "geometric".
    """
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"token reduction patches timm VisionTransformer models, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (Block, TokenBlock):
            raise ValueError(f"block {i} is a {type(blk).__name__}; only timm's standard Block is supported")
    depth = len(model.blocks)
    num_patches = model.patch_embed.num_patches
    method = None if method in (None, "none", "deit", "baseline") else method
    budget = budget or ("r" if r is not None else "geometric")
    if budget not in BUDGETS:
        raise ValueError(f"unknown token budget {budget!r}; use one of {', '.join(BUDGETS)}")
    if reduction_loc is None:
        reduction_loc = range(depth) if budget == "r" else (3, 6, 9)
    locs = _check_locations(reduction_loc, depth) if method is not None else []
    method_kwargs = dict(method_kwargs or {})

    reducer_cls = get_method(method) if method is not None else None
    token_budget = None
    if reducer_cls is not None:
        if reducer_cls.needs_class_token and model.num_prefix_tokens == 0:
            raise ValueError(f"method {method!r} reads the CLS attention but the model has no class token")
        if budget == "r":
            if r is None:
                raise ValueError("the 'r' budget needs r")
            token_budget = TokenBudget("r", num_patches, len(locs), r_per_block=r_schedule(r, depth, r_schedule_name))
        else:
            if keep_rate is None:
                raise ValueError(f"method {method!r} with the {budget!r} budget needs keep_rate")
            token_budget = TokenBudget(budget, num_patches, len(locs), keep_rate=keep_rate)
    if prop_attn is None:
        prop_attn = bool(reducer_cls is not None and reducer_cls.uses_sizes)

    # simulate the stages to validate the budget and size learned modules
    counts = []
    n = num_patches
    reducers = {}
    for stage, loc in enumerate(locs):
        if budget == "r":
            r_here = token_budget.r_per_block[loc]
            if r_here >= n:
                raise ValueError(
                    f"r={r_here} at block {loc} is too large: only {n} patch tokens are left there"
                )
        stage_budget = token_budget.stage(stage, loc, n)
        sized = _sized(reducer_cls, n, stage_budget, tuple(model.patch_embed.grid_size))
        reducer = reducer_cls(dim=model.embed_dim, **sized, **method_kwargs)
        n = reducer.output_count(n, stage_budget)
        counts.append(n)
        reducers[loc] = reducer

    model.__class__ = _patched_class(type(model))
    for i, blk in enumerate(model.blocks):
        blk.__class__ = TokenBlock
        blk.block_index = i
        blk.stage_index = locs.index(i) if i in locs else -1
        blk.budget_fn = token_budget.stage if token_budget is not None else None
        blk.provide_received = False
        if "reduction" in blk._modules:
            del blk._modules["reduction"]
        if i in reducers:
            blk.add_module("reduction", reducers[i])
    for loc, reducer in reducers.items():
        if "attn_received" in reducer.needs and loc > 0:
            model.blocks[loc - 1].provide_received = True
    model.reduction_config = {
        "method": method,
        "keep_rate": keep_rate,
        "reduction_loc": locs,
        "budget": budget,
        "r": None if token_budget is None or token_budget.r_per_block is None else token_budget.r_per_block,
        "prop_attn": bool(prop_attn),
        "expected_tokens": counts,
        "num_patches": num_patches,
        "method_kwargs": method_kwargs,
    }
    return model


def _sized(reducer_cls, num_tokens: int, stage_budget, grid_size: Optional[tuple] = None) -> dict:
    """Constructor arguments that fix the output count of learned methods, and
    the model's patch grid (h, w) for methods that ask (``needs_grid``)."""
    kwargs = {}
    if reducer_cls.fixed_output:
        kwargs.update(num_out=min(stage_budget.target, num_tokens), num_in=num_tokens)
    if getattr(reducer_cls, "needs_grid", False):
        kwargs["grid_size"] = grid_size
    return kwargs


def load_checkpoint(model: nn.Module, path: Union[str, Path], strict_backbone: bool = True) -> nn.Module:
    """Load a local checkpoint into a (patched or plain) timm ViT.

    Accepts a plain state dict or a dict holding one under ``model``,
    ``state_dict`` or ``model_ema`` (DeiT, MAE and this project's own
    checkpoints), strips DDP's ``module.`` prefix and converts through timm's
    own ``checkpoint_filter_fn`` (original DeiT/MAE layouts, position embedding
    resizing). MAE's decoder weights are ignored; a model with global average
    pooling (``fc_norm``) loading a checkpoint with the final ``norm`` drops
    that norm and keeps ``fc_norm`` as initialised, as MAE's fine-tuning
    does. Missing backbone weights are an error naming them; the
    classifier head may differ in size (fine-tuning on another dataset) and is
    then left as initialised.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    raw = torch.load(path, map_location="cpu", weights_only=False)
    state = raw
    if isinstance(raw, dict):
        for key in ("model_ema", "model", "state_dict"):
            if key in raw and isinstance(raw[key], dict):
                state = raw[key]
                break
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no state dict (looked for keys model, state_dict, model_ema)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    # MAE pre-training files may carry the decoder (and its mask_token, which
    # timm's filter would take for a DINOv2 checkpoint): the encoder is all we load
    state = {k: v for k, v in state.items() if k != "mask_token" and not k.startswith("decoder")}
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    if "fc_norm.weight" in own and "norm.weight" not in own and "fc_norm.weight" not in state:
        # global average pooling (MAE fine-tuning) on a checkpoint with the final
        # norm: as MAE does, drop that norm and start fc_norm afresh
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    for key in list(state):
        if key.startswith("head") and key in own and state[key].shape != own[key].shape:
            del state[key]  # another number of classes: keep the new head
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".reduction." not in k and not k.startswith(("head", "fc_norm"))]
    if strict_backbone and missing:
        raise ValueError(f"{path} lacks weights for {len(missing)} parameters, e.g. {missing[:5]}")
    if strict_backbone and unexpected:
        raise ValueError(f"{path} has {len(unexpected)} weights the model does not, e.g. {unexpected[:5]}")
    return model


def create_model(
    name: str,
    method: Optional[str] = None,
    keep_rate: Optional[Union[float, Sequence[float]]] = None,
    reduction_loc: Optional[Sequence[int]] = None,
    budget: Optional[str] = None,
    r: Optional[Union[int, Sequence[int]]] = None,
    r_schedule: Union[str, float] = "constant",
    prop_attn: Optional[bool] = None,
    method_kwargs: Optional[dict[str, Any]] = None,
    pretrained: bool = False,
    checkpoint_path: Optional[Union[str, Path]] = None,
    clca: Optional[dict[str, Any]] = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, pretrained, **timm_kwargs)`` with `method`
    inserted at `reduction_loc` (0-indexed blocks).

    keep_rate means tokens kept for pruning methods, clusters for merging
    methods and the maximum kept for ATS; how it turns into counts is the
    `budget` (see :mod:`tokenreduction.models.budget`). ``r`` with
    ``r_schedule`` removes r tokens per block ToMe-style. ``pretrained=True``
    uses timm's weight loading; ``checkpoint_path`` loads a local file.
    ``clca`` (a dict of :func:`tokenreduction.clca.apply_clca` options, e.g.
    ``dict(ifa_head=True, clc=True, num_clr=1)``) adds cross-layer cache
    aggregation after the weights are loaded.
    Every bad argument raises one ValueError naming it, at build time.
    """
    if keep_rate is not None and not isinstance(keep_rate, (int, float)):
        keep_rate = [float(v) for v in keep_rate]
    if method not in (None, "none", "deit", "baseline"):
        get_method(method)  # unknown names fail before timm builds anything
    model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    model = patch_model(
        model,
        method=method,
        keep_rate=keep_rate,
        reduction_loc=reduction_loc,
        budget=budget,
        r=r,
        r_schedule_name=r_schedule,
        prop_attn=prop_attn,
        method_kwargs=method_kwargs,
    )
    if clca:
        from ..clca import apply_clca

        apply_clca(model, **clca)
    return model


def count_flops(model: nn.Module, img_size: Optional[int] = None, batch_size: int = 1) -> float:
    """GFLOPs of one forward per image, counted by torch's FlopCounterMode on
    the actual forward (so per-block token counts are the real ones), in the
    convention of the papers (one multiply-add = one FLOP, as fvcore counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    if img_size is None:
        img_size = model.patch_embed.img_size[0]
    device = next(model.parameters()).device
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2 / batch_size / 1e9
