"""Snakemake's scheduling cost side by side: CPU of a local run under
``--scheduler ilp`` (Snakemake's default), ``greedy``, and the workflow
profile's choice (greedy by priority only, with the input-size survey skipped:
workflow/lib/scheduler_speed.py), on a synthetic DAG shaped like a study's
per-run stage: ``n`` ready jobs at once (a fine-tune each), each followed by one
dependent job (its evaluation), trivial commands. What differs is only the
scheduler's own work.

    python benchmarks/scheduler.py [--runs 400]

Prints wall and CPU (user+sys of Snakemake and its children) per selector and
their ratio.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SKIP_SIZES = """
import importlib.util
_spec = importlib.util.spec_from_file_location("scheduler_speed", {lib!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
assert _module.install()
"""
LIB = Path(__file__).resolve().parents[1] / "workflow" / "lib" / "scheduler_speed.py"
#: name -> (Snakemake options, load workflow/lib/scheduler_speed.py)
VARIANTS = {
    "ilp": (["--scheduler", "ilp"], False),
    "greedy": (["--scheduler", "greedy"], False),
    "profile": (["--scheduler", "greedy", "--scheduler-greedy-omit-prioritize-by-temp-and-input"], True),
}
SNAKEFILE = """
rule all:
    input: expand("out/evaluate/{{i}}.txt", i=range({runs}))
rule finetune:
    input: "data/train.txt", "data/spec.txt"
    output: "out/finetune/{{i}}.txt"
    shell: "cat {{input}} > {{output}}"
rule evaluate:
    input: "out/finetune/{{i}}.txt", "data/spec.txt"
    output: "out/evaluate/{{i}}.txt"
    shell: "cat {{input}} > {{output}}"
"""


def run(variant: str, runs: int, workdir: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one local run of the synthetic DAG under ``variant``."""
    options, skip_sizes = VARIANTS[variant]
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "data").mkdir(parents=True)
    for name in ("train.txt", "spec.txt"):
        (workdir / "data" / name).write_text(name + "\n")
    head = SKIP_SIZES.format(lib=str(LIB)) if skip_sizes else ""
    (workdir / "Snakefile").write_text(head + SNAKEFILE.format(runs=runs))
    snakemake = Path(sys.executable).with_name("snakemake")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([str(snakemake), "--cores", "2", *options, "--quiet", "all"],
                   cwd=workdir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=400, help="fine-tune/evaluate pairs (2 x runs jobs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {v: run(v, args.runs, Path(tmp) / v) for v in VARIANTS}
    jobs = 2 * args.runs + 1
    for variant, (wall, cpu) in results.items():
        print(f"{variant:7s} {jobs} jobs: wall {wall:7.1f} s  CPU {cpu:7.1f} s  ({1000 * cpu / jobs:.0f} ms CPU per job)")
    for other in ("ilp", "greedy"):
        print(f"{other} / profile: wall {results[other][0] / results['profile'][0]:.2f}x,"
              f" CPU {results[other][1] / results['profile'][1]:.2f}x")


if __name__ == "__main__":
    main()
