# Detection and instance segmentation (ATC study): ViT-Adapter Mask R-CNN with
# ToMe / ATC merging, trained, evaluated (COCO bbox + segm mAP) and benchmarked
# per (size, method, ratio), then one table. The jobs run in the detection
# environment: envs/mmdet.yaml under --sdm conda, else the interpreter of
# detection.python (default .venv-mmdet/bin/python), whose environment the
# DAG builds itself (rule detection_env, beside the fine-tuning jobs).


include: "detection_common.smk"


if DET_ENV_STAMP and DET_RUNS:

    rule detection_env:
        """The detection environment (OpenMMLab pins: torch 2.13.0, mmcv 2.1.0
        with its compiled ops, mmdet 3.3.0), built once by envs/install_mmdet.sh;
        mmcv's compiled wheel is cached under ~/.cache/tokenreduction, keyed by
        the torch and mmcv versions, so a rebuild takes a minute."""
        input:
            script=str(ROOT / "envs" / "install_mmdet.sh"),
        output:
            DET_ENV_STAMP,
        log:
            f"{RESULTS}/logs/detection/env.log",
        priority: 50
        # on a cluster, built in a job on a GPU node when the detection jobs
        # use GPUs (mmcv's CUDA ops compile there), else in this process
        localrule: det_gpus() == 0
        conda:
            # for the record: under --sdm conda this rule is not defined, the
            # detection jobs get envs/mmdet.yaml instead
            "../../envs/mmdet.yaml"
        threads: 1 if det_gpus() == 0 else 8
        resources:
            mem_mb=4000 if det_gpus() == 0 else 16000,
            runtime=60 if det_gpus() == 0 else 120,
            gpu=1 if det_gpus() > 0 else 0,
        params:
            venv=lambda w, output: str(Path(output[0]).parent),
            require_cuda=1 if det_gpus() > 0 else 0,
        shell:
            "TOKENREDUCTION_DETECTION_REQUIRE_CUDA={params.require_cuda} MAX_JOBS=${{MAX_JOBS:-{threads}}}"
            " bash {input.script:q} {params.venv:q} > {log:q} 2>&1"


rule make_detection_demo_data:
    input:
        script=script_path("detection.py"),
        env=det_env_input,
    output:
        directory(DET_DEMO_DATA),
    log:
        f"{RESULTS}/logs/detection/make_demo_data.log",
    benchmark:
        f"{RESULTS}/benchmarks/make_detection_demo_data/make_demo_data.tsv"
    conda:
        "../../envs/mmdet.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        check=DET_CHECK,
        num_images=DET.get("demo_data", {}).get("num_images", 8),
        image_size=DET.get("demo_data", {}).get("image_size", 128),
        code=lambda w: code_hash(("detection",)),
    shell:
        '{params.check}"$TOKENREDUCTION_MMDET_PYTHON" {input.script:q} make-data --root {output:q}'
        " --num-images {params.num_images} --image-size {params.image_size} > {log:q} 2>&1"


rule detection_train:
    input:
        script=script_path("detection.py"),
        env=det_env_input,
        configs=det_config_files,
        data=det_data_input,
        init=det_init_input,
    output:
        model=f"{DET_RUN}/final.pth",
    log:
        f"{RESULTS}/logs/detection/train/{DET_LOG}.log",
    benchmark:
        f"{RESULTS}/benchmarks/detection/train/{DET_LOG}.tsv"
    conda:
        "../../envs/mmdet.yaml"
    threads: int(DET.get("threads_per_job", 2))  # detection.threads_per_job
    resources:
        gpu=lambda w: _det_gpus(),
        mem_mb=array_uniform("detection_train", det_mem),
        runtime=array_uniform("detection_train", det_runtime),
    params:
        check=DET_CHECK,
        launch=det_launch,
        options=det_train_options,
        work_dir=det_work_dir,
        code=det_code,
    shell:
        '{params.check}"$TOKENREDUCTION_MMDET_PYTHON" {params.launch} {input.script:q} train --config {input.configs[0]:q}'
        " --work-dir {params.work_dir:q} --final {output.model:q} {params.options} > {log:q} 2>&1"


rule detection_eval:
    input:
        script=script_path("detection.py"),
        env=det_env_input,
        configs=det_config_files,
        data=det_data_input,
        model=f"{DET_RUN}/final.pth",
    output:
        metrics=f"{DET_RUN}/metrics.json",
    log:
        f"{RESULTS}/logs/detection/eval/{DET_LOG}.log",
    benchmark:
        f"{RESULTS}/benchmarks/detection/eval/{DET_LOG}.tsv"
    conda:
        "../../envs/mmdet.yaml"
    threads: int(DET.get("threads_per_job", 2))  # detection.threads_per_job
    resources:
        gpu=lambda w: int(DET.get("gpus_per_eval_job", 0)),
        mem_mb=array_uniform("detection_eval", det_mem),
        runtime=array_uniform(
            "detection_eval", lambda w, attempt: max(10, det_runtime(w, attempt) // 6)
        ),
    params:
        check=DET_CHECK,
        options=det_run_options,
        work_dir=lambda w: det_work_dir(w, "work_eval"),
        code=det_code,
    shell:
        '{params.check}"$TOKENREDUCTION_MMDET_PYTHON" {input.script:q} eval --config {input.configs[0]:q}'
        " --work-dir {params.work_dir:q} --checkpoint {input.model:q} --out {output.metrics:q}"
        " {params.options} > {log:q} 2>&1"


rule detection_benchmark:
    input:
        script=script_path("detection.py"),
        env=det_env_input,
        configs=det_config_files,
        data=det_data_input,
        model=f"{DET_RUN}/final.pth",
    output:
        result=f"{DET_RUN}/benchmark.json",
    log:
        f"{RESULTS}/logs/detection/benchmark/{DET_LOG}.log",
    conda:
        "../../envs/mmdet.yaml"
    threads: int(DET.get("threads_per_job", 2))  # detection.threads_per_job
    resources:
        gpu=lambda w: int(DET.get("gpus_per_eval_job", 0)),
        mem_mb=det_mem,
        runtime=lambda w, attempt: 30 * attempt,
    params:
        check=DET_CHECK,
        options=det_run_options,
        work_dir=lambda w: det_work_dir(w, "work_benchmark"),
        batch=DET.get("benchmark", {}).get("batch_size", 1),
        runs=DET.get("benchmark", {}).get("runs", 20),
        warmup=DET.get("benchmark", {}).get("warmup", 5),
        code=det_code,
    shell:
        '{params.check}"$TOKENREDUCTION_MMDET_PYTHON" {input.script:q} benchmark --config {input.configs[0]:q}'
        " --work-dir {params.work_dir:q} --checkpoint {input.model:q} --out {output.result:q}"
        " --bench-batch {params.batch} --runs {params.runs} --warmup {params.warmup}"
        " {params.options} > {log:q} 2>&1"


# manifest.smk (included by summary.smk): the runs reach the job in a file
MANIFESTS["detection_summary"] = lambda: {"runs": det_summary_runs()}


rule detection_summary:
    input:
        script=script_path("detection.py"),
        env=det_env_input,
        manifest=manifest_path("detection_summary"),
        metrics=[_det_path(f"{DET_RUN}/metrics.json", *run) for run in DET_RUNS],
        benchmarks=[_det_path(f"{DET_RUN}/benchmark.json", *run) for run in DET_RUNS],
    output:
        table=f"{RESULTS}/detection/summary.csv",
    log:
        f"{RESULTS}/logs/detection/summary.log",
    localrule: True
    conda:
        "../../envs/mmdet.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        check=DET_CHECK,
        code=lambda w: code_hash(("detection",)),
    shell:
        '{params.check}"$TOKENREDUCTION_MMDET_PYTHON" {input.script:q} summary --manifest {input.manifest:q}'
        " --out {output.table:q} > {log:q} 2>&1"
