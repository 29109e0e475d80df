"""What the workflow needs from the machine it runs on: the interpreter of its
jobs and, after a run, the time each stage took.

Plain Python without Snakemake or torch imports, loaded by
``workflow/rules/software.smk`` at DAG build (and by the tests).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from collections import defaultdict
from pathlib import Path

#: deployment methods under which every job runs in an environment that
#: Snakemake made for it (its own ``python`` first on PATH)
ENV_DEPLOYMENTS = {"conda", "apptainer"}


class InterpreterError(ValueError):
    """The configured interpreter does not exist."""


def resolve_path(path: str, root: Path) -> str:
    """An interpreter as configured: a bare command name stays as it is (found
    on PATH when the job runs), a relative path is taken from the repository
    root, ``~`` is expanded."""
    path = os.path.expanduser(str(path))
    if "/" not in path:
        return path
    return str(Path(path) if Path(path).is_absolute() else root / path)


def main_python(
    root: Path,
    configured: str | None = None,
    deployments: set[str] = frozenset(),
    executable: str | None = None,
    has_package=None,
) -> str:
    """The interpreter of the main environment's jobs (training, evaluation,
    analysis, diffusion, reports).

    In order: ``python`` under ``--sdm conda``/``apptainer`` (the environment
    Snakemake made for the job); the config's ``python:`` key when set; the
    interpreter running Snakemake when this package is importable from it
    (``.venv/bin/snakemake``, ``.venv/bin/python -m snakemake``); the
    repository's ``.venv/bin/python`` when it exists (a ``snakemake`` from
    elsewhere on PATH); else the Snakemake interpreter itself.
    ``has_package`` (default: ``importlib.util.find_spec``) says whether
    ``tokenreduction`` is importable from the Snakemake process.
    """
    if deployments & ENV_DEPLOYMENTS:
        return "python"
    if configured:
        python = resolve_path(configured, root)
        if "/" in python and not Path(python).exists():
            raise InterpreterError(f"invalid config at python: {python} does not exist")
        return python
    executable = executable or sys.executable
    if has_package is None:
        has_package = lambda: importlib.util.find_spec("tokenreduction") is not None  # noqa: E731
    if has_package():
        return executable
    venv = root / ".venv" / "bin" / "python"
    if venv.exists():
        return str(venv)
    return executable


def venv_of(python: str) -> Path | None:
    """The virtual environment folder of an interpreter path ``<venv>/bin/python``,
    else None (a bare command, or an interpreter outside a venv layout)."""
    path = Path(python)
    if "/" not in python or path.parent.name != "bin" or not path.name.startswith("python"):
        return None
    return path.parent.parent


def shell_quote(value: str) -> str:
    return shlex.quote(str(value))


# ---------------------------------------------------------------- stage times


def job_records(metadata_dir: Path, since: float = 0.0) -> list[dict]:
    """One record per job finished at or after ``since`` (seconds since the
    epoch), from Snakemake's per-output metadata files: rule, start, end. A job
    with several outputs has one file per output (same rule and job hash, end
    times a little apart): it counts once, from its first start to its last end."""
    jobs = {}
    if not Path(metadata_dir).is_dir():
        return []
    for path in Path(metadata_dir).rglob("*"):
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        start, end, rule = record.get("starttime"), record.get("endtime"), record.get("rule")
        if start is None or end is None or rule is None or record.get("incomplete"):
            continue
        if end < since:
            continue
        job_hash = record.get("job_hash")
        key = (rule, job_hash) if job_hash is not None else (rule, start, end)
        job = jobs.setdefault(key, {"rule": rule, "start": float(start), "end": float(end)})
        job["start"] = min(job["start"], float(start))
        job["end"] = max(job["end"], float(end))
    return sorted(jobs.values(), key=lambda j: (j["start"], j["rule"]))


def _benchmark_seconds(path: Path) -> float | None:
    """The wall seconds a job recorded in its Snakemake benchmark file (the
    ``s`` column, summed over repeats); None when unreadable."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if len(lines) < 2:
        return None
    header = lines[0].split("\t")
    if "s" not in header:
        return None
    col = header.index("s")
    total = 0.0
    for line in lines[1:]:
        cells = line.split("\t")
        try:
            total += float(cells[col])
        except (IndexError, ValueError):
            return None
    return total


def benchmark_records(root: Path, patterns: list[tuple[str, "re.Pattern"]], since: float = 0.0) -> list[dict]:
    """One record per job that wrote its benchmark file under ``root`` at or
    after ``since``: rule (the first of ``patterns``, (rule, regex of its
    benchmark path), that matches the path), end (the file's mtime: the job
    writes it as it ends), start (end minus the seconds it recorded). The job
    itself records both, on a laptop and in a Slurm allocation alike."""
    records = []
    root = Path(root)
    if not root.is_dir():
        return []
    for path in root.rglob("*.tsv"):
        try:
            end = path.stat().st_mtime
        except OSError:
            continue
        if end < since:
            continue
        rel = str(path)
        rule = next((name for name, regex in patterns if regex.match(rel)), None)
        seconds = _benchmark_seconds(path)
        if rule is None or seconds is None:
            continue
        records.append({"rule": rule, "start": end - seconds, "end": end})
    return sorted(records, key=lambda j: (j["start"], j["rule"]))


def run_records(metadata_dir: Path, benchmarks_root: Path, patterns: list[tuple[str, "re.Pattern"]],
                since: float = 0.0) -> list[dict]:
    """The jobs of a run: from their benchmark files for the rules that have
    one (every job rule: what the job records itself), from Snakemake's
    metadata for the others (the rules run in the Snakemake process)."""
    with_benchmark = {name for name, _ in patterns}
    records = benchmark_records(benchmarks_root, patterns, since)
    records += [r for r in job_records(metadata_dir, since) if r["rule"] not in with_benchmark]
    return sorted(records, key=lambda j: (j["start"], j["rule"]))


def stage_times(records: list[dict]) -> list[dict]:
    """Per rule: jobs, summed job time (s), and the wall-clock span from its
    first job's start to its last job's end (s), in order of first start."""
    by_rule: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_rule[record["rule"]].append(record)
    rows = []
    for rule, jobs in by_rule.items():
        first = min(j["start"] for j in jobs)
        last = max(j["end"] for j in jobs)
        rows.append(
            {
                "stage": rule,
                "jobs": len(jobs),
                "job_seconds": round(sum(j["end"] - j["start"] for j in jobs), 3),
                "first_start": first,
                "wall_seconds": round(last - first, 3),
            }
        )
    return sorted(rows, key=lambda r: r["first_start"])


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_stage_times(rows: list[dict], run_start: float, run_end: float) -> str:
    """A table for the terminal: per stage the jobs, the summed job time, and
    when (from the start of the run) it began and ended."""
    if not rows:
        return "stage times: no job ran"
    width = max(len("stage"), *(len(r["stage"]) for r in rows))
    lines = [
        f"{'stage':<{width}}  {'jobs':>5}  {'job time':>9}  {'from':>8}  {'to':>8}",
    ]
    for row in rows:
        begin = row["first_start"] - run_start
        lines.append(
            f"{row['stage']:<{width}}  {row['jobs']:>5}  {_clock(row['job_seconds']):>9}"
            f"  {_clock(max(begin, 0)):>8}  {_clock(max(begin, 0) + row['wall_seconds']):>8}"
        )
    lines.append(f"whole run: {_clock(run_end - run_start)} (h:mm:ss)")
    return "\n".join(lines)


def write_stage_times(rows: list[dict], path: Path) -> None:
    """The table as TSV (stage, jobs, job_seconds, wall_seconds), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    lines = ["stage\tjobs\tjob_seconds\twall_seconds"]
    lines += [f"{r['stage']}\t{r['jobs']}\t{r['job_seconds']}\t{r['wall_seconds']}" for r in rows]
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    """python workflow/lib/runtime.py [.snakemake/metadata] [--since EPOCH]:
    the stage times of the jobs recorded there."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("metadata", nargs="?", default=".snakemake/metadata")
    parser.add_argument("--since", type=float, default=0.0)
    args = parser.parse_args(argv)
    records = job_records(Path(args.metadata), args.since)
    rows = stage_times(records)
    start = min((r["start"] for r in records), default=0.0)
    end = max((r["end"] for r in records), default=0.0)
    print(format_stage_times(rows, start, end))


if __name__ == "__main__":
    main()
