"""A study rehearsed through a real Slurm (issue 25): `config/which-tokens.yaml`
restricted to one dataset (``rehearse=true 'rehearse_datasets=[nabirds]'``,
291 jobs: 135 fine-tunes, 135 evaluations, the patterns, analysis, summary and
report), submitted with the site profile that ``scripts/install_profile.py
--no-account --partition <ci partition>`` installs, its arrays as the profile
configures them (``slurm-array-jobs: finetune,evaluate``).

The smallest slice of the three studies that still runs every stage of the
training-and-analysis chain once (docs/slurm.md, "Rehearsing through Slurm":
which-tokens 291 jobs per dataset, CLCA 384+ per dataset; ATC's OTS, MAE and
diffusion stages need its ImageNet, which is its largest slice).

Asserted from squeue (the local Slurm keeps finished jobs for MinJobAge; it
has no accounting database for sacct): the fine-tunes and evaluations ran as
array tasks, every job submitted finished COMPLETED in the profile's
partition, and the summary, analysis tables and report exist. The test prints
each rule's Slurm elapsed time against the job's own time (its benchmark
file): the difference is the in-job overhead (Snakemake's start in the job).

Opt-in (``TOKENREDUCTION_SLURM_REHEARSAL=1``), not yet part of CI: on the
2-CPU local Slurm every job pays ~20 s outside its command (the plugin starts
Snakemake twice per job), so the 291 jobs need ~60 min at a load of ~9 and
~30 min idle, more than CI's budget (docs/slurm.md, "Rehearsing through
Slurm"). The run on 2026-12-07 (array limit 40) had 152 jobs (75 fine-tunes, 71
evaluations) finished, none failed, after 35 min when it was stopped. When opted
in it is skipped, with the reason, where no Slurm answers.
Runs hold /tmp/slurm-test.lock (flock) so that they do not share the one-node
Slurm with another test run on the same machine.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_slurm import (  # noqa: F401  (slurm_partition is a fixture)
    SLURM_ARGS, arrays, install_profile, slurm_jobs, slurm_partition, snakemake_cmd, snakemake_env, submissions,
)
from workflow_utils import REPO, planned_jobs

STUDY = "which-tokens"
DATASET = "nabirds"
REHEARSAL = ["--configfile", str(REPO / "config" / f"{STUDY}.yaml"),
             "--config", "rehearse=true", f"rehearse_datasets=[{DATASET}]"]
LOCK = Path(os.environ.get("SLURM_TEST_LOCK", "/tmp/slurm-test.lock"))
LOCK_WAIT_S = 1800
LIMIT_S = 3000


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


def _benchmark_s(results: Path) -> dict[str, list[float]]:
    """Each rule's job seconds from its benchmark files (rule = first folder)."""
    per_rule: dict[str, list[float]] = defaultdict(list)
    for path in (results / "benchmarks").rglob("*.tsv"):
        rule = path.relative_to(results / "benchmarks").parts[0]
        per_rule[rule].append(float(pd.read_csv(path, sep="\t")["s"].iloc[0]))
    return per_rule


@pytest.mark.skipif(os.environ.get("TOKENREDUCTION_SLURM_REHEARSAL") != "1",
                    reason="the one-dataset rehearsal through Slurm (~30-60 min on 2 CPUs) is opt-in: "
                           "TOKENREDUCTION_SLURM_REHEARSAL=1")
@pytest.mark.slurm
@pytest.mark.slow
def test_rehearsal_of_one_dataset_through_slurm(tmp_path, slurm_partition, slurm_lock):
    t0 = time.time()
    config_home = tmp_path / "cfg"
    profile = yaml.safe_load(install_profile(config_home, "--no-account", "--partition", slurm_partition,
                                             "--status-command", "squeue").read_text())
    grouped = {item.split("=")[0] for item in profile.get("groups") or []}  # one group submission each set
    env = snakemake_env(config_home)

    dry = subprocess.run(snakemake_cmd(["-n", *REHEARSAL, "--profile", "slurm"], tmp_path, 600),
                         capture_output=True, text=True, env=env)
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-6000:]
    planned = planned_jobs(dry.stdout + dry.stderr)
    for rule in ("finetune", "evaluate", "pattern_grid", "analysis_compare", "analysis_collate", "analysis_correlate",
                 "token_statistics", "summarise", "report_tables"):
        assert planned.get(rule), (rule, planned)
    assert planned["finetune"] == planned["evaluate"] > 1
    dry_s = time.time() - t0

    # the whole slice through sbatch: the site profile as users run it
    proc = subprocess.run(snakemake_cmd([*REHEARSAL, *SLURM_ARGS], tmp_path, LIMIT_S), capture_output=True, text=True,
                          env=env)
    out = proc.stdout + proc.stderr
    (tmp_path / "snakemake.out").write_text(out)
    assert proc.returncode == 0, f"the rehearsal through Slurm failed ({proc.returncode}):\n{out[-8000:]}"
    run_s = time.time() - t0 - dry_s

    subs = submissions(out)
    submitted = Counter(rule for _, rule in subs)
    local = {"all", "manifest", "summarise", "report_config", "report_section", "report_tables"}
    # every job went through sbatch once (no retry was needed), the grouped ones in group submissions ("?")
    expected = Counter({r: n for r, n in planned.items() if r not in local | grouped and n})
    assert Counter({r: n for r, n in submitted.items() if r != "?"}) == expected, (submitted, planned)
    assert 1 <= submitted["?"] <= sum(planned.get(r, 0) for r in grouped), submitted
    # the fine-tunes and evaluations as array tasks (<array id>_<task>), in arrays of several tasks
    tasks = {jobid for array in arrays(out) for jobid in array}
    for rule in ("finetune", "evaluate"):
        ids = [jobid for jobid, r in subs if r == rule]
        assert ids and all("_" in jobid and jobid in tasks for jobid in ids), (rule, ids[:5])
    assert max(len(a) for a in arrays(out)) > 1
    states = slurm_jobs([jobid for jobid, _ in subs])
    assert set(states) == {jobid for jobid, _ in subs}, "squeue lost jobs (MinJobAge too short?)"
    assert all(s["state"] == "COMPLETED" for s in states.values()), {k: v for k, v in states.items()
                                                                     if v["state"] != "COMPLETED"}
    assert all(s["partition"] == slurm_partition for s in states.values())

    results = tmp_path / "results" / f"{STUDY}-rehearsal"
    summary = pd.read_csv(results / "summary" / "metrics.csv")
    assert len(summary) == planned["evaluate"] and set(summary["dataset"]) == {DATASET}
    for axis in ("rates", "capacity", "models"):
        for table in (f"collated_{axis}.csv", f"correlations_{axis}.csv"):
            assert len(pd.read_csv(results / "analysis" / DATASET / table)) > 0, table
    for path in ("analysis/heatmap_comparison.csv", f"analysis/{DATASET}/token_stats.json",
                 f"patterns/{DATASET}/pattern_grid.png", "report/summary.html", "report/analysis.html", "README.md"):
        assert (results / path).stat().st_size > 0, path

    # the in-job overhead: Slurm's elapsed time against the job's own (benchmark) time
    elapsed = _elapsed_s([jobid for jobid, _ in subs])
    by_rule: dict[str, list[float]] = defaultdict(list)
    for jobid, rule in subs:
        by_rule[rule].append(elapsed[jobid])
    own = _benchmark_s(results)
    print(f"\n{STUDY} [{DATASET}] through Slurm: {sum(planned.values())} jobs ({len(subs)} through sbatch); "
          f"dry run {dry_s:.0f} s, run {run_s:.0f} s")
    print(f"{'rule':<22} {'jobs':>5} {'Slurm s (mean)':>14} {'job s (mean)':>12}")
    for rule, values in sorted(by_rule.items(), key=lambda kv: -sum(kv[1])):
        mine = own.get(rule) or [float("nan")]
        print(f"{rule:<22} {len(values):>5} {sum(values) / len(values):>14.1f} {sum(mine) / len(mine):>12.1f}")
