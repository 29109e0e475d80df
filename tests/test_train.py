"""Fine-tuning loop: outputs, exact resume (in process and after a real
SIGTERM), gradient accumulation, multi-label, DynamicViT, config checks."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokenreduction as tr
from tokenreduction.train import TrainConfig, TrainingInterrupted, load_trained_model, param_groups, train
from tokenreduction.train.engine import LOG_COLUMNS, EpochSampler

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(patch_size=4, embed_dim=16, depth=4, num_heads=2)


def make_imagefolder(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 4) -> Path:
    """root/{train,val}/c<k>/*.png, 16 px; class k is brighter with k."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (rng.random((16, 16, 3)) * 80 + c * 80).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{split}_{c}_{i}.png")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("imgs"))


def tiny_config(data_root: Path, **overrides) -> dict:
    cfg = dict(
        model="vit_tiny_patch16_224",
        model_kwargs=dict(TINY),
        img_size=16,
        method="topk",
        keep_rate=0.7,
        reduction_loc=[1, 2],
        dataset="imagefolder",
        data_root=str(data_root),
        epochs=2,
        warmup_epochs=1,
        batch_size=4,
        lr=1e-3,
        lr_batch_normalizer=None,
        num_workers=0,
        model_ema=True,
        model_ema_decay=0.9,
    )
    cfg.update(overrides)
    return cfg


# the resume runs exercise every source of randomness: mixup/cutmix (numpy),
# drop path (torch), RandAugment + random erasing (per-sample), EMA, accumulation
RESUME = dict(epochs=3, batch_size=2, grad_accum_steps=2, drop_path=0.1, mixup=0.8, cutmix=1.0, reprob=0.25)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pth", map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ in {different[:5]}"


@pytest.fixture(scope="module")
def reference_run(data_root, tmp_path_factory) -> Path:
    """Run A: uninterrupted, with the resume settings."""
    out = tmp_path_factory.mktemp("run_a")
    train(tiny_config(data_root, **RESUME), out)
    return out


def test_outputs_of_a_two_epoch_run(data_root, tmp_path):
    # the last EMA weights (the selection rules themselves: test_train_phases.py)
    result = train(tiny_config(data_root, select_weights="last_ema"), tmp_path)
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == LOG_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    # 24 train images / batch 4 = 6 optimizer steps per epoch
    assert [int(r["step"]) for r in rows] == [6, 12]
    for r in rows:
        assert 0.0 <= float(r["val_metric"]) <= 100.0 and float(r["val_top5"]) == 100.0  # 3 classes
        assert float(r["train_loss"]) > 0 and float(r["lr"]) > 0
    metrics = json.loads((tmp_path / "train_metrics.json").read_text())
    assert metrics["metric"] == "top1" and metrics["steps"] == 12 and metrics["epochs_completed"] == 2
    assert metrics["weights"] == "ema"
    assert metrics["final"]["metric"] == pytest.approx(float(rows[-1]["val_ema_metric"]))
    assert metrics["best_val_metric"] >= metrics["final"]["metric"]
    assert result["steps"] == 12
    # final.pth rebuilds the same network and holds the EMA weights
    model, spec = load_trained_model(tmp_path / "final.pth")
    assert spec["num_classes"] == 3 and spec["method"] == "topk" and spec["reduction_loc"] == [1, 2]
    assert model.reduction_config["expected_tokens"] == [11, 7]
    ckpt = torch.load(tmp_path / "checkpoint_last.pth", map_location="cpu", weights_only=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["ema"]["module." + k])
    assert not all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    model(torch.randn(2, 3, 16, 16))
    assert model.tokens_kept == [11, 7]


def test_resume_in_process_is_exact(data_root, tmp_path, reference_run):
    cfg = tiny_config(data_root, **RESUME)
    # 6 optimizer steps per epoch (12 batches of 2, accumulation 2); stop mid-epoch, at an epoch end, mid-epoch again
    for stop in (2, 6, 9):
        with pytest.raises(TrainingInterrupted) as exc:
            train(cfg, tmp_path, stop_after_steps=stop)
        assert exc.value.code == 128 + signal.SIGTERM
        state = torch.load(tmp_path / "checkpoint_last.pth", map_location="cpu", weights_only=False)
        assert state["step"] == stop and not (tmp_path / "final.pth").exists()
    train(cfg, tmp_path)
    assert_same_weights(final_weights(reference_run), final_weights(tmp_path))
    with open(tmp_path / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [6, 12, 18]  # no duplicated rows


def test_resume_depends_on_the_saved_rng_state(data_root, tmp_path, reference_run):
    """Negative control: the equality above is sensitive to the restored state."""
    cfg = tiny_config(data_root, **RESUME)
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path, stop_after_steps=4)
    path = tmp_path / "checkpoint_last.pth"
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["rng"]["torch"] = torch.Generator().manual_seed(12345).get_state()
    state["rng"]["numpy"] = np.random.RandomState(12345).get_state()
    torch.save(state, path)
    train(cfg, tmp_path)
    a, b = final_weights(reference_run), final_weights(tmp_path)
    assert any(not torch.equal(a[k], b[k]) for k in a)


SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, torch
    from tokenreduction.train import train
    torch.set_num_threads(1)
    cfg, out = json.loads(sys.argv[1]), sys.argv[2]
    def on_step(step):
        print(f"STEP {step}", flush=True)
        time.sleep(0.3)
    train(cfg, out, on_step=on_step)
    print("FINISHED", flush=True)
    """
)


def test_sigterm_saves_and_resumes_exactly(data_root, tmp_path, reference_run):
    # two data workers in the killed run: augmentations must not depend on them,
    # and they must survive the signal sent to the whole process group (as Slurm does)
    cfg = tiny_config(data_root, **RESUME, num_workers=2)
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBPROCESS_SCRIPT, json.dumps(cfg), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("STEP 3"):
                os.killpg(proc.pid, signal.SIGTERM)
                break
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines.append(out)
    log = "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "FINISHED" not in log
    state = torch.load(tmp_path / "checkpoint_last.pth", map_location="cpu", weights_only=False)
    assert 3 <= state["step"] < 18 and not state["finished"]
    assert not (tmp_path / "final.pth").exists()
    train(dict(cfg, num_workers=0), tmp_path)
    assert_same_weights(final_weights(reference_run), final_weights(tmp_path))


def test_resume_refuses_a_changed_config(data_root, tmp_path):
    cfg = tiny_config(data_root, epochs=1)
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path, stop_after_steps=1)
    with pytest.raises(ValueError, match="lr"):
        train(dict(cfg, lr=5e-4), tmp_path)
    # the DAG's choice: a rerun with changed parameters starts afresh
    fresh = train(dict(cfg, lr=5e-4), tmp_path, on_config_change="restart")
    assert (tmp_path / "checkpoint_stale.pth").exists()
    reference = train(dict(cfg, lr=5e-4), tmp_path / "reference")
    assert_same_weights(final_weights(tmp_path / "reference"), final_weights(tmp_path))
    assert fresh["steps"] == reference["steps"]


def test_gradient_accumulation_matches_a_larger_batch(data_root, tmp_path):
    common = dict(epochs=1, model_ema=False, mixup=0.0, cutmix=0.0, drop_path=0.0, smoothing=0.0)
    train(tiny_config(data_root, batch_size=4, grad_accum_steps=1, **common), tmp_path / "big")
    train(tiny_config(data_root, batch_size=2, grad_accum_steps=2, **common), tmp_path / "accum")
    a, b = final_weights(tmp_path / "big"), final_weights(tmp_path / "accum")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    init = tr.create_model("vit_tiny_patch16_224", num_classes=3, img_size=16, **TINY).state_dict()
    assert not torch.equal(a["head.weight"], init["head.weight"])  # it trained


def test_amp_on_cpu_and_per_epoch_schedule(data_root, tmp_path):
    cfg = tiny_config(data_root, amp=True, sched_in_steps=False, epochs=2, warmup_epochs=1, warmup_lr=1e-6,
                      min_lr=1e-5, model_ema=False)
    result = train(cfg, tmp_path)  # bf16 autocast on CPU
    with open(tmp_path / "log.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    # epoch 0 is the warm-up start, epoch 1 the cosine at t = 1 of 2
    assert lrs == pytest.approx([1e-6, 1e-5 + 0.5 * (1e-3 - 1e-5)])
    assert np.isfinite(result["final"]["top1"])
    assert all(v.dtype == torch.float32 for v in final_weights(tmp_path).values() if v.is_floating_point())


def test_max_steps_and_step_checkpoints(data_root, tmp_path):
    seen = {}

    def on_step(step):
        if step == 5:
            seen["ckpt_step"] = torch.load(tmp_path / "checkpoint_last.pth", weights_only=False)["step"]

    result = train(tiny_config(data_root, epochs=5, max_steps=5, checkpoint_every_steps=2), tmp_path, on_step=on_step)
    assert seen["ckpt_step"] == 4
    assert result["steps"] == 5 and result["epochs_completed"] == 1
    assert (tmp_path / "final.pth").exists() and json.loads((tmp_path / "train_metrics.json").read_text())["steps"] == 5
    # a finished run called again only rewrites its outputs
    again = train(tiny_config(data_root, epochs=5, max_steps=5, checkpoint_every_steps=2), tmp_path)
    assert again["steps"] == 5 and again["final"] == result["final"]


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    s = EpochSampler(10, seed=3)
    s.set_epoch(1)
    full = list(s)
    assert sorted(full) == list(range(10))
    s.set_epoch(1, start=4)
    assert list(s) == full[4:]
    s.set_epoch(2)
    assert list(s) != full
    shards = []
    for rank in range(3):
        r = EpochSampler(10, seed=3, rank=rank, world_size=3)
        r.set_epoch(1)
        shards.append(list(r))
    assert all(len(x) == 4 for x in shards) and set(sum(shards, [])) == set(range(10))


def test_multilabel_with_asl_reports_map(tmp_path):
    from tokenreduction.data import make_digits_mosaic_dataset

    root = make_digits_mosaic_dataset(tmp_path / "mosaic", img_size=16, num_images=40, seed=0)
    cfg = tiny_config(root, dataset="digits_multilabel", epochs=1, mixup=0.0, cutmix=0.0, auto_augment=None,
                      multilabel_loss="asl", model_ema=False)
    result = train(cfg, tmp_path / "out")
    assert result["metric"] == "mAP" and result["multilabel"] and result["num_classes"] == 10
    assert 0.0 < result["final"]["mAP"] <= 100.0 and "top1" not in result["final"]
    with open(tmp_path / "out" / "log.csv") as f:
        row = next(csv.DictReader(f))
    assert row["val_top5"] == "" and float(row["val_metric"]) == pytest.approx(result["final"]["mAP"])


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"model": "deit_tiny_patch16_224", "learning_rate": 0.1})
    with pytest.raises(ValueError, match="multilabel_loss"):
        TrainConfig.from_dict({"multilabel_loss": "focal"})
    assert TrainConfig.from_dict({"reduction_loc": (3, 6, 9)}).model_spec.reduction_loc == [3, 6, 9]


def test_param_groups_split_reduction_and_decay():
    model = tr.create_model("vit_tiny_patch16_224", method="dynamicvit", keep_rate=0.7, reduction_loc=[1, 2],
                            num_classes=3, img_size=16, **TINY)
    groups = param_groups(model, weight_decay=0.05, backbone_lr_scale=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {g["group_name"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert set(by_name) == {"backbone_decay", "backbone_no_decay", "reduction_decay", "reduction_no_decay"}
    assert sum(len(v) for v in by_name.values()) == len(names)
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= set(by_name["backbone_no_decay"])
    assert "blocks.0.attn.qkv.weight" in by_name["backbone_decay"]
    assert all(".reduction." in n for n in by_name["reduction_decay"] + by_name["reduction_no_decay"])
    for g in groups:
        assert g["lr_scale"] == (1.0 if g["group_name"].startswith("reduction") else 0.1)
        assert g["weight_decay"] == (0.05 if g["group_name"].endswith("_decay") and "no_decay" not in g["group_name"] else 0.0)


def test_dynamicvit_trains_with_its_loss_and_teacher(data_root, tmp_path, monkeypatch):
    from tokenreduction.reduction import dynamicvit

    teacher_dir = tmp_path / "teacher"
    train(tiny_config(data_root, method=None, keep_rate=None, reduction_loc=None, epochs=1, model_ema=False), teacher_dir)
    calls = []
    original = dynamicvit.DynamicViTLoss.forward

    def spy(self, student_model, images, outputs, targets, teacher_model=None):
        loss = original(self, student_model, images, outputs, targets, teacher_model)
        calls.append((teacher_model is not None, dict(self.last_terms)))
        return loss

    monkeypatch.setattr(dynamicvit.DynamicViTLoss, "forward", spy)
    cfg = tiny_config(
        data_root, method="dynamicvit", epochs=1, init_checkpoint=str(teacher_dir / "final.pth"),
        teacher_checkpoint=str(teacher_dir / "final.pth"), backbone_lr_scale=0.01, model_ema=False,
        method_loss_kwargs={"ratio_weight": 2.0},
    )
    result = train(cfg, tmp_path / "student")
    assert len(calls) == 6 and all(has_teacher for has_teacher, _ in calls)
    assert all({"base", "ratio", "cls_kl"} <= set(terms) for _, terms in calls)
    state = torch.load(tmp_path / "student" / "checkpoint_last.pth", map_location="cpu", weights_only=False)
    lrs = {g["group_name"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    assert lrs["backbone_decay"] == pytest.approx(0.01 * lrs["reduction_decay"])
    model, spec = load_trained_model(tmp_path / "student" / "final.pth")
    assert spec["method"] == "dynamicvit" and any(".reduction." in k for k in model.state_dict())
    model(torch.randn(2, 3, 16, 16))
    assert model.tokens_kept == [11, 7] and result["final"]["top1"] >= 0.0


def test_method_loss_kwargs_need_a_method_with_a_loss(data_root, tmp_path):
    with pytest.raises(ValueError, match="method_loss_kwargs"):
        train(tiny_config(data_root, method_loss_kwargs={"ratio_weight": 1.0}), tmp_path)
