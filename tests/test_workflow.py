"""The Snakemake DAG: dry runs, config validation, a real reduced demo run,
no-op reruns, partial reruns, lint and formatting."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

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
    # evaluate.after_training: each fine-tuning job evaluates its model and
    # writes the evaluation outputs itself (no evaluate job)
    assert demo["evaluate"]["after_training"] is True
    assert jobs["finetune"] >= 40 and "evaluate" not in jobs
    finetune_outputs = [
        line for block in out.split("rule finetune:")[1:] for line in block.splitlines()[:3] if "output:" in line
    ]
    assert len(finetune_outputs) == jobs["finetune"]
    assert all(
        all(f"/{name}" in line for name in ("metrics.json", "patterns.npz", "cls_features.npz", "final.pth"))
        and "results/eval/" in line
        for line in finetune_outputs
    ), finetune_outputs[:2]
    assert "--then-evaluate" in out
    assert jobs["summarise"] == 1


#: fine-tuning jobs each study config plans
STUDY_FINETUNE_JOBS = {
    # 4 datasets x 3 capacities x (11 methods x 4 keep rates + baseline)
    "which-tokens.yaml": 4 * 3 * (11 * 4 + 1),
    # 5 datasets x 2 backbones x (8 methods x with/without CLCA x 5 keep rates + baseline
    # + the PEFT, H2T and VQT baselines, once each at keep rate 1)
    "clca.yaml": 5 * 2 * (8 * 2 * 5 + 1 + 3),
}


@pytest.mark.parametrize("name", ["which-tokens.yaml", "clca.yaml"])
def test_study_configs_dry_run(tmp_path, name):
    config = with_existing_roots(load_config(name), tmp_path)
    path = write_config(tmp_path / name, config)
    out = snakemake(["-n", "--configfile", str(path)], tmp_path).stdout
    jobs = planned_jobs(out)
    assert jobs["finetune"] == STUDY_FINETUNE_JOBS[name]
    # the studies evaluate each run in a job of its own (an evaluation change
    # reruns no training)
    assert jobs["evaluate"] == jobs["finetune"] and "--then-evaluate" not in out
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
    # the studies' route (one evaluate job per run), which the Slurm, restart
    # and rerun tests exercise; the demo's after_training route is tested in
    # test_demo_dry_run_builds_every_stage and tests/test_train_then_evaluate.py
    config["evaluate"].update(num_pattern_images=16, throughput_batch=4, batch_size=64, after_training=False)
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


# ------------------------------------------------ interpreters, environments, quoting


def _runtime():
    """workflow/lib/runtime.py, loaded as the workflow loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenreduction_runtime", REPO / "workflow" / "lib" / "runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_interpreter_is_the_one_with_the_package_whatever_the_shell(tmp_path):
    rt = _runtime()
    root = tmp_path / "repo"
    (root / ".venv" / "bin").mkdir(parents=True)
    # --sdm conda / apptainer: the environment's own python, whatever is configured
    assert rt.main_python(root, "/opt/x/bin/python", {"conda"}) == "python"
    assert rt.main_python(root, None, {"apptainer"}) == "python"
    # the interpreter running Snakemake has the package (.venv/bin/snakemake, python -m snakemake)
    assert rt.main_python(root, None, set(), executable="/opt/py/bin/python3", has_package=lambda: True) == "/opt/py/bin/python3"
    # a snakemake from elsewhere on PATH: the repository's .venv once it exists
    assert rt.main_python(root, None, set(), executable="/usr/bin/python3", has_package=lambda: False) == "/usr/bin/python3"
    (root / ".venv" / "bin" / "python").touch()
    assert rt.main_python(root, None, set(), executable="/usr/bin/python3", has_package=lambda: False) == str(
        root / ".venv" / "bin" / "python"
    )
    # the config's python: relative to the repository; a bare command stays a command
    (root / "my env" / "bin").mkdir(parents=True)
    (root / "my env" / "bin" / "python").touch()
    assert rt.main_python(root, "my env/bin/python", set()) == str(root / "my env" / "bin" / "python")
    assert rt.main_python(root, "python3.11", set()) == "python3.11"
    with pytest.raises(rt.InterpreterError, match="python: .*nowhere"):
        rt.main_python(root, "nowhere/bin/python", set())
    # the venv the detection environment's interpreter belongs to (built by the DAG)
    assert rt.venv_of("/a b/.venv-mmdet/bin/python") == Path("/a b/.venv-mmdet")
    assert rt.venv_of("python") is None and rt.venv_of("/usr/local/python3") is None


def test_missing_configured_interpreter_stops_the_dag_build(tmp_path):
    msg = _invalid(tmp_path, lambda c: c.update(python="no/such/bin/python"))
    assert "invalid config at python" in msg and "no/such/bin/python" in msg
    assert "Traceback" not in msg


def _shell_commands() -> dict[str, str]:
    """rule name -> its shell command as written (the string literals joined)."""
    import ast
    import re

    commands = {}
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        lines = path.read_text().splitlines()
        rule = None
        for i, line in enumerate(lines):
            m = re.match(r"\s*(?:rule|checkpoint) (\w+):", line)
            if m:
                rule = m.group(1)
            if line.strip() == "shell:":
                indent = len(line) - len(line.lstrip())
                parts = []
                for body in lines[i + 1:]:
                    if not body.strip() or len(body) - len(body.lstrip()) <= indent:
                        break
                    parts.append(ast.literal_eval(body.strip()))
                commands[f"{path.name}:{rule}"] = "".join(parts)
    return commands


def test_rule_shells_quote_every_path_and_name_no_bare_interpreter():
    import re

    commands = _shell_commands()
    assert len(commands) >= 30
    for name, cmd in commands.items():
        # no interpreter looked up on PATH: the main environment's jobs call
        # "$TOKENREDUCTION_PYTHON", the detection jobs "$TOKENREDUCTION_MMDET_PYTHON"
        assert not re.search(r"(^|[\s;&|(])(python3?|torchrun)\s", cmd), (name, cmd)
        assert "$TOKENREDUCTION_PYTHON " not in cmd and "$TOKENREDUCTION_MMDET_PYTHON " not in cmd, (name, cmd)
        # every input, output and log path is quoted (:q); so are path-valued params
        unquoted = re.findall(r"\{(?:input|output|log)(?:\.\w+|\[\d+\])*\}", cmd)
        assert not unquoted, (name, unquoted)
        for param in re.findall(r"\{params\.(\w+)\}", cmd):
            assert not re.search(r"root|dir|path|file|venv|pipeline|config|spec", param), (name, param)


def test_conda_envs_install_this_repository_wherever_snakemake_copies_them(tmp_path):
    import re

    import yaml

    used = set()
    for path in (REPO / "workflow" / "rules").glob("*.smk"):
        used |= set(re.findall(r'"\.\./\.\./envs/(\w+)\.yaml"', path.read_text()))
    assert used == {"torch", "diffusion", "mmdet"}
    for name in used:
        env = yaml.safe_load((REPO / "envs" / f"{name}.yaml").read_text())
        pip = [d for d in env["dependencies"] if isinstance(d, dict)]
        # no relative path: Snakemake creates the env from a copy in .snakemake/conda/
        assert not any("../" in line for block in pip for line in block["pip"]), name
    # torch and diffusion: the post-deploy script installs the repository the
    # workflow names (TOKENREDUCTION_ROOT), from any working directory
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "calls.txt"
    (fake_bin / "python").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    (fake_bin / "python").chmod(0o755)
    elsewhere = tmp_path / "some workdir"
    elsewhere.mkdir()
    for name in ("torch", "diffusion"):
        script = REPO / "envs" / f"{name}.post-deploy.sh"
        env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(tmp_path), "TOKENREDUCTION_ROOT": str(REPO)}
        proc = subprocess.run(["bash", str(script)], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        proc = subprocess.run(["bash", str(script)], cwd=elsewhere, env={**env, "TOKENREDUCTION_ROOT": str(tmp_path)},
                              capture_output=True, text=True)
        assert proc.returncode != 0 and "not the tokenreduction repository" in proc.stderr
    assert calls.read_text().splitlines() == [f"-m pip install --quiet -e {REPO}"] * 2
    # ... and the workflow exports that variable (read by the script through Snakemake)
    assert 'os.environ.update(TOKENREDUCTION_ROOT=str(ROOT))' in (REPO / "workflow" / "rules" / "software.smk").read_text()


def _detection_only(tmp_path, **detection) -> Path:
    config = load_config("config.yaml")
    config["results"] = str(tmp_path / "results")
    config["detection"].update(detection)
    return write_config(tmp_path / "det.yaml", config)


def test_detection_environment_is_a_job_the_detection_jobs_wait_for(tmp_path):
    venv = tmp_path / "mmdet env"  # a space: the path is quoted
    path = _detection_only(tmp_path, python=str(venv / "bin" / "python"))
    target = str(tmp_path / "results" / "detection" / "summary.csv")
    out = snakemake([target, "-n", "-p", "--configfile", str(path)], tmp_path).stdout
    jobs = planned_jobs(out)
    assert jobs["detection_env"] == 1 and jobs["detection_train"] >= 1, out
    assert f"bash {REPO / 'envs' / 'install_mmdet.sh'} '{venv}'" in out
    # once built (its stamp written by install_mmdet.sh), nothing rebuilds it
    venv.mkdir()
    (venv / "tokenreduction-env.json").write_text("{}")
    out = snakemake([target, "-n", "--configfile", str(path)], tmp_path).stdout
    assert "detection_env" not in planned_jobs(out)
    # build_env: false uses detection.python as it is
    path = _detection_only(tmp_path, python=str(tmp_path / "other" / "bin" / "python"), build_env=False)
    out = snakemake([target, "-n", "--configfile", str(path)], tmp_path).stdout
    assert "detection_env" not in planned_jobs(out) and planned_jobs(out)["detection_train"] >= 1


def test_stage_times_count_each_job_once_and_only_this_run(tmp_path):
    rt = _runtime()
    meta = tmp_path / "metadata"
    meta.mkdir()

    def record(name, rule, start, end, job_hash, incomplete=False):
        (meta / name).write_text(json.dumps({"rule": rule, "starttime": start, "endtime": end,
                                             "job_hash": job_hash, "incomplete": incomplete}))

    record("a1", "finetune", 100.0, 160.0, 1)
    record("a2", "finetune", 100.0, 159.5, 1)  # a second output of the same job
    record("b", "finetune", 150.0, 250.0, 2)
    record("c", "pretrain", 20.0, 90.0, 3)
    record("d", "evaluate", 10.0, 15.0, 4)      # finished before this run started
    record("e", "evaluate", 300.0, 310.0, 5, incomplete=True)
    (meta / "junk").write_text("not json")
    rows = rt.stage_times(rt.job_records(meta, since=50.0))
    assert [(r["stage"], r["jobs"], r["job_seconds"], r["wall_seconds"]) for r in rows] == [
        ("pretrain", 1, 70.0, 70.0),
        ("finetune", 2, 160.0, 150.0),
    ]
    text = rt.format_stage_times(rows, run_start=20.0, run_end=260.0)
    assert "finetune" in text and "0:02:40" in text and "whole run: 0:04:00" in text
    rt.write_stage_times(rows, tmp_path / "out" / "stage_times.tsv")
    table = pd.read_csv(tmp_path / "out" / "stage_times.tsv", sep="\t")
    assert list(table.stage) == ["pretrain", "finetune"] and table.jobs.sum() == 3


@pytest.mark.slow
def test_demo_subset_runs_in_a_checkout_whose_path_has_a_space(tmp_path):
    """A checkout and a results folder whose paths contain spaces, run by
    `.venv/bin/python -m snakemake` in a clean environment (no venv on PATH):
    data, pretraining, fine-tuning, evaluation, the summary and, where the
    detection environment exists (always in CI), the detection stage."""
    import os

    from workflow_utils import copy_tree

    checkout = copy_tree(tmp_path / "my projects" / "token reduction")
    work = tmp_path / "work dir"
    config = tiny_demo_config(work)
    config["experiments"][0]["methods"] = ["topk"]
    for stage in ("ots", "mae", "diffusion", "benchmark"):
        config.pop(stage, None)
    targets = [str(work / "results" / "summary" / "metrics.csv")]
    mmdet = REPO / ".venv-mmdet" / "bin" / "python"
    if (mmdet.parent.parent / "tokenreduction-env.json").exists():  # built (by the demo, or by hand)
        config["detection"].update(python=str(mmdet), build_env=False, methods=[], baseline=True)
        targets.append(str(work / "results" / "detection" / "summary.csv"))
    elif os.environ.get("CI"):
        pytest.fail(f"CI must have the detection environment ({mmdet})")
    else:
        config.pop("detection")
    path = write_config(tmp_path / "space demo.yaml", config)
    proc = snakemake([*targets, "--cores", "2", "--configfile", str(path)], work, timeout=1200,
                     snakefile=checkout / "Snakefile")
    assert "Time per stage" in proc.stdout and "finetune" in proc.stdout
    table = pd.read_csv(work / "results" / "summary" / "metrics.csv")
    assert sorted(table.method) == ["deit", "topk"]
    stages = pd.read_csv(work / "results" / "logs" / "stage_times.tsv", sep="\t")
    assert {"prepare_dataset", "pretrain", "finetune", "evaluate", "summarise"} <= set(stages.stage)
    if len(targets) > 1:
        det = pd.read_csv(work / "results" / "detection" / "summary.csv")
        assert len(det) == 1


def test_stage_times_from_what_each_job_records(tmp_path):
    """Job seconds from each job's own benchmark file (end: the file's mtime,
    start: end minus its recorded seconds), on a laptop or in a Slurm
    allocation alike; rules without one (run in the Snakemake process) from
    the metadata. Under Slurm the metadata's start times are not the jobs'
    (issue 29: -0.0 s per stage)."""
    import os
    import re

    rt = _runtime()
    bench = tmp_path / "results" / "benchmarks"
    patterns = [("finetune", re.compile(str(bench / "finetune") + r"/(?P<run>.+)\.tsv$")),
                ("prepare_dataset", re.compile(str(bench / "prepare_dataset") + r"/(?P<dataset>.+)\.tsv$"))]

    def write(rel, seconds, mtime):
        path = bench / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("s\th:m:s\tmax_rss\n" + "".join(f"{s}\t0:00:01\t1.0\n" for s in seconds))
        os.utime(path, (mtime, mtime))

    write("prepare_dataset/digits.tsv", [40.0], 1000.0)
    write("finetune/a/b.tsv", [100.0], 1200.0)
    write("finetune/a/c.tsv", [30.0, 20.0], 1250.0)  # two repeats: 50 s
    write("finetune/old.tsv", [5.0], 10.0)  # before this run
    write("other/x.tsv", [5.0], 1300.0)  # no rule's pattern
    meta = tmp_path / "metadata"
    meta.mkdir()
    # metadata as Snakemake writes it for a Slurm job (start unknown: -0.0 s), and a local rule
    (meta / "m1").write_text(json.dumps({"rule": "finetune", "starttime": 1200.1, "endtime": 1200.0, "job_hash": 9}))
    (meta / "m2").write_text(json.dumps({"rule": "summarise", "starttime": 1260.0, "endtime": 1270.0, "job_hash": 8}))
    records = rt.run_records(meta, bench, patterns, since=900.0)
    rows = {r["stage"]: r for r in rt.stage_times(records)}
    assert set(rows) == {"prepare_dataset", "finetune", "summarise"}
    assert (rows["finetune"]["jobs"], rows["finetune"]["job_seconds"], rows["finetune"]["wall_seconds"]) == (2, 150.0, 150.0)
    assert rows["prepare_dataset"]["job_seconds"] == 40.0 and rows["summarise"]["job_seconds"] == 10.0
    assert all(r["job_seconds"] > 0 for r in rows.values())
