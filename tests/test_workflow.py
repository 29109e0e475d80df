"""The Snakemake DAG: dry runs, config validation, a real reduced demo run,
no-op reruns, partial reruns, lint and formatting."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pandas as pd
import pytest

from workflow_utils import (
    REPO,
    load_config,
    planned_jobs,
    planned_wildcards,
    snakemake,
    with_existing_roots,
    write_config,
)


def test_demo_dry_run_builds_every_stage(tmp_path):
    out = snakemake(["-n"], tmp_path).stdout
    jobs = planned_jobs(out)
    demo = load_config("config.yaml")
    assert jobs["prepare_dataset"] == len(demo["datasets"])
    assert jobs["pretrain"] == len(demo["backbones"])
    assert jobs["finetune"] == jobs["evaluate"] >= 40
    assert jobs["summarise"] == 1


#: fine-tuning jobs each study config plans
STUDY_FINETUNE_JOBS = {
    # 4 datasets x 3 capacities x (11 methods x 4 keep rates + baseline)
    "which-tokens.yaml": 4 * 3 * (11 * 4 + 1),
    # 5 datasets x 2 backbones x (8 methods x with/without CLCA x 5 keep rates + baseline)
    "clca.yaml": 5 * 2 * (8 * 2 * 5 + 1),
}


@pytest.mark.parametrize("name", ["which-tokens.yaml", "clca.yaml"])
def test_study_configs_dry_run(tmp_path, name):
    config = with_existing_roots(load_config(name), tmp_path)
    path = write_config(tmp_path / name, config)
    out = snakemake(["-n", "--configfile", str(path)], tmp_path).stdout
    jobs = planned_jobs(out)
    assert jobs["finetune"] == STUDY_FINETUNE_JOBS[name]
    assert "pretrain" not in jobs  # real runs start from timm's weights


def _invalid(tmp_path, edit) -> str:
    config = load_config("config.yaml")
    edit(config)
    path = write_config(tmp_path / "bad.yaml", config)
    proc = snakemake(["-n", "--configfile", str(path)], tmp_path, check=False)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_unknown_method_is_rejected_with_its_key(tmp_path):
    msg = _invalid(tmp_path, lambda c: c["methods"]["topk"].update(method="topkk"))
    assert "methods.topk.method" in msg and "topkk" in msg and "tome" in msg


def test_keep_rate_above_one_is_rejected(tmp_path):
    msg = _invalid(tmp_path, lambda c: c["experiments"][0].update(keep_rates=[1.5]))
    assert "keep_rates" in msg and "1.5" in msg


def test_reduction_location_past_depth_is_rejected(tmp_path):
    msg = _invalid(tmp_path, lambda c: c.update(reduction_loc=[3, 6, 12]))
    assert "reduction_loc" in msg and "12" in msg and "0..11" in msg


def test_missing_dataset_root_is_rejected(tmp_path):
    def edit(c):
        c["datasets"]["real"] = {"kind": "nabirds", "root": str(tmp_path / "nowhere"), "img_size": 32}

    msg = _invalid(tmp_path, edit)
    assert "datasets.real.root" in msg and "nowhere" in msg


def test_lint_is_clean(tmp_path):
    proc = snakemake(["--lint"], tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakefmt_is_clean():
    files = [str(REPO / "Snakefile")] + [str(p) for p in sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def tiny_demo_config(tmp_path) -> dict:
    """The demo cut to one dataset, one tiny backbone, three methods, a few steps."""
    config = load_config("config.yaml")
    config["results"] = str(tmp_path / "results")
    config["datasets"] = {"digits": {**config["datasets"]["digits"], "root": str(tmp_path / "data" / "digits")}}
    config["backbones"] = {
        "tiny": {
            "model": "vit_tiny_patch16_224",
            "model_kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 12, "num_heads": 2},
            "init": "pretrain",
            "capacity": "tiny",
        }
    }
    config["pretrain"]["recipe"].update(epochs=1, max_steps=4)
    config["finetune"].update(epochs=1, max_steps=3, batch_size=32)
    config["evaluate"].update(num_pattern_images=16, throughput_batch=4, batch_size=64)
    config["experiments"] = [
        {"datasets": ["digits"], "backbones": ["tiny"], "methods": ["topk", "evit"], "keep_rates": [0.5]}
    ]
    return config


@pytest.mark.slow
def test_reduced_demo_runs_reruns_nothing_and_reruns_only_what_changed(tmp_path):
    config = tiny_demo_config(tmp_path)
    for stage in ("ots", "mae", "detection", "diffusion", "benchmark"):  # tested on their own
        config.pop(stage, None)
    path = write_config(tmp_path / "demo.yaml", config)
    snakemake(["--cores", "2", "--configfile", str(path)], tmp_path, timeout=1200)

    results = tmp_path / "results"
    table = pd.read_csv(results / "summary" / "metrics.csv")
    assert sorted(table.method) == ["deit", "evit", "topk"]
    assert {"metric", "gflops", "throughput", "tokens_kept", "params_m"} <= set(table.columns)
    assert table.metric.between(0, 100).all()
    reduced = table.set_index("method")
    assert reduced.loc["topk", "gflops"] < reduced.loc["deit", "gflops"]
    assert reduced.loc["topk", "tokens_kept"] == "32 16 8"  # geometric 0.5 of 64 patches
    for plot in ("accuracy_vs_keep_rate.png", "accuracy_vs_gflops.png"):
        assert (results / "summary" / plot).read_bytes()[:4] == b"\x89PNG"
    run = results / "eval" / "digits" / "tiny" / "topk" / "kr0.5" / "seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tokens_kept"] == [32, 16, 8]
    for name in ("patterns.npz", "cls_features.npz"):
        assert (run / name).stat().st_size > 0
    assert (results / "finetune" / "digits" / "tiny" / "topk" / "kr0.5" / "seed0" / "log.csv").exists()

    # analysis: topk and evit at the same keep rate are the one "models" pair (both orders)
    analysis = results / "analysis" / "digits"
    collated = pd.read_csv(analysis / "collated_models.csv")
    assert sorted(zip(collated.method_a, collated.method_b)) == [("evit", "topk"), ("topk", "evit")]
    assert {"IoU_mean@3", "IoU_mean@9", "LinCKA@11", "metric_diff"} <= set(collated.columns)
    assert collated["IoU_mean@3"].between(0, 1).all()
    row = collated.iloc[0]
    assert row.metric_diff == pytest.approx(row.metric_a - row.metric_b)
    correlations = pd.read_csv(analysis / "correlations_models.csv")
    assert list(correlations.columns[:3]) == ["measure", "n", "spearman_rho"]
    assert pd.read_csv(analysis / "collated_rates.csv").empty  # one keep rate: no rate pairs
    stats = json.loads((analysis / "token_stats.json").read_text())
    assert stats["digits/tiny/topk/kr0.5/seed0"]["stage_blocks"] == [3, 6, 9]
    assert (results / "analysis" / "heatmap_comparison.csv").exists()

    # a second run has nothing to do
    out = snakemake(["-n", "--configfile", str(path)], tmp_path).stdout
    assert "Nothing to be done" in out, out

    # changing one method's option reruns only that method's jobs (and the summary)
    changed = copy.deepcopy(config)
    changed["methods"]["evit"]["fuse_token"] = False
    path2 = write_config(tmp_path / "demo2.yaml", changed)
    out = snakemake(["-n", "--configfile", str(path2)], tmp_path).stdout
    jobs = planned_jobs(out)
    assert jobs.get("finetune") == 1 and jobs.get("evaluate") == 1, out
    assert all("method=evit" in w for w in planned_wildcards(out, "finetune"))
    assert "pretrain" not in jobs and "prepare_dataset" not in jobs
    assert "Params have changed" in out  # the reason Snakemake gives
