# Benchmarks (code in tokenreduction.benchmark): throughput of every configured
# model against the unreduced baseline measured side by side, theoretical FLOPs
# and achieved / FLOPs-implied speed-up, and the clustering back ends of ATC
# timed and checked against SciPy. Outputs under results/speed/ (results/
# benchmarks/ holds Snakemake's own per-job benchmark: files). Runs when the
# config has a `benchmark:` section (without `enabled: false`).

import sys


def _load_benchmark_specs():
    """tokenreduction.benchmark.specs without importing torch."""
    path = ROOT / "src" / "tokenreduction" / "benchmark" / "specs.py"
    spec = importlib.util.spec_from_file_location(
        "tokenreduction_benchmark_specs", path
    )
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up
    spec.loader.exec_module(loaded)
    return loaded


bench_specs = _load_benchmark_specs()
BENCH = config.get("benchmark") or {}
BENCH_CLUSTERING = BENCH.get("clustering") or {}


def benchmark_enabled():
    return bool(BENCH) and BENCH.get("enabled", True) is not False


def benchmark_backbones():
    """The backbones to benchmark: benchmark.backbones, else every backbone
    of the fine-tuning grid."""
    names = BENCH.get("backbones")
    if names is None:
        names = [b for exp in config["experiments"] for b in exp["backbones"]]
    return list(dict.fromkeys(names))


def _check_benchmark_config():
    for name in BENCH.get("backbones") or []:
        if name not in config["backbones"]:
            _fail(
                "benchmark.backbones",
                f"{name!r} is not defined under backbones: ({', '.join(config['backbones'])})",
            )
    for key, items in (
        ("benchmark.methods", BENCH.get("methods") or []),
        ("benchmark.r_models", [m["method"] for m in BENCH.get("r_models") or []]),
    ):
        for name in items:
            if name not in config["methods"]:
                _fail(
                    key,
                    f"{name!r} is not defined under methods: ({', '.join(config['methods'])})",
                )


_check_benchmark_config()


def benchmark_gpus():
    """GPUs a benchmark job asks for (and measures): benchmark.gpus, else
    resources.gpus_per_eval_job."""
    return int(BENCH.get("gpus", _gpus("eval")))


def benchmark_device():
    return BENCH.get("device") or ("cuda" if benchmark_gpus() > 0 else "cpu")


def benchmark_threads():
    return int(BENCH.get("threads", 2))


def benchmark_model_specs(wildcards):
    specs = bench_specs.specs_from_config(config, wildcards.backbone)
    return json.dumps([s.to_dict() for s in specs], sort_keys=True)


def benchmark_model_kwargs(wildcards):
    spec = config["backbones"][wildcards.backbone]
    return json.dumps(spec.get("model_kwargs") or {}, sort_keys=True)


def benchmark_img_size(wildcards):
    return bench_specs.image_size(config["backbones"][wildcards.backbone])


def benchmark_batch_sizes():
    return " ".join(
        str(b) for b in bench_specs.batch_sizes(BENCH.get("batch_exponents", range(11)))
    )


def benchmark_code(wildcards):
    """Fingerprint of the model code and of every benchmarked method."""
    methods = sorted(
        {s.method for s in bench_specs.specs_from_config(config, wildcards.backbone)}
        - {None}
    )
    parts = [provenance.code_hash(("model", "benchmark"))]
    parts += [provenance.code_hash((), m) for m in methods]
    return "-".join(parts)


def benchmark_runtime(wildcards, attempt):
    return int(BENCH.get("runtime", 60) * _scale(wildcards.backbone) ** 0.5 * attempt)


def speed_inputs(kind):
    return [f"{RESULTS}/speed/{kind}/{b}.csv" for b in benchmark_backbones()]


def clustering_list(key, default):
    return " ".join(str(v) for v in BENCH_CLUSTERING.get(key, default))


def clustering_gpus():
    gpu_backends = {"atc-cuda", "cuml"}
    asked = set(BENCH_CLUSTERING.get("backends", gpu_backends))
    return benchmark_gpus() if asked & gpu_backends else 0


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
        "python {input.script} throughput --backbone {wildcards.backbone} --model {params.model}"
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
        "python {input.script} flops --backbone {wildcards.backbone} --model {params.model}"
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
        code=provenance.code_hash(("benchmark",)),
    shell:
        "python {input.script} --throughput {input.throughput:q} --flops {input.flops:q}"
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
        gpu=clustering_gpus(),
        mem_mb=lambda w, attempt: int(8000 * attempt),
        runtime=lambda w, attempt: int(BENCH_CLUSTERING.get("runtime", 60) * attempt),
    params:
        backends=clustering_list(
            "backends", ["scipy", "sklearn", "fastcluster", "atc", "atc-cuda", "cuml"]
        ),
        sizes=clustering_list("sizes", [196]),
        batch_sizes=clustering_list("batch_sizes", [1, 64]),
        linkages=clustering_list("linkages", ["single", "complete", "average"]),
        keep_rate=BENCH_CLUSTERING.get("keep_rate", 0.7),
        feature_dim=BENCH_CLUSTERING.get("feature_dim", 64),
        warmup=BENCH_CLUSTERING.get("warmup", 1),
        runs=BENCH_CLUSTERING.get("runs", 5),
        throw_out=BENCH_CLUSTERING.get("throw_out", 0.0),
        code=provenance.code_hash(("benchmark",), "atc"),
    shell:
        "python {input.script} --backends {params.backends} --sizes {params.sizes}"
        " --batch-sizes {params.batch_sizes} --linkages {params.linkages}"
        " --keep-rate {params.keep_rate} --feature-dim {params.feature_dim}"
        " --warmup {params.warmup} --runs {params.runs} --throw-out {params.throw_out}"
        " --threads {threads} --out {output.table:q} > {log:q} 2>&1"
