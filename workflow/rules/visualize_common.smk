# Input functions of the pattern grid rule (visualize.smk).

import types

VISUALIZE = config.get("visualize") or {}


def _pattern_runs(dataset):
    """The reduced runs of a dataset in a stable order: backbone, method (as
    in the config), keep rate; only the first seed."""
    seed = min(config["seeds"])
    order = {name: i for i, name in enumerate(config["methods"])}
    backbones = list(config["backbones"])
    runs = [
        r
        for r in RUNS
        if r["dataset"] == dataset
        and r["seed"] == seed
        and method_spec(r["method"])["method"] != BASELINE
    ]
    return sorted(
        runs,
        key=lambda r: (
            backbones.index(r["backbone"]),
            order.get(r["method"], -1),
            float(r["keep_rate"]),
        ),
    )


def _pattern_files(name):
    def files(wildcards):
        return [
            f"{RESULTS}/eval/{RUN_DIR}/{name}".format(**r)
            for r in _pattern_runs(wildcards.dataset)
        ]

    return files


def _pattern_labels(wildcards):
    runs = _pattern_runs(wildcards.dataset)
    several = len({r["backbone"] for r in runs}) > 1
    return [
        f"{r['method']} kr{r['keep_rate']}" + (f" ({r['backbone']})" if several else "")
        for r in runs
    ]


def _pattern_manifest(dataset):
    """What a pattern grid job reads (manifest.smk): per run its patterns
    file, metrics file and row label, in the same order."""
    wildcards = types.SimpleNamespace(dataset=dataset)
    return {
        "patterns": _pattern_files("patterns.npz")(wildcards),
        "metrics": _pattern_files("metrics.json")(wildcards),
        "labels": _pattern_labels(wildcards),
    }


def _register_pattern_manifests():
    for dataset in analysis_datasets():
        MANIFESTS[f"patterns_{dataset}"] = functools.partial(_pattern_manifest, dataset)


def pattern_targets():
    return [
        f"{RESULTS}/patterns/{dataset}/pattern_grid.png"
        for dataset in analysis_datasets()
        if _pattern_runs(dataset)
    ]


def pattern_grid_mem(wildcards):
    """MB for a pattern grid: the figure holds every cell's pixels, so its
    peak grows with the image area and the runs. Full-width rehearsals: CLCA
    at 448 px (160 runs a dataset) 10.2 GB with float64 cells, 2.6 GB since
    the cells are uint8 (benchmarks/pattern_grid_memory.py, 4.0x).
    4,000 MB at 224 px and below; above, half the area's growth (8,000 MB at
    448 px, 3x the peak measured)."""
    side = config["datasets"][wildcards.dataset].get("img_size") or 224
    return int(4000 * max(1.0, (side / 224) ** 2 / 2))
