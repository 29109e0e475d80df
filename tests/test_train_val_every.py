"""The recipe's validation frequency (``val_every_epochs``): which epochs
validate, what the log holds for the others, that skipping a validation does
not change the trained weights, and that a tuning mode's epoch hook (Head2Toe's
feature selection) still runs after an epoch without validation."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tokenreduction.train import TrainConfig, train
from tokenreduction.train.engine import LOG_COLUMNS, validation_due

from test_train import assert_same_weights, final_weights, make_imagefolder, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("imgs"))


def log_rows(out: Path) -> list[dict]:
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


def test_validation_due_every_nth_and_the_last_epoch():
    cfg = TrainConfig.from_dict({"epochs": 5, "cooldown_epochs": 2, "warmup_epochs": 1, "val_every_epochs": 3})
    assert [e for e in range(cfg.total_epochs) if validation_due(cfg, e)] == [2, 5, 6]
    every = TrainConfig.from_dict({"epochs": 3, "warmup_epochs": 1})
    assert every.val_every_epochs == 1  # the default: every epoch, as before the knob
    assert [e for e in range(3) if validation_due(every, e)] == [0, 1, 2]
    only_last = TrainConfig.from_dict({"epochs": 3, "warmup_epochs": 1, "val_every_epochs": 200})
    assert [e for e in range(3) if validation_due(only_last, e)] == [2]


def test_val_every_epochs_must_be_positive():
    with pytest.raises(ValueError, match="val_every_epochs must be >= 1, got 0"):
        TrainConfig.from_dict({"val_every_epochs": 0})


def test_skipped_validations_leave_the_weights_and_the_last_validation_unchanged(data_root, tmp_path):
    common = dict(epochs=3, warmup_epochs=1, model_ema=False, select_weights="last")
    train(tiny_config(data_root, **common), tmp_path / "every")
    result = train(tiny_config(data_root, **common, val_every_epochs=2), tmp_path / "sparse")
    every, sparse = log_rows(tmp_path / "every"), log_rows(tmp_path / "sparse")
    assert tuple(sparse[0].keys()) == LOG_COLUMNS
    assert [int(r["epoch"]) for r in sparse] == [0, 1, 2] and [int(r["step"]) for r in sparse] == [6, 12, 18]
    # epoch 0 is not validated (its validation columns are empty); 1 (every 2nd) and 2 (the last) are
    assert [r["val_metric"] != "" for r in sparse] == [False, True, True]
    assert sparse[0]["val_top5"] == "" and sparse[0]["best_metric"] == ""
    for a, b in zip(every, sparse):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-6)
        if b["val_metric"]:
            assert float(a["val_metric"]) == pytest.approx(float(b["val_metric"]))
    assert_same_weights(final_weights(tmp_path / "every"), final_weights(tmp_path / "sparse"))
    metrics = json.loads((tmp_path / "sparse" / "train_metrics.json").read_text())
    assert metrics["weights_epoch"] == 2 and result["final"]["metric"] == pytest.approx(float(sparse[-1]["val_metric"]))
    assert metrics["best_epoch"] in (1, 2)


def test_h2t_selects_its_features_after_an_epoch_without_validation(data_root, tmp_path):
    # Head2Toe keeps half its features at the end of epoch 0 (select_epoch 1); only epoch 2 validates
    h2t = dict(tuning="h2t", tuning_kwargs={"keep_fraction": 0.5, "select_epoch": 1, "group_lasso": 1e-3},
               method=None, keep_rate=None, reduction_loc=None, epochs=3, warmup_epochs=1, model_ema=False,
               select_weights="last")
    train(tiny_config(data_root, **h2t), tmp_path / "every")
    train(tiny_config(data_root, **h2t, val_every_epochs=3), tmp_path / "sparse")
    assert [r["val_metric"] != "" for r in log_rows(tmp_path / "sparse")] == [False, False, True]
    selected = final_weights(tmp_path / "sparse")["selected"]
    assert selected.dtype == torch.bool and 0 < int(selected.sum()) < selected.numel()
    assert_same_weights(final_weights(tmp_path / "every"), final_weights(tmp_path / "sparse"))
