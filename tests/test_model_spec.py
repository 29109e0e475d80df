"""One model spec (issue 27.4): TrainConfig, the spec final.pth stores, the rebuild
from it and the trainer's create_model call all take their fields from ModelSpec."""
from __future__ import annotations

from dataclasses import MISSING, fields

import pytest
import torch

import tokenreduction as tr
from tokenreduction.train import TrainConfig, build_model_from_spec
from tokenreduction.train.checkpoint import SPEC_KEYS
from tokenreduction.train.recipe import model_spec
from tokenreduction.train.spec import ModelSpec

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
#: the keys of the spec in final.pth as every earlier version wrote them (the file format)
STORED_SPEC_KEYS = {
    "model", "model_kwargs", "num_classes", "method", "keep_rate", "reduction_loc", "budget", "r", "r_schedule",
    "prop_attn", "method_kwargs", "img_size", "dataset", "multilabel", "clca", "tuning", "tuning_kwargs",
    "eval_split",
}


def test_train_config_has_every_spec_field_with_the_same_default():
    config = {f.name: f for f in fields(TrainConfig)}
    for f in fields(ModelSpec):
        assert f.name in config, f"TrainConfig lacks the model spec field {f.name}"
        if f.name in ("model", "num_classes"):
            continue  # required in a spec; TrainConfig has its own defaults
        mine = f.default_factory() if f.default is MISSING else f.default
        theirs = config[f.name].default_factory() if config[f.name].default is MISSING else config[f.name].default
        assert mine == theirs, (f.name, mine, theirs)
    assert SPEC_KEYS == ModelSpec.field_names()


def test_stored_spec_keeps_its_format_and_values():
    cfg = TrainConfig(model="vit_tiny_patch16_224", model_kwargs={"patch_size": 8}, img_size=32, method="evit",
                      keep_rate=(0.7,), reduction_loc=(1, 2), method_kwargs={"fuse_token": False},
                      clca={"ifa_head": True}, dataset="imagefolder")
    spec = model_spec(cfg, num_classes=5, multilabel=False)
    assert set(spec) == STORED_SPEC_KEYS
    assert spec["model_kwargs"] == {"patch_size": 8, "img_size": 32}
    assert spec["reduction_loc"] == [1, 2] and spec["keep_rate"] == [0.7] and spec["num_classes"] == 5
    assert spec["method_kwargs"] == {"fuse_token": False} and spec["clca"] == {"ifa_head": True}
    assert spec["tuning"] == "full" and spec["eval_split"] == "val" and spec["multilabel"] is False


def test_a_spec_written_before_builds_the_same_network_as_create_model():
    """A stored spec of the earlier format (with the evaluator's extra keys, r_schedule
    absent) rebuilds the network create_model gives for the same arguments."""
    stored = {"model": "vit_tiny_patch16_224", "model_kwargs": dict(TINY), "num_classes": 5, "method": "evit",
              "keep_rate": 0.5, "reduction_loc": [1, 2], "budget": None, "r": None, "prop_attn": None,
              "method_kwargs": {"fuse_token": False}, "img_size": 32, "dataset": "imagefolder", "multilabel": False,
              "clca": None, "tuning": "full", "tuning_kwargs": {}, "eval_split": "val"}
    torch.manual_seed(0)
    rebuilt = build_model_from_spec(stored).eval()
    torch.manual_seed(0)
    direct = tr.create_model("vit_tiny_patch16_224", method="evit", keep_rate=0.5, reduction_loc=(1, 2),
                             fuse_token=False, num_classes=5, **TINY).eval()
    assert rebuilt.reduction_config == direct.reduction_config
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), direct(x))


def test_build_overrides_reach_timm_and_a_spec_without_model_is_named():
    spec = ModelSpec(model="vit_tiny_patch16_224", num_classes=3, model_kwargs={**TINY, "drop_path_rate": 0.0})
    model = spec.build(drop_path_rate=0.2)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    with pytest.raises(ValueError, match="lacks \\['model'\\]"):
        ModelSpec.from_dict({"num_classes": 3})
    with pytest.raises(ValueError, match="got unknown option"):  # the tuning mode checks its options, even 'full'
        ModelSpec(model="vit_tiny_patch16_224", num_classes=3, model_kwargs=TINY, tuning_kwargs={"x": 1}).build()
