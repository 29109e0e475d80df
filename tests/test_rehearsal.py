"""The rehearsal (--config rehearse=true): the config rewrite, the stand-ins in
their real formats (read back by the real readers and timm's loader), the
rehearsal DAG against the study's own, and the configs it refuses."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tokenreduction.config_validation import timm_model_info
from tokenreduction.data import build_dataset
from tokenreduction.rehearsal import RehearsalError, is_current, standin_config
from tokenreduction.rehearsal.fabricate import COCO_CATEGORY_IDS, DATASET_WRITERS, NUM_CLASSES, fabricate
from tokenreduction.rehearsal.standin import standin_width
from workflow_utils import load_config, snakemake, with_existing_roots, write_config

STUDIES = ["which-tokens.yaml", "clca.yaml"]
REPO = Path(__file__).resolve().parents[1]
MMDET_PYTHON = Path(os.environ.get("TOKENREDUCTION_MMDET_PYTHON", REPO / ".venv-mmdet" / "bin" / "python"))
SPLITS = {"train": 6, "val": 9, "test": 5, "train_val": 7}


# ---------------------------------------------------------------- the config rewrite


@pytest.mark.parametrize("name", STUDIES)
def test_standin_config_shrinks_inputs_only(name):
    real = load_config(name)
    cfg, plan = standin_config({**real, "rehearse": True})
    assert cfg["results"] == real["results"] + "-rehearsal"
    # the grid is the study's
    for key in ("experiments", "methods", "reduction_loc", "budget", "seeds"):
        assert cfg[key] == real[key], key
    assert set(cfg["datasets"]) == set(real["datasets"]) and set(cfg["backbones"]) == set(real["backbones"])
    for ds, spec in cfg["datasets"].items():
        assert spec["kind"] == real["datasets"][ds]["kind"] and spec["img_size"] == real["datasets"][ds]["img_size"]
        assert spec["root"] == f"{cfg['results']}/standins/data/{ds}"
    for bb, spec in cfg["backbones"].items():
        orig = real["backbones"][bb]
        assert spec["model"] == orig["model"] and spec["init"] == orig["init"]
        a = timm_model_info(orig["model"], orig.get("model_kwargs"))
        b = timm_model_info(spec["model"], spec["model_kwargs"])
        # same family, depth, patch grid, prefix tokens; narrow
        assert (a.depth, a.patch_size, a.img_size, a.class_token, a.builds) == (
            b.depth, b.patch_size, b.img_size, b.class_token, b.builds)
        assert 16 <= spec["model_kwargs"]["embed_dim"] <= 32 and spec["model_kwargs"]["num_heads"] in (1, 2)
        assert spec["model_kwargs"]["pretrained_cfg_overlay"]["file"] == f"{cfg['results']}/standins/weights/{bb}.pth"
    assert cfg["finetune"]["epochs"] == 2 and cfg["finetune"]["batch_size"] == 4
    assert cfg["resources"]["gpus_per_train_job"] == 0
    whats = sorted((item["what"], item["path"]) for item in plan)
    assert len(whats) == len(real["datasets"]) + len(real["backbones"])
    assert len({item["fingerprint"] for item in plan}) == len(plan)
    # the input is not changed
    assert real == load_config(name)


def test_standin_widths_keep_the_capacity_order():
    widths = [standin_width(m, {}) for m in ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")]
    assert widths == [(16, 1), (24, 2), (32, 2)]
    assert standin_width("vit_tiny_patch16_224", {"embed_dim": 1024}) == (32, 2)


def test_study_standin_widths_rank_the_studys_backbones():
    from tokenreduction.rehearsal.standin import standin_splits, study_standin_widths

    # which-tokens and ATC: tiny / small / base keep the fixed table's widths (MAE's base too)
    which = load_config("which-tokens.yaml")["backbones"]
    assert study_standin_widths(which) == {"tiny": (16, 1), "small": (24, 2), "base": (32, 2)}
    atc = study_standin_widths(load_config("atc.yaml")["backbones"])
    assert atc == {"tiny": (16, 1), "small": (24, 2), "base": (32, 2), "mae_base": (32, 2)}
    # CLCA: two base models, one width -> the narrowest stand-in (one head at 785 tokens)
    assert study_standin_widths(load_config("clca.yaml")["backbones"]) == {"deit3": (16, 1), "clip": (16, 1)}
    # ranked by the real width (model_kwargs.embed_dim first), wider than third -> 32
    ranked = study_standin_widths({
        "a": {"model": "vit_base_patch16_224", "model_kwargs": {"embed_dim": 1024}},
        "b": {"model": "vit_small_patch16_224"},
        "c": {"model": "vit_huge_patch14_224"},
        "d": {"model": "vit_large_patch16_224"},
        "e": {"model": "vit_base_patch16_224"},
    })
    assert ranked == {"b": (16, 1), "e": (24, 2), "a": (32, 2), "d": (32, 2), "c": (32, 2)}
    # val / test: more images than the two widest stand-ins' widths together
    assert standin_splits(32) == {"train": 24, "val": 80, "test": 80, "train_val": 8}
    assert standin_splits(16) == {"train": 24, "val": 48, "test": 48, "train_val": 8}


@pytest.mark.parametrize("name,width,heads,images", [("clca.yaml", 16, 1, 48), ("which-tokens.yaml", 32, 2, 80)])
def test_standin_splits_and_pattern_images_follow_the_widest_standin(name, width, heads, images):
    cfg, plan = standin_config({**load_config(name), "rehearse": True})
    widest = max(spec["model_kwargs"]["embed_dim"] for spec in cfg["backbones"].values())
    assert widest == width
    assert max(spec["model_kwargs"]["num_heads"] for spec in cfg["backbones"].values()) == heads
    # the weights are generated at the width the jobs build
    weights = {item["path"]: item["model_kwargs"] for item in plan if item["what"] == "timm_weights"}
    for spec in cfg["backbones"].values():
        generated = weights[spec["model_kwargs"]["pretrained_cfg_overlay"]["file"]]
        assert (generated["embed_dim"], generated["num_heads"]) == (spec["model_kwargs"]["embed_dim"], spec["model_kwargs"]["num_heads"])
    datasets = [item for item in plan if item["what"] == "dataset"]
    assert datasets and all(item["splits"]["val"] == item["splits"]["test"] == images for item in datasets)
    assert all(item["splits"]["train_val"] == 8 and item["splits"]["train"] == 24 for item in datasets)
    # every pattern image is a stand-in image, and the CCA of two stand-ins has more images than widths
    assert cfg["evaluate"]["num_pattern_images"] == images > 2 * widest


def test_cut_recipe_validates_where_the_study_reads_the_validation():
    from tokenreduction.rehearsal.standin import SPLIT_SIZES
    from tokenreduction.train import TrainConfig

    clca, _ = standin_config({**load_config("clca.yaml"), "rehearse": True})
    which, _ = standin_config({**load_config("which-tokens.yaml"), "rehearse": True})
    # CLCA keeps its last weights: one validation, after the last of its 2 + 1 cut epochs
    ft = TrainConfig.from_dict({k: v for k, v in clca["finetune"].items() if k in TrainConfig.keys()})
    assert (ft.epochs, ft.warmup_epochs, ft.cooldown_epochs, ft.select_weights) == (2, 1, 1, "last")
    assert ft.val_every_epochs == ft.total_epochs == 3
    # trained on train_val: 3 epochs x 8 images / batch 4 = 6 optimiser steps
    assert ft.total_epochs * -(-SPLIT_SIZES["train_val"] // (ft.batch_size * ft.grad_accum_steps)) == 6
    # which-tokens selects the best epoch: it still validates every epoch
    assert which["finetune"]["select_weights"] == "best" and "val_every_epochs" not in which["finetune"]
    assert TrainConfig.from_dict({k: v for k, v in which["finetune"].items() if k in TrainConfig.keys()}).val_every_epochs == 1
    # evaluation: 15 throughput passes of 1 image; pattern images enough for the CCA of the
    # two widest stand-ins (more images than their widths together)
    for cfg in (clca, which):
        assert cfg["evaluate"]["throughput_batch"] == 1
        widest = max(spec["model_kwargs"]["embed_dim"] for spec in cfg["backbones"].values())
        assert cfg["evaluate"]["num_pattern_images"] > 2 * widest
    assert (clca["evaluate"]["num_pattern_images"], which["evaluate"]["num_pattern_images"]) == (48, 80)
    # the study's own recipe and evaluation are left as they are
    real = load_config("clca.yaml")
    assert (real["finetune"]["epochs"], real["finetune"]["batch_size"], real["finetune"]["num_workers"]) == (45, 32, 8)
    assert real["evaluate"] == {"num_pattern_images": 256, "batch_size": 64, "throughput_batch": 64}


def test_rehearse_datasets_restricts_the_grid():
    real = load_config("which-tokens.yaml")
    cfg, plan = standin_config({**real, "rehearse": True, "rehearse_datasets": ["nabirds"]})
    assert list(cfg["datasets"]) == ["nabirds"]
    assert [e["datasets"] for e in cfg["experiments"]] == [["nabirds"]]
    assert cfg["experiments"][0]["methods"] == real["experiments"][0]["methods"]
    assert sum(item["what"] == "dataset" for item in plan) == 1
    with pytest.raises(RehearsalError, match=r"rehearse_datasets: \['birds'\]"):
        standin_config({**real, "rehearse_datasets": ["birds"]})


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c["datasets"]["nabirds"].update(kind="cub"), "datasets.nabirds.kind"),
        (lambda c: c["backbones"]["small"].update(model="swin_tiny_patch4_window7_224"), "backbones.small.model"),
        (lambda c: c["backbones"]["base"].update(init="pretrained/deit_base.pth"), "backbones.base.init"),
        (lambda c: c.update(benchmark={"enabled": True}), "benchmark"),
        (lambda c: c.update(ots={"backbones": {"big": {"preset": "eva_giant"}}}), "ots.backbones.big.preset"),
    ],
)
def test_uncovered_config_names_its_key(edit, key):
    cfg = load_config("which-tokens.yaml")
    edit(cfg)
    with pytest.raises(RehearsalError) as err:
        standin_config(cfg)
    assert str(err.value).startswith(f"{key}:"), str(err.value)


# ---------------------------------------------------------------- the stand-ins in their real formats


@pytest.mark.parametrize("kind", sorted(DATASET_WRITERS))
def test_fabricated_dataset_reads_with_the_real_reader(tmp_path, kind):
    DATASET_WRITERS[kind](tmp_path, SPLITS, seed=0)
    splits = ("train", "val", "test", "train_val") if kind == "ufgir" else ("train", "val")
    for split in splits:
        ds = build_dataset(kind, tmp_path, split)
        assert len(ds) == SPLITS[split], (kind, split)
        image, target = ds[len(ds) - 1]
        assert image.mode == "RGB" and 48 <= min(image.size) and max(image.size) <= 96
        if kind == "coco":
            assert ds.multilabel and ds.num_classes == 80 and ds.category_ids == COCO_CATEGORY_IDS
            assert target.sum() >= 1
        elif kind == "nuswide":
            assert ds.multilabel and target.sum() >= 1
        else:
            assert not ds.multilabel and ds.num_classes == NUM_CLASSES
            # every class in turn: the class counts of the writer
            assert sorted(int(t) for t in ds.targets) == sorted(i % NUM_CLASSES for i in range(len(ds)))
    if kind == "nabirds":
        # sparse leaf ids above the parents': remapped to 0..C-1 in ascending order
        assert build_dataset(kind, tmp_path, "train").source_class_ids == [295 + 7 * c for c in range(NUM_CLASSES)]


def test_fabricated_coco_leaves_out_the_unannotated_image(tmp_path):
    DATASET_WRITERS["coco"](tmp_path, SPLITS)
    data = json.loads((tmp_path / "annotations" / "instances_val2014.json").read_text())
    assert len(data["images"]) == SPLITS["val"] + 1
    assert len(build_dataset("coco", tmp_path, "val")) == SPLITS["val"]
    assert any(a["iscrowd"] for a in data["annotations"])


def test_generated_weights_load_through_timm_pretrained_loading(tmp_path):
    import timm

    real = load_config("clca.yaml")
    real["results"] = str(tmp_path / "results")
    cfg, plan = standin_config(real)
    item = next(i for i in plan if i["what"] == "timm_weights" and i["model"].startswith("deit3"))
    assert not is_current(item)
    fabricate(item)
    assert is_current(item)
    spec = cfg["backbones"]["deit3"]
    # as the fine-tuning job builds it: pretrained, 448 px, the data set's classes
    model = timm.create_model(spec["model"], pretrained=True, num_classes=5, **spec["model_kwargs"])
    saved = torch.load(item["path"], weights_only=True)
    assert torch.equal(model.blocks[7].mlp.fc1.weight, saved["blocks.7.mlp.fc1.weight"])
    assert saved["pos_embed"].shape[1] == 14 * 14  # written at 224 px ...
    assert model.pos_embed.shape[1] == 28 * 28  # ... resampled by timm to 448 px (deit3: no class-token position)
    assert model.head.out_features == 5 and saved["head.weight"].shape[0] == 1000


def test_dataset_standin_is_rewritten_when_its_spec_changes(tmp_path):
    item = {"what": "dataset", "kind": "ufgir", "path": str(tmp_path / "leaves"), "splits": SPLITS, "fingerprint": "a"}
    fabricate(item)
    assert is_current(item) and len(build_dataset("ufgir", tmp_path / "leaves", "test")) == SPLITS["test"]
    changed = {**item, "splits": {**SPLITS, "test": 3}, "fingerprint": "b"}
    assert not is_current(changed)
    fabricate(changed)
    assert is_current(changed) and len(build_dataset("ufgir", tmp_path / "leaves", "test")) == 3


# ---------------------------------------------------------------- the DAG


def _jobs(output: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of every planned job of a dry run (jobs without wildcards: '')."""
    jobs, current = [], None
    for line in output.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line.strip())
        if m:
            if current:
                jobs.append(tuple(current))
            current = [m.group(1), ""]
        elif current and line.strip().startswith("wildcards:"):
            current[1] = line.strip()[len("wildcards:"):].strip()
    if current:
        jobs.append(tuple(current))
    return sorted(jobs)


def _runnable_study_config(name: str, folder):
    """The study config with its local inputs present (empty dataset roots,
    empty checkpoint files, a 1000-line class-names file, an empty COCO root
    and detector checkpoints for detection), as a dry run needs them."""
    config = with_existing_roots(load_config(name), folder)
    if "detection" in config and not MMDET_PYTHON.exists():
        # the rehearsal writes its detector checkpoints with the detection environment
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the detection environment ({MMDET_PYTHON}): run envs/install_mmdet.sh")
        config.pop("detection")
    det = config.get("detection") or {}
    if det.get("data_root"):
        (folder / "coco").mkdir(exist_ok=True)
        det["data_root"] = str(folder / "coco")
    for spec in det.get("sizes", {}).values():
        if spec.get("load_from"):
            path = folder / "checkpoints" / spec["load_from"].rsplit("/", 1)[-1]
            path.parent.mkdir(exist_ok=True)
            path.touch()
            spec["load_from"] = str(path)
    for spec in (config.get("ots") or {}).get("backbones", {}).values():
        if spec.get("checkpoint"):
            path = folder / "checkpoints" / spec["checkpoint"].rsplit("/", 1)[-1]
            path.parent.mkdir(exist_ok=True)
            path.touch()
            spec["checkpoint"] = str(path)
    if isinstance((config.get("diffusion") or {}).get("class_names"), str):
        path = folder / "class_names.txt"
        path.write_text("".join(f"class {i}\n" for i in range(1000)))
        config["diffusion"]["class_names"] = str(path)
    return write_config(folder / name, config)


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES + ["atc.yaml"])
def test_rehearsal_dag_is_the_studys(tmp_path, name):
    real_dir, rehearsal_dir = tmp_path / "real", tmp_path / "rehearsal"
    real_dir.mkdir()
    rehearsal_dir.mkdir()
    real = _runnable_study_config(name, real_dir)
    real_jobs = _jobs(snakemake(["-n", "--configfile", str(real)], real_dir).stdout)
    proc = snakemake(["-n", "--configfile", str(real), "--config", "rehearse=true"], rehearsal_dir)
    rehearsal_jobs = _jobs(proc.stdout)
    assert len(real_jobs) > 700
    assert rehearsal_jobs == real_jobs
    # the stand-ins were written where the rehearsal reads them
    results = rehearsal_dir / (load_config(name)["results"] + "-rehearsal")
    for ds in load_config(name)["datasets"]:
        assert (results / "standins" / "data" / ds / ".standin.json").is_file()
    assert "standins/data" in proc.stdout and "--img-size" in proc.stdout
    if name == "atc.yaml":  # the whole study, detection included: 2 sizes x (4 methods x 4 keep rates + baseline)
        assert sum(rule == "detection_train" for rule, _ in rehearsal_jobs) == 34
        assert "standins/detection/adapter-t.py" in proc.stdout and "standins/weights/detection-adapter-s.pth" in proc.stdout


@pytest.mark.slow
def test_uncovered_config_stops_the_dag_build_with_its_key(tmp_path):
    cfg = load_config("which-tokens.yaml")
    cfg["backbones"]["tiny"]["model"] = "swin_tiny_patch4_window7_224"
    path = write_config(tmp_path / "bad.yaml", cfg)
    proc = snakemake(["-n", "--configfile", str(path), "--config", "rehearse=true"], tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rehearse=true" in out and "backbones.tiny.model" in out and "swin_tiny" in out
    assert "Traceback" not in out


# ---------------------------------------------------------------- off-the-shelf backbones (ATC study)


def _atc_ots_standins(tmp_path, drop=("detection", "diffusion")):
    """(the ATC config less `drop`, its rehearsal config, the plan)."""
    from tokenreduction.config_validation import ots_presets

    real = load_config("atc.yaml")
    real["results"] = str(tmp_path / "results")
    for section in drop:
        real.pop(section)
    return real, *standin_config(real, ots_presets())


def test_ots_standins_cover_every_preset_of_the_atc_study(tmp_path):
    real, cfg, plan = _atc_ots_standins(tmp_path)
    whats = {i["path"].rsplit("/", 1)[-1]: i["what"] for i in plan}
    assert whats["ots-swag_h14.torch"] == "swag_weights" and whats["ots-mae_huge.pth"] == "mae_weights"
    assert whats["ots-augreg_large_384.pth"] == "timm_weights"
    for name, spec in cfg["ots"]["backbones"].items():
        assert spec["r"] == real["ots"]["backbones"][name]["r"] and spec["preset"] == real["ots"]["backbones"][name]["preset"]
        assert 16 <= spec["model_kwargs"]["embed_dim"] <= 32
    # the configured checkpoint files are replaced, never written over
    assert cfg["ots"]["backbones"]["swag_b16"]["checkpoint"].startswith(cfg["results"] + "/standins/")
    assert cfg["mae"]["recipe"]["epochs"] == 2 and cfg["mae"]["r"] == real["mae"]["r"]
    # the sweeps measure throughput as the evaluations do: batch 1
    assert real["ots"]["throughput_batch"] and cfg["ots"]["throughput_batch"] == 1
    # and evaluate one batch of images per value of r, not the whole val split
    assert not real["ots"].get("max_images") and cfg["ots"]["max_images"] == cfg["ots"]["batch_size"] == 16
    with pytest.raises(RehearsalError, match="ots.backbones.augreg_tiny.preset"):
        standin_config(real, {})


@pytest.mark.parametrize("name", ["augreg_large_384", "swag_h14", "mae_base"])
def test_ots_standin_weights_load_with_the_real_loaders(tmp_path, name):
    from tokenreduction.ots.presets import build_backbone, preset_from_spec

    _, cfg, plan = _atc_ots_standins(tmp_path)
    spec = {k: v for k, v in cfg["ots"]["backbones"][name].items() if k != "r"}
    item = next(i for i in plan if i["path"].rsplit("/", 1)[-1].startswith(f"ots-{name}."))
    fabricate(item)
    preset = preset_from_spec({"name": name, **spec})
    model = build_backbone(preset)
    grid = preset.img_size // preset.patch_size
    assert model.patch_embed.grid_size == (grid, grid) and len(model.blocks) == preset.depth
    saved = torch.load(item["path"], weights_only=True)
    if item["what"] == "swag_weights":
        assert saved["encoder.pos_embedding"].shape[1] == 1  # SWAG's (S, 1, D)
        written = saved["encoder.layers.layer_31.self_attention.in_proj_weight"]
        assert torch.equal(model.blocks[31].attn.qkv.weight, written)
    elif item["what"] == "mae_weights":
        assert set(saved) == {"model"} and "fc_norm.weight" in saved["model"]
        assert torch.equal(model.fc_norm.weight, saved["model"]["fc_norm.weight"])
    else:
        assert torch.equal(model.blocks[23].mlp.fc2.weight, saved["blocks.23.mlp.fc2.weight"])


# ---------------------------------------------------------------- Stable Diffusion + FID (ATC study)


def test_diffusion_standins_load_with_the_real_readers(tmp_path):
    from tokenreduction.diffusion.fid import inception_extractor
    from tokenreduction.diffusion.reference import class_names

    real, cfg, plan = _atc_ots_standins(tmp_path, drop=("detection",))
    diff = cfg["diffusion"]
    assert diff["experiments"] == real["diffusion"]["experiments"]
    assert diff["pipeline"] == f"{cfg['results']}/standins/diffusion/pipeline" and diff["steps"] == 2
    wanted = {"dataset", "class_names", "inception_weights"}
    for item in plan:
        if item["what"] in wanted and (item["what"] != "dataset" or item["path"].endswith("/imagenet")):
            fabricate(item)
    val_root = f"{cfg['datasets']['imagenet']['root']}/val"
    names = class_names(val_root, diff["class_names"], diff["num_classes"])
    assert len(names) == NUM_CLASSES and names[3] == "stand-in class 3, rehearsal 3"
    model, label = inception_extractor(diff["fid"]["inception_weights"], torch.device("cpu"))
    images = torch.randint(0, 256, (3, 3, 299, 299)).float()
    features = model(images)
    assert features.shape == (3, 2048) and torch.isfinite(features).all()
    assert "inception-2015-12-05.pt" in label


def test_rehearse_datasets_without_rehearse_is_refused():
    import importlib.util

    from workflow_utils import REPO

    spec = importlib.util.spec_from_file_location("rehearsal_hook", REPO / "workflow" / "lib" / "rehearsal.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    config = load_config("which-tokens.yaml")
    assert hook.apply_rehearsal(copy.deepcopy(config), REPO) == []  # not rehearsing: nothing changes
    with pytest.raises(SystemExit, match="rehearse_datasets.*rehearse=true"):
        hook.apply_rehearsal({**config, "rehearse_datasets": ["nabirds"]}, REPO)
    with pytest.raises(SystemExit, match="rehearse=true.*datasets.nabirds.kind"):
        bad = copy.deepcopy(config)
        bad["datasets"]["nabirds"]["kind"] = "cub"
        hook.apply_rehearsal({**bad, "rehearse": True}, REPO)


# ---------------------------------------------------------------- detection (ATC study)


def _atc_detection_standins(tmp_path):
    """(the ATC config, its rehearsal config, the detection part of the plan)."""
    real = load_config("atc.yaml")
    real["results"] = str(tmp_path / "results")
    real.pop("ots")
    cfg, plan = standin_config(real)
    detection = [i for i in plan if i["what"] in ("coco_instances", "detection_config", "detection_checkpoint")]
    return real, cfg, detection


def test_detection_standins_keep_the_grid_and_narrow_the_model(tmp_path):
    real, cfg, plan = _atc_detection_standins(tmp_path)
    det, orig = cfg["detection"], real["detection"]
    for key in set(orig) - {"data_root", "sizes", "gpus_per_train_job", "gpus_per_eval_job", "benchmark"}:
        assert det[key] == orig[key], key  # methods, keep rates, baseline, python: the study's
    assert list(det["sizes"]) == list(orig["sizes"])
    assert det["data_root"] == f"{cfg['results']}/standins/data/coco2017"
    assert (det["gpus_per_train_job"], det["gpus_per_eval_job"], det["threads_per_job"]) == (0, 0, 1)
    assert det["benchmark"] == {"batch_size": 1, "runs": 3, "warmup": 1}
    assert sorted(i["what"] for i in plan) == ["coco_instances"] + ["detection_checkpoint"] * 2 + ["detection_config"] * 2
    widths = {}
    for size, spec in det["sizes"].items():
        assert spec["config"] == f"{cfg['results']}/standins/detection/{size}.py"  # absolute: tmp_path is
        assert spec["load_from"] == f"{cfg['results']}/standins/weights/detection-{size}.pth"
        assert spec["batch_size"] == 2 and spec["cumulative_iters"] == orig["sizes"][size]["cumulative_iters"]
        text = next(i["text"] for i in plan if i["path"] == spec["config"])
        # the study's config is the base; only widths, scale, schedule, loaders and the fp32 wrapper change
        assert f"_base_ = [{str(REPO / orig['sizes'][size]['config'])!r}]" in text
        model = re.search(r"^model = (.*)$", text, re.M).group(1)
        widths[size] = eval(model)["backbone"]["embed_dim"]  # noqa: S307 - our own repr
        assert "'scales': [(48, 133), (51, 133)" in text and "'scale': (133, 80)" in text
        assert "train_cfg = {'max_epochs': 1, 'val_interval': 1}" in text
        assert "type='OptimWrapper'" in text and "{{_base_.optim_wrapper.optimizer}}" in text
        ckpt = next(i for i in plan if i["what"] == "detection_checkpoint" and i["path"] == spec["load_from"])
        assert ckpt["config"] == spec["config"] and ckpt["python"] == str(REPO / ".venv-mmdet/bin/python")
    # ViT-Adapter-T (192) and -S (384): the stand-in widths of DeiT-T / DeiT-S
    assert widths == {"adapter-t": 16, "adapter-s": 24}


@pytest.mark.parametrize("edit, key", [
    (lambda d, tmp: d["sizes"]["adapter-t"].update(config=str(tmp / "faster_rcnn.py")), "detection.sizes.adapter-t.config"),
    (lambda d, tmp: d["sizes"]["adapter-s"].update(pretrained="pretrained/deit_small.pth"), "detection.sizes.adapter-s.pretrained"),
])
def test_uncovered_detection_config_names_its_key(tmp_path, edit, key):
    (tmp_path / "faster_rcnn.py").write_text('_base_ = ["mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"]\n')
    cfg = load_config("atc.yaml")
    cfg.pop("ots")
    edit(cfg["detection"], tmp_path)
    with pytest.raises(RehearsalError) as err:
        standin_config(cfg)
    assert str(err.value).startswith(f"{key}:"), str(err.value)
    if key.endswith(".config"):
        assert "vit_adapter_mask_rcnn.py" in str(err.value) and "faster_rcnn.py" in str(err.value)


def test_fabricated_coco2017_layout(tmp_path):
    _, _, plan = _atc_detection_standins(tmp_path)
    item = next(i for i in plan if i["what"] == "coco_instances")
    fabricate(item)
    root = tmp_path / item["path"] if not item["path"].startswith("/") else Path(item["path"])
    assert is_current(item)
    for split, count in item["splits"].items():
        data = json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
        assert [c["id"] for c in data["categories"]] == COCO_CATEGORY_IDS
        assert len(data["images"]) == count + 1
        files = sorted(p.name for p in (root / f"{split}2017").iterdir())
        assert files == sorted(img["file_name"] for img in data["images"]) and all(re.fullmatch(r"\d{12}\.jpg", f) for f in files)
        polygons = [a for a in data["annotations"] if not a["iscrowd"]]
        assert polygons and all(len(a["segmentation"][0]) >= 6 and a["area"] > 0 for a in polygons)
        crowd = [a for a in data["annotations"] if a["iscrowd"]]
        # uncompressed RLE: column-major runs over the whole image, starting with zeros
        img = next(i for i in data["images"] if i["id"] == crowd[0]["image_id"])
        counts = crowd[0]["segmentation"]["counts"]
        assert len(crowd) == 1 and sum(counts) == img["width"] * img["height"]
        assert sum(counts[1::2]) == crowd[0]["area"]


def _detection_env_checks(tmp_path, names):
    """Write the ATC rehearsal's detection stand-ins, then run
    tests/rehearsal_detection_checks.py with the detection interpreter."""
    if not MMDET_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the detection environment ({MMDET_PYTHON}): run envs/install_mmdet.sh")
        pytest.skip(f"detection environment not installed ({MMDET_PYTHON})")
    _, _, plan = _atc_detection_standins(tmp_path)
    if "checkpoints" not in names:
        plan = [i for i in plan if i["what"] != "detection_checkpoint"]
    for item in plan:
        fabricate(item)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([str(MMDET_PYTHON), str(REPO / "tests" / "rehearsal_detection_checks.py"), ",".join(names),
                           str(tmp_path / "plan.json")], capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    out = proc.stdout + "\n" + proc.stderr[-6000:]
    for name in names:
        assert f"check {name}: ok" in out, f"check {name} did not pass:\n{out[-8000:]}"


def test_fabricated_coco2017_reads_with_pycocotools(tmp_path):
    _detection_env_checks(tmp_path, ["pycocotools"])


@pytest.mark.slow
def test_detection_standins_read_by_mmdet_and_checkpoints_load_strictly(tmp_path):
    """mmdet's CocoDataset through the stand-in configs; each checkpoint has
    the ViT-Adapter 3x release's key names and loads strictly through the
    detection jobs' load path (detection.checkpoint)."""
    _detection_env_checks(tmp_path, ["mmdet_dataset", "checkpoints"])
