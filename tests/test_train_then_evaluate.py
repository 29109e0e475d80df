"""scripts/train.py --then-evaluate (the fine-tuning job of the demo, with
evaluate.after_training) writes what scripts/evaluate.py writes for the same
final.pth: the same metrics, patterns and CLS features."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import runpy

import numpy as np
import pytest
import torch

from test_train import TINY, make_imagefolder

ROOT = Path(__file__).resolve().parents[1]
EVAL_OPTIONS = dict(dataset="imagefolder", img_size=16, batch_size=4, num_pattern_images=6, throughput_batch=0)


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    """`script` in a fresh process with this process's torch thread count
    (test modules pin it to 1 at import; a fresh process would take one
    thread per core), so its reductions add in the same order as here."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def assert_same_arrays(mine: Path, theirs: Path) -> None:
    """Same names; integer arrays (patterns) equal, float arrays (CLS
    features) equal to float32 rounding: two processes may still sum in a
    different order (thread count, the kernel chosen), which moves float32
    features by ~1e-9, so bit equality across processes is not a property of
    the code. rtol 1e-5 is ~100x float32 epsilon; a wrong checkpoint, image
    order or layer changes them at 1e-2 and more."""
    with np.load(mine) as x, np.load(theirs) as y:
        assert sorted(x.files) == sorted(y.files) and x.files
        for name in x.files:
            assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape, name
            if np.issubdtype(x[name].dtype, np.floating):
                np.testing.assert_allclose(x[name], y[name], rtol=1e-5, atol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def _train_main(monkeypatch, *args: str, **replace) -> dict:
    """Run scripts/train.py's main() in this process (one interpreter start
    less than a subprocess); `replace` swaps names in the script's globals."""
    script = runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="train_script")
    script["main"].__globals__.update(replace)  # run_path returns a copy of them
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    script["main"]()
    return script


def _spec(data_root: Path) -> str:
    return json.dumps(dict(model="vit_tiny_patch16_224", model_kwargs=dict(TINY), img_size=16, method="topk",
                           keep_rate=0.5, reduction_loc=[1, 2], dataset="imagefolder", data_root=str(data_root),
                           epochs=1, batch_size=4, num_workers=0, lr_batch_normalizer=None))


def test_train_then_evaluate_writes_what_the_evaluate_script_writes(tmp_path, monkeypatch, capsys):
    data = make_imagefolder(tmp_path / "data")
    run, merged, alone = tmp_path / "run", tmp_path / "merged", tmp_path / "alone"
    outs = {k: str(merged / f"{k}.{ext}") for k, ext in (("metrics", "json"), ("patterns", "npz"), ("features", "npz"))}
    options = dict(EVAL_OPTIONS, data_root=str(data), out_metrics=outs["metrics"], out_patterns=outs["patterns"],
                   out_features=outs["features"])
    _train_main(monkeypatch, "--spec", _spec(data), "--final", str(run / "final.pth"),
                "--then-evaluate", json.dumps(options))
    assert "top1" in capsys.readouterr().out and (run / "final.pth").exists()

    # the same checkpoint evaluated by the evaluate rule's script, in a fresh process

    proc = _run("evaluate.py", "--checkpoint", str(run / "final.pth"), "--kind", "imagefolder", "--root", str(data),
                "--img-size", "16", "--batch-size", "4", "--num-pattern-images", "6", "--throughput-batch", "0",
                "--metrics", str(alone / "metrics.json"), "--patterns", str(alone / "patterns.npz"),
                "--features", str(alone / "cls_features.npz"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    a = json.loads(Path(outs["metrics"]).read_text())
    b = json.loads((alone / "metrics.json").read_text())
    for key in ("metric", "value", "num_images", "split", "gflops", "tokens_kept", "params_m"):
        if key in b:
            assert a[key] == b[key], key
    assert set(a) == set(b)
    assert_same_arrays(Path(outs["patterns"]), alone / "patterns.npz")
    assert_same_arrays(Path(outs["features"]), alone / "cls_features.npz")


def test_a_bad_then_evaluate_argument_fails_before_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --then-evaluate")

    final = tmp_path / "run" / "final.pth"
    bad = json.dumps({"dataset": "imagefolder", "data_root": str(tmp_path), "out_metrcs": "m.json"})
    with pytest.raises(SystemExit, match=r"unknown evaluate\(\) argument\(s\) out_metrcs"):
        _train_main(monkeypatch, "--spec", "{}", "--final", str(final), "--then-evaluate", bad, train=no_training)
    with pytest.raises(SystemExit, match="'data_root' is required"):
        _train_main(monkeypatch, "--spec", "{}", "--final", str(final), "--then-evaluate", '{"dataset": "x"}',
                    train=no_training)
    with pytest.raises(SystemExit, match="not a JSON object"):
        _train_main(monkeypatch, "--spec", "{}", "--final", str(final), "--then-evaluate", "{oops", train=no_training)
