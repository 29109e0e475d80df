"""CPU time of CLCA's rehearsal jobs (fine-tune + evaluate at 448 px, 785
tokens) under the previous stand-ins and the current ones, side by side in
one run.

    python benchmarks/rehearsal_job_cpu.py [--methods tome-clca evit-clca dpcknn-clca deit-h2t] [--repeats 1]

* current: what ``--config rehearse=true`` makes now
  (``tokenreduction.rehearsal.standin.standin_config``): stand-in widths
  ranked within the study (CLCA's two base models -> 16 wide, 1 head) and
  val / test splits of 2 x 16 + 16 = 48 images;
* previous: every base model 32 wide with 2 heads
  (``standin_width``, the fixed size -> width table) and 80 val / test
  images (``SPLIT_SIZES``), the same recipe.

The jobs are the study's own commands, taken from Snakemake's dry run of a
narrowed CLCA config (one dataset, the given methods, keep rate 0.25; DeiT-III
and CLIP) with ``rehearse=true``; the previous cut's commands are the same with
the width, the stand-in paths and the pattern images replaced. Each job runs
as the warm interpreter runs it: forked from a process that has imported
``tokenreduction.rehearsal.warm.PRELOAD``, 1 thread, the script run as
``__main__``. Jobs alternate between the two cuts, so the load of the machine
weighs on both alike. Prints the CPU time (user + sys of the job) of each
fine-tune and evaluation and the ratio of the means.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import runpy
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tokenreduction.rehearsal import fabricate as fab  # noqa: E402
from tokenreduction.rehearsal import standin  # noqa: E402

DATASET = "soyageing"


def narrowed_config(results: Path, methods: list[str]) -> dict:
    cfg = yaml.safe_load((REPO / "config/clca.yaml").read_text())
    cfg["results"] = str(results)
    cfg["experiments"] = [{"datasets": [DATASET], "backbones": ["deit3", "clip"], "methods": methods,
                           "keep_rates": [0.25]}]
    return cfg


def job_commands(config_path: Path) -> list[list[str]]:
    """argv (script first) of every fine-tune and evaluate job of the dry run."""
    out = subprocess.run(
        [str(REPO / ".venv/bin/snakemake"), "-n", "-p", "--forceall", "--cores", "2", "--configfile", str(config_path),
         "--config", "rehearse=true", f"rehearse_datasets=[{DATASET}]"],
        cwd=REPO, capture_output=True, text=True, check=True).stdout
    jobs = []
    for line in out.splitlines():
        if not line.startswith("Shell command:") or not ("/scripts/train.py" in line or "/scripts/evaluate.py" in line):
            continue
        cmd = line[len("Shell command:"):].rsplit(" > ", 1)[0]  # less the log redirection
        argv = shlex.split(cmd.split('"$TOKENREDUCTION_PYTHON"', 1)[1].replace('"$@"', "", 1))
        jobs.append(argv)
    return jobs


def previous_plan(cfg: dict) -> list[dict]:
    """The stand-ins of the previous cut: the current plan with every
    backbone at its fixed size -> width stand-in and 80-image val / test."""
    _, plan = standin.standin_config({**cfg, "rehearse": True, "rehearse_datasets": [DATASET]})
    models = {spec["model"] for spec in cfg["backbones"].values()}
    for item in plan:
        if item["what"] == "dataset":
            item["splits"] = dict(standin.SPLIT_SIZES)
        elif item["what"] == "timm_weights" and item["model"] in models:
            dim, heads = standin.standin_width(item["model"], {})
            item["model_kwargs"] = {**item["model_kwargs"], "embed_dim": dim, "num_heads": heads}
        item["fingerprint"] = standin.standin_fingerprint(item)
    return plan


def previous_argv(argv: list[str], current_root: str, previous_root: str) -> list[str]:
    """A current job's argv for the previous cut: its paths under the previous
    results, 32 wide with 2 heads, 80 pattern images."""
    out = [a.replace(current_root, previous_root) for a in argv]
    if "--spec" in out:
        i = out.index("--spec") + 1
        spec = json.loads(out[i])
        dim, heads = standin.standin_width(spec["model"], {})
        spec["model_kwargs"].update(embed_dim=dim, num_heads=heads)
        out[i] = json.dumps(spec)
    if "--num-pattern-images" in out:
        out[out.index("--num-pattern-images") + 1] = str(min(standin.SPLIT_SIZES["val"], standin.SPLIT_SIZES["test"]))
    return out


def run_job(argv: list[str], log: Path) -> float:
    """CPU seconds (user + sys) of `argv` run in a fork, as the warm interpreter runs a job."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{Path(argv[0]).name} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["tome-clca", "evit-clca", "dpcknn-clca", "deit-h2t"])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each job per cut")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="rehearsal-cpu-") if args.workdir is None else None
    work = Path(args.workdir or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)

    current_cfg = narrowed_config(work / "current/clca", args.methods)
    config_path = work / "current.yaml"
    config_path.write_text(yaml.safe_dump(current_cfg))
    current_jobs = job_commands(config_path)  # its DAG build fabricates the current stand-ins
    current_root = standin.rehearsal_results(current_cfg["results"])
    previous_cfg = narrowed_config(work / "previous/clca", args.methods)
    previous_root = standin.rehearsal_results(previous_cfg["results"])
    for item in previous_plan(previous_cfg):
        if not fab.is_current(item):
            fab.fabricate(item)
    trains = [j for j in current_jobs if j[0].endswith("train.py")]
    evals = [j for j in current_jobs if j[0].endswith("evaluate.py")]
    # each evaluation after its fine-tune: the pair shares the run folder
    pairs = []
    for train in trains:
        run_dir = str(Path(train[train.index("--final") + 1]).parent)
        ev = next(e for e in evals if e[e.index("--checkpoint") + 1].startswith(run_dir + "/"))
        pairs.append((run_dir[len(current_root) + 1:], train, ev))

    for name in standin_preload():
        importlib.import_module(name.partition(":")[0])
    import torch

    torch.set_num_threads(1)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    cpu = {"previous": {"train": [], "evaluate": []}, "current": {"train": [], "evaluate": []}}
    print(f"{'run':58s} {'cut':9s} {'fine-tune':>9s} {'evaluate':>9s}")
    for repeat in range(args.repeats):
        for n, (run, train, ev) in enumerate(pairs):
            order = ("previous", "current") if (n + repeat) % 2 == 0 else ("current", "previous")
            for cut in order:
                argvs = (train, ev) if cut == "current" else (previous_argv(train, current_root, previous_root),
                                                            previous_argv(ev, current_root, previous_root))
                for argv in argvs:  # a fresh run: no resume from an earlier repeat
                    if "--final" in argv:
                        for f in Path(argv[argv.index("--final") + 1]).parent.glob("*.pth"):
                            f.unlink()
                t = run_job(argvs[0], logs / f"{cut}-{n}-{repeat}-train.log")
                e = run_job(argvs[1], logs / f"{cut}-{n}-{repeat}-evaluate.log")
                cpu[cut]["train"].append(t)
                cpu[cut]["evaluate"].append(e)
                print(f"{run:58s} {cut:9s} {t:8.2f}s {e:8.2f}s", flush=True)

    def mean(xs):
        return sum(xs) / len(xs)

    print()
    for job in ("train", "evaluate"):
        p, c = mean(cpu["previous"][job]), mean(cpu["current"][job])
        print(f"{'fine-tune' if job == 'train' else 'evaluate':9s} mean CPU: previous {p:.2f} s, current {c:.2f} s, "
              f"ratio {p / c:.2f}x")
    p = mean(cpu["previous"]["train"]) + mean(cpu["previous"]["evaluate"])
    c = mean(cpu["current"]["train"]) + mean(cpu["current"]["evaluate"])
    print(f"pair      mean CPU: previous {p:.2f} s, current {c:.2f} s, ratio {p / c:.2f}x "
          f"({len(pairs) * args.repeats} pairs per cut)")
    if tmp is not None:
        tmp.cleanup()


def standin_preload() -> tuple[str, ...]:
    from tokenreduction.rehearsal.warm import PRELOAD

    return PRELOAD


if __name__ == "__main__":
    main()
