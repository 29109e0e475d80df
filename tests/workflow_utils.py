"""Helpers for driving the Snakemake workflow from tests."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


#: PATH of a plain shell: no virtual environment on it, so a job that called a
#: bare `python` would get the system interpreter (without this package)
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a plain shell, as `env -i HOME=... PATH=...` gives:
    the workflow must find its interpreters by itself."""
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": CLEAN_PATH, "WANDB_MODE": "offline"}
    for name in ("TMPDIR", "LANG", "CI"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra)
    return env


def snakemake(args: list[str], workdir: Path, timeout: int = 900, check: bool = True,
              snakefile: Path | None = None) -> subprocess.CompletedProcess:
    """Run snakemake (`.venv/bin/python -m snakemake`) on the repository's
    Snakefile (or `snakefile`) with `workdir` as working directory (its own
    .snakemake metadata), in a clean environment, bounded in time."""
    snakefile = snakefile or REPO / "Snakefile"
    cmd = SNAKEMAKE + ["-s", str(snakefile), "--directory", str(workdir)] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_config(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / name).read_text())


def planned_jobs(output: str) -> dict[str, int]:
    """Job counts per rule from a dry run's 'Job stats' table."""
    counts: dict[str, int] = {}
    in_table = False
    for line in output.splitlines():
        if line.startswith("job") and "count" in line:
            in_table = True
            counts = {}
            continue
        if in_table:
            m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
            if m:
                if m.group(1) != "total":
                    counts[m.group(1)] = int(m.group(2))
            elif line.strip().startswith("---"):
                continue
            elif counts:
                in_table = False
    return counts


def planned_wildcards(output: str, rule: str) -> list[str]:
    """The wildcards lines of every planned job of `rule` in a dry run."""
    found = []
    current = None
    for line in output.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line.strip())
        if m:
            current = m.group(1)
        elif current == rule and line.strip().startswith("wildcards:"):
            found.append(line.strip()[len("wildcards:"):].strip())
    return found


def with_existing_roots(config: dict, tmp_path: Path) -> dict:
    """A study config whose dataset roots exist (empty folders), for dry runs."""
    for name, spec in config["datasets"].items():
        root = tmp_path / "data" / name
        root.mkdir(parents=True, exist_ok=True)
        spec["root"] = str(root)
    return config


def copy_tree(dst: Path) -> Path:
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".venv-mmdet", "results", ".snakemake", "__pycache__", "*.egg-info", ".pytest_cache"))
    return dst
