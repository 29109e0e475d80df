"""A timm ViT block that can reduce tokens, patched in place (weights and
parameter names untouched, as ToMe's timm patch does).

Attention stays on ``F.scaled_dot_product_attention``: proportional attention
and token masks are one additive float bias; the CLS-attention row that pruning
methods read is computed apart (one query against all keys), never the full
attention matrix. The full matrix is formed only where a method needs the
attention each token *received* (K-Medoids, in the block before it) or where
DynamicViT's training policy reweights attention.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from .._compat import merge_heads, require_timm
from ..reduction.base import BlockFeatures, TokenReducer
from .budget import StageBudget
from .context import ReductionContext

# every timm has a Block to import; an older timm than the package supports
# fails at the first forward, so it gets one clear error here instead
require_timm()


def _policy_softmax(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's attention under a soft keep policy.

    logits (B, H, T, T), policy (B, T) in [0, 1]; each query may always attend
    to itself, so dropped tokens keep a defined output. Softmax of the logits
    reweighted by the key policy, renormalised (eps as the reference uses)."""
    T = logits.shape[-1]
    eye = torch.eye(T, dtype=logits.dtype, device=logits.device)
    key_policy = policy[:, None, None, :].to(logits.dtype)
    weight = key_policy + (1.0 - key_policy) * eye
    logits = logits - logits.amax(dim=-1, keepdim=True)
    attn = logits.exp() * weight
    return (attn + eps / T) / (attn.sum(-1, keepdim=True) + eps)


class TokenBlock(Block):
    """timm ``Block`` with an optional reducer; swapped in by ``__class__``.

    Attributes set by the model patch:
      reducer:          TokenReducer or None (``self.reduction`` holds it so
                        its parameters live at ``blocks.<i>.reduction.*``).
      block_index:      index of this block in the model.
      stage_index:      index of the reduction stage this block runs (or -1).
      provide_received: compute attention received per token for the next
                        block's reducer (K-Medoids).
    """

    block_index: int = 0
    stage_index: int = -1
    provide_received: bool = False
    budget_fn = None

    @property
    def reducer(self) -> Optional[TokenReducer]:
        return self._modules.get("reduction")

    def forward(self, x: torch.Tensor, ctx: Optional[ReductionContext] = None, **kwargs) -> torch.Tensor:
        reducer = self.reducer
        if ctx is None or (
            reducer is None and not self.provide_received and ctx.keep_score is None and ctx.mask is None
            and not (ctx.prop_attn and ctx.merged)
        ):
            # a stock call (e.g. from timm helpers), or nothing to do here (no
            # reducer, no attention bias, no features to hand on): timm's own
            # block, so an unreduced model costs what stock timm costs
            return super().forward(x, **kwargs)
        if reducer is not None and reducer.position == "pre":
            x = self._reduce(ctx, x, BlockFeatures(attn_received=ctx.attn_received))
        need = reducer.needs if (reducer is not None and reducer.position == "mid") else frozenset()
        attn_out, feats = self._attend(self.norm1(x), ctx, need)
        x = x + self.drop_path1(self.ls1(attn_out))
        if reducer is not None and reducer.position == "mid":
            x = self._reduce(ctx, x, feats)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def _reduce(self, ctx: ReductionContext, x: torch.Tensor, feats: BlockFeatures) -> torch.Tensor:
        n = x.shape[1] - ctx.num_prefix
        budget: StageBudget = self.budget_fn(self.stage_index, self.block_index, n, ctx.num_patches)
        return ctx.reduce(self.reducer, self.block_index, self.stage_index, budget, x, feats)

    def _attend(self, x: torch.Tensor, ctx: ReductionContext, need: frozenset):
        """Attention of timm's Attention module with the context's bias.

        x (B, T, C) -> (output (B, T, C), BlockFeatures sliced to patches)."""
        attn = self.attn
        B, T, _ = x.shape
        p = ctx.num_prefix
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = ctx.attn_bias(q.dtype)
        feats = BlockFeatures()
        explicit = ctx.keep_score is not None or self.provide_received
        if explicit:
            logits = (q * attn.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            if ctx.keep_score is not None:
                weights = _policy_softmax(logits, ctx.keep_score)
            else:
                weights = logits.softmax(dim=-1)
            if self.provide_received:
                ctx.attn_received = weights.sum(dim=(1, 2))[:, p:].detach()
            if "cls_attn" in need:
                feats.cls_attn = weights[:, :, 0, p:]
            out = attn.attn_drop(weights) @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if self.training else 0.0
            )
            if "cls_attn" in need:
                if p == 0:
                    raise RuntimeError("this method reads the CLS attention but the model has no class token")
                row = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
                if bias is not None:
                    row = row + bias
                feats.cls_attn = row.softmax(dim=-1)[:, :, 0, p:]
        if "metric" in need:
            feats.metric = k[:, :, p:].mean(dim=1)
        if "value" in need:
            feats.value = v[:, :, p:]
        out = merge_heads(attn, out)  # (B, T, C), as every supported timm's Attention gives it
        if gate is not None:
            out = out * gate
        out = attn.proj_drop(attn.proj(out))
        return out, feats
