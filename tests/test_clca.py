"""CLCA (cross-layer cache aggregation) and the study's tuning baselines, on
tiny random ViTs (64 patches, 12 blocks)."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from timm.models.vision_transformer import Block

import tokenreduction as tr
from tokenreduction.clca import (
    Head2ToeViT,
    VisualQueryTuningViT,
    apply_clca,
    apply_tuning,
    trainable_parameters,
)
from tokenreduction.clca.baselines import query_block_forward

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=5)
D, DEPTH, PATCHES, CLASSES = 32, 12, 64, 5
LOCS = (3, 6, 9)
CLCA_ON = dict(ifa_head=True, clc=True, num_clr=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(method="topk", clca=None, seed=0, keep_rate=0.1, **kwargs):
    torch.manual_seed(seed)
    args = dict(method=method, reduction_loc=LOCS, budget="current", clca=clca)
    if method not in (None, "none"):
        args["keep_rate"] = keep_rate
    return tr.create_model("vit_tiny_patch16_224", **TINY, **args, **kwargs)


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def block_lengths(model, x):
    """(input length, output length) of every block in one forward."""
    seen = []
    hooks = [
        blk.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[1], out.shape[1])))
        for blk in model.blocks
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


# ---------------------------------------------------------------- off = unchanged
@pytest.mark.parametrize("method", ["topk", "tome", None])
def test_disabled_plugin_leaves_the_model_unchanged(method):
    x = images()
    plain = build(method).eval()
    off = build(method, clca=dict(ifa_head=False, clc=False, num_clr=0)).eval()
    assert type(off) is type(plain) and not hasattr(off, "clca")
    assert "clca" not in off.reduction_config
    with torch.no_grad():
        assert torch.equal(plain(x), off(x))
    same = apply_clca(plain)
    assert same is plain and type(same) is type(off)


# ---------------------------------------------------------------- CLA head
def test_cla_head_classifies_the_stacked_cls_tokens():
    """Head only: the backbone is untouched, so the logits are the CLA head
    applied to the CLS tokens of the plain model after blocks 3, 6, 9, 11."""
    x = images(batch=4)
    plain = build("topk").eval()
    model = apply_clca(copy.deepcopy(plain), ifa_head=True)
    model.eval()
    cls = {}
    hooks = [
        plain.blocks[b].register_forward_hook(lambda m, a, o, b=b: cls.__setitem__(b, o[:, 0]))
        for b in (3, 6, 9, 11)
    ]
    with torch.no_grad():
        plain_logits = plain(x)
        for h in hooks:
            h.remove()
        stacked = torch.stack([cls[b] for b in (3, 6, 9, 11)], dim=-1)
        expected = model.clca.head(stacked)
        got = model(x)
    assert got.shape == (4, CLASSES)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, plain_logits)
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.head, torch.nn.Identity)
    # depthwise conv across the 4 layers: D groups, D -> 2D channels (ifa_dws_conv_groups=2)
    conv = model.clca.head.net[1]
    assert conv.groups == D and conv.out_channels == 2 * D and conv.kernel_size == (4,)


def test_cla_head_linear_variant_and_groups():
    model = build("topk", clca=dict(ifa_head=True, ifa_dws_conv_groups=3)).eval()
    assert model.clca.head.net[1].out_channels == 3 * D
    linear = build("topk", clca=dict(ifa_head=True, ifa_dws_conv_groups=0)).eval()
    with torch.no_grad():
        assert linear(images()).shape == (2, CLASSES)


# ---------------------------------------------------------------- CLC cache
def _expected_growth(num_clr, include_gap, recover_at_last):
    """Tokens appended after each block, counted the slow way."""
    recovery = sorted(set(LOCS) | ({DEPTH - 2} if recover_at_last else set()))
    per_block = int(include_gap) + num_clr
    growth, cached = [0] * DEPTH, 0
    for i in range(DEPTH):
        if i in recovery:
            growth[i] = cached * per_block
            cached = 0
        if i < recovery[-1]:
            cached += 1
    return growth


@pytest.mark.parametrize(
    "num_clr,include_gap,recover_at_last", [(1, True, True), (0, True, True), (2, False, True), (2, True, False)]
)
def test_sequence_grows_at_each_recovery_layer_by_the_cached_tokens(num_clr, include_gap, recover_at_last):
    clca = dict(clc=True, num_clr=num_clr, clc_include_gap=include_gap, clc_recover_at_last=recover_at_last)
    plain = build("topk").eval()
    model = build("topk", clca=clca).eval()
    lengths = block_lengths(model, images())
    plain_lengths = block_lengths(plain, images())
    growth = _expected_growth(num_clr, include_gap, recover_at_last)
    assert lengths[0][0] == 1 + num_clr + PATCHES
    extra = num_clr
    for i in range(DEPTH):
        # the block itself changes the length exactly as in the plain model (extras are never reduced)
        assert lengths[i][0] - lengths[i][1] == plain_lengths[i][0] - plain_lengths[i][1]
        if i + 1 < DEPTH:
            assert lengths[i + 1][0] - lengths[i][1] == growth[i], f"after block {i}"
        extra += growth[i]
    assert model.clca_extra_tokens == extra
    assert model.tokens_kept == plain.tokens_kept == [7, 1, 1]


def test_cache_holds_patch_means_and_carrier_states():
    """Unreduced model, one carrier: block 4 receives, right after CLS and
    the carrier, [GAP, carrier] of the outputs of blocks 0, 1, 2."""
    model = build(None, clca=dict(clc=True, num_clr=1)).eval()
    outs, ins = {}, {}

    def record(i):
        def hook(module, args, out):
            outs[i], ins[i] = out, args[0]

        return hook

    hooks = [blk.register_forward_hook(record(i)) for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model(images())
    for h in hooks:
        h.remove()
    expected = []
    for b in range(3):
        expected += [outs[b][:, 2:].mean(dim=1), outs[b][:, 1]]  # patches start after CLS + carrier
    got = ins[4][:, 2:8]
    assert torch.allclose(got, torch.stack(expected, dim=1), atol=1e-6)
    # the recovered tokens leave the patches and the CLS token where they were
    assert torch.equal(ins[4][:, 8:], outs[3][:, 2:]) and torch.equal(ins[4][:, :2], outs[3][:, :2])


def test_carriers_start_from_the_cls_token_with_their_own_positions():
    model = build("topk", clca=dict(clc=True, num_clr=2))
    assert torch.equal(model.clca.carriers[0, 0], model.cls_token[0, 0])
    assert torch.equal(model.clca.carriers[0, 1], model.cls_token[0, 0])
    assert model.clca.carrier_pos.shape == (1, 2, D) and model.clca.carrier_pos.abs().sum() > 0
    assert {"clca.carriers", "clca.carrier_pos"} <= model.no_weight_decay()


def test_cache_changes_the_output():
    plain = build("topk").eval()
    model = apply_clca(copy.deepcopy(plain), clc=True, num_clr=1).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(images()), model(images()))


# ---------------------------------------------------------------- every kind of method
@pytest.mark.parametrize("method", ["topk", "evit", "tome", "sit", "dynamicvit", "ats"])
def test_gradients_reach_cache_and_head_with_every_kind_of_method(method):
    plain = build(method).eval()
    model = build(method, clca=CLCA_ON)
    kind = tr.get_method(method).kind
    with torch.no_grad():
        model.eval()
        model(images())
        plain(images())
    assert model.tokens_kept == plain.tokens_kept
    for rec, ref in zip(model.reduction_state.stages, plain.reduction_state.stages):
        # the records still describe the original patches, whatever extras are present
        assert rec.tokens_in == ref.tokens_in and rec.assignment.shape == ref.assignment.shape
        assert rec.kind == kind
    composed = tr.compose_assignments([s.assignment for s in model.reduction_state.stages])
    assert composed[0].shape == (2, PATCHES)
    model.train()
    out = model(images(batch=4))
    assert out.shape == (4, CLASSES) and torch.isfinite(out).all()
    out.square().sum().backward()
    for name in ("carriers", "carrier_pos"):
        grad = getattr(model.clca, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    for name, p in model.clca.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dynamicvit_loss_with_clca_extra_tokens():
    from tokenreduction.reduction.dynamicvit import DynamicViTLoss

    teacher = build(None).eval()
    model = build("dynamicvit", keep_rate=0.5, clca=dict(clc=True, num_clr=1)).train()
    x, y = images(batch=4), torch.tensor([0, 1, 2, 3])
    loss = DynamicViTLoss(torch.nn.CrossEntropyLoss())(model, x, model(x), y, teacher)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.clca.carriers.grad.abs().sum() > 0


def test_average_pooling_ignores_extra_tokens():
    plain = build("tome", global_pool="avg", class_token=False).eval()
    model = apply_clca(copy.deepcopy(plain), clc=True, num_clr=0).eval()
    with torch.no_grad():
        model(images())
        feats = model.reduction_state.features
        p = model.reduction_state.num_prefix
        pooled = model.forward_head(feats, pre_logits=True)
        size = model.reduction_state.size[:, p:, None]
        expected = model.fc_norm((feats[:, p:] * size).sum(1) / size.sum(1))  # the original patches' mean
    assert p > 0 and torch.allclose(pooled, expected, atol=1e-5)


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="unknown CLCA option"):
        build("topk", clca=dict(ifa_head=True, typo=1))
    with pytest.raises(ValueError, match="num_clr"):
        build("topk", clca=dict(num_clr=1))
    with pytest.raises(ValueError, match="class token"):
        build("topk", clca=dict(ifa_head=True), global_pool="avg", class_token=False)
    with pytest.raises(ValueError, match="already has CLCA"):
        apply_clca(build("topk", clca=CLCA_ON), clc=True)
    with pytest.raises(ValueError, match="differs"):
        apply_clca(build("topk"), clc=True, reduction_loc=[2, 5])


def test_clca_on_unreduced_model_uses_default_layers():
    model = build(None, clca=CLCA_ON).eval()
    assert model.reduction_config["clca"]["recovery_layers"] == [3, 6, 9, 10]
    assert model.reduction_config["clca"]["cls_layers"] == [3, 6, 9, 11]
    with torch.no_grad():
        assert model(images()).shape == (2, CLASSES)


def test_bfloat16_forward():
    model = build("tome", clca=CLCA_ON).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = model(images().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ---------------------------------------------------------------- baselines
def _backbone_params(model):
    return sum(p.numel() for p in model.parameters())


def test_head_tuning_trains_only_the_classifier():
    model = apply_tuning(build("topk"), "head")
    assert trainable_parameters(model) == D * CLASSES + CLASSES
    with_clca = apply_tuning(build("topk", clca=CLCA_ON), "head")
    assert trainable_parameters(with_clca) == sum(p.numel() for p in with_clca.clca.parameters())
    assert all(not p.requires_grad for n, p in with_clca.named_parameters() if not n.startswith("clca."))


def test_head2toe_trains_its_linear_head_on_every_layer_and_selects_features():
    backbone = build(None)
    n_backbone = _backbone_params(backbone)
    model = apply_tuning(backbone, "h2t", pool_dim=16, keep_fraction=0.25, group_lasso=1e-3)
    assert isinstance(model, Head2ToeViT)
    features = 16 * DEPTH
    assert trainable_parameters(model) == features * CLASSES + CLASSES
    assert _backbone_params(model.backbone) == n_backbone
    model.train()
    out = model(images(batch=4))
    loss = out.square().sum() + model.regularization_loss()
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.classifier.weight.grad.abs().sum() > 0
    # selection at half the epochs keeps the quarter of features with the largest group norm
    model.end_epoch(0, epochs=4)
    assert not bool(model.selection_done)
    model.end_epoch(1, epochs=4)
    assert bool(model.selection_done) and int(model.selected.sum()) == features // 4
    norms = model.classifier.weight.norm(dim=0)
    assert norms[model.selected].min() >= norms[~model.selected].max()
    assert float(model.regularization_loss()) == 0.0
    model.eval()
    with torch.no_grad():
        f = model.features(images())
        assert torch.allclose(model(images()), model.classifier(f * model.selected), atol=1e-6)
        # the features: CLS and patch mean of each block, pooled to 16, normalised per block
        assert f.shape == (2, features) and torch.allclose(f.view(2, DEPTH, 16).mean(-1), torch.zeros(2, DEPTH), atol=1e-5)
    assert model.blocks is model.backbone.blocks and model.reduction_config["method"] is None


def test_visual_query_tuning_trains_queries_and_head_only():
    backbone = build("topk", keep_rate=0.5).eval()
    with torch.no_grad():
        before = backbone(images())
    model = apply_tuning(backbone, "vqt", num_queries=2)
    assert isinstance(model, VisualQueryTuningViT)
    head_in = D + DEPTH * 2 * D
    assert trainable_parameters(model) == DEPTH * 2 * D + head_in * CLASSES + CLASSES
    model.train()
    model(images(batch=4)).sum().backward()
    assert model.queries.grad.abs().sum() > 0 and all(p.grad is None for p in model.backbone.parameters())
    model.eval()
    with torch.no_grad():
        model(images())
        assert torch.equal(model.backbone(images()), before)  # the queries never change the tokens
        assert model.tokens_kept == [32, 16, 8]
    # on a CLCA backbone the classifier reads the stacked CLS tokens (4 layers) and the queries
    on_clca = apply_tuning(build("topk", clca=CLCA_ON), "vqt").eval()
    assert on_clca.classifier.in_features == 4 * D + DEPTH * D
    with torch.no_grad():
        assert on_clca(images()).shape == (2, CLASSES)


def test_query_block_matches_a_masked_block_on_the_joint_sequence():
    """Reference: timm's Block on [x, queries] where x may not attend to the queries."""
    torch.manual_seed(0)
    blk = Block(D, 2, qkv_bias=True).eval()
    x, q = torch.randn(2, 9, D), torch.randn(2, 3, D)
    mask = torch.zeros(12, 12)
    mask[:9, 9:] = float("-inf")
    with torch.no_grad():
        got = query_block_forward(blk, x, None, q)
        if "attn_mask" in inspect.signature(Block.forward).parameters:
            joint = blk(torch.cat([x, q], 1), attn_mask=mask)
            assert torch.allclose(joint[:, :9], blk(x), atol=1e-5)
        else:  # timm < 1.0.16: no attn_mask; the mask only changes the rows of x, not the queries' rows
            joint = blk(torch.cat([x, q], 1))
    assert torch.allclose(got, joint[:, 9:], atol=1e-5)


def test_bad_tuning_is_rejected():
    with pytest.raises(ValueError, match="unknown tuning"):
        apply_tuning(build("topk"), "lora")
    with pytest.raises(ValueError, match="keep_fraction"):
        Head2ToeViT(build("topk"), keep_fraction=0)
    from tokenreduction.train import TrainConfig

    with pytest.raises(ValueError, match="tuning must be"):
        TrainConfig.from_dict({"tuning": "lora"})


# ---------------------------------------------------------------- trainer + data
def test_trainer_with_clca_head_tuning_and_train_trainval(tmp_path):
    from tokenreduction.data.demo import make_digits_ufgir_dataset
    from tokenreduction.evaluate import evaluate
    from tokenreduction.train import TrainConfig, train
    from tokenreduction.train.checkpoint import load_trained_model

    root = make_digits_ufgir_dataset(tmp_path / "leaves", img_size=16, per_class=5)
    cfg = TrainConfig.from_dict(dict(
        model="vit_tiny_patch16_224",
        model_kwargs=dict(img_size=16, patch_size=4, embed_dim=16, depth=4, num_heads=2),
        method="topk", keep_rate=0.1, budget="current", reduction_loc=[1, 2],
        clca=dict(ifa_head=True, clc=True, num_clr=1), tuning="head", train_trainval=True,
        dataset="digits_ufgir", data_root=str(root), img_size=16, epochs=1, warmup_epochs=0, batch_size=10,
        lr=1e-3, lr_batch_normalizer=None, mixup=0, cutmix=0, auto_augment=None, reprob=0, model_ema=False,
        num_workers=0, device="cpu",
    ))
    result = train(cfg, tmp_path / "run")
    assert result["spec"]["eval_split"] == "test" and result["spec"]["clca"]["num_clr"] == 1
    assert result["steps"] == 4  # train_val: 40 images (3 train + 1 val per class x 10) at batch 10
    model, spec = load_trained_model(tmp_path / "run" / "final.pth")
    assert model.reduction_config["clca"]["recovery_layers"] == [1, 2]
    metrics = evaluate(tmp_path / "run" / "final.pth", "digits_ufgir", root, out_metrics=tmp_path / "m.json",
                       batch_size=8, throughput_batch=2, num_pattern_images=4)
    assert metrics["split"] == "test" and metrics["num_images"] == 10 and metrics["tuning"] == "head"
    assert metrics["clca"]["ifa_head"] is True and metrics["tokens_kept"] == [2, 1]
