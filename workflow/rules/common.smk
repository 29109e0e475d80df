"""Config loading and validation, the run table, and input functions.

Everything the rules need to know about the config is computed here once, at
DAG build: invalid configs stop here with the offending key named.
"""

import functools
import importlib.util
import json
import sys
from pathlib import Path

from snakemake.utils import validate

ROOT = Path(workflow.basedir)


def _load_config_validation():
    """tokenreduction.config_validation without importing torch or timm."""
    path = ROOT / "src" / "tokenreduction" / "config_validation.py"
    spec = importlib.util.spec_from_file_location(
        "tokenreduction_config_validation", path
    )
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up
    spec.loader.exec_module(loaded)
    return loaded


# Everything a job would check, checked now (schema, methods and their options,
# locations, token budgets, recipes, timm models, paths): a mistake stops the
# DAG build with every offending key named, and no traceback.
config_validation = _load_config_validation()
# rehearse=true: the study on small stand-ins (docs/rehearsal.md), swapped in
# before the checks so that they check the stand-ins
if any(key in config for key in ("rehearse", "rehearse_datasets", "rehearse_warm")):
    _spec = importlib.util.spec_from_file_location(
        "tokenreduction_rehearsal", ROOT / "workflow" / "lib" / "rehearsal.py"
    )
    _rehearsal = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_rehearsal)
    _rehearsal.apply_rehearsal(config, ROOT)
_problems = config_validation.check_config(
    config,
    config_validation.load_schema(ROOT / "workflow" / "schemas" / "config.schema.yaml"),
    base=Path.cwd(),
    repo=ROOT,
)
if _problems:
    sys.exit(config_validation.format_problems(_problems))
# fills in the schema's defaults
validate(config, schema="../schemas/config.schema.yaml")

RESULTS = config["results"]


def script_path(name):
    """Absolute path of an entry point under scripts/ (an input of its rule,
    so editing the script reruns the rule's jobs)."""
    return str(ROOT / "scripts" / name)


def _load_provenance():
    """tokenreduction.provenance without importing torch (DAG build stays fast)."""
    path = ROOT / "src" / "tokenreduction" / "provenance.py"
    spec = importlib.util.spec_from_file_location("tokenreduction_provenance", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


provenance = _load_provenance()


@functools.lru_cache(maxsize=None)
def _cached_code_hash(stages, method, extra):
    return provenance.code_hash(stages, method, extra)


def code_hash(stages=(), method=None, extra=()):
    """provenance.code_hash, computed once per argument set in this DAG build
    rather than once per job (the sources do not change while it is built)."""
    return _cached_code_hash(tuple(stages), method, tuple(str(p) for p in extra))


DEMO_KINDS = {"digits", "digits_multilabel", "digits_ufgir"}
BASELINE = "none"


class ConfigError(ValueError):
    pass


def _fail(key, message):
    """Stop the DAG build with one clear message (no traceback)."""
    sys.exit(f"invalid config at {key}: {message}")


def backbone_depth(name):
    """Blocks of a backbone, read from timm's own model definition (with the
    backbone's model_kwargs); model_kwargs.depth where timm is not installed
    beside Snakemake."""
    spec = config["backbones"][name]
    kwargs = spec.get("model_kwargs") or {}
    try:
        return config_validation.timm_model_info(spec["model"], kwargs).depth
    except LookupError:
        if kwargs.get("depth") is not None:
            return int(kwargs["depth"])
        _fail(
            f"backbones.{name}.model_kwargs.depth",
            "timm is not installed where Snakemake runs: give the depth here",
        )


def fmt_rate(rate):
    return f"{float(rate):g}"


def baseline_method():
    for name, spec in config["methods"].items():
        if spec["method"] == BASELINE:
            return name
    return "deit"


def _runs():
    """Every fine-tuning run: dicts with dataset, backbone, method, keep_rate, seed."""
    runs = {}
    base = baseline_method()
    for exp in config["experiments"]:
        for d in exp["datasets"]:
            for b in exp["backbones"]:
                for s in config["seeds"]:
                    runs[(d, b, base, "1", s)] = None
                    for m in exp["methods"]:
                        if m == base:
                            continue
                        if config["methods"][m]["method"] == BASELINE:
                            # another unreduced variant (a PEFT baseline): once, at keep rate 1
                            runs[(d, b, m, "1", s)] = None
                            continue
                        for kr in exp["keep_rates"]:
                            runs[(d, b, m, fmt_rate(kr), s)] = None
    keys = ("dataset", "backbone", "method", "keep_rate", "seed")
    return [
        {**dict(zip(keys, run)), "capacity": config["backbones"][run[1]]["capacity"]}
        for run in runs
    ]


RUNS = _runs()
RUN_DIR = "{dataset}/{backbone}/{method}/kr{keep_rate}/seed{seed}"


def method_spec(name):
    if name not in config["methods"]:
        return {"method": BASELINE}
    return config["methods"][name]


wildcard_constraints:
    dataset="|".join(config["datasets"]),
    backbone="|".join(config["backbones"]),
    method="|".join(list(config["methods"]) + ["deit"]),
    keep_rate=r"[0-9.]+",
    seed=r"\d+",


def run_paths(pattern):
    return [pattern.format(**run) for run in RUNS]


# ---------------------------------------------------------------- data


def dataset_manifest(name):
    return f"{RESULTS}/data/{name}/manifest.json"


def dataset_root(name):
    return config["datasets"][name]["root"]


# ---------------------------------------------------------------- training


def init_input(wildcards):
    """What a fine-tuning run starts from: the DAG's pretrained demo backbone,
    or a checkpoint file; nothing for timm's own pretrained weights."""
    init = config["backbones"][wildcards.backbone]["init"]
    if init == "pretrain":
        return [f"{RESULTS}/pretrain/{wildcards.backbone}/final.pth"]
    if init == "timm":
        return []
    return [init]


def teacher_input(wildcards):
    """DynamicViT distils from the plain model fine-tuned on the same dataset."""
    if method_spec(wildcards.method)["method"] != "dynamicvit":
        return []
    return [
        f"{RESULTS}/finetune/{wildcards.dataset}/{wildcards.backbone}/{baseline_method()}/kr1/seed{wildcards.seed}/final.pth"
    ]


def _model_fields(backbone):
    spec = config["backbones"][backbone]
    return {
        "model": spec["model"],
        "model_kwargs": spec.get("model_kwargs") or {},
        "pretrained": spec["init"] == "timm",
    }


def _method_fields(method_name, keep_rate):
    """TrainConfig fields of a method (variant): a variant may carry its own
    ``budget`` and ``clca`` options (e.g. evit-clca: {method: evit, clca: {...}});
    the rest of its keys are the method's keyword arguments."""
    spec = dict(method_spec(method_name))
    method = spec.pop("method")
    budget = spec.pop("budget", None) or config["budget"]
    clca = spec.pop("clca", None)
    # which parameters train (CLCA study's PEFT / H2T / VQT baselines)
    tuning = {k: spec.pop(k) for k in ("tuning", "tuning_kwargs") if spec.get(k)}
    if method == BASELINE:
        return {"method": None, **tuning}
    fields = {
        "method": method,
        "keep_rate": float(keep_rate),
        "reduction_loc": list(config["reduction_loc"]),
        "budget": budget,
        "method_kwargs": spec,
    }
    if clca:
        fields["clca"] = clca
    fields.update(tuning)
    return fields


def _stages(stages, method_name):
    """The code stages of a job, with CLCA's package for CLCA variants."""
    spec = method_spec(method_name)
    uses_clca = spec.get("clca") or spec.get("tuning", "full") != "full"
    return stages + (("clca",) if uses_clca else ())


def _data_fields(dataset):
    spec = config["datasets"][dataset]
    return {
        "dataset": spec["kind"],
        "data_root": spec["root"],
        "img_size": spec["img_size"],
    }


def finetune_spec(wildcards):
    recipe = {
        **config["finetune"],
        **(config["datasets"][wildcards.dataset].get("recipe") or {}),
    }
    fields = {
        **recipe,
        **_model_fields(wildcards.backbone),
        **_data_fields(wildcards.dataset),
    }
    fields.update(_method_fields(wildcards.method, wildcards.keep_rate))
    fields["seed"] = int(wildcards.seed)
    init, teacher = init_input(wildcards), teacher_input(wildcards)
    fields["init_checkpoint"] = init[0] if init else None
    if teacher:
        fields["teacher_checkpoint"] = teacher[0]
    fields["wandb_project"] = config.get("wandb_project")
    return json.dumps(fields, sort_keys=True)


def pretrain_spec(wildcards):
    pre = config["pretrain"]
    fields = {**config["finetune"], **(pre.get("recipe") or {})}
    fields.update(_model_fields(wildcards.backbone))
    fields.update(_data_fields(pre["dataset"]))
    fields.update(
        {
            "method": None,
            "seed": 0,
            "pretrained": False,
            "wandb_project": config.get("wandb_project"),
        }
    )
    return json.dumps(fields, sort_keys=True)


def finetune_code(wildcards):
    """Fingerprint of the code a fine-tuning job runs (see tokenreduction.provenance)."""
    method = method_spec(wildcards.method)["method"]
    return code_hash(_stages(("model", "data", "train"), wildcards.method), method)


def evaluate_code(wildcards):
    method = method_spec(wildcards.method)["method"]
    return code_hash(
        _stages(("model", "data", "train", "evaluate"), wildcards.method), method
    )


# ---------------------------------------------------------------- resources


def _load_resources():
    """workflow/lib/resources.py (plain Python): the resource model."""
    path = ROOT / "workflow" / "lib" / "resources.py"
    spec = importlib.util.spec_from_file_location("tokenreduction_resources", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


resource_model = _load_resources()
RESOURCES = config.get("resources") or {}


def _recipe(dataset=None):
    recipe = dict(config["finetune"])
    if dataset is not None:
        recipe.update(config["datasets"][dataset].get("recipe") or {})
    return recipe


def arrayed(rule_name):
    """Whether the cluster profile submits this rule's jobs as Slurm arrays
    (CLUSTER, cluster.smk): every task of an array gets the same resources,
    so such a rule asks for the largest request among its jobs."""
    arrays = CLUSTER["array_jobs"]
    return "all" in arrays or rule_name in arrays


def array_uniform(rule_name, request):
    """A resource function for rule_name: ``request(wildcards, attempt)`` of
    each job, or, where the cluster profile arrays the rule, the largest over
    all its jobs (their wildcards: ARRAY_JOB_WILDCARDS, cluster_common.smk),
    the same for every task (workflow/lib/resources.py; once per attempt)."""

    @functools.lru_cache(maxsize=None)
    def largest(attempt):
        return resource_model.largest_request(
            request, ARRAY_JOB_WILDCARDS[rule_name](), attempt
        )

    def uniform(wildcards, attempt):
        return largest(attempt) if arrayed(rule_name) else request(wildcards, attempt)

    return uniform


def _workers(dataset):
    return int(_recipe(dataset).get("num_workers", 0) or 0)


def job_threads(kind="train", rule_name=None):
    """Threads of each training/evaluation job (a function of its wildcards):
    data-loading workers + 1 per process, at least resources.threads_per_job,
    times the GPUs of a torchrun job (workflow/lib/resources.py); the most
    over the rule's runs where its jobs go in arrays."""

    def threads(wildcards):
        if rule_name and arrayed(rule_name):
            workers = _most_workers()
        else:
            workers = _workers(getattr(wildcards, "dataset", None))
        gpus = _gpus(kind) if kind == "train" else 1
        return resource_model.job_threads(
            workers, gpus, at_least=int(RESOURCES.get("threads_per_job", 1))
        )

    return threads


def _gpus(kind):
    return int(RESOURCES.get(f"gpus_per_{kind}_job", 0))


def _scale(backbone):
    """Relative cost of a backbone: 1 (tiny) .. ~20 (large), from its name or width."""
    spec = config["backbones"][backbone]
    width = (spec.get("model_kwargs") or {}).get("embed_dim")
    if width is not None:
        return max(1.0, (int(width) / 192) ** 2)
    for name, scale in (("huge", 40.0), ("large", 20.0), ("base", 8.0), ("small", 3.0)):
        if name in spec["model"]:
            return scale
    return 1.0


def _train_estimate(dataset, backbone, recipe_extra=None):
    """Estimated minutes of one training job (no safety factor)."""
    recipe = {**_recipe(dataset), **(recipe_extra or {})}
    epochs = float(recipe.get("epochs", 30)) + float(
        recipe.get("cooldown_epochs", 0) or 0
    )
    try:
        images = resource_model.train_images(dataset, config["datasets"][dataset])
    except resource_model.ResourceError as err:
        sys.exit(str(err))
    rate = resource_model.throughput(
        backbone,
        config["backbones"][backbone],
        RESOURCES.get("train_throughput") or {},
    )
    return resource_model.train_estimate_minutes(
        images,
        epochs,
        rate,
        _gpus("train"),
        config["datasets"][dataset]["img_size"],
    )


def train_estimate(wildcards):
    """Estimated minutes of a fine-tuning (or pretraining) job, no safety factor."""
    if hasattr(wildcards, "dataset"):
        return _train_estimate(wildcards.dataset, wildcards.backbone)
    pre = config["pretrain"]
    return _train_estimate(pre["dataset"], wildcards.backbone, pre.get("recipe"))


@functools.lru_cache(maxsize=None)
def _largest_run_estimate():
    return max(_train_estimate(r["dataset"], r["backbone"]) for r in RUNS)


def train_runtime(wildcards, attempt, uniform=False):
    """Minutes: the estimate x resources.time_safety_factor + overhead; grows
    with each retry (workflow/lib/resources.py). uniform: the largest run's
    (a rule whose jobs go in arrays)."""
    safety = float(
        RESOURCES.get("time_safety_factor", resource_model.DEFAULT_SAFETY_FACTOR)
    )
    estimate = _largest_run_estimate() if uniform else train_estimate(wildcards)
    return resource_model.time_limit_minutes(estimate, safety, attempt)


@functools.lru_cache(maxsize=None)
def _largest_scale():
    """The largest backbone scale among the runs (once per DAG build, not per job)."""
    return max(_scale(backbone) for backbone in {r["backbone"] for r in RUNS})


@functools.lru_cache(maxsize=None)
def _most_workers():
    """The most data-loading workers among the runs' datasets (once per DAG build)."""
    return max(_workers(d) for d in analysis_datasets())


def train_mem(wildcards, attempt):
    scale = (
        _largest_scale()
        if arrayed("finetune") and hasattr(wildcards, "dataset")
        else _scale(wildcards.backbone)
    )
    return int(min(4000 + 2000 * scale, 120000) * attempt)


def eval_mem(wildcards, attempt):
    scale = _largest_scale() if arrayed("evaluate") else _scale(wildcards.backbone)
    return int(4000 * scale**0.5 * attempt)


def job_device(wildcards, resources):
    """The device a training/evaluation job runs on, from its own GPU request
    (the rule's gpu resource, after any --set-resources): cuda when it asked
    for GPUs, cpu when not; never 'auto', so that a GPU job on a node where
    CUDA is not usable fails at once instead of training on the CPU
    (tokenreduction.train.runtime.resolve_device). resources.device (cpu
    or cuda) replaces that choice for every job, e.g. cpu on fake GPUs."""
    chosen = config.get("resources", {}).get("device")
    if chosen:
        return chosen
    return "cuda" if int(resources.get("gpu", 0) or 0) > 0 else "cpu"


# ---------------------------------------------------------------- analysis

ANALYSIS_AXES = config.get("analysis", {}).get("axes", ["rates", "capacity", "models"])


wildcard_constraints:
    axis="|".join(ANALYSIS_AXES),


def analysis_datasets():
    return sorted({run["dataset"] for run in RUNS})


def dataset_eval_files(wildcards):
    runs = [r for r in RUNS if r["dataset"] == wildcards.dataset]
    return [
        f"{RESULTS}/eval/{RUN_DIR}/{name}".format(**r)
        for r in runs
        for name in ("patterns.npz", "cls_features.npz")
    ]


def eval_root(wildcards, input):
    return str(Path(input.summary).parent.parent / "eval")


def backbone_depths():
    return json.dumps({name: backbone_depth(name) for name in config["backbones"]})


def analysis_code(wildcards):
    return code_hash(("analysis",))


def analysis_targets():
    per_dataset = [
        f"{RESULTS}/analysis/{{dataset}}/correlations_{axis}.csv"
        for axis in ANALYSIS_AXES
    ] + [
        f"{RESULTS}/analysis/{{dataset}}/token_stats.json",
        f"{RESULTS}/analysis/{{dataset}}/rho_heatmap.png",
    ]
    targets = expand(per_dataset, dataset=analysis_datasets())
    return targets + [f"{RESULTS}/analysis/heatmap_comparison.csv"]
