"""One model spec (issue 27.4): TrainConfig holds a ModelSpec (the field list
exists once), the spec final.pth stores is its fields, the rebuild from it and
the trainer's create_model calls go through ModelSpec.build, and files written
in the earlier flat layout still read the same."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import tokenreduction as tr
from tokenreduction.train import TrainConfig, build_model_from_spec, load_trained_model
from tokenreduction.train.engine import config_diff
from tokenreduction.train.recipe import stored_spec
from tokenreduction.train.spec import ModelSpec

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
#: the keys of the spec in final.pth as every earlier version wrote them (the file format)
STORED_SPEC_KEYS = {
    "model", "model_kwargs", "num_classes", "method", "keep_rate", "reduction_loc", "budget", "r", "r_schedule",
    "prop_attn", "method_kwargs", "img_size", "dataset", "multilabel", "clca", "tuning", "tuning_kwargs",
    "eval_split",
}
#: a config in the flat layout, as the workflow's --spec JSON gives it
FLAT = {"model": "vit_tiny_patch16_224", "model_kwargs": {"patch_size": 8}, "method": "evit", "keep_rate": 0.7,
        "reduction_loc": [3, 6, 9], "budget": "current", "method_kwargs": {"fuse_token": False},
        "clca": {"ifa_head": True}, "dataset": "digits", "img_size": 32, "epochs": 2, "seed": 1}
#: json.dumps(TrainConfig.from_dict(FLAT).to_dict(), sort_keys=True) as the flat TrainConfig
#: (before the model spec was one field) wrote it: checkpoint_last.pth's "config", compared on resume
RECORDED_FLAT = (
    '{"amp": false, "auto_augment": "rand-m9-mstd0.5-inc1", "backbone_lr_scale": 1.0, "batch_size": 256, '
    '"budget": "current", "checkpoint_every_steps": null, "clca": {"ifa_head": true}, "clip_grad": null, '
    '"color_jitter": 0.3, "cooldown_epochs": 0, "cutmix": 1.0, "cutout": null, "data_root": "data", '
    '"dataset": "digits", "device": "auto", "drop_path": 0.1, "epochs": 2, "grad_accum_steps": 1, "img_size": 32, '
    '"init_checkpoint": null, "keep_effective_batch": false, "keep_rate": 0.7, "layer_decay": null, '
    '"log_every": 50, "lr": 0.001, "lr_batch_normalizer": 1024, "max_steps": null, "method": "evit", '
    '"method_kwargs": {"fuse_token": false}, "method_loss_kwargs": {}, "min_lr": 1e-05, "mixup": 0.8, '
    '"model": "vit_tiny_patch16_224", "model_ema": true, "model_ema_decay": 0.99996, '
    '"model_kwargs": {"patch_size": 8}, "multilabel_loss": "asl", "num_classes": null, "num_workers": 4, '
    '"opt": "adamw", "pretrained": false, "progress_seconds": 60.0, "prop_attn": null, "r": null, '
    '"r_schedule": "constant", "re_count": 1, "re_mode": "pixel", "reduction_loc": [3, 6, 9], "reprob": 0.25, '
    '"sched": "cosine", "sched_in_steps": true, "seed": 1, "select_weights": "best", "smoothing": 0.1, '
    '"teacher_checkpoint": null, "train_split": "train", "train_trainval": false, "tuning": "full", '
    '"tuning_kwargs": {}, "val_split": "val", "wandb_project": null, "warmup_epochs": 20, "warmup_lr": 1e-06, '
    '"weight_decay": 0.05}'
)


def test_train_config_holds_the_model_spec_and_lists_none_of_its_fields():
    own = [f.name for f in fields(TrainConfig)]
    assert "model_spec" in own
    assert not set(own) & set(ModelSpec.field_names()), "a model spec field declared again in TrainConfig"
    assert TrainConfig.keys() == ModelSpec.field_names() + tuple(n for n in own if n != "model_spec")
    cfg = TrainConfig.from_dict(FLAT)
    assert cfg.model_spec == ModelSpec(model="vit_tiny_patch16_224", model_kwargs={"patch_size": 8}, method="evit",
                                       keep_rate=0.7, reduction_loc=[3, 6, 9], budget="current",
                                       method_kwargs={"fuse_token": False}, clca={"ifa_head": True})
    assert (cfg.dataset, cfg.img_size, cfg.epochs, cfg.seed) == ("digits", 32, 2, 1)
    assert TrainConfig().model_spec == ModelSpec()  # the defaults live in ModelSpec only


def test_the_flat_layout_reads_and_writes_as_before():
    """The --spec JSON and the checkpoints' "config" keep their flat form to the
    letter, so neither Snakemake's params trigger nor a resume sees a change."""
    # recipe keys added since the recording (with their defaults, which change nothing)
    added = {"val_every_epochs": 1}
    now = json.dumps({**json.loads(RECORDED_FLAT), **added}, sort_keys=True)
    cfg = TrainConfig.from_dict(json.loads(RECORDED_FLAT))
    assert json.dumps(cfg.to_dict(), sort_keys=True) == now
    assert json.dumps(TrainConfig.from_dict(FLAT).to_dict(), sort_keys=True) == now
    # a checkpoint written before those keys existed resumes: a missing key counts as its default
    assert config_diff(json.loads(RECORDED_FLAT), TrainConfig.from_dict(FLAT).to_dict()) == []
    assert config_diff(json.loads(RECORDED_FLAT), TrainConfig.from_dict({**FLAT, "method": "topk"}).to_dict()) == ["method"]
    assert config_diff(json.loads(RECORDED_FLAT),
                       TrainConfig.from_dict({**FLAT, "val_every_epochs": 2}).to_dict()) == ["val_every_epochs"]


def test_bad_values_are_named_once():
    with pytest.raises(ValueError, match="unknown training config key\\(s\\): model_spec"):
        TrainConfig.from_dict({"model_spec": {"model": "x"}})  # configs are flat: one spelling
    with pytest.raises(ValueError, match="model_spec must be a ModelSpec"):
        TrainConfig(model_spec={"model": "vit_tiny_patch16_224"})
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        TrainConfig.from_dict({"num_classes": 0})
    with pytest.raises(ValueError, match="model_kwargs and method_kwargs must be mappings"):
        TrainConfig.from_dict({"method_kwargs": [1]})
    with pytest.raises(ValueError, match="tuning_kwargs must be a mapping"):
        ModelSpec(tuning_kwargs=[("x", 1)])
    with pytest.raises(ValueError, match="has no num_classes"):
        ModelSpec(model="vit_tiny_patch16_224", model_kwargs=TINY).build()


def test_stored_spec_keeps_its_format_and_values():
    cfg = TrainConfig.from_dict(dict(model="vit_tiny_patch16_224", model_kwargs={"patch_size": 8}, img_size=32,
                                     method="evit", keep_rate=(0.7,), reduction_loc=(1, 2),
                                     method_kwargs={"fuse_token": False}, clca={"ifa_head": True},
                                     dataset="imagefolder"))
    spec = stored_spec(cfg, num_classes=5, multilabel=False)
    assert set(spec) == STORED_SPEC_KEYS
    assert spec["model_kwargs"] == {"patch_size": 8, "img_size": 32}
    assert spec["reduction_loc"] == [1, 2] and spec["keep_rate"] == [0.7] and spec["num_classes"] == 5
    assert spec["method_kwargs"] == {"fuse_token": False} and spec["clca"] == {"ifa_head": True}
    assert spec["tuning"] == "full" and spec["eval_split"] == "val" and spec["multilabel"] is False
    assert ModelSpec.from_dict(spec) == cfg.model_spec.for_dataset(5, 32)
    assert cfg.model_spec.model_kwargs == {"patch_size": 8}  # for_dataset leaves the config's spec alone


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


def test_a_final_pth_written_in_the_flat_layout_loads(tmp_path):
    """final.pth as the flat TrainConfig wrote it (spec and config flat dicts,
    a W&B entry in the spec) loads into the network it describes, with its weights."""
    torch.manual_seed(3)
    trained = tr.create_model("vit_tiny_patch16_224", method="topk", keep_rate=0.5, reduction_loc=[2],
                              num_classes=4, **TINY).eval()
    spec = {"model": "vit_tiny_patch16_224", "model_kwargs": dict(TINY), "num_classes": 4, "method": "topk",
            "keep_rate": 0.5, "reduction_loc": [2], "budget": None, "r": None, "r_schedule": "constant",
            "prop_attn": None, "method_kwargs": {}, "img_size": 32, "dataset": "imagefolder", "multilabel": False,
            "clca": None, "tuning": "full", "tuning_kwargs": {}, "eval_split": "val", "wandb": None}
    torch.save({"model": trained.state_dict(), "weights": "plain", "spec": spec, "config": json.loads(RECORDED_FLAT),
                "metrics": {}}, tmp_path / "final.pth")
    model, loaded = load_trained_model(tmp_path / "final.pth")
    assert loaded == spec and model.reduction_config == trained.reduction_config
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))


def test_build_overrides_reach_timm_and_a_spec_without_model_is_named():
    spec = ModelSpec(model="vit_tiny_patch16_224", num_classes=3, model_kwargs={**TINY, "drop_path_rate": 0.0})
    model = spec.build(drop_path_rate=0.2)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    with pytest.raises(ValueError, match="lacks \\['model'\\]"):
        ModelSpec.from_dict({"num_classes": 3})
    with pytest.raises(ValueError, match="got unknown option"):  # the tuning mode checks its options, even 'full'
        ModelSpec(model="vit_tiny_patch16_224", num_classes=3, model_kwargs=TINY, tuning_kwargs={"x": 1}).build()


def test_the_config_validator_sees_the_same_flat_keys():
    """The validator loads train/config.py (and the spec.py it imports) by path,
    without torch: its flat field types are TrainConfig.keys()."""
    path = Path(tr.__file__).parent / "config_validation.py"
    loader = importlib.util.spec_from_file_location("h_config_validation_for_spec_test", path)
    cv = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(cv)
    assert tuple(cv.field_types(cv.train_config_module().TrainConfig)) == TrainConfig.keys()
