"""The workflow on a real Slurm (one node on localhost, started by
`bash .ci/slurm.sh start`): the site profile installed by name, every job
through sbatch, no-op and partial reruns, and a training job killed with
scancel that resumes from its checkpoint on the retry.

Skipped, with the reason, where no Slurm answers; never in CI (CI set): there
.ci/run starts Slurm first, so a missing Slurm is a failure.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_workflow import tiny_demo_config
from workflow_utils import REPO, SNAKEMAKE, planned_jobs, write_config

INSTALLER = REPO / "scripts" / "install_profile.py"
PROFILE_NAME = "slurm"
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
FINETUNE_RUN = "digits/tiny/{method}/kr0.5/seed0"
# the training spine of the demo (data, pretraining, fine-tuning, evaluation,
# summary); the analysis, benchmark and report stages run as in test_workflow
def summary_target(tmp_path: Path) -> str:
    return str(tmp_path / "results" / "summary" / "metrics.csv")


# ------------------------------------------------------------------ helpers


def slurm_unavailable() -> str | None:
    """Why no Slurm can run jobs here (None when one can)."""
    for tool in ("sinfo", "sbatch", "squeue", "scancel"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out (no slurmctld answers)"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip() or proc.stdout.strip()}"
    states = {s.strip().rstrip("*~#") for s in proc.stdout.split()}
    if not states & {"idle", "mix", "mixed", "alloc", "allocated", "comp", "completing"}:
        return f"no Slurm node responds (node states: {sorted(states) or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm_partition() -> str:
    """The partition the tests submit to: `ci` when .ci/slurm.sh made one (not
    the cluster default, so a profile whose partition is lost shows up), else
    the default partition."""
    reason = slurm_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but Slurm is not available ({reason}); .ci/run must run `bash .ci/slurm.sh start` first")
        pytest.skip(f"Slurm is not available: {reason} (start one with `bash .ci/slurm.sh start` as root)")
    parts = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout.split()
    names = [p.rstrip("*") for p in parts]
    if "ci" in names:
        return "ci"
    default = [p.rstrip("*") for p in parts if p.endswith("*")]
    return (default or names)[0]


def install_profile(config_home: Path, *args: str) -> Path:
    env = {**os.environ, "XDG_CONFIG_HOME": str(config_home)}
    proc = subprocess.run([sys.executable, str(INSTALLER), *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return config_home / "snakemake" / PROFILE_NAME / "config.yaml"


def snakemake_cmd(args: list[str], workdir: Path, limit: int) -> list[str]:
    """A Snakemake call bounded by `timeout -k` (Snakemake can ignore SIGTERM
    while it waits on a cluster)."""
    return ["timeout", "-k", "20", str(limit), *SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]


def snakemake_env(config_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["XDG_CONFIG_HOME"] = str(config_home)  # where --profile slurm is found
    env.setdefault("WANDB_MODE", "offline")
    return env


# the profile as users run it, with a quick first status check for the tests
# (one CPU per job lets two jobs share this 2-core node)
SLURM_ARGS = [
    "--profile", PROFILE_NAME,
    "--slurm-init-seconds-before-status-checks", "2",
    "--set-threads", "pretrain=1", "finetune=1", "evaluate=1",
]


def run_slurm(args: list[str], workdir: Path, config_home: Path, limit: int = 420) -> str:
    cmd = snakemake_cmd(args + SLURM_ARGS, workdir, limit)  # targets first
    proc = subprocess.run(cmd, capture_output=True, text=True, env=snakemake_env(config_home))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{out[-8000:]}"
    return out


ARRAY_SUBMITTED = re.compile(
    r"Submitted array job with Snakemake IDs ([\d,]+) and SLURM job ID (\d+)\. The individual task IDs are (\d+)-(\d+)\."
)


def snakemake_jobs(output: str) -> dict[str, tuple[str, str]]:
    """Snakemake job id -> (rule, wildcards line), from the job blocks Snakemake prints."""
    found: dict[str, tuple[str, str]] = {}
    rule, jobid = None, None
    for line in output.splitlines():
        text = line.strip()
        m = re.match(r"^(?:local)?rule (\w+):", text)
        if m:
            rule, jobid = m.group(1), None
        m = re.match(r"^jobid: (\d+)$", text)
        if m and rule:
            jobid = m.group(1)
            found[jobid] = (rule, "")
        if text.startswith("wildcards:") and jobid:
            found[jobid] = (rule, text[len("wildcards:"):].strip() + ",")
    return found


def snakemake_job_rules(output: str) -> dict[str, str]:
    return {jobid: rule for jobid, (rule, _) in snakemake_jobs(output).items()}


def submissions(output: str) -> list[tuple[str, str]]:
    """(Slurm job id, rule) of every job the executor submitted with sbatch,
    in order; an array's tasks as <array id>_<task>."""
    found = []
    for m in SUBMITTED.finditer(output):
        r = re.search(r"rule_(\w+)", m.group(2))
        found.append((m.start(), m.group(1), r.group(1) if r else "?"))
    rules = snakemake_job_rules(output)
    for m in ARRAY_SUBMITTED.finditer(output):
        ids, array_id, first = m.group(1).split(","), m.group(2), int(m.group(3))
        for k, snakemake_id in enumerate(ids):
            found.append((m.start(), f"{array_id}_{first + k}", rules.get(snakemake_id, "?")))
    return [(jobid, rule) for _, jobid, rule in sorted(found, key=lambda f: f[0])]


def arrays(output: str) -> list[list[str]]:
    """The Slurm ids of each array's tasks."""
    return [[f"{m.group(2)}_{k}" for k in range(int(m.group(3)), int(m.group(4)) + 1)]
            for m in ARRAY_SUBMITTED.finditer(output)]


def slurm_jobs(ids: list[str]) -> dict[str, dict[str, str]]:
    """State, partition and GPU request of finished or running jobs (squeue
    keeps them for MinJobAge; no accounting database needed)."""
    proc = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%P|%b"],
        capture_output=True, text=True, timeout=30,
    )
    jobs = {}
    for line in proc.stdout.splitlines():
        jobid, state, partition, tres = line.strip().split("|")
        jobs[jobid] = {"state": state, "partition": partition, "tres": tres}
    return jobs


def job_field(jobid: str, *names: str) -> str:
    """A field of `scontrol show job` (the first of `names` present)."""
    out = subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True, timeout=30).stdout
    for name in names:
        m = re.search(rf"\b{name}=(\S+)", out)
        if m:
            return m.group(1)
    return ""


def minutes(limit: str) -> int:
    """Slurm's [D-]HH:MM:SS as minutes."""
    days, _, clock = limit.rpartition("-")
    h, m, _s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 1440 + h * 60 + m


# ------------------------------------------------------------------ profile install (no Slurm needed)


def test_installer_fills_the_site_specifics(tmp_path):
    target = install_profile(tmp_path / "cfg", "--account", "proj42", "--partition", "gpu", "--gpu-model", "a100",
                             "--status-command", "squeue")
    assert target == tmp_path / "cfg" / "snakemake" / "slurm" / "config.yaml"
    profile = yaml.safe_load(target.read_text())
    assert profile["executor"] == "slurm"
    assert profile["default-resources"] == {"slurm_account": "proj42", "slurm_partition": "gpu", "max_runtime": 2880,
                                            "disk_mb": 1000}
    assert profile["slurm-status-command"] == "squeue"
    assert profile["retries"] >= 1 and "params" in profile["rerun-triggers"]
    assert profile["set-resources"]["finetune"] == {"gpu_model": "a100"}
    assert "slurm-no-account" not in profile
    assert "ACCOUNT" not in target.read_text().split("default-resources:")[1]

    # no account, cluster default partition
    other = install_profile(tmp_path / "cfg2", "--no-account", "--status-command", "sacct")
    profile = yaml.safe_load(other.read_text())
    assert profile["slurm-no-account"] is True and profile["slurm-status-command"] == "sacct"
    assert profile.get("default-resources") == {"max_runtime": 2880, "disk_mb": 1000} and "set-resources" not in profile

    # an existing, different profile is kept unless --force
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    proc = subprocess.run([sys.executable, str(INSTALLER), "--account", "other"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "--force" in proc.stderr
    assert "proj42" in target.read_text()
    proc = subprocess.run([sys.executable, str(INSTALLER), "--account", "bad name"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "bad name" in proc.stderr


def test_installed_profile_is_found_by_name_and_its_resources_reach_every_job(tmp_path):
    """`snakemake --profile slurm` finds the installed profile, and the site's
    account and partition survive the workflow profile (profiles/default is
    loaded after it and replaces any top-level key it also sets)."""
    config_home = tmp_path / "cfg"
    install_profile(config_home, "--account", "proj42", "--partition", "part7", "--status-command", "squeue")
    config = tiny_demo_config(tmp_path)
    path = write_config(tmp_path / "demo.yaml", config)
    cmd = snakemake_cmd([summary_target(tmp_path), "--profile", PROFILE_NAME, "-n", "--configfile", str(path)], tmp_path, 120)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=snakemake_env(config_home))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert f"Using profiles {PROFILE_NAME}" in out or f"Using profile {PROFILE_NAME}" in out, out[:2000]
    resources = [line for line in out.splitlines() if line.strip().startswith("resources:")]
    jobs = planned_jobs(out)
    remote = sum(n for rule, n in jobs.items() if rule != "summarise")
    assert remote >= 4, jobs
    with_site = [line for line in resources if "slurm_account=proj42" in line and "slurm_partition=part7" in line]
    assert len(with_site) >= remote, "the site profile's default-resources were dropped:\n" + "\n".join(resources)


# ------------------------------------------------------------------ real Slurm


@pytest.mark.slurm
@pytest.mark.slow
def test_demo_on_slurm_reruns_nothing_reruns_only_what_changed_and_resumes(tmp_path, slurm_partition):
    t0 = time.time()
    config_home = tmp_path / "cfg"
    install_profile(config_home, "--no-account", "--partition", slurm_partition, "--status-command", "squeue")
    # slurm_partition appears in sbatch only through the installed profile

    config = tiny_demo_config(tmp_path)
    config["experiments"][0]["methods"] = ["evit"]  # baseline + one method: 6 Slurm jobs
    # GPU tags on the fake GPUs; the jobs are told to train on the CPU (a
    # job that asks for a GPU otherwise fails where CUDA is not usable)
    config.setdefault("resources", {}).update(gpus_per_train_job=1, gpus_per_eval_job=0, device="cpu")
    path = write_config(tmp_path / "demo.yaml", config)

    # ---- 1. the reduced demo: every non-local job through sbatch
    out = run_slurm([summary_target(tmp_path), "--configfile", str(path)], tmp_path, config_home)
    subs = submissions(out)
    rules = sorted(rule for _, rule in subs)
    assert rules == sorted(["prepare_dataset", "pretrain"] + ["finetune"] * 2 + ["evaluate"] * 2), out[-4000:]
    jobs = slurm_jobs([jobid for jobid, _ in subs])
    assert set(jobs) == {jobid for jobid, _ in subs}
    assert all(j["state"] == "COMPLETED" for j in jobs.values()), jobs
    assert all(j["partition"] == slurm_partition for j in jobs.values()), jobs
    for jobid, rule in subs:
        gres = job_field(jobid, "TresPerJob", "TresPerNode")
        if rule in ("finetune", "pretrain"):
            assert "gpu:1" in gres, (rule, gres)  # gpu=1 became --gpus=1
        else:
            assert "gpu" not in gres, (rule, gres)
    results = tmp_path / "results"
    assert (results / "summary" / "metrics.csv").stat().st_size > 0
    for method in ("deit", "evit"):
        run = FINETUNE_RUN.format(method=method).replace("deit/kr0.5", "deit/kr1")
        assert (results / "finetune" / run / "final.pth").stat().st_size > 0
        metrics = json.loads((results / "eval" / run / "metrics.json").read_text())
        assert 0 <= metrics["value"] <= 100
        assert bool(metrics["tokens_kept"]) == (method != "deit")

    print(f"{time.time() - t0:.0f} s: run 1 done; second run", flush=True)
    # ---- 2. a second run submits nothing
    out = run_slurm([summary_target(tmp_path), "--configfile", str(path)], tmp_path, config_home)
    assert "Nothing to be done" in out and not submissions(out), out[-3000:]

    print(f"{time.time() - t0:.0f} s: changed method option", flush=True)
    # ---- 3. one method's option changed: only its jobs are submitted
    changed = copy.deepcopy(config)
    changed["methods"]["evit"]["fuse_token"] = False
    # ... and it trains on two (fake) GPUs: --gpus=2 and torchrun, two processes
    changed["resources"]["gpus_per_train_job"] = 2
    path2 = write_config(tmp_path / "demo2.yaml", changed)
    out = run_slurm([summary_target(tmp_path), "--configfile", str(path2)], tmp_path, config_home)
    subs = submissions(out)
    assert sorted(rule for _, rule in subs) == ["evaluate", "finetune"], out[-4000:]
    assert all(j["state"] == "COMPLETED" for j in slurm_jobs([i for i, _ in subs]).values())
    assert all("_evit_" in log for _, log in SUBMITTED.findall(out)), out[-4000:]
    finetune_id = next(jobid for jobid, rule in subs if rule == "finetune")
    assert "gpu:2" in job_field(finetune_id, "TresPerJob", "TresPerNode")
    evit_run = results / "finetune" / FINETUNE_RUN.format(method="evit")
    assert json.loads((evit_run / "train_metrics.json").read_text())["world_size"] == 2

    print(f"{time.time() - t0:.0f} s: scancel and resume", flush=True)
    # ---- 4. arrays: both fine-tunes rerun (a longer recipe for digits only:
    # the pretraining spec stays the same) as ONE array of two tasks; one task
    # killed with scancel is retried alone (attempt 2: its runtime doubled)
    # and resumes from its checkpoint; the run finishes
    longer = copy.deepcopy(changed)
    longer["datasets"]["digits"]["recipe"] = {"epochs": 2, "max_steps": None, "log_every": 5, "batch_size": 16}
    longer["resources"]["gpus_per_train_job"] = 1
    path3 = write_config(tmp_path / "demo3.yaml", longer)
    run = FINETUNE_RUN.format(method="evit")
    target = results / "finetune" / run / "final.pth"
    train_log = results / "logs" / "finetune" / f"{run}.log"
    cmd = snakemake_cmd([summary_target(tmp_path), *SLURM_ARGS, "--configfile", str(path3)], tmp_path, 480)
    log_path = tmp_path / "resume.out"
    train_log.unlink()  # step 3's log of the same run already has progress lines: wait for this run's own
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=snakemake_env(config_home))
        try:
            killed = _wait_for_training(log_path, train_log, proc, method="evit")
            subprocess.run(["scancel", killed], check=True, timeout=30)
            rc = proc.wait(timeout=460)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log_path.read_text()
    assert rc == 0, out[-6000:]
    subs = submissions(out)
    finetunes = [jobid for jobid, rule in subs if rule == "finetune"]
    tasks = arrays(out)[0]
    assert finetunes[:2] == tasks and len(tasks) == 2, out[-4000:]  # the two fine-tunes: one array
    assert killed in tasks and len(finetunes) == 3 and "_" not in finetunes[2], finetunes  # the retry: alone
    retry = finetunes[2]
    states = slurm_jobs(finetunes)
    other = next(t for t in tasks if t != killed)
    assert states[killed]["state"] == "CANCELLED", states
    assert states[other]["state"] == "COMPLETED" and states[retry]["state"] == "COMPLETED", states
    # every task of the array asks for the same time; the retry is attempt 2: doubled
    limits = {jobid: minutes(job_field(jobid, "TimeLimit")) for jobid in finetunes}
    assert limits[tasks[0]] == limits[tasks[1]] > 0 and limits[retry] == 2 * limits[killed], limits
    log = train_log.read_text()
    m = re.search(r"resumed from \S+: epoch (\d+), batch (\d+), step (\d+)", log)
    assert m and int(m.group(3)) > 0, log[-3000:]
    metrics = json.loads((results / "finetune" / run / "train_metrics.json").read_text())
    assert metrics["epochs_completed"] == 2 and metrics["steps"] > int(m.group(3))
    assert target.stat().st_size > 0
    # the stage table from what the jobs recorded: positive job seconds for every stage that ran
    stages = (results / "logs" / "stage_times.tsv").read_text().splitlines()[1:]
    ran = {line.split("\t")[0]: float(line.split("\t")[2]) for line in stages}
    assert {"finetune", "evaluate", "summarise"} <= set(ran) and all(v > 0 for v in ran.values()), ran

    print(f"{time.time() - t0:.0f} s: requeue (preemption)", flush=True)
    # ---- 5. preemption: a third epoch reruns both fine-tunes as one array;
    # a running task is requeued by Slurm itself (`scontrol requeue`, what
    # preemption with PreemptMode=REQUEUE does): it gets SIGTERM, checkpoints,
    # runs again under the same job id and resumes; Snakemake waits for it
    # (no retry, no new submission) and the run finishes
    third = copy.deepcopy(longer)
    third["datasets"]["digits"]["recipe"]["epochs"] = 3
    path4 = write_config(tmp_path / "demo4.yaml", third)
    cmd = snakemake_cmd([summary_target(tmp_path), *SLURM_ARGS, "--configfile", str(path4)], tmp_path, 540)
    log_path = tmp_path / "requeue.out"
    train_log.unlink()
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=snakemake_env(config_home))
        try:
            requeued = _wait_for_training(log_path, train_log, proc, method="evit")
            subprocess.run(["scontrol", "requeue", requeued], check=True, timeout=30)
            rc = proc.wait(timeout=520)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log_path.read_text()
    assert rc == 0, out[-6000:]
    finetunes = [jobid for jobid, rule in submissions(out) if rule == "finetune"]
    tasks = arrays(out)[0]
    assert finetunes == tasks and len(tasks) == 2 and requeued in tasks, (finetunes, out[-4000:])
    assert job_field(requeued, "Restarts") == "1", subprocess.run(
        ["scontrol", "show", "job", requeued], capture_output=True, text=True).stdout
    assert all(j["state"] == "COMPLETED" for j in slurm_jobs(tasks).values())
    log = train_log.read_text()  # the requeued run's own log (the first one's was overwritten)
    m = re.search(r"resumed from \S+: epoch (\d+), batch (\d+), step (\d+)", log)
    assert m and int(m.group(3)) > 0, log[-3000:]
    metrics = json.loads((results / "finetune" / run / "train_metrics.json").read_text())
    assert metrics["epochs_completed"] == 3 and metrics["steps"] > int(m.group(3)), metrics
    print(f"slurm test took {time.time() - t0:.0f} s")


def _wait_for_training(out_path: Path, train_log: Path, proc: subprocess.Popen, method: str,
                       limit: float = 240) -> str:
    """The Slurm id (an array task's <id>_<n>) of `method`'s finetune job once
    its trainer logged a few steps."""
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("snakemake ended before the job could be killed:\n" + out_path.read_text()[-4000:])
        out = out_path.read_text()
        if train_log.exists() and re.search(r"train step (\d*[1-9]\d*)\b[^\n]*, loss ", train_log.read_text()):
            jobs = snakemake_jobs(out)
            ids = [i for i, (rule, wildcards) in jobs.items() if rule == "finetune" and f"method={method}," in wildcards]
            for m in ARRAY_SUBMITTED.finditer(out):
                for k, snakemake_id in enumerate(m.group(1).split(",")):
                    if snakemake_id in ids:
                        return f"{m.group(2)}_{int(m.group(3)) + k}"
            for m in SUBMITTED.finditer(out):
                if re.match(rf"Job ({'|'.join(ids) or '-'}) has", m.group(0)):
                    return m.group(1)
        time.sleep(0.5)
    raise AssertionError("training never started:\n" + out_path.read_text()[-4000:])
