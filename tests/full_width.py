"""Fabricated upstream outputs for running a study's aggregation jobs at full
width (tests/test_full_width_aggregation.py, issue 25).

A study's dry run names every job of its DAG with its outputs and wildcards
(:func:`planned_job_outputs`). For the jobs that feed the aggregation rules
(evaluate, mae_evaluate, ots_sweep, detection_eval, detection_benchmark,
sd_fid) this module writes their outputs in their real formats, through the
library's own writers where they exist (the evaluation's ``_write_patterns``
and ``_write_features``, ``ots.sweep.write_table``, ``io.write_json``), so
that the formats cannot drift:

- ``metrics.json`` with the keys ``tokenreduction.evaluate.evaluate`` writes;
- ``patterns.npz``: assignments of a stand-in of the run's real patch grid
  (196 patches at 224 px, 784 at 448 px), one per reduction stage at the
  config's ``reduction_loc``, token counts from the config's budget (geometric
  or current), composed by ``tokenreduction.patterns.compose_assignments``;
  pruned patches for the methods of kind ``prune``, every patch in a cluster
  for ``merge`` and ``soft``;
- ``cls_features.npz``: CLS features of the stand-in width of the backbone
  (``tokenreduction.rehearsal.standin.standin_width``: 16-32) at the blocks the
  evaluation records, for ``NUM_IMAGES`` images (the rehearsal's validation
  size: more images than two stand-in widths, as the CCA needs);
- the off-the-shelf sweep tables, the detection metrics and benchmark files,
  and the FID files of the diffusion stage.

Only the number of images and the feature width are small; the number of runs
and the patch grids are the study's.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from tokenreduction.evaluate.evaluate import _write_features, _write_patterns
from tokenreduction.io import write_json
from tokenreduction.patterns import compose_assignments
from tokenreduction.reduction import get_method
from tokenreduction.rehearsal.standin import SPLIT_SIZES, standin_width

#: the rules whose jobs aggregate over runs: what the full-width run executes
AGGREGATION_RULES = (
    "summarise", "analysis_compare", "analysis_collate", "analysis_correlate", "analysis_rho_heatmap",
    "token_statistics", "compare_heatmaps", "report_section", "report_config", "report_tables",
    "ots_plot", "mae_summary", "detection_summary", "sd_fid_table",
)
#: rules rendered in the Snakemake process (a template, no command)
TEMPLATE_RULES = ("manifest",)
#: pattern images per run (the rehearsal's validation split)
NUM_IMAGES = min(SPLIT_SIZES["val"], SPLIT_SIZES["test"])
#: distinct pattern files per (method, stage counts, grid); its other runs copy one
VARIANTS = 3
PATCH = 16
MULTILABEL_KINDS = ("coco", "nuswide")


# ---------------------------------------------------------------- the dry run


def planned_job_outputs(dry_run: str) -> list[dict]:
    """Every job of a dry run's listing: {rule, outputs: [paths], wildcards: {name: value}}."""
    jobs: list[dict] = []
    current = None
    for line in dry_run.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line.strip())
        if m:
            current = {"rule": m.group(1), "outputs": [], "wildcards": {}}
            jobs.append(current)
            continue
        if current is None:
            continue
        stripped = line.strip()
        if stripped.startswith("output:"):
            current["outputs"] = [p.strip() for p in stripped[len("output:"):].split(",") if p.strip()]
        elif stripped.startswith("wildcards:"):
            for item in stripped[len("wildcards:"):].split(","):
                key, _, value = item.strip().partition("=")
                current["wildcards"][key] = value
        elif line and not line[0].isspace():
            current = None
    return jobs


# ---------------------------------------------------------------- helpers


def _rng(*keys: Any) -> np.random.Generator:
    digest = hashlib.sha256("/".join(str(k) for k in keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _grid(img_size: int) -> tuple[int, int]:
    return (img_size // PATCH, img_size // PATCH)


def stage_counts(num_patches: int, keep_rate: float, stages: int, budget: str) -> list[int]:
    """Tokens left after each stage: geometric (P x rate^(s+1)) or current
    (rate x the tokens present)."""
    counts, current = [], num_patches
    for s in range(stages):
        current = int(num_patches * keep_rate ** (s + 1)) if budget == "geometric" else int(current * keep_rate)
        counts.append(max(1, current))
    return counts


def stage_assignments(rng: np.random.Generator, kind: str, counts: list[int], num_images: int,
                      num_patches: int) -> list[torch.Tensor]:
    """(B, N_s) assignment of each stage: a kept token's new index or -1 when
    pruned (kind prune); every token to one of the stage's clusters, each
    cluster used (merge, soft)."""
    out, n_in = [], num_patches
    for n_out in counts:
        if kind == "prune":
            order = np.argsort(rng.random((num_images, n_in)), axis=1)
            a = np.full((num_images, n_in), -1, dtype=np.int64)
            rows = np.arange(num_images)[:, None]
            a[rows, order[:, :n_out]] = np.arange(n_out)[None, :]
        else:
            a = np.concatenate(
                [np.tile(np.arange(n_out), (num_images, 1)), rng.integers(0, n_out, (num_images, n_in - n_out))], axis=1
            )
            a = np.take_along_axis(a, np.argsort(rng.random((num_images, n_in)), axis=1), axis=1)
        out.append(torch.from_numpy(a))
        n_in = n_out
    return out


def _method_kind(config: dict, name: str) -> str:
    spec = (config.get("methods") or {}).get(name) or {}
    method = spec.get("method", "none")
    return "none" if method in (None, "none") else get_method(method).kind


# ---------------------------------------------------------------- writers


def write_evaluation(config: dict, job: dict, workdir: Path, written: dict) -> None:
    """metrics.json, patterns.npz and cls_features.npz of one evaluate or
    mae_evaluate job."""
    w = job["wildcards"]
    outputs = {Path(p).name: workdir / p for p in job["outputs"]}
    dataset = config["datasets"][w["dataset"]]
    backbone = config["backbones"][w["backbone"]]
    method_name = w["method"]
    kind = _method_kind(config, method_name)
    img_size = int((backbone.get("model_kwargs") or {}).get("img_size", dataset["img_size"]))
    grid = _grid(img_size)
    num_patches = grid[0] * grid[1]
    width, _ = standin_width(backbone["model"], backbone.get("model_kwargs") or {})
    depth = 12
    rng = _rng(*job["outputs"][:1])
    if "r" in w:  # MAE: r tokens merged in every block
        r = int(w["r"])
        blocks = list(range(depth)) if r and kind != "none" else []
        counts, n = [], num_patches
        for _ in blocks:
            n = max(1, n - r)
            counts.append(n)
        keep_rate = None
    else:
        keep_rate = float(w["keep_rate"])
        blocks = [] if kind == "none" or keep_rate >= 1.0 else list(config.get("reduction_loc") or [])
        counts = stage_counts(num_patches, keep_rate, len(blocks), config.get("budget", "geometric"))
    feat_blocks = sorted(set(blocks) | {depth - 1})
    image_ids = np.array([f"val_{i:05d}" for i in range(NUM_IMAGES)], dtype=str)
    method = (config.get("methods") or {}).get(method_name, {}).get("method") or "none"
    model = types.SimpleNamespace(patch_embed=types.SimpleNamespace(num_patches=num_patches, grid_size=grid),
                                  embed_dim=width)
    features = {b: [torch.from_numpy(rng.standard_normal((NUM_IMAGES, width)).astype(np.float32))]
                for b in feat_blocks}
    _write_features(outputs["cls_features.npz"], types.SimpleNamespace(feat_blocks=feat_blocks, features=features),
                    model, image_ids)
    # the runs of one method, stage counts and grid share VARIANTS pattern files
    # (composing and compressing 840 of them takes minutes)
    variants = written.setdefault((method_name, tuple(blocks), tuple(counts), grid), [])
    if len(variants) >= VARIANTS:
        shutil.copyfile(variants[int(rng.integers(len(variants)))], outputs["patterns.npz"])
    else:
        composed = compose_assignments(stage_assignments(rng, kind, counts, NUM_IMAGES, num_patches))
        recorder = types.SimpleNamespace(
            composed=[torch.stack(composed).to(torch.int32)] if composed else [],
            kinds=[kind] * len(blocks), stage_blocks=blocks, kept=[],
        )
        _write_patterns(outputs["patterns.npz"], recorder, model, method, image_ids)
        variants.append(outputs["patterns.npz"])
    multilabel = dataset["kind"] in MULTILABEL_KINDS
    value = float(np.clip(80.0 * (keep_rate or 0.9) ** 0.2 + rng.normal(0, 1.0), 0, 100))
    score = {"metric": "mAP", "value": value, "mAP": value} if multilabel else {
        "metric": "top1", "value": value, "top1": value, "top5": min(100.0, value + 10.0)}
    write_json(outputs["metrics.json"], {
        "checkpoint": str(outputs["metrics.json"].parent / "final.pth"), "dataset": dataset["kind"], "split": "val",
        "num_images": NUM_IMAGES, "multilabel": multilabel, **score,
        "params_m": 5.7, "gflops": 1.3 * (sum(counts) / max(1, len(counts)) / num_patches if counts else 1.0),
        "throughput": 2500.0, "throughput_batch": 256, "device": "cuda", "amp": True, "model": backbone["model"],
        "img_size": img_size, "method": method, "keep_rate": keep_rate, "reduction_loc": blocks,
        "budget": config.get("budget") if blocks else None, "clca": None, "tuning": "full",
        "stage_blocks": blocks, "tokens_kept": counts, "tokens_kept_mean": [float(c) for c in counts],
        "tokens_expected": counts, "num_patches": num_patches,
    })


def write_ots_sweep(config: dict, job: dict, workdir: Path, written: dict) -> None:
    """One sweep table (tokenreduction.ots.sweep.COLUMNS): a row per r of the backbone."""
    from tokenreduction.ots.sweep import COLUMNS, write_table

    w = job["wildcards"]
    spec = config["ots"]["backbones"][w["otsbackbone"]]
    rng = _rng(*job["outputs"])
    rows = []
    for r in spec["r"]:
        rows.append({
            "backbone": w["otsbackbone"], "family": spec["preset"].split("_")[0], "model": spec["preset"],
            "img_size": 224, "method": w["method"], "reducer": w["method"].split("-")[0], "schedule": w["schedule"],
            "r": int(r), "r_per_block": " ".join([str(r)] * 12), "top1": 80.0 - 0.3 * r + rng.normal(0, 0.1),
            "top5": 95.0 - 0.1 * r, "gflops": 4.6 * (1 - r / 40), "throughput": 1000.0 + 30 * r,
            "throughput_batch": 256, "params_m": 22.0, "tokens_left": " ".join(str(197 - r * b) for b in range(12)),
            "prop_attn": True, "num_images": 50000, "device": "cuda",
        })
    write_table(pd.DataFrame(rows, columns=COLUMNS), workdir / job["outputs"][0])


def write_detection_metrics(config: dict, job: dict, workdir: Path, written: dict) -> None:
    ratio = float(job["wildcards"]["det_ratio"])
    write_json(workdir / job["outputs"][0], {"coco/bbox_mAP": 0.40 * (0.8 + 0.2 * ratio),
                                             "coco/segm_mAP": 0.36 * (0.8 + 0.2 * ratio),
                                             "tokens_kept": [int(196 * ratio ** s) for s in (1, 2, 3)]})


def write_detection_benchmark(config: dict, job: dict, workdir: Path, written: dict) -> None:
    ratio = float(job["wildcards"]["det_ratio"]) or 1.0
    write_json(workdir / job["outputs"][0], {"images_per_s": 10.0 / ratio, "backbone_images_per_s": 30.0 / ratio})


def write_fid(config: dict, job: dict, workdir: Path, written: dict) -> None:
    name = job["wildcards"]["sd_experiment"]
    rng = _rng(name)
    write_json(workdir / job["outputs"][0], {
        "fid": float(30 + rng.random()), "feature_extractor": "inception", "mode": "clean", "experiment": name,
        "time_mean": 2.0, "time_std": 0.1, "merge": name, "steps": 50, "device": "cuda",
    })


#: producer rule -> writer of its outputs
WRITERS: dict[str, Callable[[dict, dict, Path, dict], None]] = {
    "evaluate": write_evaluation,
    "mae_evaluate": write_evaluation,
    "ots_sweep": write_ots_sweep,
    "detection_eval": write_detection_metrics,
    "detection_benchmark": write_detection_benchmark,
    "sd_fid": write_fid,
}


def fabricate_upstream(config: dict, jobs: list[dict], workdir: Path) -> dict[str, int]:
    """Write the outputs of every planned job of a producer rule (WRITERS);
    returns the jobs fabricated per rule."""
    done: dict[str, int] = {}
    written: dict = {}
    for job in jobs:
        writer = WRITERS.get(job["rule"])
        if writer is None:
            continue
        for path in job["outputs"]:
            (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        writer(config, job, workdir, written)
        done[job["rule"]] = done.get(job["rule"], 0) + 1
    return done
