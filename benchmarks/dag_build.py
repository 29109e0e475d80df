"""How long Snakemake takes to build a study's DAG (a dry run), per config.

    python benchmarks/dag_build.py [--config config/which-tokens.yaml ...] [--repeats 3]
                                   [--compare OTHER_CHECKOUT] [--profile slurm] [--out results/benchmarks/dag_build.csv]

Dataset roots are pointed at empty temporary folders (the dry run only checks
that they exist). For each config (and the demo's, for scale) it prints the
jobs, the wall time of ``snakemake -n`` and its CPU time (user + system of the
child, which a loaded machine inflates much less than the wall time), and the
same for ``snakemake --version``: Snakemake's own start-up (interpreter,
imports, executor plugins), which no workflow can shorten. ``build`` is the
dry run minus that start-up: the part this workflow's code and size decide
(parsing the rule files, validating the config, the jobs). Each figure is the
minimum over ``--repeats`` runs; the load average is printed with the table.
With ``--compare DIR`` (another checkout of this repository, e.g. a ``git
worktree`` of an older commit) each dry run is also made with DIR's Snakefile,
alternating with this one's, and the ratio of the two build CPU times printed.

Where the Slurm client is installed but its controller is not running (a
machine that ran ``.ci/slurm.sh`` and stopped it), the Slurm executor plugin's
import-time ``scontrol show config`` retries the connection for about 9 s in
every Snakemake start, whatever the executor: the start-up column shows it.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tokenreduction.io import atomic_path  # noqa: E402  (imports nothing heavy)


@dataclass(frozen=True)
class Timing:
    """One command's wall and CPU seconds (CPU: user + system of the child)."""

    wall: float
    cpu: float


def timed(cmd: list[str]) -> tuple[Timing, subprocess.CompletedProcess]:
    """Run ``cmd``; its wall time and the CPU time of the child process tree."""
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return Timing(wall, cpu), proc


def fastest(timings: list[Timing]) -> Timing:
    """Minimum over repeats, wall and CPU separately."""
    return Timing(min(t.wall for t in timings), min(t.cpu for t in timings))


def startup() -> Timing:
    """``snakemake --version``: interpreter, Snakemake's imports and its plugins."""
    timing, proc = timed([sys.executable, "-m", "snakemake", "--version"])
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    return timing


def dry_run(config_path: Path | None, workdir: Path, repo: Path = REPO,
            profile: str | None = None) -> tuple[Timing, int]:
    """``snakemake -n`` of ``repo``'s workflow with a config (and a profile):
    its timing and job count."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(workdir), "-n", "--quiet", "rules"]
    if profile is not None:
        cmd += ["--profile", profile]
    if config_path is not None:
        cmd += ["--configfile", str(config_path)]
    timing, proc = timed(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"snakemake -n failed for {config_path or 'the demo'}:\n{proc.stdout}{proc.stderr}")
    total = re.search(r"^total\s+(\d+)$", proc.stdout, re.MULTILINE)
    if total is None:
        raise SystemExit(f"no job count in the dry run's output for {config_path or 'the demo'}:\n{proc.stdout}")
    return timing, int(total.group(1))


def with_empty_roots(name: str, tmp: Path) -> Path:
    """A copy of a study config whose dataset roots are empty folders under ``tmp``."""
    config = yaml.safe_load(Path(name).read_text())
    for key, spec in config.get("datasets", {}).items():
        root = tmp / "roots" / key
        root.mkdir(parents=True, exist_ok=True)
        spec["root"] = str(root)
    path = tmp / Path(name).name
    path.write_text(yaml.safe_dump(config))
    return path


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="*", default=sorted(str(p) for p in (REPO / "config").glob("*.yaml") if p.name != "config.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", type=Path, default=None, metavar="DIR",
                        help="another checkout of this repository: its dry runs alternate with this one's")
    parser.add_argument("--profile", default=None,
                        help="a Snakemake profile for the dry runs, e.g. slurm (its groups, arrays and the Slurm plan)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/dag_build.csv"))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    for name in args.config:
        if not Path(name).is_file():
            parser.error(f"--config: no such file: {name}")
    trees = {"this": REPO}
    if args.compare is not None:
        if not (args.compare / "Snakefile").is_file():
            parser.error(f"--compare: no Snakefile in {args.compare}")
        trees = {"this": REPO, "compare": args.compare.resolve()}
    load_before = load()
    rows = []  # (tree, config label, jobs, fastest Timing)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        configs = [("demo (config/config.yaml)", None)] + [(name, with_empty_roots(name, tmp)) for name in args.config]
        starts = []
        for label, path in configs:
            runs: dict[str, list[tuple[Timing, int]]] = {tree: [] for tree in trees}
            # start-up and the trees' dry runs interleaved, so a change of load hits all alike
            for _ in range(args.repeats):
                starts.append(startup())
                for tree, root in trees.items():
                    workdir = tmp / tree / ("demo" if path is None else path.stem)
                    runs[tree].append(dry_run(path, workdir, root, args.profile))
            for tree in trees:
                rows.append((tree, label, runs[tree][0][1], fastest([t for t, _ in runs[tree]])))
    start = fastest(starts)
    print(f"load average before: {load_before}, after: {load()}  ({os.cpu_count()} CPUs)")
    print(f"snakemake --version (start-up): wall {start.wall:.2f} s, cpu {start.cpu:.2f} s")
    if args.profile:
        print(f"dry runs with --profile {args.profile}")
    if args.compare is not None:
        print(f"this: {REPO}\ncompare: {args.compare.resolve()}")
    print(f"{'tree':8s} {'config':32s} {'jobs':>6s} {'wall (s)':>9s} {'cpu (s)':>8s} {'build wall':>11s} {'build cpu':>10s}")
    for tree, label, jobs, t in rows:
        print(f"{tree:8s} {label:32s} {jobs:6d} {t.wall:9.2f} {t.cpu:8.2f} {t.wall - start.wall:11.2f} {t.cpu - start.cpu:10.2f}")
    if args.compare is not None:
        print("build cpu, this / compare:")
        ours = {label: t for tree, label, _, t in rows if tree == "this"}
        for tree, label, _, t in rows:
            if tree == "compare":
                print(f"  {label:32s} {(ours[label].cpu - start.cpu) / (t.cpu - start.cpu):.2f}")
    with atomic_path(args.out) as out:
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["tree", "root", "config", "jobs", "wall_s", "cpu_s", "startup_wall_s", "startup_cpu_s",
                             "build_wall_s", "build_cpu_s"])
            for tree, label, jobs, t in rows:
                writer.writerow([tree, trees[tree], label, jobs, f"{t.wall:.3f}", f"{t.cpu:.3f}", f"{start.wall:.3f}",
                                 f"{start.cpu:.3f}", f"{t.wall - start.wall:.3f}", f"{t.cpu - start.cpu:.3f}"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
