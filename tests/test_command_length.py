"""No job's command grows with the number of runs (issue 25): every config in
config/ is dry-run with -p and each job's shell command stays under 16 kB;
the lists that grow (summary, pattern grids, detection table) go through
manifest files (workflow/rules/manifest.smk, tokenreduction.manifest)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workflow_utils import (
    REPO,
    load_config,
    planned_commands,
    planned_jobs,
    snakemake,
    with_existing_inputs,
    write_config,
)

#: well below Linux's 128 KiB limit on one argument (MAX_ARG_STRLEN), which
#: `bash -c "<command>"` hits first
LIMIT = 16 * 1024

CONFIGS = sorted(p.name for p in (REPO / "config").glob("*.yaml"))


def test_every_config_is_covered():
    assert {"config.yaml", "which-tokens.yaml", "clca.yaml", "atc.yaml"} <= set(CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_every_job_command_is_short(tmp_path, name):
    config = with_existing_inputs(load_config(name), tmp_path)
    path = write_config(tmp_path / name, config)
    out = snakemake(["-n", "-p", "--configfile", str(path)], tmp_path).stdout
    jobs = planned_jobs(out)
    # every job that runs a command printed it (`all` and the template jobs have none)
    commands = [(rule, cmd) for rule, cmd in planned_commands(out) if cmd != "None"]
    assert len(commands) == sum(n for rule, n in jobs.items() if rule not in ("all", "manifest"))
    too_long = [(rule, len(cmd.encode())) for rule, cmd in commands if len(cmd.encode()) >= LIMIT]
    assert not too_long, too_long
    rules = {rule for rule, _ in commands}
    assert "summarise" in rules
    summarise = next(cmd for rule, cmd in commands if rule == "summarise")
    assert "--manifest" in summarise and "metrics.json" not in summarise
    assert jobs["manifest"] >= 1


def _metrics(path: Path, top1: float) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metric": "acc1", "value": top1, "top5": 99.0, "params_m": 5.0, "gflops": 1.0,
                                "throughput": 10.0}))
    return str(path)


def test_summarise_reads_its_runs_from_a_manifest(tmp_path):
    runs = [
        {"dataset": "d", "backbone": "tiny", "capacity": "tiny", "method": m, "keep_rate": kr, "seed": 0}
        for m, kr in (("deit", "1"), ("topk", "0.5"), ("topk", "0.7"))
    ]
    metrics = [_metrics(tmp_path / f"m{i}" / "metrics.json", 90.0 - i) for i in range(len(runs))]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"runs": runs, "metrics": metrics}))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "summarise.py"), "--manifest", str(manifest),
           "--table", str(out / "t.csv"), "--keep-rate-plot", str(out / "k.png"), "--gflops-plot", str(out / "g.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import pandas as pd

    table = pd.read_csv(out / "t.csv")
    assert sorted(table["metric"]) == [88.0, 89.0, 90.0]
    assert list(table["method"]) == ["deit", "topk", "topk"]

    # a manifest whose lists disagree is refused with one message naming the file
    manifest.write_text(json.dumps({"runs": runs, "metrics": metrics[:2]}))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0 and str(manifest) in proc.stderr and "different lengths" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_load_manifest_errors(tmp_path):
    from tokenreduction.manifest import ManifestError, load_manifest

    path = tmp_path / "m.json"
    with pytest.raises(ManifestError, match="cannot be read"):
        load_manifest(path, ("runs",))
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not JSON"):
        load_manifest(path, ("runs",))
    path.write_text(json.dumps({"runs": {"a": 1}}))
    with pytest.raises(ManifestError, match="'runs' must hold a list"):
        load_manifest(path, ("runs",))
    path.write_text(json.dumps({"runs": [1, 2], "metrics": ["a", "b"]}))
    assert load_manifest(path, ("runs", "metrics"))["runs"] == [1, 2]


def test_pattern_grid_reads_its_runs_from_a_manifest(tmp_path):
    """visualize_patterns.py --manifest: the same figure input as the three lists."""
    import torch

    import tokenreduction as tr
    from test_visualize import TINY, _write_run
    from tokenreduction.data import build_dataset, build_transform
    from tokenreduction.data.demo import make_digits_dataset

    root = make_digits_dataset(tmp_path / "digits", img_size=32)
    ds = build_dataset("digits", root, "val", build_transform(False, 32, "digits"))
    images = torch.stack([ds[i][0] for i in range(4)])
    ids = [ds.image_id(i) for i in range(4)]
    for method in ("topk", "tome"):
        torch.manual_seed(0)
        model = tr.create_model("vit_tiny_patch16_224", **TINY, method=method, reduction_loc=(1, 2), keep_rate=0.5)
        _write_run(tmp_path / method, model, images, ids, "val")
    manifest = tmp_path / "patterns_digits.json"
    manifest.write_text(json.dumps({
        "patterns": [str(tmp_path / m / "patterns.npz") for m in ("topk", "tome")],
        "metrics": [str(tmp_path / m / "metrics.json") for m in ("topk", "tome")],
        "labels": ["topk kr0.5", "tome kr0.5"],
    }))
    out = tmp_path / "fig" / "pattern_grid.png"
    cmd = [sys.executable, str(REPO / "scripts" / "visualize_patterns.py"), "--kind", "digits", "--root", str(root),
           "--img-size", "32", "--num-images", "2", "--out", str(out), "--manifest", str(manifest)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 runs x 2 images (val: " in done.stdout and out.stat().st_size > 0
    # giving both the manifest and a list is refused
    done = subprocess.run(cmd + ["--labels", "x"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--manifest replaces" in done.stderr
