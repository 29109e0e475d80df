# Functions and settings of benchmark.smk (kept apart from the rules, as the
# linter asks).

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
# On Slurm a benchmark job asks for a node to itself (no neighbours skewing
# the timings) only where the config says so: benchmark.exclusive: true
# (many sites refuse --exclusive, or charge a whole node for it).
BENCH_SLURM = {"slurm_extra": "--exclusive"} if BENCH.get("exclusive") else {}


def benchmark_enabled():
    return bool(BENCH) and BENCH.get("enabled", True) is not False


def benchmark_backbones():
    """The backbones to benchmark: benchmark.backbones, else every backbone
    of the fine-tuning grid."""
    names = BENCH.get("backbones")
    if names is None:
        names = [b for exp in config["experiments"] for b in exp["backbones"]]
    return list(dict.fromkeys(names))


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
    specs = bench_specs.specs_from_config(config, wildcards.backbone)
    methods = sorted({s.method for s in specs} - {None})
    stages = ("model", "benchmark") + (("clca",) if any(s.clca for s in specs) else ())
    parts = [code_hash(stages)]
    parts += [code_hash((), m) for m in methods]
    return "-".join(parts)


def benchmark_runtime(wildcards, attempt):
    return int(BENCH.get("runtime", 60) * _scale(wildcards.backbone) ** 0.5 * attempt)


def speed_inputs(kind):
    return [f"{RESULTS}/speed/{kind}/{b}.csv" for b in benchmark_backbones()]


def clustering_list(key, default):
    return " ".join(str(v) for v in BENCH_CLUSTERING.get(key, default))


def clustering_linkages():
    """The linkages of benchmark.clustering.methods (methods: registry names
    of ATC variants), space-separated; default every linkage."""
    names = BENCH_CLUSTERING.get("methods")
    if names is None:
        return "single complete average"
    return " ".join(
        config_validation.variant_options(config, name)[1]["linkage"] for name in names
    )


def clustering_gpus():
    gpu_backends = {"atc-cuda", "cuml"}
    asked = set(BENCH_CLUSTERING.get("backends", gpu_backends))
    return benchmark_gpus() if asked & gpu_backends else 0
