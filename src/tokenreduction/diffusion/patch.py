"""Token merging inside a diffusers backbone (ToMe for SD and ATC), by hooks.

Supported backbones: every diffusers model whose transformer blocks are
``BasicTransformerBlock`` and whose token grid the patch can name:

* UNets (``UNet2DConditionModel``: SD 1.x, SD 2.x, SDXL): a block's grid is
  the latent (H, W) halved (ceil, as the UNet's stride-2 convolutions do) once
  per level it sits below the top; the level (downsampling 1, 2, 4, 8) of
  every block is read from the UNet's structure when patching.
* DiT-style transformers (``PixArtTransformer2DModel``,
  ``DiTTransformer2DModel``, a patched ``Transformer2DModel``): every block
  runs on the patch embedding's grid (H // p, W // p).
* any other module holding BasicTransformerBlocks whose forward takes the
  latent (B, C, H, W) first (e.g. one block behind a UNet-like call): the grid
  is found by halving (H, W) until the token count matches.

Backbones with other transformer blocks (SD3's ``JointTransformerBlock``,
Flux's ``FluxTransformerBlock``/``FluxSingleTransformerBlock``, video blocks)
are refused with a message naming the block type.

:func:`apply_patch` leaves the model's classes, weights, attention processors
(SDPA by default) and forward code as they are: diffusers' own
``BasicTransformerBlock.forward`` runs unchanged. Forward hooks add merging:

* a pre-hook on the backbone records the latent size (H, W) of each call,
  and a post-hook warns (once) when a call with ratio > 0 merged nothing;
* a pre-hook on every patched block computes the merge of this call from the
  block's input hidden states (B, N, C) on the block's grid;
* pre/post hooks on the block's ``attn1`` (self-attention), ``attn2``
  (cross-attention) and ``ff`` (MLP), as chosen, merge the normalised hidden
  states going in and unmerge what comes out, before the gate and residual.

``ratio`` is the fraction of tokens removed (ToMe-SD's ``ratio``; the ATC
study's ``--reduction_ratio`` for SD). :func:`remove_patch` removes every hook.
A patch that would merge nothing is refused when patching (no block at the
chosen levels) or warned about at the first call that merged nothing.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..reduction.clustering import check_linkage
from .merge import MERGE_FUNCTIONS, MergeFn, compute_merge, max_tome_ratio

STATE_ATTR = "_tokenreduction_merge"
SUBMODULES = {"merge_attn": "attn1", "merge_crossattn": "attn2", "merge_mlp": "ff"}
DOWNSAMPLINGS = (1, 2, 4, 8)
#: transformer blocks of backbones the patch refuses, with the models that use them
UNSUPPORTED_BLOCKS = {
    "JointTransformerBlock": "SD3 (joint image-text attention)",
    "SD3SingleTransformerBlock": "SD3.5",
    "FluxTransformerBlock": "Flux",
    "FluxSingleTransformerBlock": "Flux",
}


class NothingMergedWarning(RuntimeWarning):
    """A patched call with ratio > 0 merged no token (see :func:`apply_patch`)."""


@dataclass
class MergeOptions:
    """Options of :func:`apply_patch` (see there). ``max_downsample=None``:
    the UNet's highest-resolution level that has transformer blocks."""

    ratio: float = 0.5
    max_downsample: Optional[int] = None
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
        if self.max_downsample is not None and self.max_downsample not in DOWNSAMPLINGS:
            raise ValueError(f"max_downsample must be 1, 2, 4, 8 or None (auto), got {self.max_downsample}")
        if self.sx < 1 or self.sy < 1:
            raise ValueError(f"sx and sy must be >= 1, got sx={self.sx}, sy={self.sy}")
        if self.merge_fn not in MERGE_FUNCTIONS:
            raise ValueError(f"unknown merge_fn {self.merge_fn!r}; use one of {', '.join(MERGE_FUNCTIONS)}")
        if self.merge_fn == "tome" and self.ratio > max_tome_ratio(self.sx, self.sy):
            raise ValueError(
                f"ratio {self.ratio} is above what ToMe-SD can merge with sx={self.sx}, sy={self.sy}: at most "
                f"1 - 1/(sx*sy) = {max_tome_ratio(self.sx, self.sy):.4g} of the tokens (one destination per "
                "cell stays); tomesd caps it without a word, this patch refuses it"
            )
        if self.merge_fn == "atc":
            check_linkage(self.linkage)
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ValueError("merge_attn, merge_crossattn and merge_mlp are all off: nothing would be merged")
        return self


@dataclass
class PatchedBlock:
    """One patched block: its name, module, and downsampling level relative
    to the latent (UNets), 1 on a DiT's patch grid, None when the grid is
    searched for (other modules)."""

    name: str
    module: nn.Module
    level: Optional[int]


@dataclass
class Backbone:
    """The module the patch hooks: ``kind`` "unet", "dit" or "module"
    (anything else holding BasicTransformerBlocks), the DiT patch size (1
    otherwise), and (name, module, level) of each BasicTransformerBlock."""

    module: nn.Module
    kind: str
    patch_size: int
    blocks: List[PatchedBlock]

    @property
    def levels(self) -> List[int]:
        return sorted({b.level for b in self.blocks if b.level is not None})


@dataclass
class PatchState:
    """What the hooks share: options, the backbone, the dst-selection
    generators (one per device, all seeded with ``options.seed``), the latent
    size of the current call, the merge of each block's current call, and the
    last (N, M) token counts per block name (for logs and tests)."""

    options: MergeOptions
    backbone: Backbone
    generators: Dict[torch.device, torch.Generator] = field(default_factory=dict)
    handles: List[Any] = field(default_factory=list)
    latent_hw: Optional[Tuple[int, int]] = None
    active: Dict[str, Optional[Tuple[MergeFn, MergeFn]]] = field(default_factory=dict)
    pending: Dict[Tuple[str, str], bool] = field(default_factory=dict)
    tokens: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    merged_this_call: bool = False
    warned: bool = False

    def generator(self, device: torch.device) -> torch.Generator:
        """The destination-selection generator of `device` (made on first use)."""
        gen = self.generators.get(device)
        if gen is None:
            gen = self.generators[device] = torch.Generator(device=device).manual_seed(self.options.seed)
        return gen

    def reseed(self, seed: int) -> None:
        self.options.seed = int(seed)
        for gen in self.generators.values():
            gen.manual_seed(int(seed))


def _backbone_module(model: Any) -> nn.Module:
    """The module to patch: a pipeline's ``unet`` or ``transformer``, or the module itself."""
    for attr in ("unet", "transformer"):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            return module
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"expected a diffusers pipeline, UNet or transformer (an nn.Module), got {type(model).__name__}"
        )
    return model


def transformer_blocks(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, block) of every diffusers BasicTransformerBlock in `module`."""
    from diffusers.models.attention import BasicTransformerBlock

    return [(n, m) for n, m in module.named_modules() if isinstance(m, BasicTransformerBlock)]


def _refuse_unsupported(module: nn.Module) -> None:
    """Raise for transformer blocks the patch does not handle (named)."""
    from diffusers.models.attention import BasicTransformerBlock

    found = sorted({
        type(m).__name__ for m in module.modules()
        if not isinstance(m, BasicTransformerBlock)
        and (type(m).__name__ in UNSUPPORTED_BLOCKS or type(m).__name__.endswith("TransformerBlock"))
    })
    if found:
        known = [f"{name} ({UNSUPPORTED_BLOCKS[name]})" for name in found if name in UNSUPPORTED_BLOCKS]
        other = [name for name in found if name not in UNSUPPORTED_BLOCKS]
        raise ValueError(
            f"{type(module).__name__} has {', '.join(known + other)} blocks, which token merging does not handle: "
            "it supports backbones built from diffusers' BasicTransformerBlock (SD 1.x/2.x and SDXL UNets, "
            "PixArt, DiT); see docs/diffusion.md"
        )


_LEVEL_PATTERN = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def _unet_level(name: str, n_down: int, n_up: int) -> int:
    """Downsampling of a UNet2DConditionModel block from its module path:
    down_blocks.i runs at 2^i, the mid block at the bottom, up_blocks.j at
    2^(n_up - 1 - j) (every level but the last halves the grid)."""
    match = _LEVEL_PATTERN.match(name)
    if match is None:
        raise ValueError(f"cannot place the UNet block {name} at a resolution level")
    if match.group(1) == "down_blocks":
        return 2 ** int(match.group(2))
    if match.group(1) == "up_blocks":
        return 2 ** (n_up - 1 - int(match.group(2)))
    return 2 ** (n_down - 1)


def find_backbone(model: Any) -> Backbone:
    """The backbone of `model` (pipeline or module) with its blocks and
    their levels; raises ValueError for unsupported or block-less models."""
    module = _backbone_module(model)
    _refuse_unsupported(module)
    named = transformer_blocks(module)
    if not named:
        raise ValueError(f"{type(module).__name__} has no diffusers BasicTransformerBlock to patch")
    from diffusers.models.embeddings import PatchEmbed

    pos_embed = getattr(module, "pos_embed", None)
    down, up = getattr(module, "down_blocks", None), getattr(module, "up_blocks", None)
    if isinstance(pos_embed, PatchEmbed):
        return Backbone(module, "dit", int(pos_embed.patch_size), [PatchedBlock(n, m, 1) for n, m in named])
    if isinstance(down, nn.ModuleList) and isinstance(up, nn.ModuleList):
        blocks = [PatchedBlock(n, m, _unet_level(n, len(down), len(up))) for n, m in named]
        return Backbone(module, "unet", 1, blocks)
    return Backbone(module, "module", 1, [PatchedBlock(n, m, None) for n, m in named])


def grid_size(latent_hw: Tuple[int, int], num_tokens: int, max_downsample: int) -> Optional[Tuple[int, int]]:
    """(h, w) of a block's token grid if it is downsampled at most
    `max_downsample` times relative to the latent (H, W), else None."""
    h, w = latent_hw
    downsample = 1
    while h * w > num_tokens and downsample < max_downsample:
        h, w, downsample = math.ceil(h / 2), math.ceil(w / 2), downsample * 2
    return (h, w) if h * w == num_tokens else None


def level_grid(latent_hw: Tuple[int, int], level: int) -> Tuple[int, int]:
    """(h, w) of a UNet level: (H, W) halved (ceil) log2(level) times."""
    h, w = latent_hw
    while level > 1:
        h, w, level = math.ceil(h / 2), math.ceil(w / 2), level // 2
    return h, w


def _first_arg(args: tuple, kwargs: dict, *names: str) -> Any:
    if args:
        return args[0]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return None


def _replace_first_arg(args: tuple, kwargs: dict, name: str, value: torch.Tensor) -> Tuple[tuple, dict]:
    if args:
        return (value,) + tuple(args[1:]), kwargs
    return args, {**kwargs, name: value}


def _block_grid(state: PatchState, block: PatchedBlock, num_tokens: int) -> Optional[Tuple[int, int]]:
    """The (h, w) grid of `block`'s tokens in the current call; raises when a
    UNet or DiT block's token count does not fit its grid."""
    backbone = state.backbone
    latent = state.latent_hw
    if latent is None:
        if backbone.kind == "module":
            return None
        raise RuntimeError(
            f"token merging found no latent (B, C, H, W) as the first argument of {type(backbone.module).__name__}"
        )
    if backbone.kind == "module":
        limit = state.options.max_downsample or 1
        return grid_size(latent, num_tokens, limit)
    if backbone.kind == "dit":
        hw = (latent[0] // backbone.patch_size, latent[1] // backbone.patch_size)
        where = f"the {latent[0]}x{latent[1]} latent's patch grid (patch size {backbone.patch_size})"
    else:
        hw = level_grid(latent, block.level)
        where = f"downsampling {block.level} of the {latent[0]}x{latent[1]} latent"
    if hw[0] * hw[1] != num_tokens:
        raise RuntimeError(
            f"block {block.name} got {num_tokens} tokens, but {where} has {hw[0]}x{hw[1]} = {hw[0] * hw[1]}"
        )
    return hw


def _make_hooks(state: PatchState):
    opts = state.options

    def backbone_pre(module, args, kwargs):
        sample = _first_arg(args, kwargs, "sample", "hidden_states")
        is_latent = isinstance(sample, torch.Tensor) and sample.dim() == 4
        state.latent_hw = tuple(sample.shape[-2:]) if is_latent else None
        state.merged_this_call = False

    def backbone_post(module, args, kwargs, output):
        if opts.ratio > 0 and not state.merged_this_call and not state.warned:
            state.warned = True
            counts = sorted({n for n, _ in state.tokens.values()})
            warnings.warn(
                f"token merging (ratio {opts.ratio}, merge_fn {opts.merge_fn}) merged no token in this call of "
                f"{type(module).__name__}: latent {state.latent_hw}, token counts of the patched blocks "
                f"{counts or 'none seen'} (too few tokens for the ratio, or no grid found)",
                NothingMergedWarning, stacklevel=2,
            )

    def block_pre(block: PatchedBlock):
        name = block.name

        def hook(module, args, kwargs):
            x = _first_arg(args, kwargs, "hidden_states")
            state.active[name] = None
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                return
            hw = _block_grid(state, block, x.shape[1])
            if hw is None:
                return
            generator = state.generator(x.device) if opts.use_rand else None
            merge, unmerge, num_out = compute_merge(
                x, hw[0], hw[1], opts.ratio, opts.merge_fn, opts.sx, opts.sy, opts.use_rand,
                generator, opts.linkage,
            )
            state.tokens[name] = (x.shape[1], num_out)
            if num_out < x.shape[1]:
                state.active[name] = (merge, unmerge)
                state.merged_this_call = True

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
            if not applies:
                return None
            if sub == "attn1" and kwargs.get("attention_mask") is not None:
                raise RuntimeError(f"block {name}: self-attention has a token mask, which merging cannot follow")
            return _replace_first_arg(args, kwargs, "hidden_states", closures[0](x))

        return hook

    def sub_post(name, sub):
        def hook(module, args, kwargs, output):
            if state.pending.pop((name, sub), False):
                return state.active[name][1](output)
            return None

        return hook

    return backbone_pre, backbone_post, block_pre, block_post, sub_pre, sub_post


def _select_blocks(backbone: Backbone, max_downsample: Optional[int]) -> List[PatchedBlock]:
    """The blocks to patch: UNet blocks at levels <= max_downsample (None:
    the highest-resolution level with blocks); every DiT block; every block
    of another module (its grid is searched for at each call)."""
    name = type(backbone.module).__name__
    if backbone.kind == "dit":
        if max_downsample not in (None, 1):
            raise ValueError(
                f"max_downsample={max_downsample} applies to UNets; every block of {name} runs on the patch "
                "grid (leave it unset or 1)"
            )
        return list(backbone.blocks)
    if backbone.kind == "module":
        return list(backbone.blocks)
    limit = min(backbone.levels) if max_downsample is None else max_downsample
    chosen = [b for b in backbone.blocks if b.level <= limit]
    if not chosen:
        raise ValueError(
            f"max_downsample={max_downsample} selects no transformer block of {name}: its BasicTransformerBlocks "
            f"run at downsampling {', '.join(map(str, backbone.levels))} (an SDXL-style UNet has no attention "
            f"at the first level); use max_downsample={min(backbone.levels)} or leave it unset (auto)"
        )
    return chosen


def apply_patch(
    model: Any,
    ratio: float = 0.5,
    max_downsample: Optional[int] = None,
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
    """Add token merging to a diffusers UNet, DiT-style transformer or
    pipeline (in place; returns it).

    ratio:          fraction of the spatial tokens removed, in [0, 1); for
                    ToMe at most 1 - 1/(sx*sy) (refused above).
    max_downsample: UNets: merge in blocks at latent downsampling <= this
                    (1, 2, 4, 8); None (default) = the highest-resolution level
                    that has transformer blocks (1 for SD 1.x/2.x, as
                    tomesd's default; 2 for SDXL). A value that selects no
                    block is refused. DiT-style transformers: every block
                    (None or 1 only).
    sx, sy:         ToMe's destination grid: one destination per sy x sx cell.
    use_rand:       random destination within each cell (from a generator on
                    the block's device seeded with `seed`, see :func:`reseed`),
                    else the top-left (the default, as the study without
                    --use_rand).
    merge_attn / merge_crossattn / merge_mlp: merge around self-attention,
                    cross-attention, the MLP.
    merge_fn:       "tome" (bipartite matching, 2-D strided destinations) or
                    "atc" (agglomerative clustering, cosine distance of the
                    block's input hidden states, `linkage`).
    A model patched before is unpatched first. Raises ValueError for bad
    options, a model without BasicTransformerBlocks, or one with transformer
    blocks this patch does not handle (named). A call with ratio > 0 that
    merges nothing warns once (:class:`NothingMergedWarning`).
    """
    opts = MergeOptions(
        float(ratio), None if max_downsample is None else int(max_downsample), int(sx), int(sy), bool(use_rand),
        bool(merge_attn), bool(merge_crossattn), bool(merge_mlp), str(merge_fn), str(linkage), int(seed),
    ).check()
    backbone = find_backbone(model)
    chosen = _select_blocks(backbone, opts.max_downsample)
    module = backbone.module
    remove_patch(module)
    state = PatchState(options=opts, backbone=Backbone(module, backbone.kind, backbone.patch_size, chosen))
    backbone_pre, backbone_post, block_pre, block_post, sub_pre, sub_post = _make_hooks(state)
    handles = [
        module.register_forward_pre_hook(backbone_pre, with_kwargs=True),
        module.register_forward_hook(backbone_post, with_kwargs=True),
    ]
    for block in chosen:
        handles.append(block.module.register_forward_pre_hook(block_pre(block), with_kwargs=True))
        handles.append(block.module.register_forward_hook(block_post(block.name), with_kwargs=True))
        for flag, sub in SUBMODULES.items():
            submodule = getattr(block.module, sub, None)
            if getattr(opts, flag) and submodule is not None:
                handles.append(submodule.register_forward_pre_hook(sub_pre(block.name, sub), with_kwargs=True))
                handles.append(submodule.register_forward_hook(sub_post(block.name, sub), with_kwargs=True))
    state.handles = handles
    setattr(module, STATE_ATTR, state)
    return model


def patch_state(model: Any) -> Optional[PatchState]:
    """The merge state of a patched model/pipeline, or None if unpatched."""
    return getattr(_backbone_module(model), STATE_ATTR, None)


def remove_patch(model: Any) -> Any:
    """Remove the token-merging hooks (a no-op on an unpatched model)."""
    module = _backbone_module(model)
    state = getattr(module, STATE_ATTR, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        delattr(module, STATE_ATTR)
    return model


def reseed(model: Any, seed: int) -> None:
    """Restart the destination-selection generators (e.g. once per image, so
    each image's merges do not depend on the images generated before it)."""
    state = patch_state(model)
    if state is not None:
        state.reseed(seed)
