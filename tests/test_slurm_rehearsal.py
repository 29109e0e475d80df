"""A study rehearsed through a real Slurm (issue 25): `config/which-tokens.yaml`
restricted to one dataset (``rehearse=true 'rehearse_datasets=[nabirds]'``:
135 fine-tunes, the dataset preparation, patterns, analysis, summary and
report), submitted with the site profile that ``scripts/install_profile.py
--no-account --partition <ci partition>`` installs.

The slice. Each of the three studies restricted to one dataset: which-tokens
292 jobs per dataset (any of its four), CLCA 358, ATC only its ImageNet (its
OTS, MAE and diffusion stages hang on it), the largest. which-tokens is the
smallest that still runs every stage of the training-and-analysis chain.

What fits CI (2 CPUs). A stand-in fine-tune and its evaluation in fresh
interpreters cost ~8.6 s of CPU, most of it importing torch and timm, and
every array task of the Slurm plugin (2.8.0) starts Snakemake three times
(the array's first job, the task's own job step, the job in ``srun``), each
~1.6 s of CPU (docs/slurm.md, "Rehearsing through Slurm"). So this test runs
the slice as a cluster user would with the settings docs/slurm.md recommends
for that case, and no less of it:

* ``evaluate: {after_training: true}`` (an overlay config file): each
  fine-tuning job evaluates its model at its end (same script, same outputs),
  the remedy docs/slurm.md recommends for a cluster: 157 jobs instead of 292,
  every run still fine-tuned and evaluated.
* the runs as Snakemake **groups** from the command line (``--groups
  finetune=runs --group-components runs=68``, besides the profile's own
  groups), so one sbatch runs 68 fine-tunes: Snakemake starts once per group
  and once per job (in its ``srun`` step) instead of three times per array
  task. The job-step plugin (0.6.1) runs a group's jobs **one at a time**
  (its ``run_job`` waits for each ``srun`` step), so a group gets one CPU
  (``--cores 1`` bounds a group job's CPUs) and the 2-CPU node runs the two
  groups side by side. Each group job starts its own warm interpreter
  (workflow/lib/rehearsal.py, ``warm_in_remote_job``), so a run costs its
  work (~3 s of CPU) and its job's Snakemake, not torch's imports.
  The plugin never submits a group as an array: the arrays themselves (a
  two-task fine-tuning array, one task retried alone, one requeued) are
  tested by tests/test_slurm.py.

Asserted from the output and squeue (the local Slurm keeps finished jobs for
MinJobAge; it has no accounting database for sacct): every job that is not a
local rule went through sbatch exactly once (the runs in ceil(135 / 68) group
submissions, the analysis in the profile's groups), every submission finished
COMPLETED in the profile's partition, the groups of runs asked one CPU each
and overlapped in time, each group's log says it started a warm interpreter
whose own log has one successful ``train.py`` per job of the group, the
summary has one row per run, and the analysis tables, pattern grid and
reports exist. It prints the wall time, the job and submission counts and
each submission's Slurm time.

Run where ``TOKENREDUCTION_SLURM_REHEARSAL=1`` (.ci/run sets it): 469 s on the
idle 2-core machine (2,079 s before the groups ran side by side and warm).
Skipped with the reason where no Slurm answers (a failure where CI is set).
Runs hold /tmp/slurm-test.lock (flock) so that they do not share the one-node
Slurm with another test run on the same machine.
"""
from __future__ import annotations

import fcntl
import math
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_slurm import (  # noqa: F401  (slurm_partition is a fixture)
    SUBMITTED, install_profile, slurm_jobs, slurm_partition, snakemake_cmd, snakemake_env,
)
from workflow_utils import REPO, planned_jobs

STUDY = "which-tokens"
DATASET = "nabirds"
#: 135 runs in two groups of one CPU each, side by side on the 2-CPU node
RUNS_PER_GROUP = 68
LOCK = Path(os.environ.get("SLURM_TEST_LOCK", "/tmp/slurm-test.lock"))
LOCK_WAIT_S = 1800
#: the run's wall-clock limit (it needs ~8 min on 2 idle CPUs; more where the machine is shared)
LIMIT_S = int(os.environ.get("TOKENREDUCTION_SLURM_REHEARSAL_LIMIT_S", "1800"))
#: a group job's submission line: Snakemake names it by a UUID, its log by group and rules
GROUP_SUBMITTED = re.compile(
    r"Job [0-9a-f-]{36} has been submitted with SLURM jobid (\d+) \(log: (\S*/group_(\w+?)_[a-z_]+/\d+\.log)\)"
)

#: a group job's line when its jobs run in its warm interpreter (workflow/lib/rehearsal.py)
WARM_STARTED = re.compile(r"rehearsal: this group job's (\d+) jobs run in a warm interpreter at \S+ \(log: (\S+)\)")


def rehearsal_args(tmp_path: Path) -> list[str]:
    """The study, one dataset, rehearsed; evaluation at the end of each fine-tune."""
    overlay = tmp_path / "evaluate_after_training.yaml"
    overlay.write_text(yaml.safe_dump({"evaluate": {"after_training": True}}))
    return ["--configfile", str(REPO / "config" / f"{STUDY}.yaml"), str(overlay),
            "--config", "rehearse=true", f"rehearse_datasets=[{DATASET}]"]


def slurm_args(profile: dict) -> list[str]:
    """The installed profile as users run it, plus the runs grouped (the
    profile's own groups kept: --groups on the command line replaces them)."""
    groups = list(profile.get("groups") or []) + ["finetune=runs"]
    components = list(profile.get("group-components") or []) + [f"runs={RUNS_PER_GROUP}"]
    return ["--profile", "slurm", "--slurm-init-seconds-before-status-checks", "2",
            "--slurm-keep-successful-logs",  # the group jobs' logs say whether they ran warm
            "--set-threads", "finetune=1", "--cores", "1",
            "--groups", *groups, "--group-components", *components]


@pytest.fixture
def slurm_lock():
    """The local Slurm for this test alone (flock on LOCK, waited for)."""
    with open(LOCK, "a") as f:
        deadline = time.time() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    pytest.fail(f"{LOCK} stayed locked for {LOCK_WAIT_S} s (another Slurm test run)")
                time.sleep(5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _elapsed_s(ids: list[str]) -> dict[str, float]:
    """Elapsed seconds of finished jobs (squeue's %M: [D-][H:]M:SS)."""
    proc = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%M"],
                          capture_output=True, text=True, timeout=60)
    out = {}
    for line in proc.stdout.split():
        jobid, clock = line.split("|")
        days, _, clock = clock.rpartition("-")
        parts = [int(x) for x in clock.split(":")]
        while len(parts) < 3:
            parts.insert(0, 0)
        out[jobid] = int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    return out


def _cpus_and_times(ids: list[str]) -> dict[str, tuple[int, str, str]]:
    """CPUs, start and end (ISO times, one clock) of finished jobs, from squeue."""
    proc = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%C|%S|%e"],
                          capture_output=True, text=True, timeout=60)
    out = {}
    for line in proc.stdout.split():
        jobid, cpus, start, end = line.split("|")
        out[jobid] = (int(cpus), start, end)
    return out


@pytest.mark.skipif(os.environ.get("TOKENREDUCTION_SLURM_REHEARSAL") != "1",
                    reason="the one-dataset rehearsal through Slurm (~8 min on 2 idle CPUs; .ci/run sets it) is opt-in: "
                           "TOKENREDUCTION_SLURM_REHEARSAL=1")
@pytest.mark.slurm
@pytest.mark.slow
def test_rehearsal_of_one_dataset_through_slurm(tmp_path, slurm_partition, slurm_lock):
    t0 = time.time()
    config_home = tmp_path / "cfg"
    profile = yaml.safe_load(install_profile(config_home, "--no-account", "--partition", slurm_partition,
                                             "--status-command", "squeue").read_text())
    env = snakemake_env(config_home)
    rehearsal = rehearsal_args(tmp_path)
    run_args = slurm_args(profile)

    dry = subprocess.run(snakemake_cmd(["-n", *rehearsal, *run_args], tmp_path, 600),
                         capture_output=True, text=True, env=env)
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-6000:]
    planned = planned_jobs(dry.stdout + dry.stderr)
    for rule in ("prepare_dataset", "finetune", "pattern_grid", "analysis_compare", "analysis_collate",
                 "analysis_correlate", "token_statistics", "summarise", "report_tables"):
        assert planned.get(rule), (rule, planned)
    assert "evaluate" not in planned and planned["finetune"] == 135, planned  # every run, evaluated in its job
    dry_s = time.time() - t0

    # the whole slice through sbatch
    proc = subprocess.run(snakemake_cmd([*rehearsal, *run_args], tmp_path, LIMIT_S), capture_output=True, text=True,
                          env=env)
    out = proc.stdout + proc.stderr
    (tmp_path / "snakemake.out").write_text(out)
    assert proc.returncode == 0, f"the rehearsal through Slurm failed ({proc.returncode}):\n{out[-8000:]}"
    run_s = time.time() - t0 - dry_s

    # single submissions (rule from the log path) and group submissions (group from the log path)
    singles = [(m.group(1), re.search(r"rule_(\w+?)/", m.group(2)).group(1)) for m in SUBMITTED.finditer(out)]
    groups = [(m.group(1), m.group(3)) for m in GROUP_SUBMITTED.finditer(out)]
    group_logs = {m.group(1): Path(m.group(2)) for m in GROUP_SUBMITTED.finditer(out)}
    assert "Submitted array job" not in out  # nothing of this slice is arrayed (test_slurm.py tests arrays)
    grouped = {item.split("=")[0] for item in run_args[run_args.index("--groups") + 1:
                                                        run_args.index("--group-components")]}
    local = {"all", "manifest", "summarise", "report_config", "report_section", "report_tables"}
    expected_singles = Counter({r: n for r, n in planned.items() if r not in local and r not in grouped})
    assert Counter(rule for _, rule in singles) == expected_singles, (singles, planned)  # each once: no retry
    by_group = Counter(group for _, group in groups)
    assert by_group["runs"] == math.ceil(planned["finetune"] / RUNS_PER_GROUP), by_group
    assert by_group["analysis"] >= 1 and by_group["figures"] >= 1, by_group
    ids = [jobid for jobid, _ in singles + groups]
    states = slurm_jobs(ids)
    assert set(states) == set(ids), "squeue lost jobs (MinJobAge too short?)"
    assert all(s["state"] == "COMPLETED" for s in states.values()), {k: v for k, v in states.items()
                                                                     if v["state"] != "COMPLETED"}
    assert all(s["partition"] == slurm_partition for s in states.values())

    results = tmp_path / "results" / f"{STUDY}-rehearsal"
    summary = pd.read_csv(results / "summary" / "metrics.csv")
    assert len(summary) == planned["finetune"] and set(summary["dataset"]) == {DATASET}
    assert len(summary.drop_duplicates(["backbone", "method", "keep_rate", "seed"])) == planned["finetune"]
    for axis in ("rates", "capacity", "models"):
        for table in (f"collated_{axis}.csv", f"correlations_{axis}.csv"):
            assert len(pd.read_csv(results / "analysis" / DATASET / table)) > 0, table
    for path in ("analysis/heatmap_comparison.csv", f"analysis/{DATASET}/token_stats.json",
                 f"patterns/{DATASET}/pattern_grid.png", "report/summary.html", "report/analysis.html", "README.md"):
        assert (results / path).stat().st_size > 0, path

    # the groups of runs asked one CPU each and ran side by side (a group's jobs run one at a time)
    run_groups = [jobid for jobid, group in groups if group == "runs"]
    spans = _cpus_and_times(run_groups)
    assert {cpus for cpus, _, _ in spans.values()} == {1}, spans
    assert max(start for _, start, _ in spans.values()) < min(end for _, _, end in spans.values()), spans
    # each group of runs ran its fine-tunes in its own warm interpreter (workflow/lib/rehearsal.py)
    for jobid in run_groups:
        log = group_logs[jobid] if group_logs[jobid].is_absolute() else tmp_path / group_logs[jobid]
        started = WARM_STARTED.search(log.read_text())
        assert started, f"group job {jobid} started no warm interpreter: {log}"
        served = re.findall(r"job \d+ train\.py: exit 0", Path(started.group(2)).read_text())
        assert len(served) == int(started.group(1)), (jobid, started.group(2))

    elapsed = _elapsed_s(ids)
    print(f"\n{STUDY} [{DATASET}] through Slurm: {sum(planned.values())} jobs, {len(ids)} submissions "
          f"({len(singles)} single, {len(groups)} groups: {dict(by_group)}); "
          f"dry run {dry_s:.0f} s, run {run_s:.0f} s, wall {time.time() - t0:.0f} s")
    for jobid, name in singles + groups:
        print(f"  {jobid:>8} {name:<22} {elapsed.get(jobid, float('nan')):>6.0f} s in Slurm")
