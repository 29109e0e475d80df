"""The rehearsal hook of the workflow (``--config rehearse=true``): rewrite the
config to its stand-ins and write the stand-ins that are missing, at DAG
build, before the config is validated.

The stand-ins are written here rather than by jobs so that the rehearsal's job
list is the study's own, job for job (the dataset roots and checkpoint files
are read by jobs, not made by them, in a real run too). Plain Python: loads
``tokenreduction/rehearsal/standin.py`` by path (no torch at DAG build); the
writers run in a subprocess of the jobs' interpreter, only when a stand-in is
missing or out of date. When the rehearsal executes locally, start_warm /
stop_warm (from software.smk's onstart / onsuccess / onerror) run its per-run
jobs in a warm interpreter (tokenreduction/rehearsal/warm.py).
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


_WARM = {}  # wanted (apply_rehearsal), then module, server, python (start_warm)
#: the rules whose scripts the warm interpreter serves (warm.SERVED_SCRIPTS)
PER_RUN_RULES = frozenset({"finetune", "evaluate", "ots_sweep", "mae_finetune", "mae_evaluate", "sd_generate", "sd_fid"})
#: set by a cluster group job that started a warm interpreter: the launcher
#: its jobs' own Snakemake processes (in their srun steps) keep
LAUNCHER_ENV = "TOKENREDUCTION_WARM_LAUNCHER"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _jobs_python(config: dict, root: Path) -> str:
    """The interpreter the jobs will run (workflow/lib/runtime.py's choice)."""
    runtime = _load(root / "workflow" / "lib" / "runtime.py", "tokenreduction_rehearsal_runtime")
    try:
        return runtime.main_python(root, config.get("python"))
    except runtime.InterpreterError as err:
        sys.exit(f"rehearsal: {err}")


def flag(config: dict, key: str) -> bool:
    """A true/false key of the config as a bool. ``--config key=false``
    reaches the config as the string 'false' (Snakemake parses only True and
    False as booleans), which Python would take as true; exits with one
    message on anything else."""
    value = config[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    sys.exit(f"invalid config at {key}: {value!r} is not true or false")


def apply_rehearsal(config: dict, root: Path) -> list[dict]:
    """Replace `config` in place by its rehearsal (when ``config['rehearse']``)
    and fabricate the stand-ins with the jobs' interpreter; returns the plan (empty when
    not rehearsing). Exits with one message naming the key on a config the
    stand-ins do not cover, or when a stand-in cannot be written."""
    for key in ("rehearse", "rehearse_warm"):
        if key in config:
            config[key] = flag(config, key)
    if not config.get("rehearse"):
        if config.get("rehearse_datasets"):
            sys.exit("invalid config at rehearse_datasets: it restricts a rehearsal; add --config rehearse=true")
        return []
    standin = _load(root / "src" / "tokenreduction" / "rehearsal" / "standin.py", "tokenreduction_rehearsal_standin")
    presets = None
    if config.get("ots"):
        validation = _load(root / "src" / "tokenreduction" / "config_validation.py", "tokenreduction_rehearsal_validation")
        presets = validation.ots_presets()
    try:
        rehearsal, plan = standin.standin_config(config, presets)
    except standin.RehearsalError as err:
        sys.exit(f"invalid config for a rehearsal (rehearse=true) at {err}")
    stale = [item for item in plan if not standin.is_current(item)]
    if stale:
        python = _jobs_python(config, root)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(stale, f)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
        try:
            proc = subprocess.run([python, str(root / "scripts" / "rehearse_fabricate.py"), f.name], env=env)
        finally:
            os.unlink(f.name)
        if proc.returncode != 0:
            sys.exit(f"rehearsal: writing the stand-ins with {python} failed (exit {proc.returncode}); see above")
    # the warm interpreter is how jobs run, not what they compute: kept out of
    # the config the rules see (start_warm reads it from here)
    _WARM["wanted"] = bool(rehearsal.pop("rehearse_warm", True))
    config.clear()
    config.update(rehearsal)
    return plan


# --------------------------------------------------------------------------
# the warm interpreter (rehearse_warm, on by default in a rehearsal)



def start_warm(workflow, config: dict, root: Path, results: str, python: str, deployments) -> None:
    """From ``onstart`` (the main Snakemake process, executing, not a dry
    run): start the warm interpreter and point ``TOKENREDUCTION_PYTHON`` at
    its client, so that the per-run jobs skip their imports. Only where the
    jobs are this process's children: the local executor, no software
    deployment (a cluster's group jobs start their own: warm_in_remote_job).
    Says on stderr when it is off or could not start."""
    if not _WARM.get("wanted") or workflow.touch:
        return
    why_not = None
    if not workflow.local_exec or not workflow.is_main_process:
        why_not = "the jobs run through a cluster executor (a group job of per-run jobs starts its own)"
    elif set(deployments) & {"conda", "apptainer"}:
        why_not = f"the jobs run in their own software environments (--sdm {' '.join(sorted(deployments))})"
    if why_not:
        print(f"rehearsal: the warm interpreter is off: {why_not}", file=sys.stderr)
        return
    server = _serve(config, root, python, results, "the warm interpreter did not start ({err}); the jobs run {python}")
    if server is None:
        return
    print(
        f"rehearsal: per-run jobs ({', '.join(_WARM['module'].SERVED_SCRIPTS)}) run in the warm interpreter"
        f" at {server.socket} (log: {server.log}); --config rehearse_warm=false turns it off",
        file=sys.stderr,
    )


def _serve(config: dict, root: Path, python: str, state_root, failure: str):
    """Start the server (its state under `state_root`), remember it, stop it
    at exit and point ``TOKENREDUCTION_PYTHON`` at its launcher. Returns the
    server, or None after printing `failure` (formatted with err, python)."""
    warm = _load(root / "src" / "tokenreduction" / "rehearsal" / "warm.py", "tokenreduction_rehearsal_warm")
    preload = warm.PRELOAD + (warm.PRELOAD_DIFFUSION if config.get("diffusion") else ())
    try:
        server = warm.start(python, root / "src", state_root, root / "scripts", preload)
    except (warm.WarmError, OSError) as err:
        print("rehearsal: " + failure.format(err=err, python=python), file=sys.stderr)
        return None
    _WARM.update(module=warm, server=server, python=python)
    atexit.register(stop_warm)
    os.environ["TOKENREDUCTION_PYTHON"] = str(server.launcher)
    return server


def stop_warm() -> None:
    """From ``onsuccess`` / ``onerror`` (and at exit): stop the server."""
    if "server" in _WARM:
        server = _WARM.pop("server")
        _WARM["module"].stop(server)
        os.environ["TOKENREDUCTION_PYTHON"] = _WARM["python"]


def remote_warm_action(target_rules: list[str], inherited_launcher: str | None, deployments) -> str:
    """What a remote Snakemake process (a cluster job's) does about the warm
    interpreter: ``"inherit"`` (a job's own process in its srun step, whose
    group job started one: keep its launcher as ``$TOKENREDUCTION_PYTHON``),
    ``"start"`` (a group job of two or more per-run jobs: the job-step
    executor runs them one at a time as its children's children, each a
    fresh interpreter otherwise) or ``"none"``."""
    if set(deployments) & {"conda", "apptainer"}:
        return "none"
    if inherited_launcher and os.path.exists(inherited_launcher):
        return "inherit"
    if sum(rule in PER_RUN_RULES for rule in target_rules) >= 2:
        return "start"
    return "none"


def _target_rule(target) -> str:
    """A --target-jobs entry's rule (a TargetSpec, or its 'rule:wildcards' text)."""
    return getattr(target, "rulename", None) or str(target).split(":", 1)[0]


def target_rules(workflow, argv: list[str]) -> list[str]:
    """The rules of this process's ``--target-jobs``. Snakemake hands its DAG
    settings to the workflow only after parsing the Snakefile, so at parse
    time they come from the command line (``--target-jobs A B ...``)."""
    targets = getattr(getattr(workflow, "dag_settings", None), "target_jobs", None)
    if not targets and "--target-jobs" in argv:
        rest = argv[argv.index("--target-jobs") + 1:]
        targets = rest[:next((i for i, word in enumerate(rest) if word.startswith("-")), len(rest))]
    return [_target_rule(t) for t in targets or ()]


def warm_in_remote_job(workflow, config: dict, root: Path, python: str, deployments) -> None:
    """At parse time of a cluster job's Snakemake (``--mode remote``; hooks
    are off there): a group job of per-run jobs starts a warm interpreter in
    node-local ``$TMPDIR/tokenreduction-warm-<Slurm job id>/`` for its jobs,
    and exports its launcher; each job's own Snakemake (in its srun step)
    keeps that launcher. Nothing in a main process, a dry run or a job alone."""
    if not _WARM.get("wanted") or not workflow.remote_exec or "server" in _WARM:
        return
    targets = target_rules(workflow, sys.argv)
    action = remote_warm_action(targets, os.environ.get(LAUNCHER_ENV), deployments)
    if action == "inherit":
        os.environ["TOKENREDUCTION_PYTHON"] = os.environ[LAUNCHER_ENV]
        return
    if action != "start":
        return
    job = os.environ.get("SLURM_JOB_ID") or f"pid{os.getpid()}"
    folder = Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / f"tokenreduction-warm-{job}"
    server = _serve(config, root, python, folder,
                    "this group job's warm interpreter did not start ({err}); its jobs run {python}")
    if server is None:
        return
    os.environ[LAUNCHER_ENV] = str(server.launcher)
    print(f"rehearsal: this group job's {len(targets)} jobs run in a warm interpreter at {server.socket}"
          f" (log: {server.log})", file=sys.stderr)
