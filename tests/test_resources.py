"""The resource model (workflow/lib/resources.py, issue 25 item 5) and the
cluster plan printed at DAG build (issue 29 item 3)."""
from __future__ import annotations

import importlib.util
import math

import pytest
import yaml

from workflow_utils import REPO, load_config, planned_jobs, snakemake, with_existing_roots, write_config


def _load():
    spec = importlib.util.spec_from_file_location("resources_under_test", REPO / "workflow" / "lib" / "resources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


res = _load()


def test_threads_cover_the_loaders_and_every_torchrun_process():
    assert res.job_threads(num_workers=8, gpus=1) == 9
    assert res.job_threads(num_workers=8, gpus=4) == 36  # four processes, each with its loaders
    assert res.job_threads(num_workers=0, gpus=0) == 1
    assert res.job_threads(num_workers=2, gpus=0, at_least=8) == 8


def test_time_limit_is_images_times_epochs_over_throughput_times_safety():
    # DeiT-S on ImageNet, 30 epochs, ~1000 img/s on one GPU: ~10.7 h (issue 25)
    est = res.train_estimate_minutes(1_281_167, 30, res.DEFAULT_THROUGHPUT["small"], gpus=1)
    assert est == pytest.approx(1_281_167 * 30 / 1000 / 60)
    assert 10 * 60 < est < 11 * 60
    assert res.time_limit_minutes(est, 1.5) == math.ceil(est * 1.5 + res.OVERHEAD_MINUTES)
    assert res.time_limit_minutes(est, 1.5, attempt=2) == 2 * math.ceil(est * 1.5 + res.OVERHEAD_MINUTES)
    # four GPUs: faster, not four times; 448 px: four times the tokens, a quarter of the rate
    assert res.train_estimate_minutes(1000, 1, 1000.0, gpus=4) == pytest.approx(1000 / (1000 * 4 * 0.9) / 60)
    assert res.train_estimate_minutes(1000, 1, 1000.0, gpus=1, img_size=448) == pytest.approx(4 * 1000 / 1000 / 60)
    assert res.train_estimate_minutes(1000, 1, 1000.0, gpus=0) == pytest.approx(1000 / (1000 * res.CPU_FRACTION) / 60)


def test_throughput_and_images_declared_or_by_default():
    assert res.width_class("deit_small_patch16_224") == "small"
    assert res.width_class("anything", embed_dim=768) == "base"
    assert res.throughput("s", {"model": "deit_small_patch16_224"}, {}) == 1000.0
    assert res.throughput("s", {"model": "deit_small_patch16_224"}, {"s": 1234}) == 1234.0
    assert res.train_images("inet", {"kind": "imagenet"}) == 1_281_167
    assert res.train_images("mine", {"kind": "imagefolder", "train_images": 77}) == 77
    with pytest.raises(res.ResourceError, match=r"datasets\.mine\.train_images"):
        res.train_images("mine", {"kind": "imagefolder"})


def test_submissions_count_arrays_and_singles():
    subs = res.submissions({"finetune": 840, "evaluate": 840, "prepare_dataset": 5}, {"finetune", "evaluate"}, 200)
    assert subs == {"fewest": 5 + 5 + 5, "most": 1685}
    assert res.submissions({"finetune": 1}, {"all"}, 200) == {"fewest": 1, "most": 1}
    assert res.parse_array_rules("finetune, evaluate;ots_sweep") == {"finetune", "evaluate", "ots_sweep"}


def test_largest_request_is_the_most_any_job_asks_for_at_that_attempt():
    from types import SimpleNamespace as W

    minutes = {"s": 30, "b": 90, "l": 60}
    request = lambda w, attempt: minutes[w.size] * attempt  # noqa: E731
    jobs = [W(size="s"), W(size="b"), W(size="l")]
    assert res.largest_request(request, jobs, 1) == 90
    assert res.largest_request(request, jobs, 2) == 180
    with pytest.raises(res.ResourceError, match="no jobs"):
        res.largest_request(request, [], 1)


def test_cluster_settings_from_profile_and_command_line():
    profiles = {"slurm": {"executor": "slurm", "slurm-array-jobs": "finetune", "slurm-array-limit": 50,
                          "default-resources": {"slurm_partition": "gpu", "max_runtime": 2880}}}
    got = res.cluster_settings(["snakemake", "--profile", "slurm", "-n"], {}, profiles.get)
    assert got == {"executor": "slurm", "array_jobs": {"finetune"}, "array_limit": 50, "max_runtime": 2880}
    got = res.cluster_settings(["snakemake", "--slurm-array-limit=10", "-n"], {"SNAKEMAKE_PROFILE": "slurm"}, profiles.get)
    assert got["array_limit"] == 10 and got["executor"] == "slurm"
    assert res.cluster_settings(["snakemake", "-n"], {}, profiles.get)["executor"] == "local"
    profiles["list"] = {"executor": "slurm", "default-resources": ["mem_mb=1000", "max_runtime=60"]}
    assert res.cluster_settings(["snakemake", "--profile=list"], {}, profiles.get)["max_runtime"] == 60


def test_the_slurm_profile_arrays_the_per_run_rules_and_groups_the_short_steps():
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    arrays = res.parse_array_rules(profile["slurm-array-jobs"])
    assert {"finetune", "evaluate"} <= arrays
    assert 1 < profile["slurm-array-limit"] <= profile["jobs"]
    groups = dict(item.split("=") for item in profile["groups"])
    assert groups == {"analysis_collate": "analysis", "analysis_correlate": "analysis", "analysis_rho_heatmap": "analysis",
                      "token_statistics": "figures", "pattern_grid": "figures"}
    # one group per dataset's chain (Snakemake's group check is quadratic in a group's jobs), the figures merged
    assert profile["group-components"] == ["figures=50"]
    assert "--exclusive" not in (REPO / "profiles" / "slurm" / "config.yaml").read_text().split("#")[0]


@pytest.mark.slow
def test_dry_run_with_the_slurm_profile_prints_the_plan(tmp_path):
    """The plan under the installed slurm profile: submissions next to the
    job count, GPU-hours, and a warning for jobs over max_runtime."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "cfg"
    env = {**os.environ, "XDG_CONFIG_HOME": str(cfg)}
    subprocess.run([sys.executable, str(REPO / "scripts" / "install_profile.py"), "--no-account", "--partition", "p",
                    "--status-command", "squeue", "--max-runtime", "600"], check=True, env=env, capture_output=True)
    config = with_existing_roots(load_config("which-tokens.yaml"), tmp_path)
    path = write_config(tmp_path / "wt.yaml", config)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "-n", "--profile", "slurm", "--configfile", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = planned_jobs(out)
    total = sum(n for rule, n in jobs.items())
    assert f"Slurm plan: {total:,} jobs -> " in out
    assert "estimated GPU-hours:" in out
    # ImageNet fine-tunes of the base backbone need far more than 600 min
    assert "ask for more time than the profile's max_runtime (600 min)" in out
    # arrays: every finetune asks for the largest run's time (one array, one request)
    limits = {line.split(" runtime=")[1].split(",")[0] for block in out.split("rule finetune:")[1:]
              for line in block.splitlines()[:14] if " runtime=" in line}
    assert len(limits) == 1, limits
    # locally nothing is printed
    local = snakemake(["-n", "--configfile", str(path)], tmp_path).stdout
    assert "Slurm plan" not in local


def _requests(out: str) -> dict[str, list[tuple[str, str]]]:
    """rule -> the (mem_mb, runtime) of each of its jobs, from a dry run's job blocks."""
    import re

    found: dict[str, list[tuple[str, str]]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        resources = re.search(r"^\s*resources: (.*)$", block, re.MULTILINE)
        if rule and resources:
            values = dict(item.split("=", 1) for item in resources.group(1).split(", ") if "=" in item)
            found.setdefault(rule.group(1), []).append((values.get("mem_mb"), values.get("runtime")))
    return found


@pytest.mark.slow
def test_arrayed_rules_ask_every_job_for_their_largest_request(tmp_path):
    """Under the slurm profile every job of an arrayed per-run rule (OTS,
    MAE, diffusion, detection, fine-tune, evaluate) asks for the same memory
    and time, the largest that rule's jobs ask for locally (the plugin gives
    every task of an array the first task's resources); locally each asks
    for its own."""
    import os
    import subprocess
    import sys

    from workflow_utils import with_existing_inputs

    cfg = tmp_path / "cfg"
    env = {**os.environ, "XDG_CONFIG_HOME": str(cfg)}
    subprocess.run([sys.executable, str(REPO / "scripts" / "install_profile.py"), "--no-account", "--partition", "p",
                    "--status-command", "squeue"], check=True, env=env, capture_output=True)
    path = write_config(tmp_path / "atc.yaml", with_existing_inputs(load_config("atc.yaml"), tmp_path))
    base = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n",
            "--configfile", str(path)]
    runs = {}
    for name, extra in (("local", []), ("slurm", ["--profile", "slurm"])):
        proc = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        runs[name] = _requests(proc.stdout + proc.stderr)
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    arrayed = res.parse_array_rules(profile["slurm-array-jobs"])
    assert {"ots_sweep", "mae_finetune", "mae_evaluate", "sd_generate", "detection_train", "detection_eval"} <= arrayed
    varied = []
    for rule in sorted(arrayed & set(runs["local"])):
        local, slurm = runs["local"][rule], runs["slurm"][rule]
        assert len(local) == len(slurm) > 1, rule
        assert len(set(slurm)) == 1, (rule, set(slurm))
        largest = (max(int(m) for m, _ in local), max(int(t) for _, t in local))
        assert tuple(int(v) for v in slurm[0]) == largest, (rule, slurm[0], largest)
        if len(set(local)) > 1:
            varied.append(rule)
    # the config really has rules whose jobs ask for different amounts locally
    # (OTS backbones of different cost, generation experiments of different time)
    assert {"ots_sweep", "sd_generate", "finetune"} <= set(varied), varied
