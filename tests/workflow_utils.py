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


def with_existing_inputs(config: dict, tmp_path: Path) -> dict:
    """A study config whose every user-supplied input exists, for dry runs:
    dataset roots and the detection root as empty folders, checkpoint files
    (OTS backbones, ViT-Adapter ``load_from``) as empty files, and a class-name
    list of 1000 lines for the diffusion stage."""
    config = with_existing_roots(config, tmp_path)
    for name, spec in (config.get("ots", {}).get("backbones") or {}).items():
        if spec.get("checkpoint"):
            path = tmp_path / "checkpoints" / "ots" / Path(spec["checkpoint"]).name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            spec["checkpoint"] = str(path)
    det = config.get("detection")
    if det:
        if det.get("data_root"):
            root = tmp_path / "data" / "coco"
            root.mkdir(parents=True, exist_ok=True)
            det["data_root"] = str(root)
        for size, spec in (det.get("sizes") or {}).items():
            if spec.get("load_from"):
                path = tmp_path / "checkpoints" / "detection" / Path(spec["load_from"]).name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
                spec["load_from"] = str(path)
    diff = config.get("diffusion")
    if diff and isinstance(diff.get("class_names"), str):
        path = tmp_path / "class_names.txt"
        path.write_text("".join(f"class {i}\n" for i in range(1000)))
        diff["class_names"] = str(path)
    return config


def planned_commands(output: str) -> list[tuple[str, str]]:
    """(rule, shell command) of every planned job in a dry run with ``-p``."""
    found = []
    rule = None
    lines = output.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(?:local)?rule (\w+):", line.strip())
        if m:
            rule = m.group(1)
        if line.startswith("Shell command:"):
            command = [line[len("Shell command:"):].strip()]
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("[", "Job stats:")):
                command.append(lines[i])
                i += 1
            found.append((rule, "\n".join(command)))
            continue
        i += 1
    return found
