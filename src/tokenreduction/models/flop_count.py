"""GFLOPs in the papers' convention (fvcore's), on every device and attention kernel.

The convention (fvcore's ``FlopCountAnalysis`` defaults, which the DeiT, EViT,
DynamicViT and ToMe tables follow):

* one multiply-add is one FLOP;
* every matrix product of the forward counts: linear layers (``mm``/``addmm``),
  ``bmm``/``matmul``/``einsum``, convolutions, and attention's ``Q K^T`` and
  ``A V`` products, whether they run as explicit matmuls or inside a fused
  ``scaled_dot_product_attention`` kernel (CPU flash, CUDA flash / efficient /
  cuDNN, the overrideable and MPS variants): ``b h s_q s_k (d_qk + d_v)``;
* normalisation layers count per input element: layer and group norm 5 with an
  affine transform (4 without), batch norm in eval 2 (1 without);
  ``adaptive_avg_pool2d`` 1 per input element (a 1x1 output runs as ``mean``,
  which is free), nearest / bilinear upsampling 1 / 4 per output element;
* everything else (activations, softmax, additions, scaling, gathers) is free.

Counted with torch's ``FlopCounterMode`` on one actual forward, so the per-block
token counts are the real ones; the operators torch's counter has no formula
for (the CPU flash kernel, the norms) get one here. torch counts 2 FLOPs per
multiply-add, so every formula here returns twice fvcore's number and
:func:`count_flops` halves the total.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _numel(shape) -> int:
    return math.prod(int(v) for v in shape)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Fused attention q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv):
    the Q K^T and A V products, 2 FLOPs per multiply-add (torch's unit)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _affine_norm_flops(weight_shape) -> int:
    return 5 if weight_shape is not None else 4


def _layer_norm_flops(input_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    """native_layer_norm: fvcore's 5 (affine) or 4 per input element, doubled."""
    return 2 * _numel(input_shape) * _affine_norm_flops(weight_shape)


def _group_norm_flops(input_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    """native_group_norm: as layer norm."""
    return 2 * _numel(input_shape) * _affine_norm_flops(weight_shape)


def _batch_norm_flops(input_shape, weight_shape, bias_shape, running_mean_shape, running_var_shape, training,
                      *args, out_shape=None, **kwargs) -> int:
    """native_batch_norm: fvcore's 2 (affine) or 1 per input element with
    running statistics, 5 / 4 (as a norm) in training; doubled."""
    if training:
        return 2 * _numel(input_shape) * _affine_norm_flops(weight_shape)
    return 2 * _numel(input_shape) * (2 if weight_shape is not None else 1)


def _batch_norm_no_training_flops(input_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    """_native_batch_norm_legit_no_training: as batch norm in eval."""
    return 2 * _numel(input_shape) * (2 if weight_shape is not None else 1)


def _adaptive_avg_pool_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    """fvcore: 1 per input element, doubled."""
    return 2 * _numel(input_shape)


def _upsample_nearest_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    """fvcore: 1 per output element, doubled."""
    return 2 * _numel(out_shape)


def _upsample_bilinear_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    """fvcore: 4 per output element, doubled."""
    return 2 * 4 * _numel(out_shape)


def _optional_ops(names: list[str]) -> list:
    return [getattr(aten, name) for name in names if hasattr(aten, name)]


#: Formulas added to torch's FlopCounterMode registry (which already covers
#: mm, addmm, bmm, baddbmm, convolutions and the CUDA attention kernels).
PAPER_CONVENTION_FORMULAS = {
    **{op: _attention_flops for op in _optional_ops([
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
        "_scaled_dot_product_attention_math_for_mps",
    ])},
    aten.native_layer_norm: _layer_norm_flops,
    aten.native_group_norm: _group_norm_flops,
    aten.native_batch_norm: _batch_norm_flops,
    **{op: _batch_norm_no_training_flops for op in _optional_ops(["_native_batch_norm_legit_no_training"])},
    aten._adaptive_avg_pool2d: _adaptive_avg_pool_flops,
    aten.upsample_nearest2d: _upsample_nearest_flops,
    aten.upsample_bilinear2d: _upsample_bilinear_flops,
}


def _with_overloads(formulas: dict) -> dict:
    """Each operator packet and every overload of it: FlopCounterMode counts
    by packet but decomposes an overload it does not find (upsampling would
    run as index arithmetic and count nothing)."""
    mapping = {}
    for packet, formula in formulas.items():
        mapping[packet] = formula
        for name in packet.overloads():
            mapping[getattr(packet, name)] = formula
    return mapping


def paper_flop_counter() -> FlopCounterMode:
    """A FlopCounterMode with the convention's extra formulas; its
    ``get_total_flops()`` is in torch's unit (2 per multiply-add)."""
    return FlopCounterMode(display=False, custom_mapping=_with_overloads(PAPER_CONVENTION_FORMULAS))


def count_flops(model: nn.Module, img_size: Optional[int] = None, batch_size: int = 1) -> float:
    """GFLOPs of one eval forward per image, in the papers' convention (see
    the module docstring): input (batch_size, 3, img_size, img_size) on the
    model's device, img_size defaulting to the patch embedding's."""
    if img_size is None:
        img_size = model.patch_embed.img_size[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), paper_flop_counter() as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / batch_size / 1e9
