"""Build timm ViTs with a reduction method inserted at chosen blocks.

``create_model`` wraps ``timm.create_model`` and patches the model in place
(:func:`patch_model`): every ``Block`` becomes a :class:`TokenBlock`, the model
class gets a ``forward_features`` that threads one
:class:`~tokenreduction.models.context.ReductionContext` through the blocks,
and reducers are attached at ``reduction_loc``. Pretrained weights and
parameter names stay as timm has them, so timm checkpoints load unchanged.

After patching, :func:`set_budget` (or ``model.r = 8``, ``model.keep_rate =
0.5``) changes the token budget and keeps every weight, learned reducers
included; :func:`unpatch_model` gives the stock timm model back. Patched
classes are made from module-level mixins by :func:`compose_class` and rebuilt
by name on unpickling, so ``torch.save(model)`` and ``copy.deepcopy`` work.
Extensions (CLCA) are found through :mod:`.extensions`, never imported here.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..patterns import compose_assignments
from ..reduction import get_method
from ..safe_load import load_checkpoint_file
from .blocks import TokenBlock
from .budget import BUDGETS, TokenBudget
from .budget import r_schedule as _r_schedule
from .context import ReductionContext
from .extensions import apply_extensions, get_extension, list_extensions

#: reduction_config keys that record the patch; set_budget changes them
_LOCKED_KEYS = frozenset(
    ("method", "keep_rate", "reduction_loc", "budget", "r", "prop_attn", "expected_tokens", "num_patches",
     "method_kwargs")
)
_BASELINE_NAMES = (None, "none", "deit", "baseline")


class ReductionConfig(dict):
    """``model.reduction_config``: how the model reduces (method, keep_rate,
    reduction_loc, budget, r per block, prop_attn, expected_tokens,
    num_patches, method_kwargs; extensions add their own keys, e.g. ``clca``).

    A record, not a control: assigning one of those keys raises and names
    :func:`set_budget`, instead of being silently ignored by the forward."""

    def __setitem__(self, key: str, value: Any) -> None:
        if key in _LOCKED_KEYS:
            raise KeyError(
                f"reduction_config[{key!r}] records how the model was patched and does not change it; "
                "use tokenreduction.set_budget(model, keep_rate=..., r=..., budget=...) "
                "(or model.keep_rate / model.r), or patch_model for another method"
            )
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        if key in _LOCKED_KEYS:
            raise KeyError(f"reduction_config[{key!r}] cannot be removed; use tokenreduction.unpatch_model(model)")
        super().__delitem__(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, key: str, *default: Any) -> Any:
        if key in _LOCKED_KEYS and key in self:
            del self[key]  # raises
        return super().pop(key, *default)

    def _set(self, key: str, value: Any) -> None:
        """Internal: set a locked key (set_budget)."""
        dict.__setitem__(self, key, value)

    def __reduce__(self):
        return (ReductionConfig, (dict(self),))

    def __deepcopy__(self, memo: dict) -> "ReductionConfig":
        return ReductionConfig(copy.deepcopy(dict(self), memo))


# ---------------------------------------------------------------- classes
_COMPOSED: dict[tuple, type] = {}


def compose_class(base: type, mixins: tuple) -> type:
    """The class ``mixins[0], ..., mixins[-1], base`` (MRO order), made once
    and cached. Instances pickle through :meth:`ReducedViTMixin.__reduce_ex__`
    as (base, mixins), so the composed class needs no importable name."""
    mixins = tuple(mixins)
    key = (base, mixins)
    cls = _COMPOSED.get(key)
    if cls is None:
        prefix = "".join(getattr(m, "class_prefix", m.__name__) for m in mixins)
        cls = type(f"{prefix}{base.__name__}", mixins + (base,), {"_tr_base": base, "_tr_mixins": mixins})
        _COMPOSED[key] = cls
    return cls


def add_mixin(model: nn.Module, mixin: type) -> nn.Module:
    """Put `mixin` in front of a patched model's class (how an extension
    overrides the model's hooks); in place, returns the model."""
    if not isinstance(model, ReducedViTMixin):
        raise ValueError("add_mixin takes a model built by tokenreduction.create_model or patch_model")
    cls = type(model)
    if mixin in cls._tr_mixins:
        raise ValueError(f"the model already has {mixin.__name__}")
    model.__class__ = compose_class(cls._tr_base, (mixin,) + cls._tr_mixins)
    return model


def _rebuild(base: type, mixins: tuple) -> nn.Module:
    """Unpickling: an empty instance of the composed class (state follows)."""
    cls = compose_class(base, mixins)
    return cls.__new__(cls)


class ReducedViTMixin:
    """Methods added to the patched model class."""

    class_prefix = "Reduced"
    _tr_base: type = VisionTransformer
    _tr_mixins: tuple = ()
    reduction_state: Optional[ReductionContext] = None
    keep_cls_per_stage: bool = False

    # -------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a reduced ViT takes no external attention mask")
        x, ctx = self._embed(x)
        x, _ = self._run_blocks(x, ctx)
        x = self.norm(x)
        ctx.features = x
        self.reduction_state = ctx
        return x

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, ReductionContext]:
        """Images (B, 3, H, W) -> embedded tokens (B, T, C) and the forward's context."""
        x = self.patch_embed(x)
        if x.ndim == 4:  # dynamic_img_size: (B, h, w, C)
            grid = (int(x.shape[1]), int(x.shape[2]))
        else:
            grid = tuple(int(v) for v in self.patch_embed.grid_size)
        if grid != tuple(int(v) for v in self.patch_embed.grid_size):
            self._check_grid(grid)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        B, T, _ = x.shape
        ctx = ReductionContext(
            num_prefix=self.num_prefix_tokens,
            size=torch.ones(B, T, dtype=x.dtype, device=x.device),
            prop_attn=self.reduction_config["prop_attn"],
            num_patches=grid[0] * grid[1],
            grid=grid,
        )
        x = self._before_blocks(x, ctx)
        return x, ctx

    def _check_grid(self, grid: tuple) -> None:
        """An input whose patch grid differs from the build-time one
        (timm's ``dynamic_img_size``): the geometric budget counts from the
        actual patches; methods that rank the build-time grid refuse."""
        for blk in self.blocks:
            reducer = blk.reducer
            if reducer is not None and getattr(reducer, "needs_grid", False):
                build = tuple(int(v) for v in self.patch_embed.grid_size)
                raise ValueError(
                    f"method {self.reduction_config['method']!r} places patches on the build-time grid "
                    f"{build[0]}x{build[1]}, but this input has {grid[0]}x{grid[1]} patches "
                    "(dynamic_img_size): feed images of the build size or build the model at this size"
                )

    def _run_blocks(
        self, x: torch.Tensor, ctx: ReductionContext, take: Optional[set] = None, stop: Optional[int] = None
    ) -> tuple[torch.Tensor, list]:
        """Run the blocks (up to `stop`); returns x and, for each index in
        `take`, (its output, patch start, stages done). Honours timm's
        ``set_grad_checkpointing``: blocks that neither reduce nor feed a
        reducer are checkpointed (reducing blocks change the context, and
        recomputing them would record their stage twice)."""
        captured = []
        ckpt = bool(getattr(self, "grad_checkpointing", False)) and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            if stop is not None and i > stop:
                break
            if ckpt and blk.stage_index < 0 and not blk.provide_received and not (
                blk._forward_hooks or blk._forward_pre_hooks
            ):
                # a shallow copy: recomputation in the backward pass sees the
                # sizes and masks of this point, not those of the end
                x = checkpoint(blk, x, copy.copy(ctx), use_reentrant=False)
            else:
                x = blk(x, ctx)
            if self.keep_cls_per_stage and blk.stage_index >= 0 and self.num_prefix_tokens:
                ctx.cls_per_stage.append(x[:, 0])
            x = self._after_block(i, x, ctx)
            if take is not None and i in take:
                captured.append((x, ctx.num_prefix, len(ctx.stages)))
        return x, captured

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ):
        """timm's ``forward_intermediates`` on the *reduced* forward.

        ``output_fmt="NLC"``: each intermediate is the block's patch tokens as
        they are there, (B, M_i, C) with M_i the tokens left after the stages
        before it. ``"NCHW"``: (B, C, h, w) on the input's patch grid, each
        patch showing the token it ended in (merged patches share their
        token's features; soft methods by their argmax), pruned patches zero.
        Prefix tokens are the model's own (CLS, registers). Returns as timm
        does: (final features, intermediates), the list alone, or a dict.
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        if attn_mask is not None or is_causal:
            raise ValueError("a reduced ViT takes no external attention mask")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, ctx = self._embed(x)
        x, captured = self._run_blocks(x, ctx, take=set(take), stop=max_index if stop_early else None)
        self.reduction_state = ctx
        p0 = self.num_prefix_tokens
        intermediates, prefix_tokens = [], []
        for y, p, done in captured:
            y = self.norm(y) if norm else y
            prefix_tokens.append(y[:, :p0])
            patches = y[:, p:]
            if output_fmt == "NCHW":
                patches = _patches_to_grid(patches, [s.assignment for s in ctx.stages[:done]], ctx.grid)
            intermediates.append(patches)
        if output_dict:
            out = {"image_intermediates": intermediates}
            if p0 and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and p0:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

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
            # timm has pool_include_prefix only from 1.0.16 on; before, avg pools the patches only
            start = 0 if getattr(self, "pool_include_prefix", False) else p
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

    # ------------------------------------------------- budget as attributes
    @property
    def r(self) -> Optional[Union[int, list[int]]]:
        """Tokens removed per block under the 'r' budget (ToMe's ``model.r``):
        an int when every reduction block removes the same number, else the
        per-block list; None under a keep-rate budget. Assigning calls
        :func:`set_budget` (learned weights are kept)."""
        per_block = self.reduction_config.get("r")
        if per_block is None:
            return None
        at_locs = {per_block[i] for i in self.reduction_config["reduction_loc"]}
        return at_locs.pop() if len(at_locs) == 1 and len(set(per_block)) == 1 else list(per_block)

    @r.setter
    def r(self, value: Union[int, Sequence[int]]) -> None:
        set_budget(self, r=value)

    @property
    def keep_rate(self) -> Optional[Union[float, list[float]]]:
        """The keep rate of a keep-rate budget (None under 'r'); assigning
        calls :func:`set_budget`."""
        return self.reduction_config.get("keep_rate")

    @keep_rate.setter
    def keep_rate(self, value: Union[float, Sequence[float]]) -> None:
        set_budget(self, keep_rate=value)

    @property
    def budget(self) -> Optional[str]:
        """The budget's name (geometric, current, r); assigning calls :func:`set_budget`."""
        return self.reduction_config.get("budget") if self.reduction_config.get("method") else None

    @budget.setter
    def budget(self, value: str) -> None:
        set_budget(self, budget=value)

    @property
    def prop_attn(self) -> bool:
        """Proportional attention (log-size bias) once tokens are merged;
        assignable (ToMe's ``_tome_info["prop_attn"]``)."""
        return bool(self.reduction_config["prop_attn"])

    @prop_attn.setter
    def prop_attn(self, value: bool) -> None:
        self.reduction_config._set("prop_attn", bool(value))

    @property
    def method(self) -> Optional[str]:
        """The reduction method's name (None when unreduced); fixed at patch time."""
        return self.reduction_config.get("method")

    @method.setter
    def method(self, value: Any) -> None:
        raise AttributeError(
            "the method is fixed when the model is patched; use tokenreduction.patch_model(model, method=...)"
        )

    @property
    def reduction_loc(self) -> list[int]:
        """The reduction blocks (0-indexed); fixed at patch time."""
        return list(self.reduction_config.get("reduction_loc") or [])

    @reduction_loc.setter
    def reduction_loc(self, value: Any) -> None:
        raise AttributeError(
            "the reduction locations are fixed when the model is patched; "
            "use tokenreduction.patch_model(model, method=..., reduction_loc=...)"
        )

    # ------------------------------------------------------------- pickling
    def __reduce_ex__(self, protocol: int):
        """Pickle as (timm base class, mixins) + state: the composed class is
        rebuilt on loading. The last forward's context is not saved."""
        state = self.__getstate__()
        if "reduction_state" in state:
            state = dict(state, reduction_state=None)
        cls = type(self)
        return (_rebuild, (cls._tr_base, cls._tr_mixins), state)


def _patches_to_grid(patches: torch.Tensor, assignments: list, grid: tuple) -> torch.Tensor:
    """Patch tokens (B, M, C) after the stages with these `assignments` ->
    (B, C, h, w): every original patch shows the token it ended in, zero where
    it was dropped."""
    B, M, C = patches.shape
    h, w = grid
    if not assignments:
        return patches.reshape(B, h, w, C).permute(0, 3, 1, 2).contiguous()
    where = compose_assignments(assignments)[-1]  # (B, P)
    alive = (where >= 0).unsqueeze(-1).to(patches.dtype)
    full = patches.gather(1, where.clamp_min(0).unsqueeze(-1).expand(B, where.shape[1], C)) * alive
    return full.reshape(B, h, w, C).permute(0, 3, 1, 2).contiguous()


def _patched_class(cls: type) -> type:
    if issubclass(cls, ReducedViTMixin):
        return cls
    return compose_class(cls, (ReducedViTMixin,))


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


def _resolve_budget(
    method: str,
    budget: Optional[str],
    keep_rate: Optional[Union[float, Sequence[float]]],
    r: Optional[Union[int, Sequence[int]]],
    r_schedule_name: Union[str, float],
    num_patches: int,
    depth: int,
    locs: list[int],
) -> TokenBudget:
    """The TokenBudget the arguments describe; one ValueError per conflict."""
    if r is not None and keep_rate is not None:
        raise ValueError(
            "give either r (tokens removed per block, the 'r' budget) or keep_rate (a keep-rate budget), not both"
        )
    if budget not in BUDGETS:
        raise ValueError(f"unknown token budget {budget!r}; use one of {', '.join(BUDGETS)}")
    if budget == "r":
        if r is None:
            raise ValueError("the 'r' budget needs r")
        return TokenBudget("r", num_patches, len(locs), r_per_block=_r_schedule(r, depth, r_schedule_name),
                           stage_blocks=locs)
    if r is not None:
        raise ValueError(f"r belongs to the 'r' budget; the {budget!r} budget takes keep_rate")
    if keep_rate is None:
        raise ValueError(f"method {method!r} with the {budget!r} budget needs keep_rate")
    return TokenBudget(budget, num_patches, len(locs), keep_rate=keep_rate)


def _plan(model: nn.Module, reducer_cls, token_budget: TokenBudget, locs: list[int], make) -> list[int]:
    """Simulate the stages at the build-time patch count: validate the budget
    and get each stage's reducer from ``make(loc, sized_kwargs)``; returns the
    patch tokens expected after each stage."""
    counts = []
    n = model.patch_embed.num_patches
    for stage, loc in enumerate(locs):
        if token_budget.kind == "r":
            r_here = token_budget.r_per_block[loc]
            if r_here >= n:
                raise ValueError(f"r={r_here} at block {loc} is too large: only {n} patch tokens are left there")
        stage_budget = token_budget.stage(stage, loc, n)
        reducer = make(loc, _sized(reducer_cls, n, stage_budget, tuple(model.patch_embed.grid_size)))
        n = reducer.output_count(n, stage_budget)
        counts.append(n)
    return counts


def _install_budget(model: nn.Module, token_budget: Optional[TokenBudget]) -> None:
    for blk in model.blocks:
        blk.budget_fn = token_budget.stage if token_budget is not None else None


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
    Give r or keep_rate, not both. Patching again replaces the reducers (new
    weights); to change only the budget use :func:`set_budget`.
    """
    if not isinstance(model, VisionTransformer):
        hint = ""
        if hasattr(model, "feature_info") or type(model).__name__.startswith("Feature"):
            hint = " (a features_only=True wrapper: patch the plain model and call forward_intermediates)"
        raise ValueError(
            f"token reduction patches timm VisionTransformer models, got {type(model).__name__}{hint}"
        )
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (Block, TokenBlock):
            raise ValueError(f"block {i} is a {type(blk).__name__}; only timm's standard Block is supported")
    depth = len(model.blocks)
    num_patches = model.patch_embed.num_patches
    method = None if method in _BASELINE_NAMES else method
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
        token_budget = _resolve_budget(method, budget, keep_rate, r, r_schedule_name, num_patches, depth, locs)
    if prop_attn is None:
        prop_attn = bool(reducer_cls is not None and reducer_cls.uses_sizes)

    # simulate the stages to validate the budget and size learned modules
    reducers = {}

    def make(loc: int, sized: dict):
        reducers[loc] = reducer_cls(dim=model.embed_dim, **sized, **method_kwargs)
        return reducers[loc]

    counts = _plan(model, reducer_cls, token_budget, locs, make) if reducer_cls is not None else []

    model.__class__ = _patched_class(type(model))
    for i, blk in enumerate(model.blocks):
        blk.__class__ = TokenBlock
        blk.block_index = i
        blk.stage_index = locs.index(i) if i in locs else -1
        blk.provide_received = False
        if "reduction" in blk._modules:
            del blk._modules["reduction"]
        if i in reducers:
            blk.add_module("reduction", reducers[i])
    _install_budget(model, token_budget)
    for loc, reducer in reducers.items():
        if "attn_received" in reducer.needs and loc > 0:
            model.blocks[loc - 1].provide_received = True
    extra = {}
    old = model.__dict__.get("reduction_config")
    if isinstance(old, dict):  # re-patching keeps what extensions recorded
        extra = {k: v for k, v in old.items() if k not in _LOCKED_KEYS}
    model.reduction_config = ReductionConfig(
        method=method,
        keep_rate=None if token_budget is None or token_budget.kind == "r" else keep_rate,
        reduction_loc=locs,
        budget=budget,
        r=None if token_budget is None or token_budget.r_per_block is None else token_budget.r_per_block,
        prop_attn=bool(prop_attn),
        expected_tokens=counts,
        num_patches=num_patches,
        method_kwargs=method_kwargs,
        **extra,
    )
    return model


def set_budget(
    model: nn.Module,
    keep_rate: Optional[Union[float, Sequence[float]]] = None,
    r: Optional[Union[int, Sequence[int]]] = None,
    budget: Optional[str] = None,
    r_schedule: Union[str, float] = "constant",
) -> nn.Module:
    """Change the token budget of a patched model in place, keeping every
    weight (learned reducers such as DynamicViT's predictor included);
    returns the model. ToMe users may write ``model.r = 8`` instead.

    keep_rate: new keep rate (the budget stays geometric/current, or becomes
    `budget`, default geometric when it was 'r'); r (+ r_schedule): tokens
    removed per block, the 'r' budget; budget alone: switch the counting rule
    and keep the keep rate. The reduction locations and the method stay.
    Methods whose learned modules fix their output count (SiT, PatchMerger,
    Sinkhorn) accept only budgets that keep those counts.
    """
    if not isinstance(model, ReducedViTMixin):
        raise ValueError("set_budget takes a model built by tokenreduction.create_model or patch_model")
    cfg = model.reduction_config
    method = cfg.get("method")
    if method is None:
        raise ValueError("the model reduces no tokens (method none); use patch_model to add a method")
    if keep_rate is None and r is None and budget is None:
        raise ValueError("set_budget needs keep_rate, r or budget")
    if keep_rate is not None and not isinstance(keep_rate, (int, float)):
        keep_rate = [float(v) for v in keep_rate]
    if budget is None:
        if r is not None:
            budget = "r"
        elif cfg["budget"] != "r":
            budget = cfg["budget"]
        else:
            budget = "geometric"
    if r is None and keep_rate is None:  # only the counting rule changes
        if budget == "r":
            if cfg.get("r") is None:
                raise ValueError("switching to the 'r' budget needs r")
            r = list(cfg["r"])
        else:
            keep_rate = cfg.get("keep_rate")
            if keep_rate is None:
                raise ValueError(f"switching to the {budget!r} budget needs keep_rate")
    locs = list(cfg["reduction_loc"])
    depth = len(model.blocks)
    num_patches = model.patch_embed.num_patches
    reducer_cls = get_method(method)
    token_budget = _resolve_budget(method, budget, keep_rate, r, r_schedule, num_patches, depth, locs)

    def keep(loc: int, sized: dict):
        reducer = model.blocks[loc].reducer
        if "num_out" in sized and getattr(reducer, "num_out", sized["num_out"]) != sized["num_out"]:
            raise ValueError(
                f"method {method!r} has a learned module sized for {reducer.num_out} output tokens at block "
                f"{loc}; this budget asks {sized['num_out']}. Its count is fixed at build time: "
                "re-create (or patch_model) the model for this budget and fine-tune it"
            )
        return reducer

    counts = _plan(model, reducer_cls, token_budget, locs, keep)
    _install_budget(model, token_budget)
    cfg._set("budget", budget)
    cfg._set("keep_rate", None if budget == "r" else keep_rate)
    cfg._set("r", token_budget.r_per_block)
    cfg._set("expected_tokens", counts)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model` in place and return the stock timm model:
    its original class, plain ``Block`` blocks, the reducers (and their
    weights) removed; every timm weight is kept, so the outputs are timm's.
    Models with an extension that replaced parts of the network (CLCA's
    head) cannot be unpatched (ValueError)."""
    if not isinstance(model, ReducedViTMixin):
        raise ValueError(f"unpatch_model takes a patched model, got a plain {type(model).__name__}")
    cls = type(model)
    extensions = [m.__name__ for m in cls._tr_mixins if m is not ReducedViTMixin]
    if extensions:
        raise ValueError(
            f"the model carries extension(s) {', '.join(extensions)} that replace parts of the network "
            "(e.g. CLCA's head); it cannot be turned back into a stock timm model"
        )
    for blk in model.blocks:
        if "reduction" in blk._modules:
            del blk._modules["reduction"]
        for attr in ("block_index", "stage_index", "budget_fn", "provide_received"):
            blk.__dict__.pop(attr, None)
        blk.__class__ = Block
    for attr in ("reduction_config", "reduction_state", "keep_cls_per_stage"):
        model.__dict__.pop(attr, None)
    model.__class__ = cls._tr_base
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


def read_checkpoint_state(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The model weights a local checkpoint file holds, as a flat state dict.

    Accepts a plain state dict or a dict holding one under ``model``,
    ``state_dict`` or ``model_ema``. Files of the TokenReduction/ATC training
    code say with ``ema_best`` which of ``model`` and ``model_ema`` won
    validation; that one is taken, as their validate.py does. Otherwise
    ``model`` comes first (DeiT, EViT, MAE and this project's files), then
    ``state_dict``, then ``model_ema``. DDP's ``module.`` prefix is stripped;
    MAE's decoder (and its ``mask_token``) is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    raw = load_checkpoint_file(path, map_location="cpu")  # weights_only, allow-listed types
    state = raw
    if isinstance(raw, dict):
        order = ("model", "state_dict", "model_ema")
        if "ema_best" in raw:
            order = ("model_ema", "model") if raw["ema_best"] else ("model",)
        for key in order:
            if key in raw and isinstance(raw[key], dict):
                state = raw[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (looked for keys model, state_dict, model_ema)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    # MAE pre-training files may carry the decoder (and its mask_token, which
    # timm's filter would take for a DINOv2 checkpoint): the encoder is all we load
    return {k: v for k, v in state.items() if k != "mask_token" and not k.startswith("decoder")}


def _holds_extension_weights(state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` has weights of a model extension (CLCA: its own
    ``clca.*`` names or the reference's ``clr`` / ``ifa_head.*``)."""
    return any(k == "clr" or k.startswith(("clca.", "ifa_head.")) for k in state)


def _is_added(key: str) -> bool:
    """Parameters the library adds to the timm model (reducers, extensions)."""
    return ".reduction." in key or key.startswith("clca.")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
               strict_backbone: bool = True) -> nn.Module:
    """Load `state` (from :func:`read_checkpoint_state`) into a patched or
    plain timm ViT; `source` names it in errors.

    The published layouts are mapped first (:mod:`.published`: TokenReduction
    and CLCA reduced models, CLCA's head and carriers), then timm's
    ``checkpoint_filter_fn`` converts the backbone (original DeiT/MAE layouts,
    position embedding resizing). Two cases:

    * the state holds weights of the reducers or of an extension (a trained
      reduced model): the load is strict. Every missing, unexpected or
      differently shaped key is named in one ValueError.
    * a backbone only (fine-tuning starts): the reducers, extensions and
      classifier keep their initialisation; the head may differ in size
      (another dataset); a model with global average pooling (``fc_norm``)
      loading a checkpoint with the final ``norm`` drops that norm and keeps
      ``fc_norm`` as initialised, as MAE's fine-tuning does. Missing or
      unexpected backbone weights are an error naming them
      (``strict_backbone``).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    from .published import convert_published

    state = convert_published(dict(state), model)
    state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    full = any(_is_added(k) for k in state)
    if not full:
        if "fc_norm.weight" in own and "norm.weight" not in own and "fc_norm.weight" not in state:
            # global average pooling (MAE fine-tuning) on a checkpoint with the final
            # norm: as MAE does, drop that norm and start fc_norm afresh
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        for key in list(state):
            if key.startswith("head") and key in own and state[key].shape != own[key].shape:
                del state[key]  # another number of classes: keep the new head
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    if not full:
        missing = [k for k in missing if not _is_added(k) and not k.startswith(("head", "fc_norm"))]
    problems = []
    if missing and (full or strict_backbone):
        problems.append(f"lacks {len(missing)} weights the model has: {missing[:8]}")
    if unexpected and (full or strict_backbone):
        problems.append(f"has {len(unexpected)} weights the model does not: {unexpected[:8]}")
    if shapes:
        problems.append(f"has {len(shapes)} weights of another shape: {shapes[:8]}")
    if problems:
        kind = "a trained reduced model, loaded strictly" if full else "a backbone checkpoint"
        raise ValueError(
            f"{source} ({kind}) {'; '.join(problems)}. Build the model as the checkpoint was trained "
            "(method, keep_rate, reduction_loc, clca options, num_classes)"
        )
    model.load_state_dict(state, strict=False)
    return model


def load_checkpoint(model: nn.Module, path: Union[str, Path], strict_backbone: bool = True) -> nn.Module:
    """Load a local checkpoint file into a (patched or plain) timm ViT:
    :func:`read_checkpoint_state` then :func:`load_state` (which says what is
    strict). Published layouts load: DeiT, MAE, EViT, and reduced models
    fine-tuned with the TokenReduction, ATC and CLCA code (:mod:`.published`)."""
    return load_state(model, read_checkpoint_state(path), source=str(path), strict_backbone=strict_backbone)


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
    extensions: Optional[dict[str, Any]] = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, pretrained, **timm_kwargs)`` with `method`
    inserted at `reduction_loc` (0-indexed blocks).

    keep_rate means tokens kept for pruning methods, clusters for merging
    methods and the maximum kept for ATS; how it turns into counts is the
    `budget` (see :mod:`tokenreduction.models.budget`). ``r`` with
    ``r_schedule`` removes r tokens per block ToMe-style (give r or
    keep_rate, not both). ``pretrained=True`` uses timm's weight loading;
    ``checkpoint_path`` loads a local file into the built model: a
    backbone, or a reduced model in this library's or a published layout
    (TokenReduction, ATC, EViT, CLCA; see :func:`load_state`), strictly.
    The method's options may be given as keywords
    (``method="evit", fuse_token=False``) or in ``method_kwargs``; other
    keywords go to timm.

    Extensions registered in :mod:`tokenreduction.models.extensions` are
    applied after a backbone checkpoint is loaded (before, when the
    checkpoint holds the extension's weights), each given as a keyword of its name
    or in `extensions`: e.g. ``clca=dict(ifa_head=True, clc=True, num_clr=1)``
    adds CLCA's cross-layer cache aggregation (:func:`tokenreduction.clca.apply_clca`).
    ``dynamic_img_size=True`` is honoured (the geometric budget counts the
    actual input's patches); ``features_only=True`` is refused (use
    ``model.forward_intermediates``).
    Every bad argument raises one ValueError naming it, at build time.
    """
    if timm_kwargs.get("features_only"):
        raise ValueError(
            "features_only=True wraps the ViT in timm's feature extractor, which would run it unreduced; "
            "build the model without it and call model.forward_intermediates(x, indices=..., "
            "output_fmt='NCHW') for the features of the reduced forward"
        )
    chosen = dict(extensions or {})
    for ext in list_extensions():
        if ext in timm_kwargs:
            value = timm_kwargs.pop(ext)
            if ext in chosen and value:
                raise ValueError(f"the extension {ext!r} is given twice (keyword and extensions)")
            chosen.setdefault(ext, value)
    if keep_rate is not None and not isinstance(keep_rate, (int, float)):
        keep_rate = [float(v) for v in keep_rate]
    if method not in _BASELINE_NAMES:
        get_method(method)  # unknown names fail before timm builds anything
        if r is not None and keep_rate is not None:
            raise ValueError(
                "give either r (tokens removed per block, the 'r' budget) or keep_rate (a keep-rate budget), not both"
            )
    for ext in chosen:
        get_extension(ext)  # unknown names fail before timm builds anything too
    method_kwargs = _route_method_options(method, method_kwargs, timm_kwargs)
    state = read_checkpoint_state(checkpoint_path) if checkpoint_path is not None else None
    model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
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
    if state is None:
        return apply_extensions(model, chosen)
    if _holds_extension_weights(state):  # a trained model with its extension: load into the extended model
        return load_state(apply_extensions(model, chosen), state, source=str(checkpoint_path))
    # a backbone (or reduced model without extension): extensions start from the loaded
    # weights (CLCA's carriers from the loaded CLS token)
    return apply_extensions(load_state(model, state, source=str(checkpoint_path)), chosen)


def method_options(method: str) -> list[str]:
    """Names of the options a reduction method takes from the user (its
    ``method_kwargs``): the options its declaration
    (:mod:`tokenreduction.reduction.options`) lists, less those the model
    builder sets (output counts, the patch grid)."""
    from ..reduction.options import method_options as declaration

    get_method(method)  # an unknown name lists the known ones
    return sorted(name for name, option in declaration(method).options.items() if not option.builder)


def _route_method_options(method: Optional[str], method_kwargs: Optional[dict], timm_kwargs: dict) -> dict:
    """Move the keywords of `timm_kwargs` that are options of `method` into
    method_kwargs (in place for timm_kwargs); a keyword that is another
    method's option is a ValueError naming method_kwargs. The rest stay timm's."""
    from ..reduction import list_methods

    routed = dict(method_kwargs or {})
    own = set(method_options(method)) if method not in _BASELINE_NAMES else set()
    for key in list(timm_kwargs):
        if key in own:
            if key in routed:
                raise ValueError(f"the method option {key!r} is given twice (keyword and method_kwargs)")
            routed[key] = timm_kwargs.pop(key)
            continue
        owners = [m for m in list_methods() if key in method_options(m)]
        if owners:
            if method in _BASELINE_NAMES:
                mine = "the model has no reduction method"
            else:
                mine = f"method {method!r} takes {', '.join(sorted(own)) or 'no options'}"
            raise ValueError(
                f"{key!r} is an option of the method(s) {', '.join(owners)}, but {mine}; method options are "
                f"given as keywords of their method or in method_kwargs, e.g. method={owners[0]!r}, "
                f"method_kwargs={{{key!r}: ...}}"
            )
    return routed


def count_flops(model: nn.Module, img_size: Optional[int] = None, batch_size: int = 1) -> float:
    """GFLOPs of one forward per image in the papers' (fvcore's) convention,
    attention included on every device and kernel: see
    :mod:`tokenreduction.models.flop_count`."""
    from .flop_count import count_flops as count_paper_flops

    return count_paper_flops(model, img_size=img_size, batch_size=batch_size)
