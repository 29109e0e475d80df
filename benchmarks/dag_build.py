"""How long Snakemake takes to build a study's DAG (a dry run), per config.

    python benchmarks/dag_build.py [--config config/which-tokens.yaml ...]

Dataset roots are pointed at empty temporary folders (the dry run only checks
that they exist). Prints jobs and seconds per config, and the demo's for scale.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def dry_run(config_path: Path | None, workdir: Path) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "-n", "--quiet", "rules"]
    if config_path is not None:
        cmd += ["--configfile", str(config_path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    total = re.search(r"^total\s+(\d+)$", proc.stdout, re.MULTILINE)
    return elapsed, int(total.group(1)) if total else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", nargs="*", default=sorted(str(p) for p in (REPO / "config").glob("*.yaml") if p.name != "config.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [("demo (config/config.yaml)", *min(dry_run(None, tmp / "demo") for _ in range(args.repeats)))]
        for name in args.config:
            config = yaml.safe_load(Path(name).read_text())
            for key, spec in config.get("datasets", {}).items():
                root = tmp / "roots" / key
                root.mkdir(parents=True, exist_ok=True)
                spec["root"] = str(root)
            path = tmp / Path(name).name
            path.write_text(yaml.safe_dump(config))
            rows.append((name, *min(dry_run(path, tmp / Path(name).stem) for _ in range(args.repeats))))
    print(f"{'config':40s} {'jobs':>6s} {'dry run (s)':>12s}")
    for name, seconds, jobs in rows:
        print(f"{name:40s} {jobs:6d} {seconds:12.2f}")


if __name__ == "__main__":
    main()
