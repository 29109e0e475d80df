# Helpers of ots.smk (its config is checked by config_validation): wildcards, the MAE run table, input
# functions, job specs and resources.

OTS = config.get("ots") or {}
MAE = config.get("mae") or {}
OTS_BACKBONES = list((OTS.get("backbones") or {}) if OTS else [])
R_SCHEDULE_NAMES = ["constant", "decrease", "increase"]


wildcard_constraints:
    otsbackbone="|".join(OTS_BACKBONES) or "no-ots-backbone",
    schedule="|".join(R_SCHEDULE_NAMES),
    r=r"\d+",


# ---------------------------------------------------------------- off the shelf


def ots_r_values(name):
    spec = OTS["backbones"][name]
    if "r" in spec:
        return [int(v) for v in spec["r"]]
    if "r" in OTS:
        return [int(v) for v in OTS["r"]]
    _fail(f"ots.backbones.{name}.r", "no r sweep given (here or as ots.r)")


def ots_checkpoint_input(wildcards):
    """The DAG's pretrained backbone, or the local checkpoint file; nothing
    for weights timm fetches itself (AugReg)."""
    spec = OTS["backbones"][wildcards.otsbackbone]
    if "pretrain" in spec:
        return [f"{RESULTS}/pretrain/{spec['pretrain']}/final.pth"]
    return [spec["checkpoint"]] if spec.get("checkpoint") else []


def ots_backbone_spec(wildcards):
    """The backbone entry for tokenreduction.ots.preset_from_spec (JSON)."""
    spec = dict(OTS["backbones"][wildcards.otsbackbone])
    spec.pop("r", None)
    pre = spec.pop("pretrain", None)
    if pre is not None:
        spec["trained"] = f"{RESULTS}/pretrain/{pre}/final.pth"
    return json.dumps({"name": wildcards.otsbackbone, **spec}, sort_keys=True)


def ots_method_kwargs(wildcards):
    spec = dict(method_spec(wildcards.method))
    spec.pop("method")
    return json.dumps(spec, sort_keys=True)


def ots_code(wildcards):
    method = method_spec(wildcards.method)["method"]
    return code_hash(("model", "data", "train", "evaluate", "ots"), method)


#: relative cost of one point of each preset (GFLOPs per image, AugReg tiny = 1)
OTS_PRESET_COST = {
    "augreg_tiny": 1,
    "augreg_small": 3,
    "augreg_base": 12,
    "augreg_large": 40,
    "augreg_large_384": 130,
    "swag_b16": 40,
    "swag_l16": 250,
    "swag_h14": 800,
    "mae_base": 12,
    "mae_large": 40,
    "mae_huge": 130,
}


def _ots_scale(name):
    spec = OTS["backbones"][name]
    return 0.1 if "pretrain" in spec else OTS_PRESET_COST.get(spec["preset"], 100)


def ots_runtime(wildcards, attempt):
    """Minutes: r points x a pass over the validation set (about 0.1 min per
    unit of cost on one GPU for ImageNet val); doubles on each retry."""
    points = len(ots_r_values(wildcards.otsbackbone))
    return int(max(10, 0.1 * points * _ots_scale(wildcards.otsbackbone)) * attempt)


def ots_mem(wildcards, attempt):
    """MB of host memory (the model, a batch, the data loader workers)."""
    return int((4000 + 400 * _ots_scale(wildcards.otsbackbone) ** 0.5) * attempt)


def ots_sweep_files(wildcards):
    return expand(
        f"{RESULTS}/ots/{wildcards.otsbackbone}/{{method}}/{{schedule}}.csv",
        method=OTS["methods"],
        schedule=OTS["schedules"],
    )


def ots_targets():
    if not OTS:
        return []
    return expand(
        f"{RESULTS}/ots/{{b}}/{{name}}",
        b=OTS_BACKBONES,
        name=["sweep.csv", "accuracy_vs_gflops.png"],
    )


# ---------------------------------------------------------------- MAE fine-tuning

MAE_DIR = "{dataset}/{backbone}/{method}/r{r}-{schedule}/seed{seed}"


def _mae_runs():
    """Every MAE fine-tuning run; a method without reduction runs once, at r 0."""
    if not MAE:
        return []
    runs = {}
    for b in MAE["backbones"]:
        for m in MAE["methods"]:
            for s in MAE.get("seeds", config["seeds"]):
                if method_spec(m)["method"] == BASELINE:
                    runs[(MAE["dataset"], b, m, 0, "constant", s)] = None
                    continue
                for r in MAE["r"]:
                    for sched in MAE["schedules"]:
                        runs[(MAE["dataset"], b, m, int(r), sched, s)] = None
    keys = ("dataset", "backbone", "method", "r", "schedule", "seed")
    return [dict(zip(keys, run)) for run in runs]


MAE_RUNS = _mae_runs()


def mae_spec(wildcards):
    """TrainConfig fields: finetune: < the dataset's recipe < mae.recipe; the
    backbone with mae.model_kwargs (global_pool: avg); r per block."""
    fields = {
        **config["finetune"],
        **(config["datasets"][wildcards.dataset].get("recipe") or {}),
        **(MAE.get("recipe") or {}),
    }
    fields.update(_model_fields(wildcards.backbone))
    fields["model_kwargs"] = {
        **fields["model_kwargs"],
        **(MAE.get("model_kwargs") or {}),
    }
    fields.update(_data_fields(wildcards.dataset))
    spec = dict(method_spec(wildcards.method))
    method = spec.pop("method")
    if method == BASELINE:
        fields["method"] = None
    else:
        fields.update(
            method=method,
            method_kwargs=spec,
            budget="r",
            r=int(wildcards.r),
            r_schedule=wildcards.schedule,
            reduction_loc=None,
            prop_attn=MAE.get("prop_attn", False),
        )
    fields["seed"] = int(wildcards.seed)
    init = init_input(wildcards)
    fields["init_checkpoint"] = init[0] if init else None
    fields["wandb_project"] = config.get("wandb_project")
    return json.dumps(fields, sort_keys=True)


def mae_runtime(wildcards, attempt):
    epochs = float(
        {**config["finetune"], **(MAE.get("recipe") or {})}.get("epochs", 100)
    )
    return int(max(10, 4 * epochs * _scale(wildcards.backbone)) * attempt)


def mae_targets():
    return [f"{RESULTS}/mae/metrics.csv"] if MAE_RUNS else []
