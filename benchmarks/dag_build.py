"""How long Snakemake takes to build a study's DAG (a dry run), per config.

    python benchmarks/dag_build.py [--config config/which-tokens.yaml ...] [--repeats 3]
                                   [--compare OTHER_CHECKOUT] [--slurm | --profile NAME]
                                   [--out results/benchmarks/dag_build.csv]

With ``--slurm`` every dry run is made twice, plain and with ``--profile
slurm``, the site profile installed by scripts/install_profile.py into a
temporary $XDG_CONFIG_HOME (as tests/test_slurm.py does; your own installed
profile is not used), and the two are printed side by side: the cost of the
profile's arrays (per-job uniform resources), groups and Slurm plan.

Dataset roots, checkpoints and other user inputs are pointed at empty
temporary files and folders (the dry run only checks that they exist). For
each config (and the demo's, for scale) it prints the jobs, the wall time of
``snakemake -n`` and its CPU time (user + system of the child, which a loaded
machine inflates much less than the wall time), and the
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


def timed(cmd: list[str], env: dict | None = None) -> tuple[Timing, subprocess.CompletedProcess]:
    """Run ``cmd``; its wall time and the CPU time of the child process tree."""
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
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
            profile: str | None = None, env: dict | None = None) -> tuple[Timing, int]:
    """``snakemake -n`` of ``repo``'s workflow with a config (and a profile,
    found through ``env``): its timing and job count."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(workdir), "-n", "--quiet", "rules"]
    if profile is not None:
        cmd += ["--profile", profile]
    if config_path is not None:
        cmd += ["--configfile", str(config_path)]
    timing, proc = timed(cmd, env)
    if proc.returncode != 0:
        raise SystemExit(f"snakemake -n failed for {config_path or 'the demo'}:\n{proc.stdout}{proc.stderr}")
    total = re.search(r"^total\s+(\d+)$", proc.stdout, re.MULTILINE)
    if total is None:
        raise SystemExit(f"no job count in the dry run's output for {config_path or 'the demo'}:\n{proc.stdout}")
    return timing, int(total.group(1))


def with_empty_roots(name: str, tmp: Path) -> Path:
    """A copy of a study config whose user-supplied inputs exist under ``tmp``
    (empty dataset and detection roots, empty checkpoint files, a class-name
    list: the tests' ``with_existing_inputs``); the dry run checks only that."""
    sys.path.insert(0, str(REPO / "tests"))
    from workflow_utils import with_existing_inputs  # the tests' helper (yaml and the standard library only)

    config = with_existing_inputs(yaml.safe_load(Path(name).read_text()), tmp / "inputs" / Path(name).stem)
    path = tmp / Path(name).name
    path.write_text(yaml.safe_dump(config))
    return path


def install_slurm_profile(config_home: Path) -> dict:
    """The site profile installed under ``config_home`` (no account, squeue
    status, so no Slurm is needed); the environment that finds it by name."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(config_home)}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "install_profile.py"), "--no-account",
                           "--partition", "p", "--status-command", "squeue"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"scripts/install_profile.py failed:\n{proc.stdout}{proc.stderr}")
    return env


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="*", default=sorted(str(p) for p in (REPO / "config").glob("*.yaml") if p.name != "config.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", type=Path, default=None, metavar="DIR",
                        help="another checkout of this repository: its dry runs alternate with this one's")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--profile", default=None,
                       help="a Snakemake profile (installed by name) for every dry run")
    which.add_argument("--slurm", action="store_true",
                       help="each dry run plain and with --profile slurm (installed into a temporary dir), side by side")
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
    rows = []  # (tree, config label, jobs, fastest Timing); tree "this+slurm" etc. with --slurm
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # (suffix, profile, environment) of each kind of dry run
        kinds = [("", args.profile, None)]
        if args.slurm:
            kinds = [("", None, None), ("+slurm", "slurm", install_slurm_profile(tmp / "xdg"))]
        configs = [("demo (config/config.yaml)", None)] + [(name, with_empty_roots(name, tmp)) for name in args.config]
        starts = []
        for label, path in configs:
            runs: dict[str, list[tuple[Timing, int]]] = {tree + suffix: [] for tree in trees for suffix, _, _ in kinds}
            # start-up and the dry runs interleaved, so a change of load hits all alike
            for _ in range(args.repeats):
                starts.append(startup())
                for tree, root in trees.items():
                    for suffix, profile, env in kinds:
                        workdir = tmp / tree / ("demo" if path is None else path.stem)
                        runs[tree + suffix].append(dry_run(path, workdir, root, profile, env))
            for name, timings in runs.items():
                rows.append((name, label, timings[0][1], fastest([t for t, _ in timings])))
    start = fastest(starts)
    print(f"load average before: {load_before}, after: {load()}  ({os.cpu_count()} CPUs)")
    print(f"snakemake --version (start-up): wall {start.wall:.2f} s, cpu {start.cpu:.2f} s")
    if args.profile:
        print(f"dry runs with --profile {args.profile}")
    if args.slurm:
        print("side by side: plain dry run | with --profile slurm (fastest of the repeats; wall and CPU seconds)")
        print(f"{'config':32s} {'jobs':>6s} {'plain wall':>11s} {'plain cpu':>10s} {'slurm wall':>11s} {'slurm cpu':>10s}")
        by = {(tree, label): (jobs, t) for tree, label, jobs, t in rows}
        for tree in trees:
            for label, _ in configs:
                jobs, plain = by[(tree, label)]
                _, slurm = by[(tree + "+slurm", label)]
                print(f"{label:32s} {jobs:6d} {plain.wall:11.2f} {plain.cpu:10.2f} {slurm.wall:11.2f} {slurm.cpu:10.2f}"
                      + (f"  ({tree})" if len(trees) > 1 else ""))
    if args.compare is not None:
        print(f"this: {REPO}\ncompare: {args.compare.resolve()}")
    print(f"{'tree':14s} {'config':32s} {'jobs':>6s} {'wall (s)':>9s} {'cpu (s)':>8s} {'build wall':>11s} {'build cpu':>10s}")
    for tree, label, jobs, t in rows:
        print(f"{tree:14s} {label:32s} {jobs:6d} {t.wall:9.2f} {t.cpu:8.2f} {t.wall - start.wall:11.2f} {t.cpu - start.cpu:10.2f}")
    if args.compare is not None:
        print("build cpu, this / compare:")
        ours = {(tree[len("this"):], label): t for tree, label, _, t in rows if tree.startswith("this")}
        for tree, label, _, t in rows:
            if tree.startswith("compare"):
                suffix = tree[len("compare"):]
                ratio = (ours[(suffix, label)].cpu - start.cpu) / (t.cpu - start.cpu)
                print(f"  {label + suffix:32s} {ratio:.2f}")
    with atomic_path(args.out) as out:
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["tree", "root", "config", "jobs", "wall_s", "cpu_s", "startup_wall_s", "startup_cpu_s",
                             "build_wall_s", "build_cpu_s"])
            for tree, label, jobs, t in rows:
                writer.writerow([tree, trees[tree.split("+")[0]], label, jobs, f"{t.wall:.3f}", f"{t.cpu:.3f}", f"{start.wall:.3f}",
                                 f"{start.cpu:.3f}", f"{t.wall - start.wall:.3f}", f"{t.cpu - start.cpu:.3f}"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
