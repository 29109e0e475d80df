"""Published checkpoints load strictly: EViT's released DeiT-S, reduced models
fine-tuned with the TokenReduction ("Which Tokens to Use?") and ATC code,
CLCA's releases.

The files cannot be downloaded here, so each test writes a file with the
reference's key names and shapes, read from the reference code and written
below as data (key -> shape), in the reference's file layout (which entries
sit beside the weights), and loads it through ``create_model(...,
checkpoint_path=...)``. Every reference tensor holds distinct random values,
so "each reference tensor equals exactly one model tensor, and the model has
no other" shows the mapping is a bijection that moves the values unchanged.
"""
from __future__ import annotations

import argparse

import pytest
import torch

import tokenreduction as tr

# ---- reference key -> shape lists (data) -------------------------------------------------
# timm 0.4.12 VisionTransformer as the TokenReduction, ATC and EViT code build it
# (EViT's evit.EViT names its parameters alike; pre_logits is an Identity, no dist token).
# One block of DeiT-S (D = 384) and DeiT-T (D = 192).
DEIT_S_BLOCK = {
    "norm1.weight": (384,), "norm1.bias": (384,),
    "attn.qkv.weight": (1152, 384), "attn.qkv.bias": (1152,),
    "attn.proj.weight": (384, 384), "attn.proj.bias": (384,),
    "norm2.weight": (384,), "norm2.bias": (384,),
    "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,),
    "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,),
}
DEIT_S_OUTER = {
    "cls_token": (1, 1, 384), "pos_embed": (1, 197, 384),
    "patch_embed.proj.weight": (384, 3, 16, 16), "patch_embed.proj.bias": (384,),
    "norm.weight": (384,), "norm.bias": (384,),
    "head.weight": (1000, 384), "head.bias": (1000,),
}
DEIT_T_BLOCK = {
    "norm1.weight": (192,), "norm1.bias": (192,),
    "attn.qkv.weight": (576, 192), "attn.qkv.bias": (576,),
    "attn.proj.weight": (192, 192), "attn.proj.bias": (192,),
    "norm2.weight": (192,), "norm2.bias": (192,),
    "mlp.fc1.weight": (768, 192), "mlp.fc1.bias": (768,),
    "mlp.fc2.weight": (192, 768), "mlp.fc2.bias": (192,),
}
DEIT_T_OUTER = {
    "cls_token": (1, 1, 192), "pos_embed": (1, 197, 192),
    "patch_embed.proj.weight": (192, 3, 16, 16), "patch_embed.proj.bias": (192,),
    "norm.weight": (192,), "norm.bias": (192,),
    "head.weight": (1000, 192), "head.bias": (1000,),
}
# MAE fine-tuning (ATC's SSLBackbone_setup/models_vit_mae.py, global_pool): ViT-B/16,
# fc_norm instead of the final norm
VIT_B_BLOCK = {
    "norm1.weight": (768,), "norm1.bias": (768,),
    "attn.qkv.weight": (2304, 768), "attn.qkv.bias": (2304,),
    "attn.proj.weight": (768, 768), "attn.proj.bias": (768,),
    "norm2.weight": (768,), "norm2.bias": (768,),
    "mlp.fc1.weight": (3072, 768), "mlp.fc1.bias": (3072,),
    "mlp.fc2.weight": (768, 3072), "mlp.fc2.bias": (768,),
}
MAE_VIT_B_OUTER = {
    "cls_token": (1, 1, 768), "pos_embed": (1, 197, 768),
    "patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,),
    "fc_norm.weight": (768,), "fc_norm.bias": (768,),
    "head.weight": (1000, 768), "head.bias": (1000,),
}

# TokenReduction models/*.py on DeiT-T, keep_rate 0.7 at blocks 3, 6, 9: stage s has
# int(196 * 0.7 ** (s + 1)) = 137, 96, 67 clusters; one entry per stage in a ModuleList.
K = (137, 96, 67)
TR_STAGE_MODULES = {
    # dyvit.py: score_predictor = ModuleList(PredictorLG(embed_dim)); in_conv = (LN, Linear, GELU),
    # out_conv = (Linear D->D/2, GELU, Linear D/2->D/4, GELU, Linear D/4->2, LogSoftmax)
    "dynamicvit": [{
        f"score_predictor.{s}.in_conv.0.weight": (192,), f"score_predictor.{s}.in_conv.0.bias": (192,),
        f"score_predictor.{s}.in_conv.1.weight": (192, 192), f"score_predictor.{s}.in_conv.1.bias": (192,),
        f"score_predictor.{s}.out_conv.0.weight": (96, 192), f"score_predictor.{s}.out_conv.0.bias": (96,),
        f"score_predictor.{s}.out_conv.2.weight": (48, 96), f"score_predictor.{s}.out_conv.2.bias": (48,),
        f"score_predictor.{s}.out_conv.4.weight": (2, 48), f"score_predictor.{s}.out_conv.4.bias": (2,),
    } for s in range(3)],
    # sit.py: TokenSlimmingModule: weight = (LN, Linear D->D/2, GELU, Linear D/2->K), scale (1, 1, 1)
    "sit": [{
        f"cluster_layers.{s}.weight.0.weight": (192,), f"cluster_layers.{s}.weight.0.bias": (192,),
        f"cluster_layers.{s}.weight.1.weight": (96, 192), f"cluster_layers.{s}.weight.1.bias": (96,),
        f"cluster_layers.{s}.weight.3.weight": (K[s], 96), f"cluster_layers.{s}.weight.3.bias": (K[s],),
        f"cluster_layers.{s}.scale": (1, 1, 1),
    } for s in range(3)],
    # patchmerger.py: norm = LayerNorm(D), queries (K, D)
    "patchmerger": [{
        f"cluster_layers.{s}.norm.weight": (192,), f"cluster_layers.{s}.norm.bias": (192,),
        f"cluster_layers.{s}.queries": (K[s], 192),
    } for s in range(3)],
    # sinkhorn.py: v (K, D), the cluster centres
    "sinkhorn": [{f"cluster_layers.{s}.v": (K[s], 192)} for s in range(3)],
    # dpcknn.py: CTM.score = Linear(D, 1)
    "dpcknn": [{f"cluster_layers.{s}.score.weight": (1, 192), f"cluster_layers.{s}.score.bias": (1,)} for s in range(3)],
}
# where the library keeps them: stage s at blocks.<3 (s + 1)>.reduction (spot checks)
OURS = {
    "dynamicvit": ("score_predictor.2.out_conv.4.weight", lambda m: m.blocks[9].reduction.predictor.out_conv[4].weight),
    "sit": ("cluster_layers.1.weight.3.weight", lambda m: m.blocks[6].reduction.mlp[3].weight),
    "patchmerger": ("cluster_layers.0.queries", lambda m: m.blocks[3].reduction.queries),
    "sinkhorn": ("cluster_layers.2.v", lambda m: m.blocks[9].reduction.centres),
    "dpcknn": ("cluster_layers.1.score.weight", lambda m: m.blocks[6].reduction.score.weight),
}

# CLCA (models/<method>.py, timm 0.9.12 layout) with --ifa_head --clc --num_clr 1 on a
# DeiT-T-sized ViT (200 classes): reset_classifier makes norm an Identity and adds
# ifa_head = Sequential(Sequential(BN(D), Conv1d(D, 2D, 4, 4, groups=D), BN(2D), GELU,
# Conv1d(2D, classes, 1)), Rearrange); head (Linear) stays; add_clr adds clr and appends
# its position to pos_embed.
CLCA_OUTER = {
    "cls_token": (1, 1, 192), "pos_embed": (1, 198, 192), "clr": (1, 1, 192),
    "patch_embed.proj.weight": (192, 3, 16, 16), "patch_embed.proj.bias": (192,),
    "head.weight": (200, 192), "head.bias": (200,),
}
CLCA_IFA_HEAD = {
    "ifa_head.0.0.weight": (192,), "ifa_head.0.0.bias": (192,),
    "ifa_head.0.0.running_mean": (192,), "ifa_head.0.0.running_var": (192,), "ifa_head.0.0.num_batches_tracked": (),
    "ifa_head.0.1.weight": (384, 1, 4), "ifa_head.0.1.bias": (384,),
    "ifa_head.0.2.weight": (384,), "ifa_head.0.2.bias": (384,),
    "ifa_head.0.2.running_mean": (384,), "ifa_head.0.2.running_var": (384,), "ifa_head.0.2.num_batches_tracked": (),
    "ifa_head.0.4.weight": (200, 384, 1), "ifa_head.0.4.bias": (200,),
}
# --ifa_dws_conv_groups 0: Sequential(Linear(4, 1), Rearrange, ReLU, LayerNorm(D), Linear(D, classes), Rearrange)
CLCA_IFA_HEAD_NO_GROUPS = {
    "ifa_head.0.0.weight": (1, 4), "ifa_head.0.0.bias": (1,),
    "ifa_head.0.3.weight": (192,), "ifa_head.0.3.bias": (192,),
    "ifa_head.0.4.weight": (200, 192), "ifa_head.0.4.bias": (200,),
}


def expand(outer: dict, block: dict, depth: int = 12, extra: tuple = ()) -> dict:
    keys = dict(outer)
    for i in range(depth):
        keys.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    for more in extra:
        keys.update(more)
    return keys


def fabricate(shapes: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(seed + 7)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(shape, generator=g)
    return state


def training_file(path, state, ema=None, ema_best=None, **extra):
    """The layout the reference training scripts write (DeiT/TokenReduction/ATC/CLCA)."""
    payload = {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 29,
               "args": argparse.Namespace(model="x", keep_rate=[0.7], reduction_loc=[3, 6, 9]), **extra}
    if ema is not None:
        payload["model_ema"] = ema
    if ema_best is not None:
        payload["ema_best"] = ema_best
    torch.save(payload, path)
    return path


def assert_bijection(model, state):
    """Each reference tensor equals exactly one of the model's, and the model has no other."""
    own = model.state_dict()
    assert len(own) == len(state), (len(own), len(state))
    unmatched = dict(own)
    for key, value in state.items():
        hits = [k for k, v in unmatched.items() if v.numel() == value.numel() and torch.equal(v.flatten(), value.flatten())]
        assert len(hits) == 1, (key, hits)
        del unmatched[hits[0]]
    assert not unmatched


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- EViT ------------------------------------------------------------------------------------


def test_evit_released_deit_s_loads_model_not_ema(tmp_path):
    """EViT's releases (main.py): {model, model_ema, optimizer, ..., args}; its --eval
    reads 'model', so that is what loads, strictly, into DeiT-S with EViT."""
    shapes = expand(DEIT_S_OUTER, DEIT_S_BLOCK)
    state, ema = fabricate(shapes, 0), fabricate(shapes, 1)
    path = training_file(tmp_path / "evit-0.7-fuse.pth", state, ema=ema, lr_scheduler={}, scaler={})
    model = tr.create_model("deit_small_patch16_224", method="evit", keep_rate=0.7, checkpoint_path=path)
    assert_bijection(model, state)
    assert torch.equal(model.blocks[7].attn.qkv.weight, state["blocks.7.attn.qkv.weight"])


# ---- TokenReduction learned methods ---------------------------------------------------------


@pytest.mark.parametrize("method", sorted(TR_STAGE_MODULES))
def test_tokenreduction_learned_method_loads_strictly(method, tmp_path):
    shapes = expand(DEIT_T_OUTER, DEIT_T_BLOCK, extra=TR_STAGE_MODULES[method])
    state, ema = fabricate(shapes, 2), fabricate(shapes, 3)
    path = training_file(tmp_path / "best_checkpoint.pth", state, ema=ema, ema_best=False)
    model = tr.create_model("deit_tiny_patch16_224", method=method, keep_rate=0.7, reduction_loc=(3, 6, 9),
                            checkpoint_path=path)
    assert_bijection(model, state)
    ref_key, ours = OURS[method]
    assert torch.equal(ours(model), state[ref_key])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


def test_sit_scale_reshaped_and_ema_best_followed(tmp_path):
    """SiT's scale is (1, 1, 1) in the reference and (1,) here; with ema_best the
    reference's validate.py evaluates model_ema, and so does the load."""
    shapes = expand(DEIT_T_OUTER, DEIT_T_BLOCK, extra=TR_STAGE_MODULES["sit"])
    state, ema = fabricate(shapes, 4), fabricate(shapes, 5)
    path = training_file(tmp_path / "best_checkpoint.pth", state, ema=ema, ema_best=True)
    model = tr.create_model("deit_tiny_patch16_224", method="sit", keep_rate=0.7, checkpoint_path=path)
    assert model.blocks[3].reduction.scale.shape == (1,)
    assert torch.equal(model.blocks[3].reduction.scale, ema["cluster_layers.0.scale"].reshape(1))
    assert torch.equal(model.cls_token, ema["cls_token"])


def test_other_method_or_stage_count_or_keep_rate_is_one_error(tmp_path):
    shapes = expand(DEIT_T_OUTER, DEIT_T_BLOCK, extra=TR_STAGE_MODULES["patchmerger"])
    path = training_file(tmp_path / "pm.pth", fabricate(shapes, 6))
    with pytest.raises(ValueError, match=r"cluster_layers.*layout of patchmerger, not the model.s method .sinkhorn."):
        tr.create_model("deit_tiny_patch16_224", method="sinkhorn", keep_rate=0.7, checkpoint_path=path)
    with pytest.raises(ValueError, match=r"stage 2.*2 locations"):
        tr.create_model("deit_tiny_patch16_224", method="patchmerger", keep_rate=0.7, reduction_loc=(3, 6),
                        checkpoint_path=path)
    with pytest.raises(ValueError, match=r"another shape.*blocks\.3\.reduction\.queries \(137, 192\) \(model \(156, 192\)\)"):
        tr.create_model("deit_tiny_patch16_224", method="patchmerger", keep_rate=0.8, checkpoint_path=path)
    del_one = fabricate(shapes, 6)
    del del_one["cluster_layers.1.norm.bias"]
    torch.save({"model": del_one}, tmp_path / "pm-missing.pth")
    with pytest.raises(ValueError, match=r"strictly.*lacks 1 weights.*blocks\.6\.reduction\.norm\.bias"):
        tr.create_model("deit_tiny_patch16_224", method="patchmerger", keep_rate=0.7,
                        checkpoint_path=tmp_path / "pm-missing.pth")


def test_backbone_checkpoint_still_starts_learned_modules_fresh(tmp_path):
    """A plain DeiT file (fine-tuning starts) loads the backbone and leaves the
    predictor initialised: only files that hold reducer weights are strict about them."""
    path = training_file(tmp_path / "deit.pth", fabricate(expand(DEIT_T_OUTER, DEIT_T_BLOCK), 8))
    torch.manual_seed(0)
    model = tr.create_model("deit_tiny_patch16_224", method="dynamicvit", keep_rate=0.7, checkpoint_path=path)
    torch.manual_seed(0)
    fresh = tr.create_model("deit_tiny_patch16_224", method="dynamicvit", keep_rate=0.7)
    assert torch.equal(model.blocks[3].reduction.predictor.in_conv[1].weight,
                       fresh.blocks[3].reduction.predictor.in_conv[1].weight)


# ---- ATC -------------------------------------------------------------------------------------


def test_atc_deit_checkpoint_loads_strictly(tmp_path):
    """ATC_setup/train_deit.py writes the TokenReduction layout; ATC has no parameters."""
    shapes = expand(DEIT_S_OUTER, DEIT_S_BLOCK)
    state = fabricate(shapes, 9)
    path = training_file(tmp_path / "atc.pth", state, ema=fabricate(shapes, 10), ema_best=False)
    model = tr.create_model("deit_small_patch16_224", method="atc", keep_rate=0.9, checkpoint_path=path)
    assert_bijection(model, state)


def test_atc_mae_finetuned_checkpoint_loads_strictly(tmp_path):
    """ATC's train_mae.py (MAE's misc.save_model: {model, optimizer, epoch, scaler, args}),
    global pooling: fc_norm, no final norm."""
    shapes = expand(MAE_VIT_B_OUTER, VIT_B_BLOCK)
    state = fabricate(shapes, 11)
    path = training_file(tmp_path / "checkpoint-99.pth", state, scaler={})
    model = tr.create_model("vit_base_patch16_224", method="atc", r=16, global_pool="avg", fc_norm=True,
                            checkpoint_path=path)
    own = model.state_dict()
    assert set(own) == set(state)
    assert torch.equal(model.fc_norm.weight, state["fc_norm.weight"])
    assert torch.equal(model.blocks[11].mlp.fc2.weight, state["blocks.11.mlp.fc2.weight"])


# ---- CLCA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups,head", [(2, CLCA_IFA_HEAD), (0, CLCA_IFA_HEAD_NO_GROUPS)])
def test_clca_checkpoint_head_and_carriers_load_strictly(groups, head, tmp_path):
    block = {k: v for k, v in DEIT_T_BLOCK.items()}
    shapes = expand(CLCA_OUTER, block, extra=(head,))
    state = fabricate(shapes, 12)
    path = training_file(tmp_path / "clca.pth", state, ema_best=False)
    clca = dict(ifa_head=True, ifa_dws_conv_groups=groups, clc=True, num_clr=1)
    model = tr.create_model("deit_tiny_patch16_224", method="evit", keep_rate=0.1, budget="current",
                            num_classes=200, clca=clca, checkpoint_path=path)
    own = model.state_dict()
    # the reference's unused Linear head is dropped; pos_embed splits into the model's and the carrier's
    assert len(own) == len(state) - 2 + 1
    assert torch.equal(model.pos_embed, state["pos_embed"][:, :197])
    assert torch.equal(model.clca.carrier_pos, state["pos_embed"][:, 197:])
    assert torch.equal(model.clca.carriers, state["clr"])
    if groups:
        assert torch.equal(model.clca.head.net[1].weight, state["ifa_head.0.1.weight"])
        assert torch.equal(model.clca.head.net[2].running_var, state["ifa_head.0.2.running_var"])
    else:
        assert torch.equal(model.clca.head.mix.weight, state["ifa_head.0.0.weight"])
        assert torch.equal(model.clca.head.net[2].weight, state["ifa_head.0.4.weight"])
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (2, 200)


def test_clca_checkpoint_into_model_without_clca_is_one_error(tmp_path):
    path = training_file(tmp_path / "clca.pth", fabricate(expand(CLCA_OUTER, DEIT_T_BLOCK, extra=(CLCA_IFA_HEAD,)), 13))
    with pytest.raises(ValueError, match=r"CLCA.*no CLCA.*clca=dict"):
        tr.create_model("deit_tiny_patch16_224", method="evit", keep_rate=0.7, num_classes=200, checkpoint_path=path)
