# Benchmarks (code in tokenreduction.benchmark): throughput of every configured
# model against the unreduced baseline measured side by side, theoretical FLOPs
# and achieved / FLOPs-implied speed-up, and the clustering back ends of ATC
# timed and checked against SciPy. Outputs under results/speed/ (results/
# benchmarks/ holds Snakemake's own per-job benchmark: files). Runs when the
# config has a `benchmark:` section (without `enabled: false`).


include: "benchmark_common.smk"


rule benchmark_throughput:
    input:
        script=script_path("benchmark_models.py"),
    output:
        table=f"{RESULTS}/speed/throughput/{{backbone}}.csv",
    log:
        f"{RESULTS}/logs/speed/throughput_{{backbone}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/speed/throughput_{{backbone}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: benchmark_threads()
    resources:
        **BENCH_SLURM,
        gpu=benchmark_gpus(),
        mem_mb=lambda w, attempt: int(6000 * _scale(w.backbone) ** 0.5 * attempt),
        runtime=benchmark_runtime,
    params:
        model=lambda w: config["backbones"][w.backbone]["model"],
        model_kwargs=benchmark_model_kwargs,
        specs=benchmark_model_specs,
        img_size=benchmark_img_size,
        batch_sizes=benchmark_batch_sizes(),
        warmup=BENCH.get("warmup", 10),
        runs=BENCH.get("runs", 100),
        throw_out=BENCH.get("throw_out", 0.25),
        device=benchmark_device(),
        dtype=BENCH.get("dtype", "float32"),
        code=benchmark_code,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} throughput --backbone {wildcards.backbone} --model {params.model}'
        " --model-kwargs {params.model_kwargs:q} --specs {params.specs:q} --img-size {params.img_size}"
        " --batch-sizes {params.batch_sizes} --warmup {params.warmup} --runs {params.runs}"
        " --throw-out {params.throw_out} --device {params.device} --dtype {params.dtype}"
        " --threads {threads} --out {output.table:q} > {log:q} 2>&1"


rule benchmark_flops:
    input:
        script=script_path("benchmark_models.py"),
    output:
        table=f"{RESULTS}/speed/flops/{{backbone}}.csv",
    log:
        f"{RESULTS}/logs/speed/flops_{{backbone}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/benchmark_flops/flops_{{backbone}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=lambda w, attempt: int(4000 * _scale(w.backbone) ** 0.5 * attempt),
        runtime=lambda w, attempt: int(20 * attempt),
    params:
        model=lambda w: config["backbones"][w.backbone]["model"],
        model_kwargs=benchmark_model_kwargs,
        specs=benchmark_model_specs,
        img_size=benchmark_img_size,
        code=benchmark_code,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} flops --backbone {wildcards.backbone} --model {params.model}'
        " --model-kwargs {params.model_kwargs:q} --specs {params.specs:q} --img-size {params.img_size}"
        " --threads {threads} --out {output.table:q} > {log:q} 2>&1"


rule speed_table:
    input:
        script=script_path("speed_table.py"),
        throughput=speed_inputs("throughput"),
        flops=speed_inputs("flops"),
    output:
        table=f"{RESULTS}/speed/speed.csv",
        plot=report(
            f"{RESULTS}/speed/throughput.png",
            caption="../report/throughput.rst",
            category="Speed",
            subcategory="Model throughput",
        ),
    log:
        f"{RESULTS}/logs/speed/speed_table.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        batch_size=BENCH.get("headline_batch") or 0,
        code=code_hash(("benchmark",)),
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --throughput {input.throughput:q} --flops {input.flops:q}'
        " --batch-size {params.batch_size} --table {output.table:q} --plot {output.plot:q}"
        " > {log:q} 2>&1"


rule benchmark_clustering:
    input:
        script=script_path("benchmark_clustering.py"),
    output:
        table=f"{RESULTS}/speed/clustering.csv",
    log:
        f"{RESULTS}/logs/speed/clustering.log",
    benchmark:
        f"{RESULTS}/benchmarks/speed/clustering.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: benchmark_threads()
    resources:
        **BENCH_SLURM,
        gpu=clustering_gpus(),
        mem_mb=lambda w, attempt: int(8000 * attempt),
        runtime=lambda w, attempt: int(BENCH_CLUSTERING.get("runtime", 60) * attempt),
    params:
        backends=clustering_list(
            "backends", ["scipy", "sklearn", "fastcluster", "atc", "atc-cuda", "cuml"]
        ),
        sizes=clustering_list("sizes", [196]),
        batch_sizes=clustering_list("batch_sizes", [1, 64]),
        linkages=clustering_linkages(),
        keep_rate=BENCH_CLUSTERING.get("keep_rate", 0.7),
        feature_dim=BENCH_CLUSTERING.get("feature_dim", 64),
        warmup=BENCH_CLUSTERING.get("warmup", 1),
        runs=BENCH_CLUSTERING.get("runs", 5),
        throw_out=BENCH_CLUSTERING.get("throw_out", 0.0),
        code=code_hash(("benchmark",), "atc"),
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --backends {params.backends} --sizes {params.sizes}'
        " --batch-sizes {params.batch_sizes} --linkages {params.linkages}"
        " --keep-rate {params.keep_rate} --feature-dim {params.feature_dim}"
        " --warmup {params.warmup} --runs {params.runs} --throw-out {params.throw_out}"
        " --threads {threads} --out {output.table:q} > {log:q} 2>&1"
