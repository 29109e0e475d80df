# The ATC study's self-supervised-backbone stages.
# Off the shelf: pretrained AugReg / SWAG / MAE backbones (the demo: its own
# pretrained tiny backbone) with a method removing r tokens per block ToMe-style,
# for each r of a sweep and each schedule; no training. Accuracy, GFLOPs and
# throughput per point, one CSV and one accuracy-vs-GFLOPs plot per backbone.
# MAE fine-tuning: the MAE recipe (blr per 256 images, layer-wise lr decay,
# global average pooling) with a merging method at r per block, then evaluated.


include: "ots_common.smk"


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
    threads: job_threads()
    resources:
        gpu=lambda w: _gpus("eval"),
        mem_mb=array_uniform("ots_sweep", ots_mem),
        runtime=array_uniform("ots_sweep", ots_runtime),
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
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --backbone {params.backbone:q} --method {params.method}'
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
        code=lambda w: code_hash(("ots",)),
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --sweeps {input.sweeps:q} --table {output.table:q}'
        " --plot {output.plot:q} > {log:q} 2>&1"


# ---------------------------------------------------------------- MAE fine-tuning


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
    threads: job_threads()
    resources:
        gpu=lambda w: _gpus("train"),
        mem_mb=array_uniform("mae_finetune", train_mem),
        runtime=array_uniform("mae_finetune", mae_runtime),
    params:
        spec=mae_spec,
        code=finetune_code,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --spec {params.spec:q} --final {output.model:q} > {log:q} 2>&1'


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
    threads: job_threads()
    resources:
        gpu=lambda w: _gpus("eval"),
        mem_mb=array_uniform(
            "mae_evaluate",
            lambda w, attempt: int(4000 * _scale(w.backbone) ** 0.5 * attempt),
        ),
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
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --checkpoint {input.model:q} --kind {params.kind}'
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
        code=lambda w: code_hash(("ots",)),
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --runs {params.runs:q} --metrics {input.metrics:q}'
        " --table {output:q} > {log:q} 2>&1"
