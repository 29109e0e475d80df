"""ViT-Adapter (Chen et al., ICLR 2023) with token merging in its ViT blocks.

The backbone of the ATC study's detection experiment (from SViT's setup): a
plain ViT whose token grid interacts with a convolutional spatial prior
through multi-scale deformable attention, giving the 4-level feature pyramid
(strides 4, 8, 16, 32) that Mask R-CNN's FPN takes.

    image -> SpatialPriorModule -> c1 (1/4), c = [c2 (1/8), c3 (1/16), c4 (1/32)]
          -> patch embedding + pos. embedding -> x (1/16 grid)
    for each interaction [first, last] block range:
        x <- x + gamma * DeformAttn(query=x, value=c)          (injector)
        x <- ViT blocks first..last (merging at reduction_loc)
        c <- c + DeformAttn(query=c, value=x) ; c <- c + ConvFFN(c)   (extractor)
    outputs: norm_i(c_i + resized x), i = 1..4

Token reduction. At each block in ``reduction_loc`` the block merges its
tokens after the attention residual (ToMe bipartite matching when
``linkage="tome"``, else ATC with that linkage; both from
:mod:`tokenreduction.reduction`), keeping ``ceil(ratio * n)`` of the n tokens
present (the library's ``current`` budget; the published code takes
``int(ratio * n)``, and ToMe removes at most half). The tokens stay merged in
later blocks and interactions, with proportional attention (log token size
as an attention bias) when ``proportional_attn``. Where the adapter needs the
full 1/16 grid (the injector's queries, the extractor's values and the
output maps) the tokens are *unmerged* through the composed assignment: each
original patch takes the value of the token it was merged into; after the
injector they are merged again, each merged token the mean of its patches.
``reduction_ratio`` 0 (or 1.0) leaves the backbone unreduced, as published.

Shapes: B images, N = H x W patch tokens (1/16 grid), C channels.
Parameter names and shapes follow the ViT-Adapter checkpoints (``blocks.*``,
``spm.*``, ``interactions.*``, ``up``, ``norm1..4``): the released 3x
backbones load strictly (``layer_scale=True`` for ViT-Adapter's own, whose
windowed attention in 8 of 12 blocks is not reproduced: global attention
here, as in SViT's/ATC's 3x checkpoints, which the study fine-tunes).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmcv.ops import MultiScaleDeformableAttention
from mmengine.model import BaseModule
from torch import nn

from ..models.budget import TokenBudget
from ..models.context import ReductionContext
from ..reduction import get_method
from ..reduction.base import BlockFeatures
from ..reduction.clustering import check_linkage
from ..reduction.ops import batch_gather, pool_by_assignment
from ..safe_load import load_checkpoint_file

try:  # registering needs mmdet; the module itself only torch + mmcv + mmengine
    from mmdet.registry import MODELS
except ImportError:  # pragma: no cover - mmdet absent
    MODELS = None


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention (DeiT's parameter names) with an additive
    key bias; also returns the head-mean keys, ToMe's and ATC's metric."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor]):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)), k.mean(dim=1)


class Block(nn.Module):
    """Pre-norm ViT block; with a reducer it merges after the attention
    residual (the "mid" position of the library's methods)."""

    def __init__(self, index: int, dim: int, num_heads: int, mlp_ratio: float, drop_path: float,
                 layer_scale: bool = False) -> None:
        super().__init__()
        self.index = index
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path
        # ViT-Adapter's layer scale (its repo's default; SViT/ATC switch it off): (C,) gains, ones at start
        self.gamma1 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.gamma2 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.reduction: Optional[nn.Module] = None
        self.stage = -1

    def forward(self, x: torch.Tensor, ctx: ReductionContext, budget: Optional[TokenBudget]) -> torch.Tensor:
        out, metric = self.attn(self.norm1(x), ctx.attn_bias(x.dtype))
        if self.gamma1 is not None:
            out = self.gamma1 * out
        x = x + drop_path(out, self.drop_path, self.training)
        if self.reduction is not None:
            stage_budget = budget.stage(self.stage, self.index, x.shape[1])
            x = ctx.reduce(self.reduction, self.index, self.stage, stage_budget, x, BlockFeatures(metric=metric))
        out = self.mlp(self.norm2(x))
        if self.gamma2 is not None:
            out = self.gamma2 * out
        return x + drop_path(out, self.drop_path, self.training)


def _bn_relu_conv(cin: int, cout: int, stride: int, norm_cfg: dict) -> list:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), build_norm_layer(norm_cfg, cout)[1], nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Conv stem giving c1..c4 at strides 4, 8, 16, 32, each projected to C."""

    def __init__(self, inplanes: int, dim: int, norm_cfg: dict) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *_bn_relu_conv(3, inplanes, 2, norm_cfg),
            *_bn_relu_conv(inplanes, inplanes, 1, norm_cfg),
            *_bn_relu_conv(inplanes, inplanes, 1, norm_cfg),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_bn_relu_conv(inplanes, 2 * inplanes, 2, norm_cfg))
        self.conv3 = nn.Sequential(*_bn_relu_conv(2 * inplanes, 4 * inplanes, 2, norm_cfg))
        self.conv4 = nn.Sequential(*_bn_relu_conv(4 * inplanes, 4 * inplanes, 2, norm_cfg))
        self.fc1, self.fc2, self.fc3, self.fc4 = (
            nn.Conv2d(c, dim, 1) for c in (inplanes, 2 * inplanes, 4 * inplanes, 4 * inplanes)
        )

    def forward(self, img: torch.Tensor):
        """img (B, 3, H, W) -> c1 map (B, C, H/4, W/4) and c2, c3, c4 as token
        sequences (B, n_i, C)."""
        c1 = self.stem(img)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        tokens = [fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3), (self.fc4, c4))]
        return self.fc1(c1), tokens


def reference_points(shapes: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Normalised (x, y) centres of every cell of the given grids, in order:
    (1, sum h*w, 1, 2), the layout MultiScaleDeformableAttention takes."""
    points = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
            (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w,
            indexing="ij",
        )
        points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    return torch.cat(points)[None, :, None]


def level_inputs(shapes: Sequence[tuple[int, int]], device: torch.device):
    """(spatial_shapes (L, 2) long, level_start_index (L,) long) of the grids."""
    spatial = torch.as_tensor(shapes, dtype=torch.long, device=device)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    return spatial, start


class DeformCrossAttention(nn.Module):
    """LayerNorms on query and value, then mmcv's multi-scale deformable
    attention (CUDA kernel on GPU, mmcv's PyTorch path on CPU); returns the
    attention output only (the caller adds the residual)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, n_levels: int, deform_ratio: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleDeformableAttention(
            embed_dims=dim, num_heads=num_heads, num_levels=n_levels, num_points=n_points,
            dropout=0.0, batch_first=True, value_proj_ratio=deform_ratio,
        )

    def attend(self, query, feat, ref, spatial, start) -> torch.Tensor:
        zero = query.new_zeros(())  # mmcv adds `identity`; the residual is ours
        return self.attn(
            self.query_norm(query), value=self.feat_norm(feat), identity=zero,
            reference_points=ref.to(query.dtype), spatial_shapes=spatial, level_start_index=start,
        )


class Injector(DeformCrossAttention):
    def __init__(self, dim, num_heads, n_points, deform_ratio, init_values: float = 0.0) -> None:
        super().__init__(dim, num_heads, n_points, 3, deform_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x, c, ref, spatial, start) -> torch.Tensor:
        return x + self.gamma * self.attend(x, c, ref, spatial, start)


class ConvFFN(nn.Module):
    """Linear -> 3x3 depth-wise conv on each level's grid -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.dwconv = nn.Module()
        self.dwconv.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)

    def forward(self, c: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        h = self.fc1(c)
        B, _, C = h.shape
        levels = h.split([a * b for a, b in shapes], dim=1)
        conv = [
            self.dwconv.dwconv(t.transpose(1, 2).reshape(B, C, a, b)).flatten(2).transpose(1, 2)
            for t, (a, b) in zip(levels, shapes)
        ]
        return self.fc2(self.act(torch.cat(conv, dim=1)))


class Extractor(DeformCrossAttention):
    def __init__(self, dim, num_heads, n_points, deform_ratio, cffn_ratio: float, drop_path: float) -> None:
        super().__init__(dim, num_heads, n_points, 1, deform_ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = drop_path

    def forward(self, c, x, ref, spatial, start, c_shapes) -> torch.Tensor:
        c = c + self.attend(c, x, ref, spatial, start)
        return c + drop_path(self.ffn(self.ffn_norm(c), c_shapes), self.drop_path, self.training)


class InteractionBlock(nn.Module):
    def __init__(self, dim, num_heads, n_points, deform_ratio, cffn_ratio, drop_path, init_values, extra: bool):
        super().__init__()
        self.injector = Injector(dim, num_heads, n_points, deform_ratio, init_values)
        self.extractor = Extractor(dim, num_heads, n_points, deform_ratio, cffn_ratio, drop_path)
        self.extra_extractors = (
            nn.Sequential(*[Extractor(dim, num_heads, n_points, deform_ratio, cffn_ratio, drop_path) for _ in range(2)])
            if extra
            else None
        )


def unmerge(x: torch.Tensor, assignment: Optional[torch.Tensor]) -> torch.Tensor:
    """Merged tokens x (B, M, C) back on the full grid (B, N, C): patch n takes
    the value of token assignment[b, n] (None = nothing merged)."""
    return x if assignment is None else batch_gather(x, assignment)


def merge(full: torch.Tensor, assignment: Optional[torch.Tensor], num_out: int) -> torch.Tensor:
    """Full grid (B, N, C) -> (B, M, C): each merged token the mean of its patches."""
    return full if assignment is None else pool_by_assignment(full, assignment, num_out)[0]


class ViTAdapter(BaseModule):
    """ViT-Adapter backbone with token merging; see the module docstring.

    reduction_loc:   0-indexed blocks that merge (the study: [3, 6, 9]).
    reduction_ratio: fraction of the current tokens kept at each location (a
                     number, or one per location); 0 or 1 = no reduction.
    linkage:         "tome" (bipartite ToMe) or "single" / "average" /
                     "complete" (ATC).
    layer_scale:     learned per-channel gains on the blocks' attention and MLP
                     outputs (``blocks.i.gamma1/gamma2``), as ViT-Adapter's
                     own 3x releases have; SViT's/ATC's (the study's) have none.
    pretrained:      optional local DeiT/ViT checkpoint for the ViT part
                     (``patch_embed``, ``pos_embed``, ``blocks``), loaded by
                     ``init_weights``; the adapter parts start random.
    """

    def __init__(
        self,
        pretrain_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        conv_inplane: int = 64,
        n_points: int = 4,
        deform_num_heads: int = 6,
        init_values: float = 0.0,
        interaction_indexes: Sequence[Sequence[int]] = ((0, 2), (3, 5), (6, 8), (9, 11)),
        cffn_ratio: float = 0.25,
        deform_ratio: float = 1.0,
        use_extra_extractor: bool = True,
        layer_scale: bool = False,
        reduction_loc: Sequence[int] = (3, 6, 9),
        reduction_ratio: Union[float, Sequence[float]] = 0.0,
        linkage: str = "tome",
        proportional_attn: bool = True,
        norm_cfg: Optional[dict] = None,
        pretrained: Optional[str] = None,
        init_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if patch_size != 16:
            raise ValueError("ViT-Adapter's interactions assume a 1/16 token grid: patch_size must be 16")
        blocks_covered = [b for first, last in interaction_indexes for b in range(first, last + 1)]
        if blocks_covered != list(range(depth)):
            raise ValueError(f"interaction_indexes {interaction_indexes} must cover blocks 0..{depth - 1} in order")
        norm_cfg = norm_cfg or dict(type="BN")
        self.pretrain_grid = pretrain_size // patch_size
        self.interaction_indexes = [tuple(i) for i in interaction_indexes]
        self.proportional_attn = proportional_attn
        self.pretrained = pretrained
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pretrain_grid**2 + 1, embed_dim))  # + DeiT's CLS slot
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(i, embed_dim, num_heads, mlp_ratio, r, layer_scale) for i, r in enumerate(rates)
        )
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPriorModule(conv_inplane, embed_dim, norm_cfg)
        self.interactions = nn.Sequential(
            *[
                InteractionBlock(
                    embed_dim, deform_num_heads, n_points, deform_ratio, cffn_ratio, drop_path_rate, init_values,
                    extra=use_extra_extractor and i == len(self.interaction_indexes) - 1,
                )
                for i in range(len(self.interaction_indexes))
            ]
        )
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        for i in range(1, 5):
            setattr(self, f"norm{i}", build_norm_layer(norm_cfg, embed_dim)[1])
        self.budget = self._attach_reduction(reduction_loc, reduction_ratio, linkage, depth, embed_dim)
        self._init_random()

    def _attach_reduction(self, loc, ratio, linkage, depth, dim) -> Optional[TokenBudget]:
        loc = [int(b) for b in loc]
        ratios = [float(ratio)] * len(loc) if isinstance(ratio, (int, float)) else [float(r) for r in ratio]
        if len(ratios) != len(loc):
            raise ValueError(f"reduction_ratio has {len(ratios)} values for {len(loc)} reduction locations")
        if len(set(loc)) != len(loc):
            raise ValueError(f"reduction_loc has repeated blocks: {loc}")
        for b, r in zip(loc, ratios):
            if not 0 <= b < depth:
                raise ValueError(f"reduction location {b} is outside the {depth} blocks")
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"reduction_ratio must lie in [0, 1] (fraction kept, 0 = off), got {r}")
        if linkage == "tome":
            method, options = get_method("tome"), {}
        else:
            method, options = get_method("atc"), {"linkage": check_linkage(linkage)}
        active = [(b, r) for b, r in sorted(zip(loc, ratios)) if r > 0.0]
        for stage, (b, _) in enumerate(active):
            self.blocks[b].reduction = method(dim, **options)
            self.blocks[b].stage = stage
        self.reduction_state: Optional[ReductionContext] = None
        if not active:
            return None
        return TokenBudget("current", num_patches=self.pretrain_grid**2, num_stages=len(active),
                           keep_rate=[r for _, r in active])

    def _init_random(self) -> None:
        """Random initialisation as ViT-Adapter's (truncated-normal Linear,
        He-normal convs, unit norms; deformable attention keeps mmcv's)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.level_embed)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()

    def init_weights(self) -> None:
        """Load the ViT part from `pretrained` (a DeiT/timm state dict, or one
        under "model" / "state_dict"); keys of other parts are ignored."""
        super().init_weights()
        if not self.pretrained:
            return
        state = load_checkpoint_file(self.pretrained, map_location="cpu")  # weights_only, allow-listed types
        for key in ("model", "state_dict", "module"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        wanted = {k: v for k, v in state.items() if k.startswith(("patch_embed.", "blocks.")) or k == "pos_embed"}
        if "pos_embed" in wanted and wanted["pos_embed"].shape != self.pos_embed.shape:
            raise ValueError(
                f"checkpoint pos_embed {tuple(wanted['pos_embed'].shape)} does not match "
                f"{tuple(self.pos_embed.shape)}: set pretrain_size to the checkpoint's image size"
            )
        missing = self.load_state_dict(wanted, strict=False).missing_keys
        absent = [k for k in missing if (k.startswith(("patch_embed.", "blocks.")) or k == "pos_embed")
                  and not k.endswith((".gamma1", ".gamma2"))]  # layer scale starts at ones, as ViT-Adapter's
        if absent:
            raise ValueError(f"checkpoint {self.pretrained} lacks ViT weights: {absent[:5]}")

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """DeiT's position embedding without the CLS slot, resized (bicubic)
        to the h x w grid: (1, h*w, C)."""
        g = self.pretrain_grid
        grid = self.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """img (B, 3, H, W), H and W multiples of 32 -> four maps (B, C, H/s, W/s)
        for s = 4, 8, 16, 32."""
        B, _, H, W = img.shape
        if H % 32 or W % 32:
            raise ValueError(f"ViT-Adapter needs image sides divisible by 32, got {H}x{W} (pad with size_divisor=32)")
        h, w = H // 16, W // 16
        c_shapes = [(H // 8, W // 8), (h, w), (H // 32, W // 32)]
        dev = img.device
        inj = (reference_points([(h, w)], dev), *level_inputs(c_shapes, dev))
        ext = (reference_points(c_shapes, dev), *level_inputs([(h, w)], dev))

        c1, cs = self.spm(img)
        c = torch.cat([t + self.level_embed[i] for i, t in enumerate(cs)], dim=1)
        x = self.patch_embed.proj(img).flatten(2).transpose(1, 2) + self._pos_embed(h, w)
        ctx = ReductionContext(num_prefix=0, size=x.new_ones(B, h * w), prop_attn=self.proportional_attn)
        assignment: Optional[torch.Tensor] = None  # (B, N): token of each patch; None = unmerged
        for (first, last), inter in zip(self.interaction_indexes, self.interactions):
            x = merge(inter.injector(unmerge(x, assignment), c, *inj), assignment, x.shape[1])
            for blk in self.blocks[first : last + 1]:
                x = blk(x, ctx, self.budget)
                if blk.reduction is not None:
                    step = ctx.stages[-1].assignment
                    assignment = step if assignment is None else step.gather(1, assignment)
            x_full = unmerge(x, assignment)
            c = inter.extractor(c, x_full, *ext, c_shapes)
            for extractor in inter.extra_extractors or ():
                c = extractor(c, x_full, *ext, c_shapes)
        self.reduction_state = ctx

        n2, n3 = c_shapes[0][0] * c_shapes[0][1], h * w
        maps = [t.transpose(1, 2).reshape(B, -1, a, b) for t, (a, b) in zip(c.split([n2, n3, c.shape[1] - n2 - n3], 1), c_shapes)]
        c2, c3, c4 = maps
        c1 = c1 + self.up(c2)
        x3 = x_full.transpose(1, 2).reshape(B, -1, h, w)
        feats = (
            c1 + F.interpolate(x3, scale_factor=4, mode="bilinear", align_corners=False),
            c2 + F.interpolate(x3, scale_factor=2, mode="bilinear", align_corners=False),
            c3 + x3,
            c4 + F.interpolate(x3, scale_factor=0.5, mode="bilinear", align_corners=False),
        )
        return tuple(getattr(self, f"norm{i + 1}")(f) for i, f in enumerate(feats))

    @property
    def tokens_kept(self) -> list[int]:
        """Tokens after each merging stage of the last forward (empty if none)."""
        return [] if self.reduction_state is None else self.reduction_state.tokens_kept


if MODELS is not None:
    MODELS.register_module(module=ViTAdapter)
