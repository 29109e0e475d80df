"""GFLOPs in the papers' (fvcore's) convention: attention counted on every
kernel, the published tables reproduced, each extra formula checked against
its definition. Random weights (pretrained=False)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenreduction as tr
from tokenreduction.models.flop_count import count_flops, paper_flop_counter

DEIT_S = "deit_small_patch16_224"

# EViT seed (/work/shared/seeds, "Model Zoo"): EViT-DeiT-S, reduction in
# blocks 4/7/10 (0-indexed 3, 6, 9), MACs (G) per keep rate, with and without
# token fusion. The library's reduction_loc is 0-indexed, as the reference's drop_loc.
EVIT_TABLE = {
    (True, 0.9): 4.0, (True, 0.8): 3.5, (True, 0.7): 3.0, (True, 0.6): 2.6, (True, 0.5): 2.3,
    (False, 0.9): 4.0, (False, 0.8): 3.5, (False, 0.7): 3.0, (False, 0.6): 2.6, (False, 0.5): 2.3,
}

# DeiT paper (Touvron et al. 2021), table 1: GFLOPs at 224 px
DEIT_TABLE = {"deit_tiny_patch16_224": 1.3, DEIT_S: 4.6, "deit_base_patch16_224": 17.6}


def fvcore_vit_flops(dim: int, depth: int, heads: int, classes: int = 1000, grid: int = 14, patch: int = 16,
                     mlp_ratio: int = 4) -> int:
    """The convention written out for a plain DeiT (class token, no
    reduction): multiply-adds of every matmul, attention's QK^T and AV
    included, plus layer norm at 5 per element; everything else free."""
    n = grid * grid
    t = n + 1
    patch_embed = n * (3 * patch * patch) * dim
    qkv = t * dim * 3 * dim
    attention = 2 * t * t * dim  # QK^T and AV over all heads: heads * t * t * head_dim each
    proj = t * dim * dim
    mlp = 2 * t * dim * mlp_ratio * dim
    norms = (2 * depth + 1) * t * dim * 5
    head = dim * classes
    return patch_embed + depth * (qkv + attention + proj + mlp) + norms + head


def plain(name: str, **kwargs) -> nn.Module:
    return tr.create_model(name, method=None, pretrained=False, **kwargs)


@pytest.fixture(scope="module")
def deit_s() -> nn.Module:
    """One random-weight DeiT-S; tests copy it before changing it."""
    return plain(DEIT_S).eval()


def evit(base: nn.Module, keep_rate: float, fuse: bool) -> nn.Module:
    return tr.patch_model(copy.deepcopy(base), method="evit", keep_rate=keep_rate, reduction_loc=[3, 6, 9],
                          budget="current", method_kwargs={"fuse_token": fuse})


def set_fused_attn(model: nn.Module, fused: bool) -> None:
    for blk in model.blocks:
        blk.attn.fused_attn = fused


@pytest.mark.parametrize("name", sorted(DEIT_TABLE))
def test_deit_unreduced_matches_paper(name, deit_s):
    model = deit_s if name == DEIT_S else plain(name)
    assert count_flops(model) == pytest.approx(DEIT_TABLE[name], abs=0.05)


def test_deit_small_equals_closed_form(deit_s):
    model = deit_s
    assert count_flops(model) * 1e9 == pytest.approx(fvcore_vit_flops(384, 12, 6), rel=1e-12)
    assert tr.count_flops(model) == count_flops(model)  # the public entry point is this counter


@pytest.mark.parametrize("fuse,keep_rate", sorted(EVIT_TABLE))
def test_evit_model_zoo_table(fuse, keep_rate, deit_s):
    model = evit(deit_s, keep_rate, fuse)
    assert count_flops(model) == pytest.approx(EVIT_TABLE[(fuse, keep_rate)], abs=0.05)


def test_cpu_kernel_is_counted(deit_s):
    """On CPU the fused attention runs the CPU flash kernel, for which torch's
    counter has no formula: ours counts it, torch's alone misses it."""
    model = deit_s
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), paper_flop_counter() as ours:
        model(x)
    with torch.no_grad(), FlopCounterMode(display=False) as bare:
        model(x)
    per_op = ours.get_flop_counts()["Global"]
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    assert per_op.get(kernel, 0) == 2 * 12 * 2 * 197 * 197 * 384  # 12 blocks, QK^T + AV, torch's 2 per MAC
    assert kernel not in bare.get_flop_counts()["Global"]
    assert ours.get_total_flops() - bare.get_total_flops() >= per_op[kernel]


def test_fused_and_explicit_attention_count_the_same(deit_s):
    model = copy.deepcopy(deit_s)
    fused = count_flops(model)
    with sdpa_kernel([SDPBackend.MATH]):  # SDPA decomposed into matmuls
        math_kernel = count_flops(model)
    set_fused_attn(model, False)  # timm's explicit q @ k^T, softmax, @ v
    explicit = count_flops(model)
    assert fused == pytest.approx(math_kernel, rel=1e-12)
    assert fused == pytest.approx(explicit, rel=1e-12)


@pytest.mark.parametrize("fuse", [True, False])
def test_reduced_model_same_count_on_every_attention_kernel(fuse, deit_s):
    model = evit(deit_s, 0.7, fuse)
    fused = count_flops(model)
    with sdpa_kernel([SDPBackend.MATH]):
        math_kernel = count_flops(model)
    assert fused == pytest.approx(math_kernel, rel=1e-12)


def test_batch_size_and_mode():
    model = plain("deit_tiny_patch16_224").train()
    one = count_flops(model)
    assert count_flops(model, batch_size=3) == pytest.approx(one, rel=1e-12)
    assert model.training  # restored
    with pytest.raises(ValueError, match="batch_size"):
        count_flops(model, batch_size=0)


def _counted(module: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), paper_flop_counter() as counter:
        module(x)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("module,shape,expected", [
    (nn.LayerNorm(8), (2, 5, 8), 5 * 80),
    (nn.LayerNorm(8, elementwise_affine=False), (2, 5, 8), 4 * 80),
    (nn.GroupNorm(2, 4), (2, 4, 3, 3), 5 * 72),
    (nn.BatchNorm2d(4).eval(), (2, 4, 3, 3), 2 * 72),
    (nn.BatchNorm2d(4, affine=False).eval(), (2, 4, 3, 3), 1 * 72),
    (nn.AdaptiveAvgPool2d(2), (2, 4, 6, 6), 288),  # a 1x1 output runs as mean: free
    (nn.Upsample(scale_factor=2, mode="nearest"), (1, 2, 3, 3), 72),
    (nn.Upsample(scale_factor=2, mode="bilinear"), (1, 2, 3, 3), 4 * 72),
    (nn.Linear(8, 3), (5, 8), 5 * 8 * 3),
    (nn.Conv2d(2, 4, 3, padding=1, bias=False), (1, 2, 5, 5), 25 * 4 * 2 * 9),
    (nn.GELU(), (2, 5, 8), 0),
    (nn.Softmax(dim=-1), (2, 5, 8), 0),
])
def test_per_operator_convention(module, shape, expected):
    assert _counted(module, torch.randn(*shape)) == expected


def test_attention_formula_on_cpu_kernel():
    q = torch.randn(2, 3, 7, 4)
    k = torch.randn(2, 3, 9, 4)
    v = torch.randn(2, 3, 9, 5)

    class Attend(nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    assert _counted(Attend(), q) == 2 * 3 * 7 * 9 * (4 + 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fuse", [None, True])
def test_same_count_on_cuda(fuse, deit_s):
    """CUDA's attention kernels (flash / efficient / cuDNN) count as the CPU one."""
    model = copy.deepcopy(deit_s) if fuse is None else evit(deit_s, 0.7, fuse)
    on_cpu = count_flops(model)
    assert count_flops(model.cuda()) == pytest.approx(on_cpu, rel=1e-12)
