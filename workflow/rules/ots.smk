# The ATC study's self-supervised-backbone stages.
# Off the shelf: pretrained AugReg / SWAG / MAE backbones (the demo: its own
# pretrained tiny backbone) with a method removing r tokens per block ToMe-style,
# for each r of a sweep and each schedule; no training. Accuracy, GFLOPs and
# throughput per point, one CSV and one accuracy-vs-GFLOPs plot per backbone.
# MAE fine-tuning: the MAE recipe (blr per 256 images, layer-wise lr decay,
# global average pooling) with a merging method at r per block, then evaluated.

OTS = config.get("ots") or {}
MAE = config.get("mae") or {}
OTS_BACKBONES = list((OTS.get("backbones") or {}) if OTS else [])
R_SCHEDULE_NAMES = ["constant", "decrease", "increase"]


def _check_ots_config():
    for section, spec in (("ots", OTS), ("mae", MAE)):
        if not spec:
            continue
        dataset = spec["dataset"]
        if dataset not in config["datasets"]:
            _fail(
                f"{section}.dataset",
                f"{dataset!r} is not defined under datasets: ({', '.join(config['datasets'])})",
            )
        if config["datasets"][dataset]["kind"] in (
            "coco",
            "nuswide",
            "digits_multilabel",
        ):
            _fail(
                f"{section}.dataset",
                f"{dataset!r} is multi-label; this stage reports top-1/top-5",
            )
        for m in spec["methods"]:
            if m not in config["methods"]:
                _fail(
                    f"{section}.methods",
                    f"{m!r} is not defined under methods: ({', '.join(config['methods'])})",
                )
    for name, spec in (OTS.get("backbones") or {}).items():
        pre = spec.get("pretrain")
        if (
            pre is not None
            and config["backbones"].get(pre, {}).get("init") != "pretrain"
        ):
            _fail(
                f"ots.backbones.{name}.pretrain",
                f"{pre!r} is not a backbone pretrained by the DAG (backbones.<name>.init: pretrain)",
            )
    for b in MAE.get("backbones", []):
        if b not in config["backbones"]:
            _fail(
                "mae.backbones",
                f"{b!r} is not defined under backbones: ({', '.join(config['backbones'])})",
            )


_check_ots_config()


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
    return provenance.code_hash(("model", "data", "evaluate", "ots"), method)


def _ots_scale(name):
    """Relative cost of one sweep point: model size x tokens (AugReg tiny = 1)."""
    spec = OTS["backbones"][name]
    if "pretrain" in spec:
        return 0.1
    preset = spec["preset"]
    size = next(
        (
            v
            for k, v in (
                ("tiny", 1),
                ("small", 3),
                ("base", 8),
                ("b16", 8),
                ("large", 25),
                ("l16", 25),
            )
            if k in preset
        ),
        60,
    )
    tokens = {"swag_b16": 3, "swag_l16": 5, "swag_h14": 7, "augreg_large_384": 3}.get(
        preset, 1
    )
    return size * tokens


def ots_runtime(wildcards, attempt):
    """Minutes: points x cost per point (a pass over ImageNet val); doubles on retry."""
    points = len(ots_r_values(wildcards.otsbackbone))
    return int(max(10, 2 * points * _ots_scale(wildcards.otsbackbone)) * attempt)


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


# One job per (backbone, method, schedule) that loops over the r sweep, not one
# per r point: the backbone is loaded, the validation set opened and every r
# checked once per job and shared by its points; a cached job per point would
# make hundreds of tiny jobs (the study: 11 backbones x 5 methods x 2 schedules
# x up to 10 r), each reloading a ViT-H and re-reading ImageNet val's index.
# Adding an r to a sweep reruns that job only.
rule ots_sweep:
    input:
        script=script_path("ots_sweep.py"),
        data=lambda w: dataset_manifest(OTS["dataset"]),
        checkpoint=ots_checkpoint_input,
    output:
        f"{RESULTS}/ots/{{otsbackbone}}/{{method}}/{{schedule}}.csv",
    log:
        f"{RESULTS}/logs/ots/{{otsbackbone}}/{{method}}/{{schedule}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ots/{{otsbackbone}}/{{method}}/{{schedule}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=lambda w: _gpus("eval"),
        mem_mb=lambda w, attempt: int(
            4000 * _ots_scale(w.otsbackbone) ** 0.5 * attempt + 2000
        ),
        runtime=ots_runtime,
    params:
        backbone=ots_backbone_spec,
        method=lambda w: method_spec(w.method)["method"],
        method_kwargs=ots_method_kwargs,
        r=lambda w: " ".join(str(v) for v in ots_r_values(w.otsbackbone)),
        kind=lambda w: config["datasets"][OTS["dataset"]]["kind"],
        root=lambda w: dataset_root(OTS["dataset"]),
        split=OTS.get("split", "val"),
        batch_size=OTS.get("batch_size", 128),
        throughput_batch=OTS.get("throughput_batch") or 0,
        max_images=OTS.get("max_images") or 0,
        num_workers=OTS.get("num_workers", 0),
        code=ots_code,
    shell:
        "python {input.script} --backbone {params.backbone:q} --method {params.method}"
        " --method-kwargs {params.method_kwargs:q} --label {wildcards.method}"
        " --schedule {wildcards.schedule} --r {params.r} --kind {params.kind}"
        " --root {params.root:q} --split {params.split} --batch-size {params.batch_size}"
        " --throughput-batch {params.throughput_batch} --max-images {params.max_images}"
        " --num-workers {params.num_workers} --out {output:q} > {log:q} 2>&1"


rule ots_plot:
    input:
        script=script_path("ots_plot.py"),
        sweeps=ots_sweep_files,
    output:
        table=report(
            f"{RESULTS}/ots/{{otsbackbone}}/sweep.csv",
            caption="../report/ots_sweep.rst",
            category="Off-the-shelf",
            subcategory="{otsbackbone}",
        ),
        plot=report(
            f"{RESULTS}/ots/{{otsbackbone}}/accuracy_vs_gflops.png",
            caption="../report/ots_accuracy_vs_gflops.rst",
            category="Off-the-shelf",
            subcategory="{otsbackbone}",
        ),
    log:
        f"{RESULTS}/logs/ots/{{otsbackbone}}/plot.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=lambda w: provenance.code_hash(("ots",)),
    shell:
        "python {input.script} --sweeps {input.sweeps:q} --table {output.table:q}"
        " --plot {output.plot:q} > {log:q} 2>&1"


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


rule mae_finetune:
    input:
        script=script_path("train.py"),
        data=lambda w: dataset_manifest(w.dataset),
        init=init_input,
    output:
        model=f"{RESULTS}/mae/{MAE_DIR}/final.pth",
        metrics=f"{RESULTS}/mae/{MAE_DIR}/train_metrics.json",
        log_csv=f"{RESULTS}/mae/{MAE_DIR}/log.csv",
    log:
        f"{RESULTS}/logs/mae_finetune/{MAE_DIR}.log",
    benchmark:
        f"{RESULTS}/benchmarks/mae_finetune/{MAE_DIR}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=lambda w: _gpus("train"),
        mem_mb=train_mem,
        runtime=mae_runtime,
    params:
        spec=mae_spec,
        code=finetune_code,
    shell:
        "python {input.script} --spec {params.spec:q} --final {output.model:q} > {log:q} 2>&1"


rule mae_evaluate:
    input:
        script=script_path("evaluate.py"),
        model=f"{RESULTS}/mae/{MAE_DIR}/final.pth",
        data=lambda w: dataset_manifest(w.dataset),
    output:
        metrics=f"{RESULTS}/mae_eval/{MAE_DIR}/metrics.json",
        patterns=f"{RESULTS}/mae_eval/{MAE_DIR}/patterns.npz",
        features=f"{RESULTS}/mae_eval/{MAE_DIR}/cls_features.npz",
    log:
        f"{RESULTS}/logs/mae_evaluate/{MAE_DIR}.log",
    benchmark:
        f"{RESULTS}/benchmarks/mae_evaluate/{MAE_DIR}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=lambda w: _gpus("eval"),
        mem_mb=lambda w, attempt: int(4000 * _scale(w.backbone) ** 0.5 * attempt),
        runtime=lambda w, attempt: int(30 * attempt),
    params:
        kind=lambda w: config["datasets"][w.dataset]["kind"],
        root=lambda w: dataset_root(w.dataset),
        img_size=lambda w: config["datasets"][w.dataset]["img_size"],
        num_images=config["evaluate"].get("num_pattern_images", 256),
        batch_size=config["evaluate"].get("batch_size", 128),
        throughput_batch=config["evaluate"].get("throughput_batch") or 0,
        code=evaluate_code,
    shell:
        "python {input.script} --checkpoint {input.model:q} --kind {params.kind}"
        " --root {params.root:q} --img-size {params.img_size} --batch-size {params.batch_size}"
        " --num-pattern-images {params.num_images} --throughput-batch {params.throughput_batch}"
        " --metrics {output.metrics:q} --patterns {output.patterns:q} --features {output.features:q}"
        " > {log:q} 2>&1"


rule mae_summary:
    input:
        script=script_path("mae_summary.py"),
        metrics=[
            f"{RESULTS}/mae_eval/{MAE_DIR}/metrics.json".format(**run)
            for run in MAE_RUNS
        ],
    output:
        report(
            f"{RESULTS}/mae/metrics.csv",
            caption="../report/mae_metrics.rst",
            category="MAE fine-tuning",
        ),
    log:
        f"{RESULTS}/logs/mae_summary.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        runs=json.dumps(MAE_RUNS),
        code=lambda w: provenance.code_hash(("ots",)),
    shell:
        "python {input.script} --runs {params.runs:q} --metrics {input.metrics:q}"
        " --table {output:q} > {log:q} 2>&1"
