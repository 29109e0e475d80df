"""DynamicViT's ratio-loss target is the fraction of the original patches
that inference keeps after each stage, under every budget; the predictor
starts as the reference's (trunc-normal std 0.02 weights, zero biases)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tokenreduction as tr
from tokenreduction.models.budget import TokenBudget
from tokenreduction.reduction.dynamicvit import RATIO_KEY, KeepPredictor

PATCHES = 64  # 32 px, patch 4


def tiny(keep_rate=None, budget="geometric", reduction_loc=(3, 6, 9), img_size=32, **kwargs):
    return tr.create_model(
        "vit_tiny_patch16_224", patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=5,
        img_size=img_size, method="dynamicvit", keep_rate=keep_rate, budget=budget,
        reduction_loc=reduction_loc, **kwargs,
    )


def inference_kept(model, img_size=32) -> list[int]:
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, img_size, img_size))
    return model.reduction_state.tokens_kept


def training_targets(model, img_size=32) -> list[float]:
    model.train()
    model(torch.randn(2, 3, img_size, img_size))
    return [float(a[RATIO_KEY]) for a in model.reduction_state.aux if RATIO_KEY in a]


def chain_of_ceil(keep_rates, patches):
    """The `current` budget written out: each stage keeps ceil(rate * n)."""
    counts, n = [], patches
    for rate in keep_rates:
        n = max(1, math.ceil(rate * n))
        counts.append(n)
    return counts


@pytest.mark.parametrize("keep_rate", [0.7, 0.5, 0.33, [0.9, 0.6, 0.25]])
def test_current_budget_target_is_inference_fraction(keep_rate):
    torch.manual_seed(0)
    model = tiny(keep_rate, budget="current")
    kept = inference_kept(model)
    rates = keep_rate if isinstance(keep_rate, list) else [keep_rate] * 3
    assert kept == chain_of_ceil(rates, PATCHES)
    targets = training_targets(model)
    assert targets == pytest.approx([k / PATCHES for k in kept], abs=1e-12)
    if not isinstance(keep_rate, list):
        # the old target (ceil(rate * 64) / 64 at every stage) was flat
        assert targets[2] < targets[1] < targets[0]


@pytest.mark.parametrize("keep_rate", [0.7, 0.5, 0.9, [0.8, 0.5, 0.3]])
def test_geometric_budget_target_is_reference_value(keep_rate):
    torch.manual_seed(0)
    model = tiny(keep_rate, budget="geometric")
    kept = inference_kept(model)
    targets = training_targets(model)
    reference = ([keep_rate ** (s + 1) for s in range(3)] if not isinstance(keep_rate, list)
                 else list(keep_rate))
    assert targets == pytest.approx(reference, abs=1e-12)  # the reference's keep_rate ** (stage + 1)
    # inference keeps the floor of it: the two agree to within one patch
    assert kept == [max(1, int(t * PATCHES)) for t in targets]
    for k, t in zip(kept, targets):
        assert 0 <= t - k / PATCHES < 1 / PATCHES


def test_geometric_target_at_another_input_size():
    """dynamic_img_size: the fraction holds for the input's own patch count."""
    torch.manual_seed(0)
    model = tiny(0.6, budget="current", dynamic_img_size=True)
    kept = inference_kept(model, img_size=48)
    assert kept == chain_of_ceil([0.6] * 3, 144)
    assert training_targets(model, img_size=48) == pytest.approx([k / 144 for k in kept], abs=1e-12)


def test_r_budget_target_is_inference_fraction():
    torch.manual_seed(0)
    model = tiny(budget="r", r=[0, 0, 0, 10, 0, 0, 7, 0, 0, 5, 0, 0])
    kept = inference_kept(model)
    assert kept == [54, 47, 42]
    assert training_targets(model) == pytest.approx([k / PATCHES for k in kept], abs=1e-12)


def test_keep_fraction_of_the_budget():
    current = TokenBudget("current", 196, 3, keep_rate=0.7)
    assert [current.keep_fraction(s) for s in range(3)] == [138 / 196, 97 / 196, 68 / 196]
    assert [current.stage(s, 0, 196).keep_fraction for s in range(3)] == [138 / 196, 97 / 196, 68 / 196]
    geometric = TokenBudget("geometric", 196, 3, keep_rate=0.7)
    assert [geometric.stage(s, 0, 196).keep_fraction for s in range(3)] == [0.7, 0.7 ** 2, 0.7 ** 3]
    assert TokenBudget("r", 196, 2, r_per_block=[8] * 12).keep_fraction(1) is None  # no stage blocks
    with pytest.raises(ValueError, match="stage 3 is out of range"):
        current.keep_fraction(3)
    with pytest.raises(ValueError, match="stage_blocks has 2 blocks"):
        TokenBudget("r", 196, 3, r_per_block=[8] * 12, stage_blocks=[1, 2])


def test_predictor_initialised_as_reference():
    torch.manual_seed(0)
    predictor = KeepPredictor(384)
    linears = [m for m in predictor.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert weights.abs().max().item() <= 2.0  # trunc-normal's cut at +-2
    assert weights.mean().abs().item() < 1e-3
    # PyTorch's default (kaiming-uniform) would give std 1/sqrt(3 * fan_in): 0.029 for the first layer
    first = predictor.in_conv[1].weight.detach()
    assert first.std().item() == pytest.approx(0.02, rel=0.05)
    for m in linears:
        assert torch.count_nonzero(m.bias) == 0
    norm = predictor.in_conv[0]
    assert torch.equal(norm.weight, torch.ones(384)) and torch.count_nonzero(norm.bias) == 0


def test_predictor_init_inside_a_model():
    torch.manual_seed(0)
    model = tiny(0.7)
    predictors = [m for m in model.modules() if isinstance(m, KeepPredictor)]
    assert len(predictors) == 3
    for p in predictors:
        for m in p.modules():
            if isinstance(m, nn.Linear):
                assert torch.count_nonzero(m.bias) == 0
                assert m.weight.abs().max().item() < 0.2  # std 0.02, not the default's 1/sqrt(fan_in) bound
