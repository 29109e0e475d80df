# The interpreter every job of the main environment runs, and the stage times
# printed at the end of a run. Shell commands call
# `"$TOKENREDUCTION_PYTHON" script ...` (detection jobs:
# "$TOKENREDUCTION_MMDET_PYTHON"), never a bare `python`: a plain shell's
# `python` is not the one that has this package installed. The interpreter is
# passed in the environment that jobs inherit rather than as a parameter, so
# that running from another checkout or venv path does not rerun every job.

import importlib.util
import os
import time

_RUN_START = time.time()


def _load_runtime():
    """workflow/lib/runtime.py (plain Python, no torch)."""
    path = ROOT / "workflow" / "lib" / "runtime.py"
    spec = importlib.util.spec_from_file_location("tokenreduction_runtime", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


runtime = _load_runtime()
DEPLOYMENTS = {m.value for m in workflow.deployment_settings.deployment_method}

# the scheduler's input-size survey, quadratic at study width, skipped where
# the workflow profile's selector never reads it (workflow/lib/scheduler_speed.py)
if workflow.is_main_process:
    _spec = importlib.util.spec_from_file_location(
        "tokenreduction_scheduler_speed",
        ROOT / "workflow" / "lib" / "scheduler_speed.py",
    )
    scheduler_speed = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(scheduler_speed)
    if not scheduler_speed.install():
        print(
            "workflow/lib/scheduler_speed.py: this Snakemake has no JobScheduler.update_input_sizes"
            " to wrap; its input-size survey runs every scheduling round",
            file=sys.stderr,
        )

# a Snakemake process killed outright (SIGKILL, a lost session) leaves its
# locks behind: release them once every run that could hold them is gone, so
# that the same command runs again (workflow/lib/stale_locks.py)
if workflow.is_main_process and not workflow.dryrun:
    _spec = importlib.util.spec_from_file_location(
        "tokenreduction_stale_locks", ROOT / "workflow" / "lib" / "stale_locks.py"
    )
    stale_locks = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(stale_locks)
    if stale_locks.release_stale_locks():
        print(
            "released the locks left by a Snakemake run of this workflow that was killed",
            file=sys.stderr,
        )
    stale_locks.register_run()

try:
    # main environment: `python` of the config, else the interpreter running
    # Snakemake when it has this package, else .venv/bin/python; under
    # --sdm conda the environment's own python
    PYTHON = runtime.main_python(ROOT, config.get("python"), DEPLOYMENTS)
except runtime.InterpreterError as err:
    raise ConfigError(str(err)) from None
os.environ.update(TOKENREDUCTION_PYTHON=PYTHON)
# a rehearsal's cluster group job: a warm interpreter for its per-run jobs
# (docs/rehearsal.md); its jobs' own Snakemake processes keep its launcher
if globals().get("_rehearsal"):
    _rehearsal.warm_in_remote_job(workflow, config, ROOT, PYTHON, DEPLOYMENTS)

# envs/{torch,diffusion}.post-deploy.sh install this repository into the conda
# environments Snakemake creates (--sdm conda): they read its path from here
os.environ.update(TOKENREDUCTION_ROOT=str(ROOT))

# data.skip_bad_images: the dataset readers of every job skip (and log) image
# files they cannot decode instead of failing (tokenreduction.data.base)
os.environ.update(
    TOKENREDUCTION_SKIP_BAD_IMAGES=(
        "1" if config.get("data", {}).get("skip_bad_images", False) else "0"
    )
)


# a rehearsal's warm interpreter for the per-run jobs (docs/rehearsal.md):
# started when the run executes, stopped when it ends
_rehearsal_hook = globals().get("_rehearsal")  # common.smk's, when rehearse=true


onstart:
    print(f"main environment's jobs run {PYTHON}")
    if _rehearsal_hook:
        _rehearsal_hook.start_warm(
            workflow, config, ROOT, RESULTS, PYTHON, DEPLOYMENTS
        )


onerror:
    if _rehearsal_hook:
        _rehearsal_hook.stop_warm()


onsuccess:
    if _rehearsal_hook:
        _rehearsal_hook.stop_warm()
    # per job from its benchmark file (written by the job itself, locally
    # and on a cluster alike), else (rules run in this process) the metadata
    records = runtime.run_records(
        Path(".snakemake") / "metadata",
        Path(RESULTS) / "benchmarks",
        [(r.name, r.benchmark.regex()) for r in workflow.rules if r.benchmark],
        since=_RUN_START,
    )
    if records:
        rows = runtime.stage_times(records)
        print(
            "\nTime per stage (job time summed over its jobs; from/to: since the run started):"
        )
        print(runtime.format_stage_times(rows, _RUN_START, time.time()))
        runtime.write_stage_times(rows, Path(RESULTS) / "logs" / "stage_times.tsv")
