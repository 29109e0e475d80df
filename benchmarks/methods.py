"""Speed of the reduction methods, measured side by side in one run.

    python benchmarks/methods.py [--quick] [--threads 2] [--out results/benchmarks/methods.csv]

(a) op cost: one reduction op of every registered method at B=64, N=196
    patches (+ CLS), C=384, at keep rate 0.7 (target 137, r 59), divided by
    the time of one DeiT-S block (timm ``Block(384, 6)``) on the same input.
    The op's inputs are what the host block gives it: CLS attention
    (softmaxed over all tokens), head-mean keys, values, attention received,
    computed by that block's own qkv. Learnable methods in eval mode.
(b) DeiT-S (random weights) throughput at keep rate 0.7, blocks 3/6/9, for
    topk, evit, tome, atc (average linkage), and ToMe r=13 ('r' budget), relative to the unreduced
    model, next to the FLOPs ratio (``count_flops``): achieved speed-up over
    the speed-up the FLOPs imply. Reduced and baseline runs are interleaved to
    cancel drift; medians after warm-up.
(c) batched ATC (``agglomerative_labels``) against a per-image SciPy
    ``linkage`` + ``fcluster(maxclust)`` loop (and fastcluster when
    installed) at B=64, N=196, C=64, K=137, per linkage: time ratio and the
    fraction of images whose partitions agree. Both sides include the cosine
    distances. ATC on CUDA is timed too when a GPU is present.

Everything runs under ``torch.inference_mode`` with ``torch.set_num_threads``
(default 2). Writes a long CSV (columns section, name, metric, value) by an
atomic rename and prints one table per section. Timings on a shared machine
are noisy; the ratios are taken from interleaved runs for that reason.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pandas as pd
import torch

import tokenreduction as tr
from tokenreduction.io import atomic_path
from tokenreduction.models.budget import StageBudget
from tokenreduction.reduction import BlockFeatures, get_method, list_methods
from tokenreduction.reduction.atc import cosine_distance
from tokenreduction.reduction.clustering import LINKAGES, agglomerative_labels

Row = Dict[str, object]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: Dict[str, Callable[[], object]], warmup: int, repeats: int, device=torch.device("cpu")):
    """Run the callables round-robin: `warmup` untimed rounds, then `repeats`
    timed ones. Returns {name: [seconds per run]}."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for rnd in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if rnd >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def med(values: List[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(num: List[float], den: List[float]) -> float:
    """Median over rounds of num/den (runs of one round were taken side by side)."""
    return med([a / b for a, b in zip(num, den)])


# --- (a) one reduction op vs one DeiT-S block ------------------------------------------------------


def block_inputs(block, x: torch.Tensor) -> BlockFeatures:
    """What TokenBlock hands a reducer, from `block`'s own attention on x (B, 1 + N, C)."""
    attn = block.attn
    B, T, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, T, T)
    return BlockFeatures(
        cls_attn=weights[:, :, 0, 1:].contiguous(),
        metric=k[:, :, 1:].mean(dim=1),
        value=v[:, :, 1:].contiguous(),
        attn_received=weights.sum(dim=(1, 2))[:, 1:].contiguous(),
    )


def op_cost(args) -> List[Row]:
    from timm.models.vision_transformer import Block

    B, N, C = args.op_batch, 196, 384
    budget = StageBudget(target=137, r=59)
    torch.manual_seed(0)
    block = Block(C, 6).eval()
    x = torch.randn(B, 1 + N, C)
    patches = x[:, 1:].contiguous()
    size = torch.ones(B, N)
    rows: List[Row] = []
    with torch.inference_mode():
        feats = block_inputs(block, x)
        for name in list_methods():
            cls = get_method(name)
            try:
                kwargs = {"num_out": budget.target, "num_in": N} if cls.fixed_output else {}
                reducer = cls(dim=C, **kwargs).eval()

                def op(reducer=reducer):
                    return reducer(patches, size, feats, budget)

                out = op()
                times = interleaved({"block": lambda: block(x), "op": op}, args.warmup, args.repeats)
            except Exception as err:  # a method that cannot run here is reported, not fatal
                rows.append({"section": "op_cost", "name": name, "metric": "error", "value": repr(err)[:200]})
                continue
            rows += [
                {"section": "op_cost", "name": name, "metric": "op_ms", "value": 1e3 * med(times["op"])},
                {"section": "op_cost", "name": name, "metric": "block_ms", "value": 1e3 * med(times["block"])},
                {"section": "op_cost", "name": name, "metric": "op_over_block",
                 "value": paired_ratio(times["op"], times["block"])},
                {"section": "op_cost", "name": name, "metric": "tokens_out", "value": int(out.x.shape[1])},
            ]
    return rows


# --- (b) DeiT-S throughput against FLOPs ------------------------------------------------------------


def throughput(args) -> List[Row]:
    name = "deit_small_patch16_224"
    configs = {
        "topk kr0.7": dict(method="topk", keep_rate=0.7, reduction_loc=(3, 6, 9)),
        "evit kr0.7": dict(method="evit", keep_rate=0.7, reduction_loc=(3, 6, 9)),
        "tome kr0.7": dict(method="tome", keep_rate=0.7, reduction_loc=(3, 6, 9)),
        "atc kr0.7": dict(method="atc", keep_rate=0.7, reduction_loc=(3, 6, 9)),
        "tome r13": dict(method="tome", r=13),
    }
    torch.manual_seed(0)
    base = tr.create_model(name).eval()
    base_flops = tr.count_flops(base)
    images = torch.randn(args.model_batch, 3, 224, 224)
    rows: List[Row] = [
        {"section": "throughput", "name": "deit_s", "metric": "gflops", "value": base_flops},
    ]
    base_times: List[float] = []
    with torch.inference_mode():
        for label, cfg in configs.items():
            model = tr.create_model(name, **cfg).eval()
            model.load_state_dict(base.state_dict(), strict=False)
            flops = tr.count_flops(model)
            times = interleaved({"base": lambda: base(images), "reduced": lambda: model(images)},
                                args.model_warmup, args.model_repeats)
            base_times += times["base"]
            speedup = paired_ratio(times["base"], times["reduced"])
            implied = base_flops / flops
            rows += [
                {"section": "throughput", "name": label, "metric": "gflops", "value": flops},
                {"section": "throughput", "name": label, "metric": "flops_ratio", "value": flops / base_flops},
                {"section": "throughput", "name": label, "metric": "img_per_s",
                 "value": args.model_batch / med(times["reduced"])},
                {"section": "throughput", "name": label, "metric": "speedup", "value": speedup},
                {"section": "throughput", "name": label, "metric": "flops_implied_speedup", "value": implied},
                {"section": "throughput", "name": label, "metric": "achieved_over_implied", "value": speedup / implied},
                {"section": "throughput", "name": label, "metric": "tokens_kept", "value": str(model.tokens_kept[:3])},
            ]
    rows.append({"section": "throughput", "name": "deit_s", "metric": "img_per_s",
                 "value": args.model_batch / med(base_times)})
    return rows


# --- (c) batched ATC against a per-image SciPy loop ------------------------------------------------


def _canonical(labels: np.ndarray) -> np.ndarray:
    """(N,) labels -> each point named by the smallest index of its cluster."""
    first = {}
    return np.array([first.setdefault(v, n) for n, v in enumerate(labels.tolist())])


def atc_vs_scipy(args) -> List[Row]:
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    try:
        import fastcluster
    except ImportError:  # optional
        fastcluster = None
    B, N, C, K = args.atc_batch, 196, 64, 137
    torch.manual_seed(0)
    metric = torch.randn(B, N, C)
    metric_np = metric.double().numpy()
    rows: List[Row] = []

    def ours(method: str, m: torch.Tensor = metric) -> torch.Tensor:
        return agglomerative_labels(cosine_distance(m), K, method)

    def per_image(linkage_fn, method: str) -> np.ndarray:
        return np.stack([
            _canonical(fcluster(linkage_fn(pdist(metric_np[b], "cosine"), method=method), K, criterion="maxclust"))
            for b in range(B)
        ])

    threads = torch.get_num_threads()
    with torch.inference_mode():
        for method in LINKAGES:
            fns = {"atc": lambda: ours(method), "scipy": lambda: per_image(linkage, method)}
            if fastcluster is not None:
                fns["fastcluster"] = lambda: per_image(fastcluster.linkage, method)
            times = interleaved(fns, args.warmup, args.repeats)
            torch.set_num_threads(1)  # SciPy runs on one core: the same for ATC
            one = interleaved({"atc": lambda: ours(method), "scipy": lambda: per_image(linkage, method)},
                              1, args.repeats)
            torch.set_num_threads(threads)
            labels = ours(method).numpy()
            reference = per_image(linkage, method)
            prefix = {"section": "atc_vs_scipy", "name": method}
            rows += [
                {**prefix, "metric": "atc_ms", "value": 1e3 * med(times["atc"])},
                {**prefix, "metric": "scipy_ms", "value": 1e3 * med(times["scipy"])},
                {**prefix, "metric": "speedup_vs_scipy", "value": paired_ratio(times["scipy"], times["atc"])},
                {**prefix, "metric": "atc_1thread_ms", "value": 1e3 * med(one["atc"])},
                {**prefix, "metric": "speedup_vs_scipy_1thread", "value": paired_ratio(one["scipy"], one["atc"])},
                {**prefix, "metric": "agreement", "value": float((labels == reference).all(axis=1).mean())},
            ]
            if fastcluster is not None:
                fast = per_image(fastcluster.linkage, method)
                rows += [
                    {**prefix, "metric": "fastcluster_ms", "value": 1e3 * med(times["fastcluster"])},
                    {**prefix, "metric": "speedup_vs_fastcluster",
                     "value": paired_ratio(times["fastcluster"], times["atc"])},
                    {**prefix, "metric": "fastcluster_agreement", "value": float((fast == reference).all(axis=1).mean())},
                ]
            if torch.cuda.is_available():
                device = torch.device("cuda")
                metric_gpu = metric.to(device)
                gpu = interleaved({"atc": lambda: ours(method, metric_gpu)}, args.warmup, args.repeats, device)
                labels_gpu = ours(method, metric_gpu).cpu().numpy()
                rows += [
                    {**prefix, "metric": "atc_cuda_ms", "value": 1e3 * med(gpu["atc"])},
                    {**prefix, "metric": "cuda_speedup_vs_scipy", "value": med(times["scipy"]) / med(gpu["atc"])},
                    {**prefix, "metric": "cuda_agreement", "value": float((labels_gpu == reference).all(axis=1).mean())},
                ]
    return rows


# --- output ----------------------------------------------------------------------------------------


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def print_tables(frame: pd.DataFrame) -> None:
    for section, part in frame.groupby("section", sort=False):
        table = part.pivot(index="name", columns="metric", values="value")
        table = table[[c for c in dict.fromkeys(part["metric"]) if c in table.columns]]
        table = table.map(lambda v: f"{v:.3g}" if isinstance(v, float) else v)
        print(f"\n== {section} ==")
        print(table.to_string())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches and few repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/methods.csv"))
    parser.add_argument("--sections", nargs="+", default=["op_cost", "throughput", "atc_vs_scipy"],
                        choices=["op_cost", "throughput", "atc_vs_scipy"])
    args = parser.parse_args(argv)
    if args.quick:
        args.op_batch, args.model_batch, args.atc_batch = 16, 8, 64
        args.warmup, args.repeats, args.model_warmup, args.model_repeats = 1, 3, 1, 2
    else:
        args.op_batch, args.model_batch, args.atc_batch = 64, 64, 64
        args.warmup, args.repeats, args.model_warmup, args.model_repeats = 2, 7, 1, 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = {"op_cost": op_cost, "throughput": throughput, "atc_vs_scipy": atc_vs_scipy}
    rows: List[Row] = []
    for name in args.sections:
        start = time.perf_counter()
        rows += sections[name](args)
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", file=sys.stderr)
    settings = {"threads": args.threads, "quick": int(args.quick), "op_batch": args.op_batch,
                "model_batch": args.model_batch, "atc_batch": args.atc_batch, "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    rows += [{"section": "settings", "name": "run", "metric": k, "value": v} for k, v in settings.items()]
    frame = pd.DataFrame(rows, columns=["section", "name", "metric", "value"])
    write_csv_atomic(frame, args.out)
    print_tables(frame)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
