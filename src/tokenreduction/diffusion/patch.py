"""Token merging inside a diffusers UNet (ToMe for SD and ATC), by hooks.

:func:`apply_patch` leaves the UNet's classes, weights and forward code as
they are: diffusers' current ``BasicTransformerBlock.forward`` runs unchanged.
Forward hooks add the merging around it:

* a pre-hook on the UNet records the latent size (H, W) of each call;
* a pre-hook on every ``BasicTransformerBlock`` computes the merge for this
  call from the block's input hidden states (B, N, C): its resolution is
  found by halving (H, W) (ceil, as the UNet's stride-2 convolutions do) until
  the token count matches; blocks downsampled more than ``max_downsample``
  times 1x, 2x, 4x... are left alone;
* pre/post hooks on the block's ``attn1`` (self-attention), ``attn2``
  (cross-attention) and ``ff`` (MLP), as chosen, merge the normalised hidden
  states going in and unmerge what comes out, before the residual add.

``ratio`` is the fraction of tokens removed (ToMe-SD's ``ratio``; the ATC
study's ``--reduction_ratio`` for SD). :func:`remove_patch` removes every hook.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..reduction.clustering import check_linkage
from .merge import MERGE_FUNCTIONS, MergeFn, compute_merge

STATE_ATTR = "_tokenreduction_merge"
SUBMODULES = {"merge_attn": "attn1", "merge_crossattn": "attn2", "merge_mlp": "ff"}


@dataclass
class MergeOptions:
    """Options of :func:`apply_patch` (see there)."""

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = False
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    merge_fn: str = "tome"
    linkage: str = "average"
    seed: int = 0

    def check(self) -> "MergeOptions":
        if not 0.0 <= float(self.ratio) < 1.0:
            raise ValueError(f"ratio (fraction of tokens removed) must be in [0, 1), got {self.ratio}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"max_downsample must be 1, 2, 4 or 8, got {self.max_downsample}")
        if self.sx < 1 or self.sy < 1:
            raise ValueError(f"sx and sy must be >= 1, got sx={self.sx}, sy={self.sy}")
        if self.merge_fn not in MERGE_FUNCTIONS:
            raise ValueError(f"unknown merge_fn {self.merge_fn!r}; use one of {', '.join(MERGE_FUNCTIONS)}")
        if self.merge_fn == "atc":
            check_linkage(self.linkage)
        return self


@dataclass
class PatchState:
    """What the hooks share: options, the dst-selection generator, the latent
    size of the current UNet call, the merge of each block's current call, and
    the last (N, M) token counts per block name (for logs and tests)."""

    options: MergeOptions
    generator: torch.Generator
    handles: List[Any] = field(default_factory=list)
    latent_hw: Optional[Tuple[int, int]] = None
    active: Dict[str, Optional[Tuple[MergeFn, MergeFn]]] = field(default_factory=dict)
    pending: Dict[Tuple[str, str], bool] = field(default_factory=dict)
    tokens: Dict[str, Tuple[int, int]] = field(default_factory=dict)


def _unet(model: Any) -> nn.Module:
    """The module to patch: a pipeline's ``unet``, or the module itself."""
    module = getattr(model, "unet", model)
    if not isinstance(module, nn.Module):
        raise ValueError(f"expected a diffusers pipeline or UNet (an nn.Module), got {type(model).__name__}")
    return module


def transformer_blocks(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, block) of every diffusers BasicTransformerBlock in `module`."""
    from diffusers.models.attention import BasicTransformerBlock

    return [(n, m) for n, m in module.named_modules() if isinstance(m, BasicTransformerBlock)]


def grid_size(latent_hw: Tuple[int, int], num_tokens: int, max_downsample: int) -> Optional[Tuple[int, int]]:
    """(h, w) of a block's token grid if it is downsampled at most
    `max_downsample` times relative to the latent (H, W), else None."""
    h, w = latent_hw
    downsample = 1
    while h * w > num_tokens and downsample < max_downsample:
        h, w, downsample = math.ceil(h / 2), math.ceil(w / 2), downsample * 2
    return (h, w) if h * w == num_tokens else None


def _first_arg(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _replace_first_arg(args: tuple, kwargs: dict, name: str, value: torch.Tensor) -> Tuple[tuple, dict]:
    if args:
        return (value,) + tuple(args[1:]), kwargs
    return args, {**kwargs, name: value}


def _make_hooks(state: PatchState):
    opts = state.options

    def unet_pre(module, args, kwargs):
        sample = _first_arg(args, kwargs, "sample")
        state.latent_hw = tuple(sample.shape[-2:]) if sample.dim() == 4 else None

    def block_pre(name):
        def hook(module, args, kwargs):
            x = _first_arg(args, kwargs, "hidden_states")
            state.active[name] = None
            if state.latent_hw is None or x.dim() != 3:
                return
            hw = grid_size(state.latent_hw, x.shape[1], opts.max_downsample)
            if hw is None:
                return
            merge, unmerge, num_out = compute_merge(
                x, hw[0], hw[1], opts.ratio, opts.merge_fn, opts.sx, opts.sy, opts.use_rand,
                state.generator, opts.linkage,
            )
            state.tokens[name] = (x.shape[1], num_out)
            if num_out < x.shape[1]:
                state.active[name] = (merge, unmerge)

        return hook

    def block_post(name):
        def hook(module, args, kwargs, output):
            state.active[name] = None

        return hook

    def sub_pre(name, sub):
        def hook(module, args, kwargs):
            closures = state.active.get(name)
            x = _first_arg(args, kwargs, "hidden_states")
            # feed-forward chunking calls ff on slices: leave those unmerged
            applies = closures is not None and x.dim() == 3 and x.shape[1] == state.tokens[name][0]
            state.pending[(name, sub)] = applies
            if applies:
                return _replace_first_arg(args, kwargs, "hidden_states", closures[0](x))
            return None

        return hook

    def sub_post(name, sub):
        def hook(module, args, kwargs, output):
            if state.pending.pop((name, sub), False):
                return state.active[name][1](output)
            return None

        return hook

    return unet_pre, block_pre, block_post, sub_pre, sub_post


def apply_patch(
    model: Any,
    ratio: float = 0.5,
    max_downsample: int = 1,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = False,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    merge_fn: str = "tome",
    linkage: str = "average",
    seed: int = 0,
) -> Any:
    """Add token merging to a diffusers UNet or pipeline (in place; returns it).

    ratio:          fraction of the spatial tokens removed, in [0, 1).
    max_downsample: merge only in blocks at latent downsampling <= this (1, 2, 4, 8).
    sx, sy:         ToMe's destination grid: one destination per sy x sx cell.
    use_rand:       random destination within each cell (from a CPU generator
                    seeded with `seed`, see :func:`reseed`), else the top-left
                    (the default, as the study without --use_rand).
    merge_attn / merge_crossattn / merge_mlp: merge around self-attention,
                    cross-attention, the MLP.
    merge_fn:       "tome" (bipartite matching, 2-D strided destinations) or
                    "atc" (agglomerative clustering, cosine distance of the
                    block's input hidden states, `linkage`).
    A model patched before is unpatched first. Raises ValueError for bad
    options or a model without BasicTransformerBlocks.
    """
    unet = _unet(model)
    opts = MergeOptions(
        float(ratio), int(max_downsample), int(sx), int(sy), bool(use_rand), bool(merge_attn),
        bool(merge_crossattn), bool(merge_mlp), str(merge_fn), str(linkage), int(seed),
    ).check()
    blocks = transformer_blocks(unet)
    if not blocks:
        raise ValueError(f"{type(unet).__name__} has no diffusers BasicTransformerBlock to patch")
    remove_patch(unet)
    state = PatchState(options=opts, generator=torch.Generator().manual_seed(opts.seed))
    unet_pre, block_pre, block_post, sub_pre, sub_post = _make_hooks(state)
    handles = [unet.register_forward_pre_hook(unet_pre, with_kwargs=True)]
    for name, block in blocks:
        handles.append(block.register_forward_pre_hook(block_pre(name), with_kwargs=True))
        handles.append(block.register_forward_hook(block_post(name), with_kwargs=True))
        for flag, sub in SUBMODULES.items():
            module = getattr(block, sub, None)
            if getattr(opts, flag) and module is not None:
                handles.append(module.register_forward_pre_hook(sub_pre(name, sub), with_kwargs=True))
                handles.append(module.register_forward_hook(sub_post(name, sub), with_kwargs=True))
    state.handles = handles
    setattr(unet, STATE_ATTR, state)
    return model


def patch_state(model: Any) -> Optional[PatchState]:
    """The merge state of a patched UNet/pipeline, or None if unpatched."""
    return getattr(_unet(model), STATE_ATTR, None)


def remove_patch(model: Any) -> Any:
    """Remove the token-merging hooks (a no-op on an unpatched model)."""
    unet = _unet(model)
    state = getattr(unet, STATE_ATTR, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        delattr(unet, STATE_ATTR)
    return model


def reseed(model: Any, seed: int) -> None:
    """Restart the destination-selection generator (e.g. once per image, so
    each image's merges do not depend on the images generated before it)."""
    state = patch_state(model)
    if state is not None:
        state.generator.manual_seed(int(seed))
