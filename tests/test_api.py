"""The model API a ToMe/tomesd user expects: run-time budget changes that keep
learned weights, unpatching to a stock timm model, pickling, timm conventions
(forward_intermediates, gradient checkpointing, dynamic image size,
features_only), and the extension registry. Tiny random ViTs (16 patches)."""
from __future__ import annotations

import ast
import copy
import io
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer

import tokenreduction as tr
from tokenreduction.models import list_extensions
from tokenreduction.models.blocks import TokenBlock

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
NAME = "vit_tiny_patch16_224"
SRC = Path(tr.__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return tr.create_model(NAME, **TINY, **kwargs).eval()


def images(batch=2, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------ set_budget
def test_set_budget_keeps_learned_predictor_and_matches_a_fresh_build():
    model = build(method="dynamicvit", keep_rate=0.7, reduction_loc=(1, 2))
    with torch.no_grad():  # make the predictor's weights distinct from any init
        for _, p in model.reduction_parameters():
            p.add_(torch.randn_like(p))
    learned = {n: p for n, p in model.reduction_parameters()}
    assert learned
    x = images()
    model(x)
    assert model.tokens_kept == [11, 7]
    assert tr.set_budget(model, keep_rate=0.5) is model
    after = dict(model.reduction_parameters())
    assert all(after[n] is p for n, p in learned.items())  # the same Parameter objects, untouched
    out = model(x)
    assert model.tokens_kept == [8, 4] == model.reduction_config["expected_tokens"]
    assert model.keep_rate == 0.5 and model.reduction_config["keep_rate"] == 0.5
    fresh = build(seed=1, method="dynamicvit", keep_rate=0.5, reduction_loc=(1, 2))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), out)


def test_model_r_assignment_works_like_tome():
    model = build(method="tome", r=3)
    x = images()
    model(x)
    assert model.r == 3 and model.tokens_kept == [13, 10, 7, 4]
    model.r = 2
    out = model(x)
    assert model.r == 2 and model.tokens_kept == [14, 12, 10, 8]
    fresh = build(seed=3, method="tome", r=2)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), out)
    model.r = [0, 1, 2, 3]  # a per-block list
    model(x)
    assert model.tokens_kept == [16, 15, 13, 10] and model.r == [0, 1, 2, 3]


def test_budget_switches_between_keep_rate_and_r():
    model = build(method="topk", keep_rate=0.5, reduction_loc=(1, 2))
    x = images()
    model.r = 4  # a keep-rate model becomes an r model at the same blocks
    model(x)
    assert model.budget == "r" and model.keep_rate is None and model.tokens_kept == [12, 8]
    model.keep_rate = 0.5  # back to a keep-rate budget: geometric by default
    model(x)
    assert model.budget == "geometric" and model.tokens_kept == [8, 4]
    model.budget = "current"
    model(x)
    assert model.tokens_kept == [8, 4]
    tr.set_budget(model, keep_rate=[0.75, 0.5])
    model(x)
    assert model.tokens_kept == [12, 6]


def test_budget_attributes_refuse_instead_of_being_ignored():
    model = build(method="topk", keep_rate=0.5, reduction_loc=(1, 2))
    with pytest.raises(KeyError, match="set_budget"):
        model.reduction_config["keep_rate"] = 0.3
    with pytest.raises(KeyError, match="set_budget"):
        model.reduction_config.update(budget="current")
    with pytest.raises(AttributeError, match="patch_model"):
        model.method = "tome"
    with pytest.raises(AttributeError, match="patch_model"):
        model.reduction_loc = (0,)
    assert model.reduction_config["keep_rate"] == 0.5
    with pytest.raises(ValueError, match="not both"):
        tr.set_budget(model, keep_rate=0.5, r=2)
    with pytest.raises(ValueError, match="needs keep_rate, r or budget"):
        tr.set_budget(model)
    with pytest.raises(ValueError, match=r"keep_rate must lie in \(0, 1\]"):
        model.keep_rate = 1.5
    with pytest.raises(ValueError, match="too large"):
        model.r = 16
    assert model.keep_rate == 0.5 and model.budget == "geometric"  # failed changes leave it as it was
    model.prop_attn = True
    assert model.reduction_config["prop_attn"] is True
    with pytest.raises(ValueError, match="method none"):
        tr.set_budget(build(), keep_rate=0.5)


def test_set_budget_refuses_to_resize_learned_output_counts():
    model = build(method="patchmerger", keep_rate=0.5, reduction_loc=(1,))
    with pytest.raises(ValueError, match="fixed at build time"):
        model.keep_rate = 0.25
    tr.set_budget(model, budget="current")  # same counts: fine
    assert model.reduction_config["expected_tokens"] == [8]


def test_both_r_and_keep_rate_raise():
    with pytest.raises(ValueError, match="not both"):
        tr.create_model(NAME, **TINY, method="tome", r=2, keep_rate=0.5)
    with pytest.raises(ValueError, match="not both"):
        tr.patch_model(timm.create_model(NAME, **TINY), method="tome", r=2, keep_rate=0.5)
    with pytest.raises(ValueError, match="'r' budget"):
        tr.patch_model(timm.create_model(NAME, **TINY), method="tome", r=2, budget="geometric", reduction_loc=(1,))


# ------------------------------------------------------------ unpatch
def test_unpatch_gives_a_stock_timm_model_with_timms_outputs():
    torch.manual_seed(0)
    stock = timm.create_model(NAME, **TINY).eval()
    model = tr.patch_model(copy.deepcopy(stock), method="evit", keep_rate=0.5, reduction_loc=(1, 2))
    x = images()
    assert not torch.allclose(model(x), stock(x))
    assert tr.unpatch_model(model) is model
    assert type(model) is VisionTransformer and all(type(b) is Block for b in model.blocks)
    assert not hasattr(model, "reduction_config") and not hasattr(model.blocks[1], "stage_index")
    assert list(model.state_dict()) == list(stock.state_dict())
    torch.testing.assert_close(model(x), stock(x), rtol=0, atol=0)
    learned = build(method="sit", keep_rate=0.5, reduction_loc=(1,))
    tr.unpatch_model(learned)
    assert not any(".reduction." in k for k in learned.state_dict())
    with pytest.raises(ValueError, match="plain VisionTransformer"):
        tr.unpatch_model(stock)
    with pytest.raises(ValueError, match="CLCA"):
        tr.unpatch_model(build(method="topk", keep_rate=0.5, reduction_loc=(1, 2), clca=dict(ifa_head=True)))


# ------------------------------------------------------------ pickling
@pytest.mark.parametrize("clca", [None, dict(ifa_head=True, clc=True, num_clr=1)])
def test_torch_save_round_trip_and_deepcopy(clca):
    model = build(method="dynamicvit", keep_rate=0.5, reduction_loc=(1, 2), clca=clca).train()
    x = images()
    model(x).sum().backward()  # a training forward leaves a context holding graph tensors
    model.eval()
    expected = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded).__name__ == type(model).__name__ and type(loaded) is type(model)
    assert loaded.reduction_state is None
    torch.testing.assert_close(loaded(x), expected)
    assert loaded.tokens_kept == model.tokens_kept
    loaded.keep_rate = 0.25  # the loaded model is as usable as the original
    loaded(x)
    assert loaded.tokens_kept == [4, 1]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    torch.testing.assert_close(model(x), expected)  # the copy owns its weights
    assert not torch.allclose(twin(x), expected)


# ------------------------------------------------------------ timm conventions
def test_forward_intermediates_runs_the_reduced_forward():
    torch.manual_seed(0)
    stock = timm.create_model(NAME, **TINY).eval()
    plain = tr.patch_model(copy.deepcopy(stock))
    x = images()
    final, inter = plain.forward_intermediates(x)
    ref_final, ref_inter = stock.forward_intermediates(x)
    torch.testing.assert_close(final, ref_final)
    for a, b in zip(inter, ref_inter):
        torch.testing.assert_close(a, b)

    model = tr.patch_model(copy.deepcopy(stock), method="topk", keep_rate=0.5, reduction_loc=(1, 2))
    nlc = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    assert [t.shape[1] for t in nlc] == [16, 8, 4, 4]  # block 0 sees all 16, then 8 and 4 are left
    final, maps = model.forward_intermediates(x, indices=[2], norm=True)
    torch.testing.assert_close(final, model.forward_features(x))
    assert maps[0].shape == (2, 32, 4, 4)
    composed = tr.model_patterns(model)[-1].reshape(2, 4, 4)  # where every patch ended
    dropped = composed < 0
    assert int(dropped.sum()) == 2 * 12
    assert torch.all(maps[0].permute(0, 2, 3, 1)[dropped] == 0)
    kept = maps[0].permute(0, 2, 3, 1)[~dropped]
    assert torch.all(kept.abs().sum(-1) > 0)
    assert model.get_intermediate_layers(x, n=1)[0].shape == (2, 4, 32)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    d = model.forward_intermediates(x, indices=[0], output_dict=True, return_prefix_tokens=True)
    assert d["image_intermediates_prefix"][0].shape == (2, 1, 32) and "image_features" in d


def test_merged_patches_share_their_token_in_nchw_intermediates():
    model = build(method="tome", r=4, reduction_loc=(0,))
    x = images()
    (grid,) = model.forward_intermediates(x, indices=[0], intermediates_only=True)
    where = tr.model_patterns(model)[0]  # (B, 16): merged token of each patch
    flat = grid.flatten(2).transpose(1, 2)  # (B, 16, C)
    for b in range(2):
        for token in where[b].unique():
            members = flat[b][where[b] == token]
            torch.testing.assert_close(members, members[:1].expand_as(members))


def test_grad_checkpointing_is_honoured(monkeypatch):
    x = images()
    plain = build(method="topk", keep_rate=0.5, reduction_loc=(1,)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    calls: dict[int, int] = {}
    original = TokenBlock.forward

    def counting(self, *args, **kwargs):
        calls[self.block_index] = calls.get(self.block_index, 0) + 1
        return original(self, *args, **kwargs)

    torch.manual_seed(5)
    plain(x).square().sum().backward()
    monkeypatch.setattr(TokenBlock, "forward", counting)
    torch.manual_seed(5)
    ckpt(x).square().sum().backward()
    # blocks 0, 2, 3 are recomputed in the backward pass; the reducing block 1 is not
    assert calls == {0: 2, 1: 1, 2: 2, 3: 2}
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_dynamic_img_size_counts_the_actual_patches():
    model = build(method="topk", keep_rate=0.5, reduction_loc=(1, 2), dynamic_img_size=True)
    model(images(size=48))  # 6 x 6 = 36 patches instead of 16
    assert model.tokens_kept == [18, 9]
    model(images(size=32))
    assert model.tokens_kept == [8, 4]
    grid = model.forward_intermediates(images(size=48), indices=[3], intermediates_only=True)[0]
    assert grid.shape == (2, 32, 6, 6)
    heuristic = build(method="heuristic", keep_rate=0.5, reduction_loc=(1,), dynamic_img_size=True)
    heuristic(images(size=32))
    with pytest.raises(ValueError, match="dynamic_img_size"):
        heuristic(images(size=48))


def test_features_only_is_refused_with_a_pointer():
    with pytest.raises(ValueError, match="forward_intermediates"):
        tr.create_model(NAME, **TINY, method="tome", r=2, features_only=True)
    wrapped = timm.create_model(NAME, **TINY, features_only=True)
    with pytest.raises(ValueError, match="features_only"):
        tr.patch_model(wrapped, method="tome", r=2)


# ------------------------------------------------------------ extension registry
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_models_never_import_clca_and_clca_depends_on_models_only():
    for path in (SRC / "models").glob("*.py"):
        assert not any("clca" in name for name in _imports(path)), path
    for path in (SRC / "clca").glob("*.py"):
        for name in _imports(path):
            if name.startswith("..") or name.startswith("tokenreduction"):
                # within the package, clca reads only the models layer
                assert name.startswith(("..models", "tokenreduction.models")), (path.name, name)


def test_extensions_are_found_by_name():
    assert "clca" in list_extensions()
    model = build(method="topk", keep_rate=0.5, reduction_loc=(1, 2), extensions={"clca": dict(ifa_head=True)})
    assert type(model).__name__ == "CLCAReducedVisionTransformer" and model.reduction_config["clca"]["ifa_head"]
    with pytest.raises(ValueError, match="unknown model extension 'nope'.*clca"):
        build(method="topk", keep_rate=0.5, reduction_loc=(1,), extensions={"nope": {}})
    with pytest.raises(ValueError, match="twice"):
        build(method="topk", keep_rate=0.5, reduction_loc=(1,), clca=dict(ifa_head=True), extensions={"clca": dict(ifa_head=True)})


def test_method_options_as_keywords_go_to_the_reducer_and_timm_keywords_to_timm():
    """Issue 27.5: create_model(..., method="evit", keep_rate=0.7, fuse_token=False)."""
    common = dict(method="evit", keep_rate=0.5, reduction_loc=(1, 2), drop_path_rate=0.1)
    kw = build(fuse_token=False, **common)
    ref = build(method_kwargs={"fuse_token": False}, **common)
    fused = build(**common)
    assert kw.reduction_config["method_kwargs"] == {"fuse_token": False}
    assert kw.blocks[3].drop_path1.drop_prob == pytest.approx(0.1)  # timm's keyword reached timm
    x = images()
    with torch.no_grad():
        out, out_ref, out_fused = kw(x), ref(x), fused(x)
    assert kw.tokens_kept == ref.tokens_kept == [8, 4]
    assert fused.tokens_kept == [9, 5]  # the fused token
    assert torch.equal(out, out_ref) and not torch.allclose(out, out_fused)
    atc = build(method="atc", keep_rate=0.5, reduction_loc=(1, 2), linkage="complete")
    assert atc.blocks[1].reduction.linkage == "complete"
    assert atc.reduction_config["method_kwargs"] == {"linkage": "complete"}


def test_method_option_of_another_method_names_method_kwargs():
    with pytest.raises(ValueError, match=r"'fuse_token' is an option of the method\(s\) evit.*'topk'.*method_kwargs"):
        build(method="topk", keep_rate=0.5, reduction_loc=(1, 2), fuse_token=False)
    with pytest.raises(ValueError, match=r"'fuse_token'.*no reduction method.*method_kwargs"):
        build(method=None, fuse_token=False)
    with pytest.raises(ValueError, match=r"'fuse_token' is given twice"):
        build(method="evit", keep_rate=0.5, reduction_loc=(1, 2), fuse_token=False, method_kwargs={"fuse_token": True})
