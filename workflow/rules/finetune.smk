# Pretraining (demo backbones only) and fine-tuning with reduction. With
# evaluate.after_training (the demo), a fine-tuning job also evaluates its
# model and writes the evaluate rule's outputs (evaluate_common.smk).


include: "evaluate_common.smk"


rule pretrain:
    input:
        script=script_path("train.py"),
        data=lambda w: dataset_manifest(config["pretrain"]["dataset"]),
    output:
        model=f"{RESULTS}/pretrain/{{backbone}}/final.pth",
        metrics=f"{RESULTS}/pretrain/{{backbone}}/train_metrics.json",
    log:
        f"{RESULTS}/logs/pretrain/{{backbone}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{backbone}}.tsv"
    priority: 30
    conda:
        "../../envs/torch.yaml"
    threads: job_threads()
    resources:
        gpu=lambda w: _gpus("train"),
        mem_mb=train_mem,
        runtime=train_runtime,
    params:
        spec=pretrain_spec,
        device=job_device,
        code=lambda w: code_hash(("model", "data", "train")),
    shell:
        "set --; if [ {resources.gpu} -gt 1 ]; then"
        " set -- -m torch.distributed.run --standalone --nproc_per_node={resources.gpu}; fi;"
        " procs=$(( {resources.gpu} > 1 ? {resources.gpu} : 1 ));"
        " OMP_NUM_THREADS=$(( ({threads} + procs - 1) / procs ))"
        ' "$TOKENREDUCTION_PYTHON" "$@" {input.script:q} --spec {params.spec:q}'
        " --device {params.device}"
        " --final {output.model:q} > {log:q} 2>&1"


rule finetune:
    input:
        script=script_path("train.py"),
        data=lambda w: dataset_manifest(w.dataset),
        init=init_input,
        teacher=teacher_input,
    output:
        **(EVAL_OUTPUTS if EVAL_AFTER_TRAINING else {}),
        model=f"{RESULTS}/finetune/{RUN_DIR}/final.pth",
        metrics=f"{RESULTS}/finetune/{RUN_DIR}/train_metrics.json",
        log_csv=f"{RESULTS}/finetune/{RUN_DIR}/log.csv",
    log:
        f"{RESULTS}/logs/finetune/{RUN_DIR}.log",
    benchmark:
        f"{RESULTS}/benchmarks/finetune/{RUN_DIR}.tsv"
    priority: 20
    conda:
        "../../envs/torch.yaml"
    threads: job_threads("train", "finetune")
    resources:
        gpu=lambda w: _gpus("train"),
        mem_mb=train_mem,
        runtime=finetune_job_runtime,
    params:
        spec=finetune_spec,
        device=job_device,
        then_evaluate=then_evaluate_arg,
        code=finetune_job_code,
    shell:
        "set --; if [ {resources.gpu} -gt 1 ]; then"
        " set -- -m torch.distributed.run --standalone --nproc_per_node={resources.gpu}; fi;"
        " procs=$(( {resources.gpu} > 1 ? {resources.gpu} : 1 ));"
        " OMP_NUM_THREADS=$(( ({threads} + procs - 1) / procs ))"
        ' "$TOKENREDUCTION_PYTHON" "$@" {input.script:q} --spec {params.spec:q}'
        " --device {params.device}"
        " --final {output.model:q} {params.then_evaluate} > {log:q} 2>&1"
