# Evaluation: accuracy or mAP, parameters, GFLOPs, throughput, and the
# reduction patterns and CLS features of a fixed set of validation images.
# One job per run, unless evaluate.after_training: then the fine-tuning job
# writes these outputs itself (finetune.smk, evaluate_common.smk).


if not EVAL_AFTER_TRAINING:

    rule evaluate:
        input:
            script=script_path("evaluate.py"),
            model=f"{RESULTS}/finetune/{RUN_DIR}/final.pth",
            data=lambda w: dataset_manifest(w.dataset),
        output:
            metrics=EVAL_OUTPUTS["eval_metrics"],
            patterns=EVAL_OUTPUTS["patterns"],
            features=EVAL_OUTPUTS["features"],
        log:
            f"{RESULTS}/logs/evaluate/{RUN_DIR}.log",
        benchmark:
            f"{RESULTS}/benchmarks/evaluate/{RUN_DIR}.tsv"
        priority: 10
        conda:
            "../../envs/torch.yaml"
        threads: job_threads("eval", "evaluate")
        resources:
            gpu=lambda w: _gpus("eval"),
            mem_mb=eval_mem,
            runtime=lambda w, attempt: int(30 * attempt),
        params:
            kind=lambda w: evaluate_options(w)["dataset"],
            root=lambda w: evaluate_options(w)["data_root"],
            img_size=lambda w: evaluate_options(w)["img_size"],
            num_images=lambda w: evaluate_options(w)["num_pattern_images"],
            batch_size=lambda w: evaluate_options(w)["batch_size"],
            throughput_batch=lambda w: evaluate_options(w)["throughput_batch"],
            code=evaluate_code,
            device=job_device,
        shell:
            'OMP_NUM_THREADS={threads} "$TOKENREDUCTION_PYTHON" {input.script:q} --checkpoint {input.model:q} --kind {params.kind}'
            " --root {params.root:q} --img-size {params.img_size} --batch-size {params.batch_size}"
            " --num-pattern-images {params.num_images} --throughput-batch {params.throughput_batch}"
            " --device {params.device}"
            " --metrics {output.metrics:q} --patterns {output.patterns:q} --features {output.features:q}"
            " > {log:q} 2>&1"
