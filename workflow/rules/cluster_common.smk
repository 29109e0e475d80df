# ---------------------------------------------------------------- cluster plan
# Under a cluster executor (--profile slurm), right after the DAG is built
# (real and dry runs alike) Snakemake logs its job stats; this handler adds
# the Slurm plan: submissions next to the job count, the estimated GPU-hours,
# and a warning for jobs whose time limit exceeds the profile's max_runtime
# (default-resources: max_runtime: MINUTES, the partition's limit).

import logging
import math
from types import SimpleNamespace

from snakemake.logging import logger as _snakemake_logger


def _load_profile(name):
    """A Snakemake profile's config.yaml, found as Snakemake finds it."""
    import yaml
    from snakemake.cli import get_profile_dir

    found = get_profile_dir(name)
    if not found:
        return None
    return yaml.safe_load(Path(found[1]).read_text()) or {}


CLUSTER = resource_model.cluster_settings(sys.argv, os.environ, _load_profile)


#: per-run rules whose resources array_uniform (common.smk) makes uniform
#: under arrays: every job's wildcards, as far as their resource functions
#: read them, from the config (the largest request is taken over these)
ARRAY_JOB_WILDCARDS = {
    "ots_sweep": lambda: [SimpleNamespace(otsbackbone=b) for b in OTS_BACKBONES],
    "mae_finetune": lambda: [
        SimpleNamespace(dataset=r["dataset"], backbone=r["backbone"]) for r in MAE_RUNS
    ],
    "mae_evaluate": lambda: [SimpleNamespace(backbone=r["backbone"]) for r in MAE_RUNS],
    "sd_generate": lambda: [
        SimpleNamespace(sd_experiment=e) for e in DIFF.get("experiments") or {}
    ],
    "detection_train": lambda: [
        SimpleNamespace(det_size=s) for s in DET.get("sizes") or {}
    ],
    "detection_eval": lambda: [
        SimpleNamespace(det_size=s) for s in DET.get("sizes") or {}
    ],
}


#: GPU rules whose jobs have a time estimate of their own (minutes)
GPU_ESTIMATES = {"finetune": train_estimate, "pretrain": train_estimate}


def cluster_plan(dag):
    """The plan lines and time-limit warnings for the jobs this run will make."""
    jobs = list(dag.needrun_jobs())
    arrays, limit = CLUSTER["array_jobs"], CLUSTER["array_limit"]
    per_rule, groups, grouped, local = {}, set(), 0, 0
    gpu_hours = bound = 0.0
    max_runtime = CLUSTER["max_runtime"]
    too_long = []
    for job in jobs:
        job_rule = job.rule
        if (
            job_rule.name in workflow._localrules
            or job_rule.norun
            or job_rule.is_template_engine
        ) and job_rule.group is None:
            local += 1
            continue
        group = dag.get_job_group(job)
        if group is not None:
            groups.add(group.jobid)
            grouped += 1
        else:
            per_rule[job_rule.name] = per_rule.get(job_rule.name, 0) + 1
        gpus = int(job.resources.get("gpu", 0) or 0)
        runtime = job.resources.get("runtime") or 0
        if gpus:
            if job_rule.name in GPU_ESTIMATES:
                gpu_hours += gpus * GPU_ESTIMATES[job_rule.name](job.wildcards) / 60
            else:
                bound += gpus * float(runtime) / 60
        if max_runtime and float(runtime) > max_runtime:
            too_long.append(
                f"{job_rule.name} ({', '.join(f'{k}={v}' for k, v in job.wildcards.items())}): {runtime} min"
            )
    subs = resource_model.submissions(per_rule, arrays, limit)
    text = resource_model.format_plan(
        len(jobs), local, len(groups), grouped, subs, gpu_hours + bound, bound
    )
    return text, too_long, max_runtime


class _ClusterPlanHandler(logging.Handler):
    """Prints the cluster plan once, after Snakemake's job stats."""

    def emit(self, record):
        if getattr(record, "stats", None) is None or getattr(self, "done", False):
            return
        self.done = True
        try:
            text, too_long, max_runtime = cluster_plan(workflow.dag)
        except Exception as err:  # the plan is information: never fail the run for it
            print(f"Slurm plan: not computed ({err})", file=sys.stderr)
            return
        print(text, file=sys.stderr)
        if too_long:
            print(
                f"WARNING: {len(too_long)} job(s) ask for more time than the profile's "
                f"max_runtime ({max_runtime} min), e.g. {too_long[0]}: raise resources.train_throughput "
                "or the GPUs per job, or ask your site for a longer partition (docs/slurm.md)",
                file=sys.stderr,
            )


if workflow.is_main_process and CLUSTER["executor"] not in ("local", "dryrun", "touch"):
    _snakemake_logger.addHandler(_ClusterPlanHandler(level=logging.INFO))
