"""The Snakemake process killed mid-run (SIGKILL), then the same command again:
finished jobs are kept, incomplete ones rerun, and no file that looks complete
is partial; the stale-lock release that lets the same command run again; and
a corrupt image met by a job, with and without ``data.skip_bad_images``."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_workflow import tiny_demo_config
from workflow_utils import REPO, SNAKEMAKE, clean_env, write_config


def _stale_locks():
    """workflow/lib/stale_locks.py, loaded as the workflow loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenreduction_stale_locks", REPO / "workflow" / "lib" / "stale_locks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _decoded(folder: Path) -> set[Path]:
    """The output paths Snakemake keys its records by under `folder` (file
    names: urlsafe base64 of the path, split into '@'-prefixed sub-folders when long)."""
    out = set()
    if folder.is_dir():
        for f in folder.rglob("*"):
            if f.is_file():
                key = "".join(part.removeprefix("@") for part in f.relative_to(folder).parts)
                out.add(Path(base64.urlsafe_b64decode(key).decode()))
    return out


def _check_complete(results: Path) -> int:
    """Every file under `results` that looks complete (not a temporary
    '.name.*.tmp' of an atomic write, not a log) is whole: checkpoints load,
    JSON parses, CSV/TSV tables read, npz archives read every array.
    Returns the number of files checked."""
    from tokenreduction.safe_load import load_checkpoint_file

    checked = 0
    for f in sorted(results.rglob("*")):
        if not f.is_file() or f.name.startswith(".") or f.suffix == ".log":
            continue
        if f.suffix == ".pth":
            load_checkpoint_file(f)
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix in (".csv", ".tsv"):
            pd.read_csv(f, sep="\t" if f.suffix == ".tsv" else ",")
        elif f.suffix == ".npz":
            with np.load(f) as z:
                for name in z.files:
                    z[name]
        else:
            continue
        checked += 1
    return checked


@pytest.mark.slow
def test_snakemake_killed_mid_run_then_the_same_command_keeps_finished_jobs(tmp_path):
    config = tiny_demo_config(tmp_path)
    for stage in ("ots", "mae", "detection", "diffusion", "benchmark"):
        config.pop(stage, None)
    config.setdefault("resources", {})["threads_per_job"] = 1  # two jobs at once on --cores 2
    path = write_config(tmp_path / "demo.yaml", config)
    results = tmp_path / "results"
    runs = [("deit", "1"), ("topk", "0.5"), ("evit", "0.5")]
    targets = [str(results / "finetune" / "digits" / "tiny" / m / f"kr{k}" / "seed0" / "final.pth") for m, k in runs]
    cmd = SNAKEMAKE + ["-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), *targets,
                       "--cores", "2", "--configfile", str(path)]
    meta = tmp_path / ".snakemake"
    finetuned = results / "finetune"

    # first run: killed once a fine-tuning job has finished while another runs
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)
    deadline = time.time() + 600
    try:
        while True:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.time() < deadline, "no fine-tuning job finished in time"
            done = _decoded(meta / "metadata") - _decoded(meta / "incomplete")
            running = _decoded(meta / "incomplete")
            if any(finetuned in p.parents for p in done) and any(finetuned in p.parents for p in running):
                break
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the Snakemake process itself ...
        proc.wait()
        time.sleep(0.3)
    finally:
        try:  # ... then the jobs it ran, as when its session or node is lost
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_at = time.time_ns()
    finished = _decoded(meta / "metadata") - _decoded(meta / "incomplete")
    incomplete = _decoded(meta / "incomplete")
    assert list((meta / "locks").glob("*.lock")), "the killed run left no locks: nothing tested"
    assert any(finetuned in p.parents for p in incomplete)
    mtimes = {p: p.stat().st_mtime_ns for p in finished}
    assert _check_complete(results) >= 4  # manifest, pretrain outputs, a fine-tuning job's outputs

    # the same command again: the stale locks are released, only the unfinished jobs run
    second = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-6000:]
    assert "released the locks left by a Snakemake run" in out
    reasons = [line.strip() for line in second.stdout.splitlines() if line.strip().startswith(("rule ", "localrule ", "reason:"))]
    # finished jobs kept (in a shared checkout, editing the library meanwhile reruns them: see the reasons)
    assert {p: p.stat().st_mtime_ns for p in finished} == mtimes, reasons
    for p in incomplete:
        assert p.stat().st_mtime_ns > killed_at, p  # rerun
    for t in targets:
        assert Path(t).exists()
    assert not _decoded(meta / "incomplete")
    assert not list((meta / "locks").glob("*.lock")) if (meta / "locks").exists() else True
    assert _check_complete(results) >= 4 + 3 * 3

    # and a third run has nothing to do
    third = subprocess.run(cmd + ["-n"], capture_output=True, text=True, env=clean_env(), timeout=300)
    assert "Nothing to be done" in third.stdout + third.stderr, third.stdout[-3000:]

    # a truncated image in the dataset: the evaluation job fails naming the file;
    # with data.skip_bad_images (passed to the jobs by the workflow) it is skipped and counted in the log
    bad = sorted((tmp_path / "data" / "digits" / "val").rglob("*.png"))[0]
    bad.write_bytes(bad.read_bytes()[:60])
    evaluation = results / "eval" / "digits" / "tiny" / "deit" / "kr1" / "seed0" / "metrics.json"
    job_log = results / "logs" / "evaluate" / "digits" / "tiny" / "deit" / "kr1" / "seed0.log"
    base = SNAKEMAKE + ["-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), str(evaluation), "--cores", "2"]
    failed = subprocess.run(base + ["--configfile", str(path)], capture_output=True, text=True, env=clean_env(), timeout=600)
    assert failed.returncode != 0 and not evaluation.exists()
    assert f"image file {bad} is corrupt or truncated" in job_log.read_text()
    skip = write_config(tmp_path / "skip.yaml", {**config, "data": {"skip_bad_images": True}})
    ok = subprocess.run(base + ["--configfile", str(skip)], capture_output=True, text=True, env=clean_env(), timeout=600)
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-4000:]
    text = job_log.read_text()
    assert f"skipped bad image {bad}" in text and "1 bad image(s) skipped so far" in text
    assert json.loads(evaluation.read_text())["num_images"] > 0


def test_stale_locks_are_released_only_when_every_recorded_run_is_dead(tmp_path):
    sl = _stale_locks()
    meta = tmp_path / ".snakemake"
    (meta / "locks").mkdir(parents=True)
    lock = meta / "locks" / "0.output.lock"
    lock.write_text("/some/output\n")
    runs = meta / sl.RUNS_DIR
    runs.mkdir()

    # no record: locks of unknown origin are left alone
    assert sl.release_stale_locks(meta) == [] and lock.exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = "this-host"
    (runs / "dead.json").write_text(json.dumps({"host": host, "pid": dead.pid, "started": time.time() - 5}))
    me = {"host": host, "pid": os.getpid(), "started": __import__("psutil").Process().create_time()}
    (runs / "alive.json").write_text(json.dumps(me))
    # a live run: its locks stay, and so do the records
    assert sl.release_stale_locks(meta, host=host) == [] and lock.exists()
    assert (runs / "dead.json").exists() and (runs / "alive.json").exists()
    # a pid reused by another process (another start time) is not the run
    (runs / "alive.json").write_text(json.dumps({**me, "started": me["started"] - 1000}))
    # a run on another host: cannot be judged, so its locks stay
    (runs / "other.json").write_text(json.dumps({"host": "elsewhere", "pid": dead.pid, "started": 0}))
    assert sl.release_stale_locks(meta, host=host) == [] and lock.exists()
    (runs / "other.json").unlink()
    assert sl.release_stale_locks(meta, host=host) == [lock] and not lock.exists()
    assert not list(runs.glob("*.json"))  # the dead runs' records go with their locks
    # no locks: the records of dead runs are pruned
    (runs / "dead.json").write_text(json.dumps({"host": host, "pid": dead.pid, "started": time.time() - 5}))
    assert sl.release_stale_locks(meta, host=host) == [] and not (runs / "dead.json").exists()

    # register_run writes this process's record (removed at exit)
    path = sl.register_run(meta)
    record = json.loads(path.read_text())
    assert record["pid"] == os.getpid() and not sl.is_dead(record)
