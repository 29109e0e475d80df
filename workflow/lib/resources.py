"""The resource model of the workflow's jobs: threads, time limits, GPU-hours,
and how many Slurm submissions a DAG makes.

Plain Python without Snakemake or torch imports, loaded by
``workflow/rules/common.smk`` and ``cluster.smk`` at DAG build (and by the
tests). Every default below is an ESTIMATE, to be replaced by a study's own
figures in its config (``datasets.<name>.train_images``,
``resources.train_throughput``, ``resources.time_safety_factor``); see
docs/slurm.md, "The resource model".
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Optional

#: training images per epoch of each dataset kind (estimates: the public
#: train splits; ``datasets.<name>.train_images`` replaces them)
DEFAULT_TRAIN_IMAGES = {
    "imagenet": 1_281_167,  # ILSVRC-2012 train
    "nabirds": 23_929,  # NABirds train
    "coco": 82_081,  # COCO 2014 train, multi-label (images with labels)
    "nuswide": 125_449,  # NUS-WIDE train, 81 concepts (images with labels)
    "ufgir": 6_000,  # the UFGIR sets: the largest has ~6k train images
    "digits": 1_500,  # the demo's sets (scikit-learn digits)
    "digits_multilabel": 1_500,
    "digits_ufgir": 1_500,
}

#: fine-tuning images per second on ONE GPU (A100/H100 class, mixed precision,
#: 224 px), by backbone width (estimates; ``resources.train_throughput``
#: replaces them per backbone). DeiT-S ~1000 img/s.
DEFAULT_THROUGHPUT = {"tiny": 2500.0, "small": 1000.0, "base": 350.0, "large": 110.0, "huge": 50.0}

#: a CPU job's throughput as a fraction of one GPU's (estimate; the demo's
#: tiny models on 32 px images)
CPU_FRACTION = 0.02

#: multiplies every time estimate before it becomes a job's time limit
DEFAULT_SAFETY_FACTOR = 1.5

#: minutes added to every training job: start-up, data set indexing,
#: checkpoints, the evaluation at the end
OVERHEAD_MINUTES = 10

#: a torchrun job's throughput per GPU, relative to one GPU
MULTI_GPU_EFFICIENCY = 0.9


class ResourceError(ValueError):
    """A config value the resource model cannot use (names its key)."""


def width_class(model: str, embed_dim: Optional[int] = None) -> str:
    """tiny | small | base | large | huge, from the width (when given) or timm's name."""
    if embed_dim is not None:
        for name, limit in (("tiny", 192), ("small", 384), ("base", 768), ("large", 1024)):
            if int(embed_dim) <= limit:
                return name
        return "huge"
    for name in ("huge", "large", "base", "small", "tiny"):
        if name in model:
            return name
    return "base"  # unknown: a middle estimate


def train_images(name: str, spec: Mapping) -> int:
    """Training images per epoch of dataset ``name``: declared, else the kind's default."""
    declared = spec.get("train_images")
    if declared is not None:
        return int(declared)
    kind = spec["kind"]
    if kind not in DEFAULT_TRAIN_IMAGES:
        raise ResourceError(
            f"invalid config at datasets.{name}.train_images: kind {kind!r} has no default image count; "
            "give the training images per epoch here (it sets the jobs' time limits)"
        )
    return DEFAULT_TRAIN_IMAGES[kind]


def throughput(name: str, spec: Mapping, declared: Mapping[str, float]) -> float:
    """Fine-tuning img/s of backbone ``name`` on one GPU: resources.train_throughput, else by width."""
    if name in declared:
        return float(declared[name])
    kwargs = spec.get("model_kwargs") or {}
    return DEFAULT_THROUGHPUT[width_class(spec["model"], kwargs.get("embed_dim"))]


def train_estimate_minutes(images: int, epochs: float, img_per_s: float, gpus: int,
                           img_size: int = 224) -> float:
    """Minutes of training: images x epochs / throughput (one GPU's, times the
    GPUs of a torchrun job at MULTI_GPU_EFFICIENCY, or CPU_FRACTION of it on
    the CPU), the throughput scaled by the token count (img_size / 224)^2."""
    rate = img_per_s * (224.0 / max(int(img_size), 8)) ** 2
    if gpus > 0:
        rate *= 1 if gpus == 1 else gpus * MULTI_GPU_EFFICIENCY
    else:
        rate *= CPU_FRACTION
    return images * float(epochs) / rate / 60.0


def time_limit_minutes(estimate: float, safety: float, attempt: int = 1) -> int:
    """A job's time limit: estimate x safety + overhead in whole minutes
    (rounded up), times the attempt (a retry asks for exactly twice as much)."""
    return int(math.ceil(estimate * safety + OVERHEAD_MINUTES)) * int(attempt)


def job_threads(num_workers: int, gpus: int, at_least: int = 1) -> int:
    """CPUs of a training/evaluation job: data-loading workers + 1 per process
    (at least ``at_least``), times the processes of a torchrun job (its GPUs)."""
    per_process = max(int(num_workers) + 1, int(at_least))
    return per_process * max(1, int(gpus))


def largest_request(request: Callable[[object, int], float], all_wildcards: Iterable[object], attempt: int) -> int:
    """The one request every task of a Slurm array gets: the largest of
    ``request(wildcards, attempt)`` (a rule's memory or time limit) over the
    wildcards of all the rule's jobs. The plugin gives each task of an array
    the first task's resources, so a rule whose jobs ask for different amounts
    must ask each for the largest. Raises ResourceError when there are no jobs."""
    values = [request(wildcards, attempt) for wildcards in all_wildcards]
    if not values:
        raise ResourceError("largest_request: the rule has no jobs to take the largest request of")
    return int(max(values))


def submissions(rule_jobs: Mapping[str, int], array_rules: Iterable[str], array_limit: int) -> dict[str, int]:
    """Fewest and most Slurm submissions of non-local, ungrouped jobs per rule.

    ``rule_jobs``: rule -> jobs. A rule in ``array_rules`` (or ``all``) submits
    its jobs that are ready together as arrays of up to ``array_limit`` tasks:
    at best ceil(jobs / array_limit) submissions, at worst one per job (jobs
    that become ready one by one, e.g. evaluations after staggered fine-tunes,
    go alone). Returns {"fewest": .., "most": ..}.
    """
    arrays = set(array_rules)
    fewest = most = 0
    for rule, jobs in rule_jobs.items():
        most += jobs
        if ("all" in arrays or rule in arrays) and jobs > 1:
            fewest += math.ceil(jobs / max(1, array_limit))
        else:
            fewest += jobs
    return {"fewest": fewest, "most": most}


def parse_array_rules(setting: Optional[str]) -> set[str]:
    """--slurm-array-jobs 'a, b' (or 'a;b') as a set of rule names."""
    if not setting:
        return set()
    return {name.strip() for name in str(setting).replace(";", ",").split(",") if name.strip()}


def format_plan(jobs: int, local_jobs: int, groups: int, grouped_jobs: int, subs: Mapping[str, int],
                gpu_hours: float, gpu_hours_bound: float) -> str:
    """The lines the DAG build prints under a cluster executor."""
    fewest = subs["fewest"] + groups
    most = subs["most"] + groups
    span = f"{fewest:,}" if fewest == most else f"{fewest:,} (arrays of jobs ready together) to {most:,} (every job alone)"
    return (
        f"Slurm plan: {jobs:,} jobs -> {span} submissions"
        f" ({local_jobs:,} jobs run in the Snakemake process, {grouped_jobs:,} jobs in {groups:,} group submissions)\n"
        f"estimated GPU-hours: {gpu_hours:,.1f} (estimates: image counts x epochs / resources.train_throughput;"
        f" {gpu_hours_bound:,.1f} of it from other GPU rules' time limits, an upper bound)"
    )


def _flag(argv: list[str], *names: str) -> Optional[str]:
    """The value of the last ``--name VALUE`` or ``--name=VALUE`` in argv."""
    found = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                found = argv[i + 1]
            elif arg.startswith(name + "="):
                found = arg[len(name) + 1:]
    return found


def _default_resource(value, name: str):
    """``name`` of a profile's default-resources (a mapping or a list of k=v)."""
    if isinstance(value, Mapping):
        return value.get(name)
    for item in value or []:
        key, _, val = str(item).partition("=")
        if key.strip() == name:
            return val.strip()
    return None


def cluster_settings(argv: list[str], env: Mapping[str, str], load_profile) -> dict:
    """What a cluster run is set to, read the way Snakemake reads it: the
    ``--profile`` on the command line (else $SNAKEMAKE_PROFILE), whose values
    the command line's own flags replace. ``load_profile(name)`` returns the
    profile's config.yaml as a dict (None when there is none). Returns
    executor, array_jobs (set), array_limit, max_runtime (minutes or None).
    A dry run needs this: its executor is 'dryrun', whatever the profile says."""
    name = _flag(argv, "--profile") or env.get("SNAKEMAKE_PROFILE")
    profile = (load_profile(name) if name else None) or {}
    executor = _flag(argv, "--executor", "-e") or profile.get("executor") or "local"
    arrays = _flag(argv, "--slurm-array-jobs") or profile.get("slurm-array-jobs")
    limit = _flag(argv, "--slurm-array-limit") or profile.get("slurm-array-limit") or 1000
    max_runtime = _default_resource(profile.get("default-resources"), "max_runtime")
    return {
        "executor": str(executor),
        "array_jobs": parse_array_rules(arrays),
        "array_limit": int(limit),
        "max_runtime": int(max_runtime) if max_runtime not in (None, "") else None,
    }
