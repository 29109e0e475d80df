"""The CLCA study's parameter-efficient baselines as the reference code builds
them (arkel23/CLCA vit_h2t.py, vit_vqt.py): H2T's per-layer sub-layer
features, VQT's query count and layers; and the study config's recipe."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

import tokenreduction as tr
from tokenreduction.clca import apply_tuning
from tokenreduction.clca.baselines import Head2ToeViT, VisualQueryTuningViT, trainable_parameters

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=3)
D, HIDDEN, DEPTH, CLASSES = 16, 64, 4, 3


def backbone(seed=0):
    torch.manual_seed(seed)
    return tr.create_model("vit_tiny_patch16_224", **TINY).eval()


def images(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference_h2t_features(model, x, layers):
    """The reference's H2T features written out on a stock timm ViT with the
    same weights: mean over tokens of the embedded input, then per chosen block
    the token means of norm1(x), the attention branch, the MLP activation and
    the MLP branch (concatenated, L2-normalised), then of the final normed
    tokens; each part L2-normalised."""
    vit = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    vit.load_state_dict(model.state_dict())
    feats = []
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        feats.append(F.normalize(t.mean(1), dim=-1))
        for i, blk in enumerate(vit.blocks):
            h1 = blk.norm1(t)
            h2 = blk.ls1(blk.attn(h1))
            t = t + h2
            h3 = blk.mlp.act(blk.mlp.fc1(blk.norm2(t)))
            h4 = blk.ls2(blk.mlp(blk.norm2(t)))
            t = t + h4
            if i in layers:
                feats.append(F.normalize(torch.cat([h.mean(1) for h in (h1, h2, h3, h4)], 1), dim=-1))
        feats.append(F.normalize(vit.norm(t).mean(1), dim=-1))
    return torch.cat(feats, 1)


def test_h2t_sublayer_features_match_the_reference_definition():
    model = backbone()
    x = images()
    h2t = apply_tuning(model, "h2t", features="sublayer", layers=[1, 3]).eval()
    assert isinstance(h2t, Head2ToeViT)
    width = D + 2 * (3 * D + HIDDEN) + D
    assert h2t.classifier.in_features == width
    assert trainable_parameters(h2t) == width * CLASSES + CLASSES  # no group lasso, no extra parameters
    with torch.no_grad():
        got = h2t.features(x)
    torch.testing.assert_close(got, reference_h2t_features(model, x, [1, 3]), atol=1e-5, rtol=1e-5)
    assert h2t(x).shape == (2, CLASSES) and float(h2t.regularization_loss()) == 0.0
    # every block by default; the project's block features stay available
    assert apply_tuning(backbone(), "h2t", features="sublayer").classifier.in_features == 2 * D + DEPTH * (3 * D + HIDDEN)
    assert apply_tuning(backbone(), "h2t").classifier.in_features == DEPTH * 2 * D
    with pytest.raises(ValueError, match="features must be"):
        apply_tuning(backbone(), "h2t", features="tokens")
    with pytest.raises(ValueError, match="layers must be block indices in 0..3"):
        apply_tuning(backbone(), "h2t", layers=[4])


def test_vqt_queries_only_at_the_chosen_layers():
    model = backbone()
    with torch.no_grad():
        before = model(images())
    vqt = apply_tuning(model, "vqt", num_queries=5, layers=[1, 3])
    assert isinstance(vqt, VisualQueryTuningViT) and vqt.queries.shape == (2, 5, D)
    head_in = D + 2 * 5 * D
    assert vqt.classifier.in_features == head_in
    assert trainable_parameters(vqt) == 2 * 5 * D + head_in * CLASSES + CLASSES
    vqt.train()
    vqt(images(4)).sum().backward()
    assert vqt.queries.grad.abs().sum() > 0
    vqt.eval()
    with torch.no_grad():
        assert vqt(images()).shape == (2, CLASSES)
        assert torch.equal(vqt.backbone(images()), before)


def test_clca_study_config_follows_the_reference_recipe():
    cfg = yaml.safe_load((ROOT / "config" / "clca.yaml").read_text())
    ft = cfg["finetune"]
    assert (ft["epochs"], ft["batch_size"], ft["warmup_epochs"]) == (45, 32, 2)
    assert (ft["drop_path"], ft["smoothing"], ft["min_lr"], ft["lr"]) == (0.0, 0.0, 1e-5, 1e-4)
    assert ft["lr_batch_normalizer"] is None and ft["sched_in_steps"] is False and ft["select_weights"] == "last"
    methods = cfg["methods"]
    assert methods["deit-h2t"] == {"method": "none", "tuning": "h2t",
                                   "tuning_kwargs": {"features": "sublayer", "layers": [3, 6, 9]}}
    assert methods["deit-vqt"]["tuning_kwargs"] == {"num_queries": 5, "layers": [3, 6, 9]}
    grid = cfg["experiments"][0]["methods"]
    assert {"deit-peft", "deit-h2t", "deit-vqt"} <= set(grid)
