"""Snakemake's job selectors side by side: CPU of a local run under
``--scheduler greedy`` (the workflow profile's choice) and ``ilp`` (Snakemake's
default), on a synthetic DAG shaped like a study's per-run stage: ``n`` ready
jobs at once (a fine-tune each), each followed by one dependent job (its
evaluation), trivial commands. What differs is only the scheduler's own work.

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


def run(selector: str, runs: int, workdir: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one local run of the synthetic DAG under ``selector``."""
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "data").mkdir(parents=True)
    for name in ("train.txt", "spec.txt"):
        (workdir / "data" / name).write_text(name + "\n")
    (workdir / "Snakefile").write_text(SNAKEFILE.format(runs=runs))
    snakemake = Path(sys.executable).with_name("snakemake")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([str(snakemake), "--cores", "2", "--scheduler", selector, "--quiet", "all"],
                   cwd=workdir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=400, help="fine-tune/evaluate pairs (2 x runs jobs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {s: run(s, args.runs, Path(tmp) / s) for s in ("greedy", "ilp")}
    jobs = 2 * args.runs + 1
    for selector, (wall, cpu) in results.items():
        print(f"{selector:7s} {jobs} jobs: wall {wall:7.1f} s  CPU {cpu:7.1f} s  ({1000 * cpu / jobs:.0f} ms CPU per job)")
    print(f"ilp / greedy: wall {results['ilp'][0] / results['greedy'][0]:.2f}x, CPU {results['ilp'][1] / results['greedy'][1]:.2f}x")


if __name__ == "__main__":
    main()
