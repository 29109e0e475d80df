"""Fast paths that must not change results: the unreduced model runs timm's
own blocks, and the ATC / ToMe-SD merge paths keep their partitions."""
from __future__ import annotations

import copy

import timm
import torch

import tokenreduction as tr
from tokenreduction.models.blocks import TokenBlock

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
NAME = "vit_tiny_patch16_224"


def _count_attend(monkeypatch) -> list:
    calls = []
    original = TokenBlock._attend

    def counting(self, *args, **kwargs):
        calls.append(self.block_index)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TokenBlock, "_attend", counting)
    return calls


def test_unreduced_model_runs_timms_blocks(monkeypatch):
    torch.manual_seed(0)
    stock = timm.create_model(NAME, **TINY).eval()
    model = tr.patch_model(copy.deepcopy(stock))
    assert all(isinstance(b, TokenBlock) for b in model.blocks)
    calls = _count_attend(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x), rtol=0, atol=0)
    assert calls == []  # timm's Block.forward ran, not the reduction-aware attention
    assert model.tokens_kept == []


def test_reduced_model_uses_its_attention_where_needed(monkeypatch):
    torch.manual_seed(0)
    model = tr.create_model(NAME, **TINY, method="tome", keep_rate=0.5, reduction_loc=(1,)).eval()
    calls = _count_attend(monkeypatch)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    # block 0 has nothing to do; block 1 reduces (needs the keys); blocks 2, 3
    # attend with proportional attention over the merged sizes
    assert calls == [1, 2, 3]
    model.prop_attn = False
    calls.clear()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert calls == [1]
