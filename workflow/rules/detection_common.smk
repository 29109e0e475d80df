# Helpers of detection.smk: the run table, input functions, run options.

import os
import shlex

DET = config.get("detection") or {}
DET_RUN = f"{RESULTS}/detection/{{det_size}}/{{det_method}}/r{{det_ratio}}"
DET_LOG = "{det_size}/{det_method}/r{det_ratio}"
DET_DEMO_DATA = f"{RESULTS}/detection/data/shapes"


def _detection_python():
    """The detection environment's interpreter: under --sdm conda the
    environment's own python (envs/mmdet.yaml), else detection.python
    (default .venv-mmdet/bin/python, relative to the repository)."""
    if DEPLOYMENTS & runtime.ENV_DEPLOYMENTS:
        return "python"
    return runtime.resolve_path(DET.get("python", ".venv-mmdet/bin/python"), ROOT)


DETECTION_PYTHON = _detection_python()
# the jobs' shell commands call "$TOKENREDUCTION_MMDET_PYTHON" (jobs inherit it)
os.environ.update(TOKENREDUCTION_MMDET_PYTHON=DETECTION_PYTHON)
# The virtual environment the DAG builds (rule detection_env) when
# detection.python is <venv>/bin/python and build_env is not false; its stamp
# file is an input of every detection job.
DET_VENV = (
    runtime.venv_of(DETECTION_PYTHON)
    if DET.get("build_env", True) and DETECTION_PYTHON != "python"
    else None
)
DET_ENV_STAMP = str(DET_VENV / "tokenreduction-env.json") if DET_VENV else None
# shell prefix: fail the job with a clear message when the interpreter is missing
DET_CHECK = (
    f"command -v {shlex.quote(DETECTION_PYTHON)} > /dev/null || {{ echo 'detection"
    f" environment missing ({DETECTION_PYTHON}): run envs/install_mmdet.sh or use"
    " --sdm conda' >&2; exit 1; }; "
)


def det_env_input(wildcards):
    """The detection environment's stamp when the DAG builds it."""
    return [DET_ENV_STAMP] if DET_ENV_STAMP else []


def _det_runs():
    """(size, method, keep rate) of every detection run: each method (a
    methods: registry name) at each keep rate, and the unreduced model
    (method none, path segment r0) per size."""
    runs = []
    for size in DET.get("sizes", {}):
        if DET.get("baseline", True):
            runs.append((size, BASELINE, "0"))
        for method in DET.get("methods", []):
            for keep_rate in DET.get("keep_rates", []):
                runs.append((size, method, fmt_rate(keep_rate)))
    return runs


DET_RUNS = _det_runs() if DET.get("enabled", True) else []
if DET_RUNS and DET.get("data_root") and not Path(DET["data_root"]).exists():
    _fail(
        "detection.data_root", f"{DET['data_root']} does not exist (a COCO-layout root)"
    )


wildcard_constraints:
    det_size="|".join(DET.get("sizes", {})) or "none",
    det_method="|".join(list(DET.get("methods", [])) + [BASELINE]),
    det_ratio=r"[0-9.]+",


def detection_targets():
    if not DET_RUNS:
        return []
    return [f"{RESULTS}/detection/summary.csv"]


def _det_path(pattern, size, method, ratio):
    return pattern.format(det_size=size, det_method=method, det_ratio=ratio)


def _repo_path(path):
    return path if Path(path).is_absolute() else str(ROOT / path)


def det_config_files(wildcards):
    """The run's mmdet config and the shared base configs (edits rerun)."""
    main = _repo_path(DET["sizes"][wildcards.det_size]["config"])
    return [main] + sorted(
        str(p) for p in (ROOT / "config" / "detection" / "_base_").glob("*.py")
    )


def det_data_input(wildcards):
    return [] if DET.get("data_root") else [DET_DEMO_DATA]


def det_init_input(wildcards):
    load_from = DET["sizes"][wildcards.det_size].get("load_from")
    return [_repo_path(load_from)] if load_from else []


def det_linkage(method):
    """The backbone's linkage of a run: tome for ToMe (and the unreduced
    baseline), else the ATC variant's linkage (its declared default when the
    methods: entry leaves it out)."""
    if method == BASELINE:
        return "tome"
    name, options = config_validation.variant_options(config, method)
    return "tome" if name == "tome" else options["linkage"]


def det_keep_rate(method, path_value):
    """A run's keep rate from its path segment r<value>: the baseline's r0
    keeps every token (1.0)."""
    return 1.0 if method == BASELINE else float(path_value)


def det_run_options(wildcards):
    """Command-line run options of scripts/detection.py for this run."""
    size = DET["sizes"][wildcards.det_size]
    method = wildcards.det_method
    linkage = det_linkage(method)
    keep_rate = det_keep_rate(method, wildcards.det_ratio)
    data_root = DET.get("data_root") or DET_DEMO_DATA
    q = shlex.quote
    options = [
        f"--linkage {q(linkage)}",
        f"--keep-rate {keep_rate:g}",
        f"--data-root {q(data_root)}",
        "--seed 0",
    ]
    if size.get("load_from"):
        options.append(f"--load-from {q(_repo_path(size['load_from']))}")
    if size.get("batch_size"):
        options.append(f"--batch-size {int(size['batch_size'])}")
    extra = dict(size.get("cfg_options") or {})
    if size.get("pretrained"):
        extra["model.backbone.pretrained"] = _repo_path(size["pretrained"])
    if extra:
        options.append(
            "--cfg-options "
            + " ".join(
                q(f"{k}={v if isinstance(v, str) else json.dumps(v)}")
                for k, v in extra.items()
            )
        )
    return " ".join(options)


def det_train_options(wildcards):
    accum = int(DET["sizes"][wildcards.det_size].get("cumulative_iters", 1))
    launcher = "pytorch" if _det_gpus() > 1 else "none"
    return (
        f"{det_run_options(wildcards)} --cumulative-iters {accum} --launcher {launcher}"
    )


def _det_gpus():
    return int(DET.get("gpus_per_train_job", 0))


def det_gpus():
    """GPUs of any detection job (train or eval): > 0 means the detection
    environment must have mmcv's CUDA ops (envs/mmcv_build.py check)."""
    return max(_det_gpus(), int(DET.get("gpus_per_eval_job", 0)))


def det_launch(wildcards):
    """Several GPUs: torch's launcher, one process per GPU."""
    gpus = _det_gpus()
    return (
        f"-m torch.distributed.run --standalone --nproc_per_node={gpus}"
        if gpus > 1
        else ""
    )


def det_runtime(wildcards, attempt):
    return int(DET["sizes"][wildcards.det_size].get("runtime", 30)) * attempt


def det_mem(wildcards, attempt):
    return int(DET["sizes"][wildcards.det_size].get("mem_mb", 8000)) * attempt


def det_work_dir(wildcards, kind="work"):
    """mmengine's work dir of a run's train / eval / benchmark job."""
    return _det_path(
        f"{DET_RUN}/{kind}",
        wildcards.det_size,
        wildcards.det_method,
        wildcards.det_ratio,
    )


def det_code(wildcards):
    method = wildcards.det_method
    name = "tome" if det_linkage(method) == "tome" else "atc"
    return code_hash(("model", "detection"), None if method == BASELINE else name)


def det_summary_runs():
    """Each detection run's size, method, keep rate (1 for the unreduced
    baseline) and result files (the detection summary's manifest)."""
    return [
        {
            "size": size,
            "method": method,
            "keep_rate": det_keep_rate(method, segment),
            "metrics": _det_path(f"{DET_RUN}/metrics.json", size, method, segment),
            "benchmark": _det_path(f"{DET_RUN}/benchmark.json", size, method, segment),
        }
        for size, method, segment in DET_RUNS
    ]
