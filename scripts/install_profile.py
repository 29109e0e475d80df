"""Install the Slurm site profile where Snakemake finds profiles by name.

    python scripts/install_profile.py --account ACCOUNT --partition PARTITION
    snakemake --configfile config/which-tokens.yaml --profile slurm

It copies profiles/slurm/config.yaml to ``~/.config/snakemake/slurm/``
(``$XDG_CONFIG_HOME/snakemake/slurm/`` when that is set; Snakemake's own
lookup) and fills in the cluster's specifics: account (or none), partition,
GPU model, and the command the executor polls job status with (sacct where
the cluster keeps accounting, else squeue). Site specifics live only there;
the workflow and the study configs never name a cluster.

Standard library only: it runs before (or without) the workflow's environment.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "profiles" / "slurm" / "config.yaml"
PLACEHOLDERS = ('"ACCOUNT"', '"PARTITION"')
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def user_profile_root() -> Path:
    """The folder Snakemake searches for profiles given by name (its
    platformdirs user config dir), e.g. ~/.config/snakemake."""
    try:
        from platformdirs import user_config_dir  # what Snakemake itself uses
    except ImportError:  # pragma: no cover - snakemake depends on platformdirs
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "snakemake"
    return Path(user_config_dir("snakemake", "snakemake"))


def detect_status_command() -> str:
    """sacct when it works (a slurmdbd keeps accounting), else squeue.

    Without accounting, sacct either fails or answers "accounting storage is
    disabled"; the executor would then never see a job finish."""
    if shutil.which("sacct") is None:
        return "squeue"
    try:
        proc = subprocess.run(
            ["sacct", "-n", "-X", "--format=JobID", "-S", "now"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "squeue"
    answer = (proc.stdout + proc.stderr).lower()
    if proc.returncode != 0 or "disabled" in answer or "error" in answer:
        return "squeue"
    return "sacct"


def _check_name(value: str | None, what: str) -> None:
    if value is not None and not _NAME.match(value):
        raise ValueError(f"{what} {value!r} may hold only letters, digits, '.', '_' and '-'")


def render(
    template: str,
    account: str | None,
    partition: str | None,
    status_command: str,
    gpu_model: str | None = None,
    jobs: int | None = None,
    max_runtime: int | None = None,
) -> str:
    """The site profile's text with the cluster's specifics filled in.

    account None: no account (slurm-no-account); partition None: the cluster's
    default partition; gpu_model: set for every GPU rule listed in the
    template's commented set-resources block."""
    _check_name(account, "account")
    _check_name(partition, "partition")
    _check_name(gpu_model, "gpu model")
    if status_command not in ("sacct", "squeue"):
        raise ValueError(f"status command must be sacct or squeue, not {status_command!r}")
    out = []
    in_gpu_block = False
    for line in template.splitlines():
        stripped = line.strip()
        if stripped.startswith("slurm_account:"):
            if account is not None:
                out.append(re.sub(r'"ACCOUNT"', f'"{account}"', line))
            continue
        if stripped.startswith("slurm_partition:"):
            if partition is not None:
                out.append(re.sub(r'"PARTITION"', f'"{partition}"', line))
            continue
        if stripped.startswith("# slurm-no-account:") and account is None:
            out.append(line.replace("# slurm-no-account:", "slurm-no-account:", 1))
            continue
        if stripped.startswith("slurm-status-command:"):
            out.append(re.sub(r"^slurm-status-command:\s*\w+", f"slurm-status-command: {status_command}", line))
            continue
        if max_runtime is not None and stripped.startswith("max_runtime:"):
            out.append(re.sub(r"max_runtime:\s*\d+", f"max_runtime: {int(max_runtime)}", line))
            continue
        if jobs is not None and re.match(r"^jobs:\s*\d+", line):
            out.append(re.sub(r"^jobs:\s*\d+", f"jobs: {int(jobs)}", line))
            continue
        if gpu_model is not None:
            if stripped == "# set-resources:":
                in_gpu_block = True
                out.append("set-resources:")
                continue
            if in_gpu_block:
                m = re.match(r"^#\s+(\w+): \{gpu_model: \"\w+\"\}", line)
                if m:
                    out.append(f'  {m.group(1)}: {{gpu_model: "{gpu_model}"}}')
                    continue
                in_gpu_block = False
        out.append(line)
    text = "\n".join(out) + "\n"
    for placeholder in PLACEHOLDERS:
        if placeholder in text:
            raise ValueError(f"placeholder {placeholder} left in the profile")
    return text


def install(dest: Path, text: str, force: bool = False) -> Path:
    """Write `text` as dest/config.yaml; refuses to overwrite a different
    existing profile unless `force`."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "config.yaml"
    if target.exists() and target.read_text() != text and not force:
        raise FileExistsError(f"{target} exists and differs; use --force to replace it")
    target.write_text(text)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--account", help="Slurm account charged for the jobs (sbatch -A)")
    who.add_argument("--no-account", action="store_true", help="the cluster has no accounts")
    parser.add_argument("--partition", help="partition for every job (default: the cluster's default partition)")
    parser.add_argument("--gpu-model", help="GPU model for the GPU rules (sbatch --gpus=MODEL:N)")
    parser.add_argument(
        "--status-command", choices=("auto", "sacct", "squeue"), default="auto",
        help="how the executor polls job status (auto: sacct if accounting works, else squeue)",
    )
    parser.add_argument("--jobs", type=int, help="jobs queued or running at once (default: the template's)")
    parser.add_argument("--max-runtime", type=int, metavar="MINUTES",
                        help="the partition's time limit; the DAG build warns about jobs asking for more (default 2880)")
    parser.add_argument("--name", default="slurm", help="profile name (default: slurm, i.e. --profile slurm)")
    parser.add_argument("--dest", type=Path, help="profile folder (default: <Snakemake user config dir>/NAME)")
    parser.add_argument("--force", action="store_true", help="replace an existing, different profile")
    parser.add_argument("--print", action="store_true", help="print the profile instead of installing it")
    args = parser.parse_args(argv)

    status = detect_status_command() if args.status_command == "auto" else args.status_command
    try:
        text = render(
            TEMPLATE.read_text(),
            account=None if args.no_account else args.account,
            partition=args.partition,
            status_command=status,
            gpu_model=args.gpu_model,
            jobs=args.jobs,
            max_runtime=args.max_runtime,
        )
    except ValueError as err:
        parser.error(str(err))
    if args.print:
        sys.stdout.write(text)
        return 0
    dest = args.dest or user_profile_root() / args.name
    try:
        target = install(dest, text, force=args.force)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"installed {target} (status command: {status}); run: snakemake --profile {args.name if args.dest is None else dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
