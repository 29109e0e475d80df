"""The parameter-efficient baselines of the CLCA study, as options of the trainer.

``apply_tuning(model, tuning, **options)`` looks the mode up in a small
registry (:data:`TUNING_MODES`, :func:`register_tuning`), which the trainer's
``tuning`` key also uses, so a new mode is one decorated builder:

``full``
    every parameter trains (the model is returned as is).
``head``
    parameter-efficient fine-tuning: the backbone is frozen; the classifier
    (``head``, ``fc_norm``) and the CLCA plug-in's own parameters
    (``model.clca``, when present) train.
``h2t``
    :class:`Head2ToeViT` (Evci et al., ICML 2022): a linear classifier on the
    features of the chosen blocks of the frozen backbone (``features="block"``:
    CLS and patch mean of each block output; ``"sublayer"``: the CLCA
    reference's token means of each block's sub-layers), with optional
    group-lasso feature selection.
``vqt``
    :class:`VisualQueryTuningViT` (Tu et al., CVPR 2023): learnable query
    tokens per block that read each block's input without changing it; a
    linear classifier on the final feature and every query output.

The wrappers hold the frozen model as ``backbone`` and pass every other
attribute through to it (``blocks``, ``patch_embed``, ``reduction_state``,
``reduction_config``...), so the evaluator and ``count_flops`` treat them as
the model. They read the blocks through forward hooks that are module-level
functions writing into the forward's ReductionContext, so a deep copy (EMA)
of a wrapper stays self-contained.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import merge_heads
from ..models.context import ReductionContext
from .cache import masked_mean

#: tuning modes by name: builder(model, **options) -> the model to train
TUNING_MODES: dict[str, Callable[..., nn.Module]] = {}


def register_tuning(name: str) -> Callable:
    """Decorator: make a builder ``fn(model, **options) -> model to train``
    available as tuning mode `name` (the trainer's ``tuning`` key)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in TUNING_MODES:
            raise ValueError(f"tuning mode {name!r} is registered twice")
        TUNING_MODES[name] = fn
        return fn

    return wrap


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def get_tuning(tuning: str) -> Callable[..., nn.Module]:
    """The builder of tuning mode `tuning`; a ValueError lists the known ones."""
    try:
        return TUNING_MODES[tuning]
    except KeyError:
        raise ValueError(f"unknown tuning {tuning!r}; use one of {', '.join(TUNING_MODES)}") from None


def apply_tuning(model: nn.Module, tuning: str = "full", **options: Any) -> nn.Module:
    """Set which parameters train (see the module docstring); returns the
    model to train (a wrapper for ``h2t`` and ``vqt``)."""
    builder = get_tuning(tuning)
    known = tuning_options(tuning)
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = f"it takes {', '.join(known)}" if known else "it takes no options"
        raise ValueError(f"tuning {tuning!r} got unknown option(s) {unknown}; {takes}")
    return builder(model, **options)


def tuning_options(tuning: str) -> list[str]:
    """Option names of tuning mode `tuning` (its builder's keyword arguments
    after the model)."""
    params = list(inspect.signature(get_tuning(tuning)).parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


@register_tuning("full")
def full_tuning(model: nn.Module) -> nn.Module:
    """Every parameter trains: the model as is."""
    return model


@register_tuning("head")
def head_tuning(model: nn.Module) -> nn.Module:
    """Frozen backbone; the classifier (head, fc_norm) and CLCA's modules train."""
    _freeze(model)
    for name in ("head", "fc_norm", "clca"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            for p in module.parameters():
                p.requires_grad_(True)
    return model


class _FrozenBackbone(nn.Module):
    """A frozen model at ``self.backbone``; other attributes pass through to it."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if not hasattr(backbone, "reduction_config"):
            raise ValueError("the tuning baselines wrap a model built by tokenreduction.create_model")
        _freeze(backbone)
        self.backbone = backbone

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "backbone":
                raise
            return getattr(self._modules["backbone"], name)

    def reduction_parameters(self) -> list:
        return []

    def no_weight_decay(self) -> set:
        return set()


# ---------------------------------------------------------------- hooks
def _capture_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook: (block output, patch start, mask) into ``ctx.block_outputs``."""
    if len(args) > 1 and isinstance(args[1], ReductionContext):
        ctx = args[1]
        ctx.__dict__.setdefault("block_outputs", []).append((output, ctx.num_prefix, ctx.mask))


def _capture_input(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: (block input, its attention bias) into ``ctx.block_inputs``."""
    if len(args) > 1 and isinstance(args[1], ReductionContext):
        ctx = args[1]
        ctx.__dict__.setdefault("block_inputs", []).append((args[0], ctx.attn_bias(args[0].dtype)))


def _pop(ctx: Optional[ReductionContext], key: str) -> list:
    if ctx is None or key not in ctx.__dict__:
        raise RuntimeError(f"the backbone's blocks recorded no {key}: is it a tokenreduction model?")
    return ctx.__dict__.pop(key)


# ---------------------------------------------------------------- Head2Toe
def head2toe_features(
    outputs: list, has_cls: bool, pool_dim: Optional[int] = None
) -> torch.Tensor:
    """Features of every block: for each (output (B, T, D), patch start p,
    mask (B, T) or None): the CLS token (if any) and the mean of the valid
    patch tokens, average-pooled along channels to `pool_dim` when smaller,
    normalised per block (LayerNorm without affine). Returns (B, L * F)."""
    feats = []
    for out, p, mask in outputs:
        w = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device) if mask is None else mask.clone()
        w[:, :p] = False
        parts = [masked_mean(out, w)[:, 0]]
        if has_cls:
            parts.insert(0, out[:, 0])
        f = torch.cat(parts, dim=1)
        if pool_dim is not None and pool_dim < f.shape[1]:
            f = F.adaptive_avg_pool1d(f[:, None], pool_dim)[:, 0]
        feats.append(F.layer_norm(f, f.shape[1:]))
    return torch.cat(feats, dim=1)


#: the sub-layers whose token means H2T's "sublayer" features read, per block:
#: the normalised block input (norm1), the attention branch (drop_path1), the
#: MLP's hidden activation (mlp.act) and the MLP branch (drop_path2)
H2T_SUBLAYERS = ("norm1", "drop_path1", "mlp.act", "drop_path2")
H2T_FEATURES = ("sublayer", "block")


def _token_mean(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook on a block's sub-layer: keep the mean over tokens (B, C)
    of its output until the block's collecting hook takes it."""
    module.__dict__["_h2t_mean"] = output.mean(dim=1)


def _collect_sublayers(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook on a block: its sub-layer token means, concatenated and
    L2-normalised (the reference's per-layer H2T feature), into
    ``ctx.h2t_layers``."""
    parts = []
    for name in H2T_SUBLAYERS:
        sub = module.get_submodule(name)
        parts.append(sub.__dict__.pop("_h2t_mean"))
    if len(args) > 1 and isinstance(args[1], ReductionContext):
        ctx = args[1]
        ctx.__dict__.setdefault("h2t_layers", []).append(F.normalize(torch.cat(parts, dim=1), dim=-1))


def _sublayers_of(block: nn.Module, index: int, dim: int) -> list:
    """[(sub-layer module, output channels)] of ``H2T_SUBLAYERS`` in `block`."""
    mods = []
    for name in H2T_SUBLAYERS:
        try:
            mod = block.get_submodule(name)
            width = block.get_submodule("mlp.fc1").out_features if name == "mlp.act" else dim
        except AttributeError:
            raise ValueError(
                f"H2T sublayer features need blocks with {', '.join(H2T_SUBLAYERS)} and mlp.fc1; block "
                f"{index} ({type(block).__name__}) lacks {name!r}: use features='block'"
            ) from None
        mods.append((mod, int(width)))
    return mods


@register_tuning("h2t")
class Head2ToeViT(_FrozenBackbone):
    """Head2Toe: a linear head on the features of the blocks of a frozen ViT.

    features: "block" (default): per block the CLS token and the mean of the
    valid patch tokens of the block output, normalised per block by a
    LayerNorm without affine. "sublayer" (the CLCA reference's
    ``vit_h2t.py``): per block the means over all tokens of the outputs of
    ``H2T_SUBLAYERS`` (norm1, attention branch, MLP activation, MLP branch:
    3 D + hidden channels), concatenated and L2-normalised, plus the
    L2-normalised token means of the embedded input (block 0's input) and of
    the final normed tokens. layers: the blocks read (None: every block; the
    reference reads its --reduction_loc blocks when given).
    pool_dim: channels kept per block (feature-wise average pooling; None
    keeps them all). group_lasso: weight of the group
    lasso penalty sum_j ||W[:, j]||_2 over the head's input features
    (:meth:`regularization_loss`, added by the trainer) until features are
    selected. keep_fraction < 1: at the end of epoch ``select_epoch`` (default
    half the epochs, :meth:`end_epoch`) keep that fraction of the features
    with the largest group norms (``selected``, a bool buffer) and zero the
    others from then on.
    """

    def __init__(
        self,
        backbone: nn.Module,
        pool_dim: Optional[int] = None,
        keep_fraction: float = 1.0,
        group_lasso: float = 0.0,
        select_epoch: Optional[int] = None,
        features: str = "block",
        layers: Optional[list] = None,
    ) -> None:
        super().__init__(backbone)
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must lie in (0, 1], got {keep_fraction}")
        if group_lasso < 0:
            raise ValueError(f"group_lasso must be >= 0, got {group_lasso}")
        if pool_dim is not None and pool_dim < 1:
            raise ValueError(f"pool_dim must be >= 1 or null, got {pool_dim}")
        if features not in H2T_FEATURES:
            raise ValueError(f"features must be one of {', '.join(H2T_FEATURES)}, got {features!r}")
        depth, dim = len(backbone.blocks), backbone.embed_dim
        self.layers = _check_layers(layers, depth)
        self.has_cls = bool(getattr(backbone, "has_class_token", backbone.num_prefix_tokens > 0))
        self.feature_kind = features
        if features == "block":
            widths = [dim * (2 if self.has_cls else 1)] * len(self.layers)
            for i in self.layers:
                backbone.blocks[i].register_forward_hook(_capture_output)
        else:
            widths = [dim]  # the embedded input
            for i in self.layers:
                blk = backbone.blocks[i]
                mods = _sublayers_of(blk, i, dim)
                widths.append(sum(w for _, w in mods))
                for m, _ in mods:
                    m.register_forward_hook(_token_mean)
                blk.register_forward_hook(_collect_sublayers)
            widths.append(dim)  # the final normed tokens
            backbone.blocks[0].register_forward_pre_hook(_capture_input)
        if pool_dim is not None:
            widths = [min(w, pool_dim) for w in widths]
        self.pool_dim = pool_dim
        self.keep_fraction = keep_fraction
        self.group_lasso = group_lasso
        self.select_epoch = select_epoch
        num_features = sum(widths)
        self.classifier = nn.Linear(num_features, backbone.num_classes)
        self.register_buffer("selected", torch.ones(num_features, dtype=torch.bool))
        self.register_buffer("selection_done", torch.tensor(False))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)
        ctx = self.backbone.reduction_state
        if self.feature_kind == "block":
            outputs = _pop(ctx, "block_outputs")
            return head2toe_features(outputs, self.has_cls, self.pool_dim)
        embedded = _pop(ctx, "block_inputs")[0][0]
        vectors = [F.normalize(embedded.mean(dim=1), dim=-1), *_pop(ctx, "h2t_layers"),
                   F.normalize(tokens.mean(dim=1), dim=-1)]
        if self.pool_dim is not None:
            vectors = [F.adaptive_avg_pool1d(v[:, None], self.pool_dim)[:, 0] if v.shape[1] > self.pool_dim else v
                       for v in vectors]
        return torch.cat(vectors, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.classifier(f * self.selected.to(f.dtype))

    def regularization_loss(self) -> torch.Tensor:
        """Group lasso over input features (0 once features are selected)."""
        w = self.classifier.weight
        if self.group_lasso == 0 or bool(self.selection_done):
            return w.new_zeros(())
        return self.group_lasso * w.norm(dim=0).sum()

    @torch.no_grad()
    def select_features(self) -> None:
        """Keep the ``keep_fraction`` of features with the largest group norm."""
        norms = self.classifier.weight.norm(dim=0)
        k = max(1, int(round(self.keep_fraction * norms.numel())))
        keep = torch.zeros_like(self.selected)
        keep[norms.topk(k).indices] = True
        self.selected.copy_(keep)
        self.selection_done.fill_(True)

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """Trainer hook after each epoch: select features once, at ``select_epoch``."""
        if self.keep_fraction >= 1.0 or bool(self.selection_done):
            return
        at = self.select_epoch if self.select_epoch is not None else max(1, epochs // 2)
        if epoch + 1 >= at:
            self.select_features()


def _check_layers(layers: Optional[list], depth: int) -> list:
    """The sorted distinct block indices to read (None: every block)."""
    if layers is None:
        return list(range(depth))
    out = sorted({int(i) for i in layers})
    if not out or out[0] < 0 or out[-1] >= depth:
        raise ValueError(f"layers must be block indices in 0..{depth - 1}, got {list(layers)}")
    return out


# ---------------------------------------------------------------- VQT
def query_block_forward(block: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
    """One ViT block applied to query tokens only: queries (B, Q, C) attend to
    the block input x (B, T, C) and to themselves (keys/values from both;
    ``bias`` (B, 1, 1, T) is the context's attention bias over x); then the
    block's MLP. The tokens of x are not changed. Returns (B, Q, C)."""
    attn = block.attn
    if getattr(attn, "gate", None) is not None:
        raise ValueError("visual query tuning does not support gated attention")
    B, T, _ = x.shape
    Q = queries.shape[1]
    seq = block.norm1(torch.cat([x, queries], dim=1))
    qkv = attn.qkv(seq).reshape(B, T + Q, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q = q[:, :, T:]
    if bias is not None:
        bias = torch.cat([bias, bias.new_zeros(B, 1, 1, Q)], dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = attn.proj(merge_heads(attn, out))  # (B, Q, C); timm's attn_dim and norm are not in every release
    z = queries + block.ls1(out)
    return z + block.ls2(block.mlp(block.norm2(z)))


@register_tuning("vqt")
class VisualQueryTuningViT(_FrozenBackbone):
    """Visual query tuning: ``num_queries`` learnable queries per chosen block
    (``queries``, (L, Q, D)) read that block's input (the tokens the block
    receives, before any reduction at that block); the classifier sees the
    backbone's final pooled feature and every query output (each normalised
    by a LayerNorm without affine). layers: the blocks with queries (None:
    every block). The CLCA reference (``vit_vqt.py``) uses 5 queries per
    block of its --reduction_loc (every block without it)."""

    def __init__(self, backbone: nn.Module, num_queries: int = 1, layers: Optional[list] = None) -> None:
        super().__init__(backbone)
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        depth, dim = len(backbone.blocks), backbone.embed_dim
        self.layers = _check_layers(layers, depth)
        self.num_queries = num_queries
        self.queries = nn.Parameter(
            nn.init.trunc_normal_(torch.zeros(len(self.layers), num_queries, dim), std=0.02))
        clca = getattr(backbone, "clca", None)
        if getattr(clca, "head", None) is not None:  # CLCA's pre-logits: the stacked CLS tokens
            pooled_dim = dim * len(clca.cls_layers)
        else:
            pooled_dim = backbone.num_features
        head_in = pooled_dim + len(self.layers) * num_queries * dim
        self.classifier = nn.Linear(head_in, backbone.num_classes)
        for i in self.layers:
            backbone.blocks[i].register_forward_pre_hook(_capture_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        tokens = bb.forward_features(x)
        inputs = _pop(bb.reduction_state, "block_inputs")
        pooled = bb.forward_head(tokens, pre_logits=True)
        B = x.shape[0]
        outs = []
        for i, (xin, bias), q in zip(self.layers, inputs, self.queries):
            z = query_block_forward(bb.blocks[i], xin, bias, q[None].expand(B, -1, -1).to(xin.dtype))
            outs.append(F.layer_norm(z, z.shape[-1:]).flatten(1))
        return self.classifier(torch.cat([pooled] + outs, dim=1))


#: the registered tuning modes (kept for imports of the former constant)
TUNINGS = tuple(TUNING_MODES)
