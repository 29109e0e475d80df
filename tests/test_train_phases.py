"""The trainer's phases and contracts: weight selection (best of plain/EMA on
validation, last, last EMA), a method's own training terms and the tuning
modes looked up through registries, the reference's augmentation per dataset
kind, SIGKILL at six moments (three of them inside a file write) in a forked
process, then resume with the same final weights, progress lines, W&B identity (offline)."""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenreduction.evaluate import evaluate
from tokenreduction.train import engine, load_trained_model, train

pytestmark = pytest.mark.usefixtures("one_thread")

from test_train import TINY, make_imagefolder  # the same tiny model and fabricated folders


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("imgs"))


def tiny_config(data_root: Path, **overrides) -> dict:
    cfg = dict(
        model="vit_tiny_patch16_224", model_kwargs=dict(TINY), img_size=16, method="topk", keep_rate=0.7,
        reduction_loc=[1, 2], dataset="imagefolder", data_root=str(data_root), epochs=2, warmup_epochs=1,
        batch_size=4, lr=1e-3, lr_batch_normalizer=None, num_workers=0, model_ema=True, model_ema_decay=0.9,
    )
    cfg.update(overrides)
    return cfg


def final_state(out: Path) -> dict:
    return torch.load(out / "final.pth", map_location="cpu", weights_only=True)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def read_log(out: Path) -> list[dict]:
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- weight selection
class ScriptedValidation:
    """Stands in for engine.validate: returns scripted metrics in call order
    (plain then EMA per epoch) and keeps a copy of each model's weights."""

    def __init__(self, metrics: list[float]) -> None:
        self.metrics = list(metrics)
        self.states: list[dict] = []

    def __call__(self, model, loader, device, multilabel, amp, rt=None):
        self.states.append(copy.deepcopy(model.state_dict()))
        value = self.metrics[len(self.states) - 1]
        return {"metric": value, "top1": value, "top5": 100.0}


# per epoch (plain, EMA): EMA best at 0, plain best at 1, a tie with the best at 2
SCRIPT = [50.0, 60.0, 70.0, 65.0, 70.0, 69.0]


@pytest.mark.parametrize(
    "rule, expect_call, expect_metric",
    [("best", 2, 70.0), ("last", 4, 70.0), ("last_ema", 5, 69.0)],  # call index: epoch * 2 + (EMA)
)
def test_selection_rules_pick_the_weights_they_name(data_root, tmp_path, monkeypatch, rule, expect_call, expect_metric):
    fake = ScriptedValidation(SCRIPT)
    monkeypatch.setattr(engine, "validate", fake)
    result = train(tiny_config(data_root, epochs=3, batch_size=8, select_weights=rule), tmp_path)
    saved = final_state(tmp_path)
    assert_same(saved["model"], fake.states[expect_call])
    which = "ema" if expect_call % 2 else "model"
    assert saved["weights"] == result["weights"] == which
    assert result["final"]["metric"] == expect_metric and result["weights_epoch"] == expect_call // 2
    assert result["best_val_metric"] == 70.0 and result["best_epoch"] == 1 and result["best_weights"] == "model"
    rows = read_log(tmp_path)
    assert [float(r["val_metric"]) for r in rows] == SCRIPT[0::2]
    assert [float(r["val_ema_metric"]) for r in rows] == SCRIPT[1::2]
    assert [(float(r["best_metric"]), int(r["best_epoch"]), r["best_weights"]) for r in rows] == [
        (60.0, 0, "ema"), (70.0, 1, "model"), (70.0, 1, "model")]
    # only the best weights' file is kept, and only under the rule that uses it
    best_files = sorted(p.name for p in tmp_path.glob("checkpoint_best_e*.pth"))
    assert best_files == (["checkpoint_best_e001.pth"] if rule == "best" else [])


def test_plain_wins_a_tie_with_ema(data_root, tmp_path, monkeypatch):
    fake = ScriptedValidation([50.0, 50.0, 40.0, 45.0])
    monkeypatch.setattr(engine, "validate", fake)
    result = train(tiny_config(data_root, epochs=2, batch_size=8), tmp_path)
    assert result["weights"] == "model" and result["weights_epoch"] == 0
    assert_same(final_state(tmp_path)["model"], fake.states[0])


def test_final_weights_are_the_better_of_plain_and_ema_on_validation(data_root, tmp_path, capsys):
    """A real run: EMA at decay 0.5 and plain differ; the evaluator, run on
    final.pth, reproduces the best validation number of log.csv."""
    result = train(tiny_config(data_root, epochs=3, model_ema_decay=0.5, lr=3e-3, mixup=0.0, cutmix=0.0), tmp_path)
    rows = read_log(tmp_path)
    candidates = [(float(r["val_metric"]), int(r["epoch"]), "model") for r in rows]
    candidates += [(float(r["val_ema_metric"]), int(r["epoch"]), "ema") for r in rows]
    best = max(c[0] for c in candidates)
    assert result["final"]["metric"] == pytest.approx(best)
    assert float(rows[-1]["best_metric"]) == pytest.approx(best)
    m = evaluate(tmp_path / "final.pth", "imagefolder", data_root, split="val", device="cpu", batch_size=4,
                 throughput_batch=0, num_pattern_images=0)
    assert m["top1"] == pytest.approx(best) and m["throughput"] is None
    # the evaluator's progress lines (12 images, batch 4: 3 steps)
    assert "evaluate step 3/3 (100%), images 12," in capsys.readouterr().out
    assert result["weights"] == rows[-1]["best_weights"]


def test_select_weights_is_checked():
    from tokenreduction.train import TrainConfig

    with pytest.raises(ValueError, match="select_weights"):
        TrainConfig(select_weights="best_ema")
    with pytest.raises(ValueError, match="needs model_ema"):
        TrainConfig(select_weights="last_ema", model_ema=False)


# ---------------------------------------------------------------- registries
def test_a_method_brings_its_own_training_terms(data_root, tmp_path, monkeypatch):
    """The trainer asks the reducer class for its loss: patching Top-K's hook
    (as a new learned method would define it) changes training, no trainer edit."""
    from tokenreduction.reduction.base import MethodLoss
    from tokenreduction.reduction.topk import TopK

    calls = []

    class CountingLoss(MethodLoss):
        def __init__(self, task_loss, weight):
            super().__init__()
            self.task_loss, self.weight = task_loss, weight

        def forward(self, model, images, outputs, targets, teacher=None):
            calls.append((tuple(images.shape), teacher is not None, len(model.reduction_state.stages)))
            return self.task_loss(outputs, targets) + self.weight * outputs.pow(2).mean()

    monkeypatch.setattr(TopK, "training_loss", classmethod(lambda cls, task_loss, **kw: CountingLoss(task_loss, **kw)))
    monkeypatch.setattr(TopK, "uses_teacher", True)
    teacher_dir = tmp_path / "teacher"
    train(tiny_config(data_root, method=None, keep_rate=None, reduction_loc=None, epochs=1, model_ema=False), teacher_dir)
    cfg = tiny_config(data_root, epochs=1, model_ema=False, method_loss_kwargs={"weight": 0.5},
                      teacher_checkpoint=str(teacher_dir / "final.pth"))
    train(cfg, tmp_path / "student")
    assert calls == [((4, 3, 16, 16), True, 2)] * 6  # every step, with the teacher, after both stages


def test_a_registered_tuning_mode_is_used_by_the_trainer(data_root, tmp_path, monkeypatch):
    from tokenreduction.clca import baselines

    def bias_only(model):
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
        return model

    monkeypatch.setitem(baselines.TUNING_MODES, "bias_only", bias_only)
    train(tiny_config(data_root, epochs=1, model_ema=False, tuning="bias_only"), tmp_path)
    import tokenreduction as tr

    torch.manual_seed(0)  # the trainer builds the model right after seeding with cfg.seed (0)
    init = tr.create_model("vit_tiny_patch16_224", method="topk", keep_rate=0.7, reduction_loc=[1, 2], num_classes=3,
                           img_size=16, **TINY)
    saved = final_state(tmp_path)["model"]
    changed = {k for k in saved if not torch.equal(saved[k], init.state_dict()[k])}
    # seeded init: identical weights except the trained biases
    assert changed and all(k.endswith(".bias") for k in changed)
    with pytest.raises(ValueError, match="tuning must be one of full, head, h2t, vqt, bias_only"):
        train(tiny_config(data_root, tuning="lora"), tmp_path / "x")


def test_train_does_not_import_evaluate():
    code = "import sys, tokenreduction.train; print('tokenreduction.evaluate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------- augmentation per kind
def test_reference_augmentation_per_dataset_kind():
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    from tokenreduction.data import build_transform
    from tokenreduction.data.transforms import Cutout, train_augmentation
    from tokenreduction.train import TrainConfig

    cfg = TrainConfig()
    assert (cfg.re_mode, cfg.re_count, cfg.color_jitter, cfg.reprob) == ("pixel", 1, 0.3, 0.25)

    def ops(kind, **kw):
        aug = train_augmentation(kind, auto_augment=kw.pop("aa", None), reprob=0.25, **kw)
        tf = build_transform(True, 32, kind, **aug)
        return aug, [t for t in tf.transforms]

    for kind in ("coco", "nuswide"):
        aug, steps = ops(kind)
        cut = [t for t in steps if isinstance(t, Cutout)]
        assert len(cut) == 1 and cut[0].factor == 0.5
        assert not any(isinstance(t, RandomErasing) for t in steps) and "re_prob" not in aug
    aug, steps = ops("digits_multilabel")  # the demo's mosaics: no Cutout unless asked
    assert not any(isinstance(t, (Cutout, RandomErasing)) for t in steps)
    assert any(isinstance(t, Cutout) for t in ops("digits_multilabel", cutout=0.5)[1])
    assert not any(isinstance(t, Cutout) for t in ops("coco", cutout=0)[1])
    # NABirds (no auto-augment): colour jitter 0.3 and random erasing in pixel mode
    _, steps = ops("nabirds")
    erase = [t for t in steps if isinstance(t, RandomErasing)]
    assert len(erase) == 1 and erase[0].mode == "pixel" and erase[0].probability == 0.25
    jitter = [t for t in steps if isinstance(t, T.ColorJitter)]
    assert len(jitter) == 1 and jitter[0].brightness == (0.7, 1.3)


# ---------------------------------------------------------------- SIGKILL and resume
def _train_and_die(cfg: dict, out: Path, kill: dict) -> None:
    """In a forked child: train, and SIGKILL this process at the kill point:
    after optimizer step ``kill["step"]``, or at the ``nth`` write of a file
    whose name contains ``kill["file"]``: halfway through writing it
    ("mid_write"), with the temporary complete but not renamed
    ("before_rename"), or right after the rename ("after_rename")."""
    count = {"n": 0}
    real_save, real_replace = torch.save, os.replace

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def ours(name) -> bool:
        if kill.get("file") and kill["file"] in Path(str(name)).name:
            count["n"] += 1
            return count["n"] == kill["nth"]
        return False

    def save(obj, f, *args, **kwargs):
        if kill.get("when") == "mid_write" and ours(getattr(f, "name", f)):
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()
        return real_save(obj, f, *args, **kwargs)

    def replace(src, dst):
        if kill.get("when") in ("before_rename", "after_rename") and ours(src):
            if kill["when"] == "after_rename":
                real_replace(src, dst)
            die()
        return real_replace(src, dst)

    torch.save, os.replace = save, replace
    train(cfg, out, on_step=lambda step: die() if kill.get("step") == step else None)


def _killed_run(cfg: dict, out: Path, kill: dict) -> int:
    """Run :func:`_train_and_die` in a forked process; its exit signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 3
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                _train_and_die(cfg, out, kill)
        except BaseException:
            traceback.print_exc()
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


KILL_RUN = dict(epochs=3, batch_size=2, grad_accum_steps=2, drop_path=0.1, mixup=0.8, cutmix=1.0, reprob=0.25)


def _ckpt_step(out: Path) -> int:
    return torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)["step"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_at_six_moments_then_resume_gives_the_same_weights(data_root, tmp_path):
    ref = tmp_path / "reference"
    train(tiny_config(data_root, **KILL_RUN), ref)
    cfg = tiny_config(data_root, **KILL_RUN, checkpoint_every_steps=2)  # a runtime key: same trajectory
    out = tmp_path / "killed"
    # 6 optimizer steps per epoch; checkpoints at steps 2, 4, 6 (epoch end), 8, 10, 12, ...
    kills = [
        ({"step": 3}, 2),  # between checkpoints
        ({"file": "checkpoint_last", "nth": 1, "when": "mid_write"}, 2),  # half of step 4's checkpoint written
        ({"file": "checkpoint_last", "nth": 2, "when": "before_rename"}, 4),  # step 6's complete, not yet renamed
        ({"file": "checkpoint_best", "nth": 1, "when": "mid_write"}, 4),  # the best weights of epoch 0, half written
        ({"file": "checkpoint_last", "nth": 3, "when": "after_rename"}, 10),  # right after step 10's was renamed
        ({"file": "final.pth", "nth": 1, "when": "mid_write"}, 18),  # the final weights, half written
    ]
    for kill, expect_step in kills:
        assert _killed_run(cfg, out, kill) == signal.SIGKILL, kill
        assert _ckpt_step(out) == expect_step, kill  # the last complete checkpoint is intact
        assert not (out / "final.pth").exists()
        if kill.get("when") in ("mid_write", "before_rename"):
            assert list(out.glob(".*.tmp*")), "the half-written file stays a temporary"
    result = train(cfg, out)
    assert not list(out.glob(".*.tmp*"))  # leftovers of killed writes are removed
    assert result["steps"] == 18
    assert_same(final_state(ref)["model"], final_state(out)["model"])
    assert [r["step"] for r in read_log(out)] == ["6", "12", "18"]


def test_a_corrupt_checkpoint_is_named(data_root, tmp_path):
    cfg = tiny_config(data_root, epochs=1)
    with pytest.raises(engine.TrainingInterrupted):
        train(cfg, tmp_path, stop_after_steps=2)
    path = tmp_path / "checkpoint_last.pth"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="checkpoint_last.pth") as err:
        train(cfg, tmp_path)
    assert "corrupt" in str(err.value)


def test_checkpoints_hold_only_tensors_and_plain_values(data_root, tmp_path):
    """checkpoint_last.pth loads with torch's weights-only unpickler and no
    allow-list (numpy's RNG state is stored as a tensor)."""
    with pytest.raises(engine.TrainingInterrupted):
        train(tiny_config(data_root, epochs=1), tmp_path, stop_after_steps=1)
    state = torch.load(tmp_path / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert state["step"] == 1 and state["rng"]["numpy"]["keys"].dtype == torch.int64


# ---------------------------------------------------------------- progress and W&B
def test_progress_lines_without_a_tty(data_root, tmp_path, capsys):
    train(tiny_config(data_root, epochs=2, log_every=4, model_ema=False), tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train step")]
    # every 4 optimizer steps and the last one: steps 4, 8, 12 of 12
    assert [line.split(",")[0] for line in lines] == ["train step 4/12 (33%)", "train step 8/12 (67%)", "train step 12/12 (100%)"]
    assert "images 16" in lines[0] and "img/s" in lines[0] and "ETA" in lines[0] and "loss" in lines[0]


def test_progress_log_interval_and_eta():
    from tokenreduction.tracking import ProgressLog

    now = {"t": 0.0}
    printed = []
    log = ProgressLog("evaluate", 100, every_steps=1000, every_seconds=10.0, clock=lambda: now["t"])
    log.stream = type("S", (), {"write": lambda self, s: printed.append(s), "flush": lambda self: None})()
    now["t"] = 5.0
    assert not log.update(10, 640)  # neither 1000 steps nor 10 s
    now["t"] = 20.0
    assert log.update(25, 1600)  # 10 s passed: 1600 images in 20 s, 75 steps left at 0.8 s each
    assert printed[0].startswith("evaluate step 25/100 (25%), images 1600, 80.0 img/s, ETA 0:01:00")
    assert log.update(100, 6400)  # the last step always prints


def test_wandb_run_named_after_its_path_and_resumed(data_root, tmp_path, monkeypatch):
    """Offline W&B: the run is named after its run path with a stable id; a
    resumed job and the evaluation continue the same run."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    inits = []
    real_init = wandb.init

    def spy(**kwargs):
        inits.append(kwargs)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    run_dir = Path("results/finetune/digits/tiny/topk/kr0.7/seed0")
    cfg = tiny_config(data_root, epochs=1, model_ema=False, wandb_project="tr-test", budget="geometric")
    with pytest.raises(engine.TrainingInterrupted):
        train(cfg, run_dir, stop_after_steps=2)
    train(cfg, run_dir)
    evaluate(run_dir / "final.pth", "imagefolder", data_root, split="val", device="cpu", batch_size=4,
             throughput_batch=0, num_pattern_images=0)
    assert len(inits) == 3
    first = inits[0]
    assert first["name"] == "results/finetune/digits/tiny/topk/kr0.7/seed0"
    assert first["group"] == "digits/tiny" and first["job_type"] == "finetune" and first["resume"] == "allow"
    assert first["tags"] == ["topk", "kr0.7", "budget:geometric"] and first["project"] == "tr-test"
    assert len({i["id"] for i in inits}) == 1 and inits[1]["name"] == first["name"]
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{first['id']}"))
    assert len(offline) >= 2  # the training run, resumed, then the evaluation


def test_cooldown_epochs_train_at_min_lr_after_the_schedule(data_root, tmp_path):
    """epochs=2 + cooldown_epochs=2 (the CLCA reference's recipe shape): four
    epochs are trained; the cosine schedule ends after the first two, so the
    last two run at min_lr exactly, and the epochs before it above it."""
    train(tiny_config(data_root, epochs=2, warmup_epochs=0, cooldown_epochs=2, min_lr=1e-5, lr=1e-3,
                      sched_in_steps=False, model_ema=False), tmp_path)
    rows = read_log(tmp_path)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] > lrs[1] > 1e-5
    assert lrs[2] == pytest.approx(1e-5) and lrs[3] == pytest.approx(1e-5)
