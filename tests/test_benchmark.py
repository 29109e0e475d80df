"""The benchmark harnesses: throughput CSV structure, thrown-out runs, ratios
to the baseline of the same run, FLOPs and the speed table, and the
clustering benchmark's agreement check (a wrong back end is reported)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tokenreduction.benchmark import (
    BACKENDS,
    Backend,
    ModelSpec,
    agreement,
    benchmark_clustering,
    benchmark_throughput,
    build_models,
    canonical_labels,
    interleaved_times,
    model_flops,
    num_thrown_out,
    speed_table,
    specs_from_config,
)
from tokenreduction.benchmark import throughput as throughput_module
from tokenreduction.benchmark.specs import batch_sizes, image_size
from tokenreduction.report import clustering_section, markdown_table, speed_section

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)  # 64 patches
LOC = (1, 2, 3)


class Recorder(nn.Module):
    """A stand-in model that logs its name on every forward."""

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        self.log.append(self.name)
        return x.mean() * self.scale


class ScriptedClock:
    """Runs the call, then returns a scripted time for the model that ran:
    `garbage` for its first `drop` timed calls per batch size, else
    cost[name] * drift[round] (the drift is common to all models of a round,
    as on a shared machine); len(drift) = runs."""

    def __init__(self, log, cost, drift, drop, garbage=1000.0):
        self.log, self.cost, self.drift, self.drop, self.garbage = log, cost, drift, drop, garbage
        self.calls: dict = {}

    def __call__(self, fn):
        fn()
        name = self.log[-1]
        rnd = self.calls.get(name, 0) % len(self.drift)  # the round within one batch size
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.garbage if rnd < self.drop else self.cost[name] * self.drift[rnd]


def test_num_thrown_out():
    assert num_thrown_out(8, 0.25) == 2
    assert num_thrown_out(2000, 0.25) == 500
    assert num_thrown_out(1, 0.5) == 0  # one run is always kept
    with pytest.raises(ValueError, match="throw_out"):
        num_thrown_out(4, 1.0)


def test_interleaved_rounds_are_aligned_and_drop_the_first_runs():
    log: list = []
    fns = {name: (lambda name=name: log.append(name)) for name in ("a", "b")}
    values = iter(range(100))
    times = interleaved_times(fns, warmup=2, runs=5, throw_out=0.4, clock=lambda fn: (fn(), float(next(values)))[1])
    # 2 warm-up rounds + 5 timed rounds, round-robin a, b
    assert log == ["a", "b"] * 7
    # timed calls got 0..9 in order; the first 2 rounds (4 calls) are dropped
    assert times == {"a": [4.0, 6.0, 8.0], "b": [5.0, 7.0, 9.0]}


def test_throughput_excludes_thrown_out_runs_and_pairs_with_the_same_runs_baseline():
    log: list = []
    models = {"baseline": Recorder("baseline", log), "fast": Recorder("fast", log), "slow": Recorder("slow", log)}
    cost = {"baseline": 0.010, "fast": 0.004, "slow": 0.020}
    runs, throw_out, warmup = 8, 0.25, 3
    drop = num_thrown_out(runs, throw_out)
    drift = [1.0, 1.0, 1.0, 3.0, 1.5, 1.2, 2.0, 1.1]  # per round, shared by all models
    clock = ScriptedClock(log, cost, drift, drop)
    table = benchmark_throughput(
        models, img_size=8, batch_sizes=[2, 8], baseline="baseline", warmup=warmup, runs=runs,
        throw_out=throw_out, clock=clock, memory_probe=None, backbone="toy",
        specs={"fast": ModelSpec("fast", method="topk", keep_rate=0.5)},
    )
    assert list(table.columns) == throughput_module.COLUMNS
    assert len(table) == 2 * 3
    assert list(table.model[:3]) == ["baseline", "fast", "slow"]  # baseline first at each batch size
    # every model ran warm-up + runs forwards per batch size, round-robin
    assert log.count("fast") == 2 * (warmup + runs)
    assert (table.runs_kept == runs - drop).all() and (table.status == "ok").all()
    kept = np.array(drift[drop:])
    for row in table.itertuples():
        expected = cost[row.model] * np.median(kept)  # the 1000 s garbage runs are not in it
        assert row.median_ms == pytest.approx(1e3 * expected)
        assert row.img_per_s == pytest.approx(row.batch_size / expected)
        q25, q75 = np.percentile(cost[row.model] * kept, [25, 75])
        assert row.img_per_s_q25 == pytest.approx(row.batch_size / q75)
        # ratio against the baseline of the same rounds: the drift cancels
        assert row.throughput_ratio == pytest.approx(cost["baseline"] / cost[row.model])
    for batch, part in table.groupby("batch_size"):
        base = part[part.model == "baseline"].iloc[0]
        assert base.throughput_ratio == 1.0 and base.method == "none" and base.keep_rate == 1.0
        assert (part.baseline_img_per_s == base.img_per_s).all()
    fast = table[table.model == "fast"].iloc[0]
    assert fast.method == "topk" and fast.keep_rate == 0.5 and fast.backbone == "toy"


def test_throughput_of_tiny_vits_with_the_real_clock_and_memory():
    specs = [ModelSpec("baseline"), ModelSpec("topk kr0.5", method="topk", keep_rate=0.5, reduction_loc=LOC),
             ModelSpec("tome kr0.5", method="tome", keep_rate=0.5, reduction_loc=LOC)]
    models = build_models("vit_tiny_patch16_224", specs, TINY)
    # the reduced models share the baseline's backbone weights
    assert torch.equal(models["topk kr0.5"].blocks[0].attn.qkv.weight, models["baseline"].blocks[0].attn.qkv.weight)
    table = benchmark_throughput(models, 32, [1, 4], warmup=1, runs=3, throw_out=0.34,
                                 specs={s.label: s for s in specs})
    assert list(table.columns) == throughput_module.COLUMNS
    assert (table.runs_kept == 2).all()
    assert (table.img_per_s > 0).all() and (table.median_ms > 0).all()
    assert (table.q25_ms <= table.median_ms + 1e-9).all() and (table.median_ms <= table.q75_ms + 1e-9).all()
    assert set(table.mem_measure) <= {"rss_hwm", "ru_maxrss"} and (table.peak_mem_mb >= 0).all()
    assert table.set_index(["model", "batch_size"]).loc[("topk kr0.5", 4), "tokens_kept"] == "32 16 8"


def test_throughput_rejects_a_missing_baseline():
    with pytest.raises(ValueError, match="baseline"):
        benchmark_throughput({"a": nn.Identity()}, 8, [1], baseline="baseline")


def test_flops_and_speed_table():
    specs = [ModelSpec("baseline"), ModelSpec("topk kr0.5", method="topk", keep_rate=0.5, reduction_loc=LOC)]
    models = build_models("vit_tiny_patch16_224", specs, TINY)
    flops = model_flops(models, 32, specs={s.label: s for s in specs}, backbone="toy")
    base, topk = flops.iloc[0], flops.iloc[1]
    assert base.model == "baseline" and base.flops_implied_speedup == 1.0
    assert topk.gflops < base.gflops and topk.flops_implied_speedup == pytest.approx(base.gflops / topk.gflops)
    log: list = []
    recorders = {name: Recorder(name, log) for name in ("baseline", "topk kr0.5")}
    cost = {"baseline": 0.01, "topk kr0.5": 0.008}
    clock = ScriptedClock(log, cost, [1.0] * 4, drop=0)
    tp = benchmark_throughput(recorders, 8, [1, 4], warmup=0, runs=4, throw_out=0.0, clock=clock,
                              memory_probe=None, backbone="toy", specs={s.label: s for s in specs})
    table = speed_table(tp, flops)
    assert set(table.batch_size) == {4}  # the largest batch size every model ran
    row = table.set_index("model").loc["topk kr0.5"]
    assert row.throughput_ratio == pytest.approx(1.25)
    assert row.achieved_over_implied == pytest.approx(1.25 / topk.flops_implied_speedup)
    text = markdown_table(speed_section(table).tables[0][1])
    assert text.startswith("| backbone | method |") and "topk" in text


def test_specs_from_the_demo_config():
    config = {
        "methods": {"deit": {"method": "none"}, "topk": {"method": "topk"}, "evit": {"method": "evit", "fuse_token": True},
                    "tome": {"method": "tome"}},
        "experiments": [
            {"datasets": ["d"], "backbones": ["tiny"], "methods": ["topk", "evit"], "keep_rates": [0.5, 0.7]},
            {"datasets": ["e"], "backbones": ["tiny", "small"], "methods": ["topk"], "keep_rates": [0.5]},
        ],
        "reduction_loc": [3, 6, 9], "budget": "geometric",
        "benchmark": {"r_models": [{"method": "tome", "r": 2}]},
    }
    specs = specs_from_config(config, "tiny")
    assert [s.label for s in specs] == ["baseline", "topk kr0.5", "topk kr0.7", "evit kr0.5", "evit kr0.7", "tome r2"]
    assert specs[3].method_kwargs == {"fuse_token": True} and specs[3].reduction_loc == (3, 6, 9)
    assert specs[-1].budget == "r" and specs[-1].r == 2
    assert ModelSpec.from_dict(specs[3].to_dict()) == specs[3]
    config["benchmark"] = {"methods": ["evit"], "keep_rates": [0.7]}
    assert [s.label for s in specs_from_config(config, "tiny")] == ["baseline", "evit kr0.7"]
    assert [s.label for s in specs_from_config(config, "small")] == ["baseline"]
    assert image_size({"model": "vit_base_patch16_384"}) == 384
    assert image_size({"model": "x", "model_kwargs": {"img_size": 32}}) == 32
    assert batch_sizes([0, 3, 10]) == [1, 8, 1024]


# ------------------------------------------------------------------ clustering


def test_canonical_labels_ignore_label_names():
    a = np.array([[3, 3, 1, 2, 1]])
    b = np.array([[0, 0, 7, 5, 7]])
    assert (canonical_labels(a) == canonical_labels(b)).all()
    assert canonical_labels(a).tolist() == [[0, 0, 2, 3, 2]]
    res = agreement(b, a, num_clusters=3)
    assert res == {"agreement": 1.0, "ari": 1.0, "valid": 1.0}


def _wrong(problem, k, linkage):
    """A deliberately wrong back end: K clusters by position, not distance."""
    batch, n = problem.shape
    return np.tile(np.arange(n) % k, (batch, 1))


def test_clustering_benchmark_reports_a_wrong_back_end():
    backends = [BACKENDS["scipy"], BACKENDS["atc"], BACKENDS["sklearn"], BACKENDS["fastcluster"],
                Backend("wrong", _wrong), BACKENDS["atc-cuda"], Backend("single-only", _wrong, linkages=("single",))]
    table = benchmark_clustering(backends, sizes=[24], batch_sizes=[3], linkages=["average", "single"],
                                 keep_rate=0.5, warmup=0, runs=2)
    ok = table[table.status == "ok"].set_index(["linkage", "backend"])
    for linkage in ("average", "single"):
        for name in ("scipy", "atc", "sklearn", "fastcluster"):
            assert ok.loc[(linkage, name), "agreement"] == 1.0 and ok.loc[(linkage, name), "agrees"]
        wrong = ok.loc[(linkage, "wrong")]
        assert wrong.agreement < 1.0 and not wrong.agrees and wrong.ari < 0.9
        assert wrong.valid == 1.0  # the right number of clusters, but the wrong ones
        assert ok.loc[(linkage, "scipy"), "speedup_vs_reference"] == 1.0
    assert ok.loc[("average", "atc"), "num_clusters"] == 12
    skipped = table[table.status != "ok"]
    assert ("single-only", "average") in set(zip(skipped.backend, skipped.linkage))
    assert "single-only" in set(ok.reset_index().query("linkage == 'single'").backend)
    if not torch.cuda.is_available():
        assert (skipped[skipped.backend == "atc-cuda"].status == "skipped: no CUDA device").all()
    notes = " ".join(clustering_section(table).notes)
    assert "DISAGREEMENT: wrong (average" in notes and "DISAGREEMENT: wrong (single" in notes
    assert "DISAGREEMENT: atc" not in notes and "DISAGREEMENT: sklearn" not in notes


def test_clustering_reference_is_computed_when_not_timed():
    table = benchmark_clustering([BACKENDS["atc"]], sizes=[16], batch_sizes=[2], linkages=["complete"],
                                 warmup=0, runs=1)
    row = table.iloc[0]
    assert row.agreement == 1.0 and np.isnan(row.speedup_vs_reference)


def test_clustering_rejects_bad_settings():
    with pytest.raises(ValueError, match="linkage"):
        benchmark_clustering([BACKENDS["atc"]], [8], [1], linkages=["ward"])
    with pytest.raises(ValueError, match="unique"):
        benchmark_clustering([BACKENDS["atc"], BACKENDS["atc"]], [8], [1])


def test_methods_script_still_imports():
    """benchmarks/methods.py (another helper's script) keeps working."""
    import importlib.util

    from workflow_utils import REPO

    spec = importlib.util.spec_from_file_location("methods_bench", REPO / "benchmarks" / "methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--quick"])
    assert args.model_batch == 8
