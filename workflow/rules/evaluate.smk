# Evaluation: accuracy or mAP, parameters, GFLOPs, throughput, and the
# reduction patterns and CLS features of a fixed set of validation images.


rule evaluate:
    input:
        script=script_path("evaluate.py"),
        model=f"{RESULTS}/finetune/{RUN_DIR}/final.pth",
        data=lambda w: dataset_manifest(w.dataset),
    output:
        metrics=f"{RESULTS}/eval/{RUN_DIR}/metrics.json",
        patterns=f"{RESULTS}/eval/{RUN_DIR}/patterns.npz",
        features=f"{RESULTS}/eval/{RUN_DIR}/cls_features.npz",
    log:
        f"{RESULTS}/logs/evaluate/{RUN_DIR}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{RUN_DIR}.tsv"
    priority: 10
    conda:
        "../../envs/torch.yaml"
    threads: job_threads()
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
        'OMP_NUM_THREADS={threads} "$TOKENREDUCTION_PYTHON" {input.script:q} --checkpoint {input.model:q} --kind {params.kind}'
        " --root {params.root:q} --img-size {params.img_size} --batch-size {params.batch_size}"
        " --num-pattern-images {params.num_images} --throughput-batch {params.throughput_batch}"
        " --metrics {output.metrics:q} --patterns {output.patterns:q} --features {output.features:q}"
        " > {log:q} 2>&1"
