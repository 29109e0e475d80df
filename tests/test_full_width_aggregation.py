"""Every study's aggregation jobs at full width (issue 25).

For each study config, the dry run of its whole DAG names every job; the
outputs of the jobs that feed the aggregation (evaluations, off-the-shelf
sweeps, detection metrics and benchmarks, FID files) are fabricated in their
real formats (tests/full_width.py), then Snakemake runs the aggregation
targets with only the aggregation rules allowed (``--allowed-rules``: the
fabricated files are source files, nothing upstream can be scheduled). Every
aggregation job of the study runs, over every run of its grid. Each job's
interpreter is a wrapper that records the job's wall time and peak resident
memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``); the table rule -> wall s
-> max RSS MB is printed (``pytest -s``) and checked against the rule's
``mem_mb`` request.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import full_width as fw
from workflow_utils import REPO, load_config, planned_jobs, snakemake, with_existing_inputs, write_config

STUDIES = ("which-tokens", "clca", "atc")

WRAPPER = '''#!{shebang}
"""The interpreter of every job of this test: runs the real one and appends
one JSON line (argv, wall s, CPU s, peak RSS of the job's process in kB, exit code)."""
import json, os, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call([{python!r}, *sys.argv[1:]])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
record = {{"argv": sys.argv[1:], "wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
          "max_rss_kb": usage.ru_maxrss, "returncode": code}}
fd = os.open({records!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, (json.dumps(record) + "\\n").encode())
os.close(fd)
sys.exit(code)
'''


def _wrapper(tmp_path: Path, python: str, name: str) -> Path:
    """An interpreter that runs `python` and records each job in job_records.jsonl."""
    path = tmp_path / name
    path.write_text(WRAPPER.format(shebang=sys.executable, python=python, records=str(tmp_path / "job_records.jsonl")))
    path.chmod(0o755)
    return path


#: the detection environment the demo builds (envs/install_mmdet.sh): the
#: detection summary reads its runs with mmengine's helpers
DETECTION_PYTHON = REPO / ".venv-mmdet" / "bin" / "python"


def _job_of(record: dict, jobs: list[dict], workdir: Path) -> dict:
    """The planned job a command ran: every aggregation command names all of
    its job's outputs; when it also names all the outputs of a job it reads
    (collate reads compare's table), its own outputs are the newer ones."""
    argv = set(record["argv"])
    candidates = [job for job in jobs if job["outputs"] and set(job["outputs"]) <= argv]
    if not candidates:
        raise AssertionError(f"a command names no planned job's outputs: {record['argv']}")
    return max(candidates, key=lambda job: min((workdir / p).stat().st_mtime for p in job["outputs"]))


def _table(rows: list[dict]) -> str:
    lines = [f"{'rule':<22} {'jobs':>4} {'wall s (max)':>12} {'CPU s (sum)':>11} {'max RSS MB':>10} {'mem_mb asked':>12}"]
    for r in rows:
        lines.append(f"{r['rule']:<22} {r['jobs']:>4} {r['wall_max']:>12.1f} {r['cpu_sum']:>11.1f} "
                     f"{r['rss_mb']:>10.0f} {r['mem_mb']:>12}")
    return "\n".join(lines)


def _mem_mb(dry_run: str) -> dict[str, int]:
    """Each rule's largest mem_mb request in the dry run's listing."""
    asked: dict[str, int] = {}
    rule = None
    for line in dry_run.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            rule = m.group(1)
        m = re.search(r"\bmem_mb=(\d+)", line)
        if m and rule:
            asked[rule] = max(asked.get(rule, 0), int(m.group(1)))
    return asked


@pytest.mark.slow
@pytest.mark.skipif(
    not (os.environ.get("CI") or os.environ.get("TOKENREDUCTION_FULL_WIDTH") == "1"),
    reason="every aggregation job of the three studies: runs in CI (CI set) "
    "or with TOKENREDUCTION_FULL_WIDTH=1 (docs/performance.md, 'Aggregation at full width')",
)
@pytest.mark.parametrize("study", STUDIES)
def test_aggregation_jobs_at_full_width(tmp_path, study):
    # job CPU measured 2026-12-07 on the loaded 2-core machine: which-tokens 226 s, ATC 219 s,
    # CLCA ~615 s (analysis_compare's 15 jobs 354 s; compare_heatmaps 106 s for 6,200 pairs of
    # 28 x 28 maps by POT's exact network simplex) (docs/performance.md)
    started = time.perf_counter()
    records_path = tmp_path / "job_records.jsonl"
    config = with_existing_inputs(load_config(f"{study}.yaml"), tmp_path)
    config["python"] = str(_wrapper(tmp_path, sys.executable, "measured-python"))
    if config.get("detection"):
        if not DETECTION_PYTHON.exists():
            pytest.skip(f"{study} has a detection stage: its environment {DETECTION_PYTHON} is missing "
                        "(envs/install_mmdet.sh; the demo builds it)")
        config["detection"].update(python=str(_wrapper(tmp_path, str(DETECTION_PYTHON), "measured-mmdet-python")),
                                   build_env=False)
    config_path = write_config(tmp_path / f"{study}.yaml", config)

    # the whole DAG of the study, as a cluster run would plan it
    dry = snakemake(["-n", "--configfile", str(config_path)], tmp_path).stdout
    jobs = fw.planned_job_outputs(dry)
    planned = Counter(job["rule"] for job in jobs)
    assert planned == Counter(planned_jobs(dry)), "the listing and the job stats disagree"
    aggregation = [job for job in jobs if job["rule"] in fw.AGGREGATION_RULES]
    expected = Counter(job["rule"] for job in aggregation)
    assert expected["summarise"] == 1 and expected["report_tables"] == 1

    fabricated = fw.fabricate_upstream(config, jobs, tmp_path)
    assert fabricated["evaluate"] == planned["evaluate"] > 0
    fabricate_s = time.perf_counter() - started

    targets = sorted({path for job in aggregation for path in job["outputs"]})
    allowed = [*fw.AGGREGATION_RULES, *fw.TEMPLATE_RULES]
    run = snakemake(["--cores", "2", "--configfile", str(config_path), "--allowed-rules", *allowed, "--", *targets],
                    tmp_path, timeout=3600)
    ran = Counter(planned_jobs(run.stdout + run.stderr))
    # exactly the study's aggregation jobs (and the manifests they read) ran
    assert {rule: n for rule, n in ran.items() if rule not in fw.TEMPLATE_RULES} == dict(expected), ran
    for path in targets:
        assert (tmp_path / path).is_file() and (tmp_path / path).stat().st_size > 0, path

    # one row per run of the grid
    results = tmp_path / config["results"]
    summary = pd.read_csv(results / "summary" / "metrics.csv")
    assert len(summary) == planned["evaluate"]
    for dataset in {job["wildcards"]["dataset"] for job in jobs if job["rule"] == "evaluate"}:
        stats = json.loads((results / "analysis" / dataset / "token_stats.json").read_text())
        runs = summary[summary["dataset"] == dataset]
        assert len(stats) == len(runs), (dataset, len(stats), len(runs))
    if planned["mae_evaluate"]:
        assert len(pd.read_csv(results / "mae" / "metrics.csv")) == planned["mae_evaluate"]
    if planned["detection_eval"]:
        assert len(pd.read_csv(results / "detection" / "summary.csv")) == planned["detection_eval"]
    if planned["sd_fid"]:
        assert len(pd.read_csv(results / "diffusion" / "fid.csv")) == planned["sd_fid"]
    for job in (j for j in aggregation if j["rule"] == "ots_plot"):
        sweeps = [j for j in jobs if j["rule"] == "ots_sweep"
                  and j["wildcards"]["otsbackbone"] == job["wildcards"]["otsbackbone"]]
        rows = sum(len(pd.read_csv(tmp_path / j["outputs"][0])) for j in sweeps)
        assert len(pd.read_csv(tmp_path / job["outputs"][0])) == rows

    # every job with a command ran through the measuring interpreter, once
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    assert all(r["returncode"] == 0 for r in records)
    per_rule: dict[str, list[dict]] = {}
    for record in records:
        per_rule.setdefault(_job_of(record, aggregation, tmp_path)["rule"], []).append(record)
    assert {rule: len(v) for rule, v in per_rule.items()} == dict(expected)
    asked = _mem_mb(dry)
    rows = [
        {"rule": rule, "jobs": len(v), "wall_max": max(r["wall_s"] for r in v), "cpu_sum": sum(r["cpu_s"] for r in v),
         "rss_mb": max(r["max_rss_kb"] for r in v) / 1024, "mem_mb": asked.get(rule, 0)}
        for rule, v in sorted(per_rule.items(), key=lambda kv: -max(r["max_rss_kb"] for r in kv[1]))
    ]
    print(f"\n{study}: {planned['evaluate']} runs, {sum(expected.values())} aggregation jobs; fabricated in "
          f"{fabricate_s:.0f} s, total {time.perf_counter() - started:.0f} s")
    print(_table(rows))
    (Path(os.environ.get("FULL_WIDTH_TABLES", tmp_path)) / f"full_width_{study}.txt").write_text(_table(rows) + "\n")
    # no job needs more memory than its rule asks a cluster for
    over = [r for r in rows if r["rss_mb"] > r["mem_mb"]]
    assert not over, _table(over)


class _Loaded(dict):
    """A loaded .npz (a dict that a weak set can track, by identity)."""

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other


@pytest.mark.parametrize("axis", ["rates", "capacity", "models"])
def test_compare_holds_one_group_of_runs_and_loads_each_file_once(tmp_path, monkeypatch, axis):
    """analysis_compare at full width held every run of the dataset in memory
    (about 6 GB at the which-tokens study's 5,000 images: 132 runs, CLS
    features of width up to 768 at 4 blocks). It now visits the pairs group by
    group and drops a run after its last pair: each file is read once, at most
    one group's runs are alive, and the table is the one every pair compared
    in the order of ``pairs`` gives."""
    import weakref

    from tokenreduction.analysis import compare, stage

    config = {
        "datasets": {"d": {"kind": "imagenet", "img_size": 64}},
        "backbones": {name: {"model": f"deit_{name}_patch16_224", "capacity": name} for name in ("tiny", "small")},
        "methods": {"deit": {"method": "none"}, "topk": {"method": "topk"}, "tome": {"method": "tome"},
                    "evit": {"method": "evit"}},
        "reduction_loc": [3, 6, 9], "budget": "geometric",
    }
    runs = [("deit", "1")] + [(m, r) for m in ("topk", "tome", "evit") for r in ("0.5", "0.7", "0.9")]
    rows = []
    for backbone in ("tiny", "small"):
        for method, rate in runs:
            run = f"d/{backbone}/{method}/kr{rate}/seed0"
            job = {"wildcards": {"dataset": "d", "backbone": backbone, "method": method, "keep_rate": rate, "seed": "0"},
                   "outputs": [f"eval/{run}/{name}" for name in ("metrics.json", "patterns.npz", "cls_features.npz")]}
            for path in job["outputs"]:
                (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            fw.write_evaluation(config, job, tmp_path, {})
            rows.append({"dataset": "d", "backbone": backbone, "capacity": backbone, "method": method,
                         "keep_rate": float(rate), "seed": 0, "metric": 70.0 + len(rows) % 7})
    pd.DataFrame(rows).to_csv(tmp_path / "summary.csv", index=False)

    loads: Counter = Counter()
    live: weakref.WeakSet = weakref.WeakSet()
    peak = [0]
    real_load = stage._load

    def tracked(eval_dir, run, name):
        loads[(run, name)] += 1
        out = _Loaded(real_load(eval_dir, run, name))
        live.add(out)
        peak[0] = max(peak[0], len(live))
        return out

    monkeypatch.setattr(stage, "_load", tracked)
    out = stage.compare_runs(tmp_path / "summary.csv", "d", axis, tmp_path / "eval", tmp_path / "cmp.csv")
    assert loads and max(loads.values()) == 1, loads
    group = {"rates": 3, "capacity": 2, "models": 4}[axis]  # runs of the largest group (models: + the baseline)
    assert 2 * 2 <= peak[0] <= 2 * (group + 1) < len(loads), (peak[0], len(loads))

    # the reference: every pair of `pairs`, in its order, compared straight from the files
    monkeypatch.setattr(stage, "_load", real_load)
    todo = compare.pairs(stage.runs_table(pd.read_csv(tmp_path / "summary.csv"), "d"), axis, match=("seed",),
                         baseline_rate=compare.BASELINE_PAIR_RATE)
    frames = []
    for a, b in zip(todo["run_a"], todo["run_b"]):
        def files(run, name):
            return real_load(tmp_path / "eval", run, name)
        pat = compare.compare_patterns(files(a, "patterns.npz"), files(b, "patterns.npz"), names=(a, b),
                                       hc_true=compare.HC_TRUE[axis])
        feat = compare.compare_features(files(a, "cls_features.npz"), files(b, "cls_features.npz"), names=(a, b))
        frames += [t.assign(axis=axis, run_a=a, run_b=b, source=s) for t, s in ((pat, "pattern"), (feat, "feature"))
                   if len(t)]
    expected = pd.concat(frames, ignore_index=True)
    first = ["axis", "run_a", "run_b", "source", "block", "n_images", *stage.PATTERN_MEASURES, *stage.FEATURE_MEASURES]
    assert list(out.columns) == [c for c in first if c in expected] + [c for c in expected if c not in first]
    expected = expected[list(out.columns)]
    pd.testing.assert_frame_equal(out.reset_index(drop=True), expected, check_dtype=False, rtol=1e-9)
    assert list(out.dtypes) == list(expected.dtypes)


def _pattern_run(rng, kind: str, blocks: list[int], images: list[str], num_patches: int = 64, kept: bool = False) -> dict:
    counts = fw.stage_counts(num_patches, 0.6, len(blocks), "current")
    from tokenreduction.patterns import compose_assignments
    composed = torch.stack(compose_assignments(fw.stage_assignments(rng, kind, counts, len(images), num_patches)))
    run = {"kind": kind, "stage_blocks": np.asarray(blocks), "composed": composed.numpy(), "image_ids": np.asarray(images)}
    if kept:  # recorded cluster centres (K-Medoids, DPC-KNN)
        run["kept"] = rng.random(run["composed"].shape) < 0.5
    return run


@pytest.mark.parametrize("hc_true", ["a", "b"])
@pytest.mark.parametrize("kinds", [("merge", "soft"), ("prune", "prune"), ("prune", "merge"), ("merge", "kept")])
def test_patterns_compared_once_and_mirrored_equal_both_orders(hc_true, kinds):
    """compare_patterns_both(A, B) == (compare_patterns(A, B), compare_patterns(B, A)):
    the slow reference computes each order on its own (B's stages in B's
    order, images in the order of the first run). Tolerance: 1e-12 absolute
    (per-image means summed in another order)."""
    from tokenreduction.analysis.compare import compare_patterns, compare_patterns_both

    rng = np.random.default_rng(len(kinds[0]) * 7 + len(hc_true))
    images = [f"img{i:03d}" for i in range(40)]
    a = _pattern_run(rng, kinds[0], [2, 5, 8], images)
    shuffled = list(np.asarray(images)[rng.permutation(len(images))])  # B lists the images in another order
    b = _pattern_run(rng, "merge" if kinds[1] == "kept" else kinds[1], [5, 8, 11], shuffled, kept=kinds[1] == "kept")
    ab, ba = compare_patterns_both(a, b, names=("a", "b"), hc_true=hc_true)
    pd.testing.assert_frame_equal(ab, compare_patterns(a, b, names=("a", "b"), hc_true=hc_true))
    reference = compare_patterns(b, a, names=("b", "a"), hc_true=hc_true)
    assert list(ba["block"]) == list(reference["block"]) == [5, 8]
    pd.testing.assert_frame_equal(ba, reference, check_exact=False, rtol=0, atol=1e-12)
    if "merge" in kinds[0] and kinds[1] != "prune":  # homogeneity and completeness really swap
        assert not np.allclose(ab["Homogeneity_mean"], ab["Completeness_mean"])


@pytest.mark.parametrize("widths", [(12, 12), (20, 8), (6, 16)])
def test_features_compared_once_and_mirrored_equal_both_orders(widths):
    """compare_features_both(A, B) == (compare_features(A, B), compare_features(B, A))
    for equal and unequal widths (PWCCA weighted by each side, with unpaired
    variates in the study's normalisation), a rank-deficient run, blocks
    listed in different orders, and a degenerate CCA (too few images: NaN,
    one warning). Tolerance: 1e-10 absolute (transposed products)."""
    import warnings

    from tokenreduction.analysis.compare import compare_features, compare_features_both
    from tokenreduction.analysis.similarity import SYMMETRIC_FEATURE_METRICS, DegenerateCCAWarning

    rng = np.random.default_rng(sum(widths))
    for n_images in (60, widths[0] + widths[1]):  # CCA defined, then degenerate
        images = np.asarray([f"i{k}" for k in range(n_images)])
        fa = rng.standard_normal((3, n_images, widths[0]))
        fa[1, :, -2:] = fa[1, :, :2]  # block 6 of A: rank-deficient
        perm = rng.permutation(n_images)
        fb = rng.standard_normal((3, n_images, widths[1]))
        fb[:, :, 0] += fa[0][perm, 0][None]  # related to A
        a = {"blocks": np.asarray([3, 6, 11]), "features": fa, "image_ids": images}
        b = {"blocks": np.asarray([11, 6, 3]), "features": fb, "image_ids": images[perm]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DegenerateCCAWarning)
            ab, ba = compare_features_both(a, b, names=("a", "b"))
            mirrored_warnings = len(caught)
            ref_ab = compare_features(a, b, names=("a", "b"))
            ref_ba = compare_features(b, a, names=("b", "a"))
        degenerate = n_images <= sum(widths)
        assert mirrored_warnings == (3 if degenerate else 0)  # one per block, not two
        pd.testing.assert_frame_equal(ab, ref_ab, check_exact=False, rtol=0, atol=1e-10)
        pd.testing.assert_frame_equal(ba, ref_ba, check_exact=False, rtol=0, atol=1e-10)
        assert list(ba["block"]) == [11, 6, 3]
        assert ab["PWCCA"].isna().all() == degenerate
        if not degenerate:  # PWCCA is not symmetric: really computed both ways
            assert not np.allclose(ab.set_index("block")["PWCCA"], ba.set_index("block")["PWCCA"].loc[[3, 6, 11]])
        for metric in SYMMETRIC_FEATURE_METRICS:
            np.testing.assert_allclose(ab.set_index("block")[metric], ba.set_index("block")[metric].loc[[3, 6, 11]],
                                       atol=1e-10)
