"""The speed table of issue 19, measured side by side in one run.

    python benchmarks/speed_table.py [--quick] [--sections ...] [--out results/benchmarks/speed_table.csv]

Rows (each a ratio of callables timed round-robin in this process, medians
over rounds after warm-up, torch on one thread unless --threads says more):

unreduced   DeiT-S (random weights) through ``tr.patch_model`` with no
            reduction vs the same stock timm model: stock time / patched time.
deit_s      DeiT-S at keep rate 0.7 (blocks 3/6/9) for topk, evit, tome, atc
            and ToMe r=13: speed-up over the unreduced model next to the
            speed-up its FLOPs imply (``benchmarks/methods.py`` section b;
            GFLOPs in the papers' convention, attention included on every
            kernel: docs/flops.md).
tome_official  DeiT-S with ToMe r=13: this library vs the official ToMe patch
            (facebookresearch/ToMe's ``tome.patch.timm``, not on PyPI: pass a
            checkout with ``--tome-repo``; the section is skipped without
            one), both as speed-ups over stock timm in the same rounds, and
            the largest logit difference between the two.
atc_batch   clustering B=64 images of N=196 tokens into K=137 (C=64 random
            features, float32 cosine distances as ATC computes them), per
            linkage: this library (``agglomerative_labels``: the default back
            end, "native" where a C compiler is found; the previous default
            "scipy" as ``library_scipy``, i.e. before/after in one run; and
            the tensor "rnn" back end) vs the official per-image
            scikit-learn loop (``AgglomerativeClustering(K,
            metric="precomputed")``, as ATC's code) and a per-image SciPy loop
            (``linkage`` + ``fcluster(K, "maxclust")`` on the condensed
            distances). Every side starts from the same (B, N, N) tensor and
            includes its own conversions. ``agree`` is the fraction of images
            whose partition equals SciPy's.
atc_reducer ATC's whole reducer (``atc_merge``: cosine distance, clustering,
            pooling, sizes) on B=64 images of N=196 patch tokens into K=137,
            at DeiT-S's widths (C=384 tokens sliced off (B, 197, C) as in the
            model, head-mean keys of width 64), per linkage, vs a per-image
            SciPy loop that only clusters (``linkage`` + ``fcluster`` on the
            precomputed distances, as in atc_batch), and vs the reducer as it
            was before (distance out of place, scatter_add_ pooling, separate
            size sum; today's kernel) as ``reducer_before``; the reducer's
            parts are timed in the same
            rounds (``distance``, ``labels``, ``pool``). ``agree`` is the
            fraction of images whose partition equals SciPy's.
atc_large   one image, N=1024 and N=4096 (a 512-px SD latent), K=N/2, on
            isotropic random tokens and on smooth ones (a random field plus
            noise, like a UNet's hidden states: where the sparse path runs):
            library (default, dense chain only, and "scipy" back ends) vs
            SciPy (same as above); ``sparse_path`` says whether the default
            took the sparse path.
sd_unet     an SD-v1.5-layout UNet (diffusers ``UNet2DConditionModel``:
            3 cross-attention down blocks + 1 plain, mirrored up; narrow widths
            64/128/256/256 so it runs on a CPU; random weights), one forward
            at a 64x64 latent (32x32 with --quick), batch 2 (classifier-free
            guidance: the same latent twice, two text embeddings, so the
            first merging block's two halves are equal and ATC clusters
            them once), merging ratio 0.5 at the highest resolution
            (max_downsample 1, self-attention): no merging vs tomesd vs this
            library's ToMe-SD vs this library's ATC (average linkage; with
            the default clustering back end and, as ``atc_sd_scipy``, with
            the SciPy back end). Speed-up = time without merging / time with.
sd_block    one transformer block at SD-v1.5's widths, N = 64 x 64 tokens;
            ATC on smooth tokens (like a UNet's hidden states) and on
            isotropic random ones (where the sparse path gives way).
            The UNet and block sections add ``sparse_share``: the fraction
            of ATC's clustered images the sparse path finished.
sd15_unet   the same comparison (without the SciPy row) on the UNet at
            SD-v1.5's own widths (320/640/1280/1280, cross-attention 768,
            860 M random weights, 3.4 GB; about 15 s a forward on one core):
            attention is a larger share there than in the narrow UNet.
sdxl_unet   a UNet in SDXL's layout at SDXL's widths (320/640/1280, heads
            of 64, cross-attention 2048, text-time conditioning, no attention
            at the first level; random weights) at a 128x128 latent (a
            1024-px image; 64x64 with --quick), batch 1 (--sdxl-batch 2 for
            a guidance batch): no merging vs this library's ToMe-SD and ATC
            (average) at ratio 0.5 with the default levels (auto: SDXL's
            first attention level, downsampling 2, 4096 tokens). SDXL has
            10 transformer layers per block at the lowest level; the default
            run keeps 2 there (--sdxl-depth 10 for the whole model, about
            4x the time) so one forward takes tens of seconds on a core.

The machine may be shared: the load average before and after is written
next to the figures. Writes a long CSV (section, name, metric, value)
atomically and prints one table per section.
"""
from __future__ import annotations

import argparse
import copy
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
from tokenreduction.reduction.atc import cosine_distance
from tokenreduction.reduction import _native_clustering as native_clustering
from tokenreduction.reduction.clustering import LINKAGES, agglomerative_labels

Row = Dict[str, object]


def interleaved(fns: Dict[str, Callable[[], object]], warmup: int, repeats: int) -> Dict[str, List[float]]:
    """Run the callables round-robin; returns {name: [seconds per timed run]}."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for rnd in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rnd >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def med(values: List[float]) -> float:
    return float(statistics.median(values))


def ratio(num: List[float], den: List[float]) -> float:
    """Median over rounds of num / den (taken side by side in each round)."""
    return med([a / b for a, b in zip(num, den)])


def canonical(labels) -> np.ndarray:
    """(B, N) labels -> each point named by the smallest index of its cluster."""
    arr = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    out = np.empty(arr.shape, dtype=np.int64)
    for b, row in enumerate(arr):
        _, first, inverse = np.unique(row, return_index=True, return_inverse=True)
        out[b] = first[inverse.reshape(-1)]
    return out


# --- per-image reference loops ------------------------------------------------------------------


def scipy_loop(distance: torch.Tensor, k: int, method: str) -> np.ndarray:
    from scipy.cluster.hierarchy import fcluster, linkage

    square = distance.double().numpy()
    rows, cols = np.triu_indices(square.shape[1], k=1)
    return np.stack([fcluster(linkage(d[rows, cols], method=method), k, criterion="maxclust") for d in square])


def sklearn_loop(distance: torch.Tensor, k: int, method: str) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    square = distance.numpy()
    return np.stack([
        AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=method).fit_predict(d) for d in square
    ])


# --- sections -----------------------------------------------------------------------------------


def unreduced(args) -> List[Row]:
    import timm

    torch.manual_seed(0)
    stock = timm.create_model("deit_small_patch16_224").eval()
    patched = tr.patch_model(copy.deepcopy(stock)).eval()
    images = torch.randn(args.model_batch, 3, 224, 224)
    with torch.inference_mode():
        same = bool(torch.equal(stock(images), patched(images)))
        times = interleaved({"stock": lambda: stock(images), "patched": lambda: patched(images)},
                            args.model_warmup, args.model_repeats)
    head = {"section": "unreduced", "name": f"deit_s b{args.model_batch}"}
    return [
        {**head, "metric": "stock_ms", "value": 1e3 * med(times["stock"])},
        {**head, "metric": "patched_ms", "value": 1e3 * med(times["patched"])},
        {**head, "metric": "speed_vs_stock", "value": ratio(times["stock"], times["patched"])},
        {**head, "metric": "same_logits", "value": same},
    ]


def atc_batch(args) -> List[Row]:
    B, N, C, K = 64, 196, 64, 137
    torch.manual_seed(0)
    distance = cosine_distance(torch.randn(B, N, C))
    rows: List[Row] = []
    for method in LINKAGES:
        fns = {
            "library": lambda: agglomerative_labels(distance, K, method),
            "library_scipy": lambda: agglomerative_labels(distance, K, method, backend="scipy"),
            "library_rnn": lambda: agglomerative_labels(distance, K, method, backend="rnn"),
            "scipy": lambda: scipy_loop(distance, K, method),
            "sklearn": lambda: sklearn_loop(distance, K, method),
        }
        times = interleaved(fns, args.warmup, args.repeats)
        reference = canonical(scipy_loop(distance, K, method))
        head = {"section": "atc_batch", "name": f"{method} B{B} N{N} K{K}"}
        rows += [{**head, "metric": f"{name}_ms", "value": 1e3 * med(t)} for name, t in times.items()]
        rows += [
            {**head, "metric": "library_vs_sklearn", "value": ratio(times["sklearn"], times["library"])},
            {**head, "metric": "library_vs_scipy", "value": ratio(times["scipy"], times["library"])},
            {**head, "metric": "scipy_backend_vs_scipy", "value": ratio(times["scipy"], times["library_scipy"])},
            {**head, "metric": "rnn_vs_scipy", "value": ratio(times["scipy"], times["library_rnn"])},
            {**head, "metric": "agree", "value": float(
                (canonical(agglomerative_labels(distance, K, method)) == reference).all(1).mean())},
            {**head, "metric": "rnn_agree", "value": float(
                (canonical(agglomerative_labels(distance, K, method, backend="rnn")) == reference).all(1).mean())},
        ]
    return rows


def atc_reducer(args) -> List[Row]:
    from tokenreduction.reduction.atc import atc_merge, pool_clusters
    from tokenreduction.reduction.ops import labels_to_assignment, pool_by_assignment, sum_by_assignment

    B, N, C, D, K = 64, 196, 384, 64, 137
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 1 + N, C, generator=g)[:, 1:]  # the patch tokens of a model's (B, 1 + N, C)
    size = torch.ones(B, N)
    metric = torch.randn(B, N, D, generator=g)
    distance = cosine_distance(metric)
    rows: List[Row] = []
    for method in LINKAGES:
        labels = agglomerative_labels(distance, K, method)
        assignment, _ = labels_to_assignment(labels, K)

        def before():
            with torch.no_grad():
                m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                lab = agglomerative_labels(1.0 - m @ m.transpose(1, 2), K, method)
            a, m = labels_to_assignment(lab, num_out=K)
            return pool_by_assignment(x, a, m, weight=size)[0], sum_by_assignment(size, a, m)

        fns = {
            "reducer": lambda: atc_merge(x, size, metric, K, method),
            "reducer_before": before,
            "scipy": lambda: scipy_loop(distance, K, method),
            "distance": lambda: cosine_distance(metric),
            "labels": lambda: agglomerative_labels(distance, K, method),
            "pool": lambda: pool_clusters(x, assignment, K, size),
        }
        times = interleaved(fns, args.warmup, args.repeats)
        out = atc_merge(x, size, metric, K, method)
        head = {"section": "atc_reducer", "name": f"{method} B{B} N{N} K{K} C{C}"}
        rows += [{**head, "metric": f"{name}_ms", "value": 1e3 * med(t)} for name, t in times.items()]
        rows += [
            {**head, "metric": "reducer_vs_scipy", "value": ratio(times["scipy"], times["reducer"])},
            {**head, "metric": "before_vs_scipy", "value": ratio(times["scipy"], times["reducer_before"])},
            {**head, "metric": "reducer_vs_before", "value": ratio(times["reducer_before"], times["reducer"])},
            {**head, "metric": "agree", "value": float(
                (canonical(out.assignment) == canonical(scipy_loop(distance, K, method))).all(1).mean())},
        ]
    return rows


def smooth_tokens(n: int, channels: int = 64, seed: int = 0) -> torch.Tensor:
    """(1, n, channels) tokens of a smooth random field on a square grid
    plus noise, n a square: like a diffusion UNet's hidden states, every
    token has a few close neighbours (isotropic random tokens have none)."""
    side = int(round(n ** 0.5))
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(1, channels, max(1, side // 8), max(1, side // 8), generator=g)
    x = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    x = x + 0.5 * torch.randn(1, channels, side, side, generator=g)
    return x.flatten(2).transpose(1, 2).contiguous()


def _dense_labels(distance: torch.Tensor, k: int, method: str) -> torch.Tensor:
    with native_clustering.dense_only():
        return agglomerative_labels(distance, k, method)


def atc_large(args) -> List[Row]:
    """Per size, linkage and input ("random": isotropic Gaussian tokens;
    "smooth": :func:`smooth_tokens`): the default back end (for complete and
    average linkage at N >= 1024 the sparse path where it applies), the
    dense chain alone, the SciPy back end and SciPy itself."""
    rows: List[Row] = []
    for N in args.large_sizes:
        K = N // 2
        torch.manual_seed(N)
        inputs = {"random": cosine_distance(torch.randn(1, N, 64)), "smooth": cosine_distance(smooth_tokens(N))}
        for kind, distance in inputs.items():
            for method in args.large_linkages:
                fns = {"library": lambda: agglomerative_labels(distance, K, method),
                       "library_scipy": lambda: agglomerative_labels(distance, K, method, backend="scipy"),
                       "scipy": lambda: scipy_loop(distance, K, method)}
                if method != "single" and native_clustering.library() is not None:
                    fns["library_dense"] = lambda: _dense_labels(distance, K, method)
                repeats = args.repeats if N <= 1024 else max(1, args.repeats // 3)
                times = interleaved(fns, 1 if N <= 1024 else 0, repeats)
                head = {"section": "atc_large", "name": f"{method} N{N} K{K} {kind}"}
                native_clustering.sparse_stats()
                labels = agglomerative_labels(distance, K, method)
                path = native_clustering.sparse_stats()
                agree = bool((canonical(labels) == canonical(scipy_loop(distance, K, method))).all())
                rows += [{**head, "metric": f"{name}_ms", "value": 1e3 * med(t)} for name, t in times.items()]
                rows += [
                    {**head, "metric": "library_vs_scipy", "value": ratio(times["scipy"], times["library"])},
                    {**head, "metric": "scipy_backend_vs_scipy", "value": ratio(times["scipy"], times["library_scipy"])},
                    {**head, "metric": "sparse_path", "value": bool(path["finished"])},
                    {**head, "metric": "agree", "value": agree},
                ]
                if "library_dense" in times:
                    rows.append({**head, "metric": "library_vs_dense", "value": ratio(times["library_dense"],
                                                                                       times["library"])})
    return rows


def sd_layout_unet(sample_size: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8,
    ).eval()


def sd15_width_unet(sample_size: int):
    """The SD-v1.5 UNet itself, random weights: diffusers' default
    ``UNet2DConditionModel`` (widths 320/640/1280/1280, 8 heads, GEGLU) with
    cross-attention width 768, as v1.5's config. 860 M parameters, 3.4 GB."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=sample_size, cross_attention_dim=768).eval()


def _shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose parameters and buffers are the
    original's tensors (the patches replace modules' classes, not weights):
    four variants of a 3.4 GB UNet then take 3.4 GB, not 14."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _unet_rows(section: str, base, side: int, text_width: int, repeats: int, with_scipy: bool) -> List[Row]:
    """One forward of `base` at a side x side latent, batch 2 (classifier-free
    guidance: one latent, two text embeddings), timed round robin: no merging, tomesd, this library's ToMe-SD and ATC (average), all
    at ratio 0.5, max_downsample 1 (self-attention); with_scipy adds ATC
    with the SciPy clustering back end."""
    from tokenreduction.diffusion import patch as sd_patch

    # classifier-free guidance, as a generation step runs the UNet: the same
    # latent twice, with the unconditional and the prompt's text embeddings
    sample = torch.randn(1, 4, side, side).expand(2, -1, -1, -1).contiguous()
    text = torch.randn(2, 77, text_width)
    step = torch.tensor(500)
    variants = {"none": base}
    try:
        import tomesd

        variants["tomesd"] = tomesd.apply_patch(_shared_copy(base), ratio=0.5, max_downsample=1)
    except ImportError:  # reported, not fatal
        print("tomesd is not installed: its row is skipped", file=sys.stderr)
    variants["tome_sd"] = sd_patch.apply_patch(_shared_copy(base), ratio=0.5, max_downsample=1)
    variants["atc_sd"] = sd_patch.apply_patch(_shared_copy(base), ratio=0.5, max_downsample=1, merge_fn="atc",
                                             linkage="average")
    if with_scipy:
        variants["atc_sd_scipy"] = variants["atc_sd"]  # the same model, clustering with the SciPy back end

    def run(name, unet):
        if name == "atc_sd_scipy":
            def call():
                with native_clustering.disabled():
                    return unet(sample, step, encoder_hidden_states=text).sample
            return call
        return lambda: unet(sample, step, encoder_hidden_states=text).sample

    with torch.inference_mode():
        times = interleaved({name: run(name, unet) for name, unet in variants.items()}, 1, repeats)
        native_clustering.sparse_stats()
        run("atc_sd", variants["atc_sd"])()
        path = native_clustering.sparse_stats()
    rows: List[Row] = []
    for name in variants:
        head = {"section": section, "name": f"{name} {side}x{side} b2 r0.5"}
        rows += [{**head, "metric": "ms", "value": 1e3 * med(times[name])}]
        if name != "none":
            rows.append({**head, "metric": "speedup_vs_none", "value": ratio(times["none"], times[name])})
        if name == "atc_sd":
            rows.append({**head, "metric": "sparse_share", "value": _share(path)})
    if "tomesd" in variants:
        rows.append({"section": section, "name": "tome_sd vs tomesd", "metric": "speed_ratio",
                     "value": ratio(times["tomesd"], times["tome_sd"])})
    return rows


def sd_unet(args) -> List[Row]:
    return _unet_rows("sd_unet", sd_layout_unet(args.latent), args.latent, 128, args.unet_repeats, True)


def sd15_unet(args) -> List[Row]:
    """The whole UNet at SD-v1.5's widths: where the narrow UNet above
    under-weights attention (8-dimensional heads) against the clustering,
    this is the model a user of the ATC diffusion experiment runs."""
    return _unet_rows("sd15_unet", sd15_width_unet(args.latent), args.latent, 768, args.sd15_repeats, False)


def sdxl_unet(args) -> List[Row]:
    """ToMe-SD and ATC against no merging in an SDXL-width UNet (see the
    module docstring); the merged blocks' token counts are checked."""
    from tokenreduction.diffusion import patch as sd_patch
    from tokenreduction.diffusion.tiny import tiny_sdxl_unet

    side, batch, depth = args.sdxl_latent, args.sdxl_batch, args.sdxl_depth
    torch.manual_seed(0)
    base = tiny_sdxl_unet(side, widths=(320, 640, 1280), layers=(1, 2, depth), heads=(5, 10, 20),
                          text_width=2048, pooled_width=1280, time_dim=256)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, side, side, generator=g).expand(batch, -1, -1, -1).contiguous()
    text = torch.randn(batch, 77, 2048, generator=g)
    added = {"text_embeds": torch.randn(batch, 1280, generator=g),
             "time_ids": torch.tensor([[8.0 * side, 8.0 * side, 0, 0, 8.0 * side, 8.0 * side]] * batch)}
    step = torch.tensor(500)
    variants = {
        "none": base,
        "tome_sd": sd_patch.apply_patch(_shared_copy(base), ratio=0.5),
        "atc_sd": sd_patch.apply_patch(_shared_copy(base), ratio=0.5, merge_fn="atc", linkage="average"),
    }
    with torch.inference_mode():
        times = interleaved({name: (lambda u=u: u(sample, step, encoder_hidden_states=text,
                                                   added_cond_kwargs=added).sample)
                             for name, u in variants.items()}, 1, args.sdxl_repeats)
    n = (side // 2) ** 2
    for name in ("tome_sd", "atc_sd"):
        counts = set(sd_patch.patch_state(variants[name]).tokens.values())
        if counts != {(n, n - n // 2)}:
            raise RuntimeError(f"{name}: merged token counts {counts}, expected {{({n}, {n - n // 2})}}")
    rows: List[Row] = []
    for name in variants:
        head = {"section": "sdxl_unet", "name": f"{name} sdxl-width depth{depth} {side}x{side} b{batch} r0.5"}
        rows.append({**head, "metric": "ms", "value": 1e3 * med(times[name])})
        if name != "none":
            rows.append({**head, "metric": "speedup_vs_none", "value": ratio(times["none"], times[name])})
    return rows


class _OneBlock(torch.nn.Module):
    """One diffusers transformer block behind a UNet-like call (the latent
    comes first, so the merging patch finds the latent size)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, sample, hidden_states, encoder_hidden_states):
        return self.block(hidden_states, encoder_hidden_states=encoder_hidden_states)


def sd_block(args) -> List[Row]:
    """One transformer block at SD-v1.5's widths of the highest resolution
    (320 channels, 8 heads of 40, cross-attention 768, GEGLU MLP), N = 64 x 64
    tokens, batch 2: where the narrow UNet above under-weights attention
    against the clustering, this is the block ATC merges in the real model.
    ATC runs on two inputs: smooth tokens (:func:`smooth_tokens`, like a
    UNet's hidden states) and isotropic random ones (no close neighbours:
    the sparse path gives way to the dense chain); not merging and ToMe-SD
    cost the same on either."""
    from diffusers.models.attention import BasicTransformerBlock

    from tokenreduction.diffusion import patch as sd_patch

    side = args.latent
    torch.manual_seed(0)
    block = BasicTransformerBlock(320, 8, 40, cross_attention_dim=768).eval()
    smooth = torch.cat([smooth_tokens(side * side, 320, seed=s) for s in (0, 1)])
    random_hidden = torch.randn(2, side * side, 320)
    text = torch.randn(2, 77, 768)
    sample = torch.randn(2, 4, side, side)
    atc = sd_patch.apply_patch(_OneBlock(copy.deepcopy(block)), ratio=0.5, max_downsample=1, merge_fn="atc",
                               linkage="average")
    variants = {
        "none": (_OneBlock(block), smooth),
        "tome_sd": (sd_patch.apply_patch(_OneBlock(copy.deepcopy(block)), ratio=0.5, max_downsample=1), smooth),
        "atc_sd": (atc, smooth),
        "atc_sd_random_tokens": (atc, random_hidden),
    }
    with torch.inference_mode():
        times = interleaved({name: (lambda m=m, h=h: m(sample, h, text)) for name, (m, h) in variants.items()},
                            1, args.repeats)
        paths = {}
        for name in ("atc_sd", "atc_sd_random_tokens"):
            native_clustering.sparse_stats()
            variants[name][0](sample, variants[name][1], text)
            paths[name] = native_clustering.sparse_stats()
    rows: List[Row] = []
    for name in variants:
        head = {"section": "sd_block", "name": f"{name} sd15-width {side}x{side} b2 r0.5"}
        rows.append({**head, "metric": "ms", "value": 1e3 * med(times[name])})
        if name != "none":
            rows.append({**head, "metric": "speedup_vs_none", "value": ratio(times["none"], times[name])})
        if name in paths:
            rows.append({**head, "metric": "sparse_share", "value": _share(paths[name])})
    return rows


def _share(stats: dict) -> float:
    """Fraction of the clustered images the sparse path finished."""
    total = stats["finished"] + stats["dense"]
    return stats["finished"] / total if total else float("nan")


# --- output -------------------------------------------------------------------------------------


def tome_official(args) -> List[Row]:
    import timm

    if args.tome_repo is None:
        print("[tome_official: skipped, no --tome-repo given]", file=sys.stderr)
        return []
    if not (args.tome_repo / "tome" / "patch" / "timm.py").is_file():
        raise SystemExit(f"--tome-repo {args.tome_repo}: no tome/patch/timm.py there (a facebookresearch/ToMe checkout)")
    sys.path.insert(0, str(args.tome_repo))
    import tome  # the official package, from the given checkout

    torch.manual_seed(0)
    stock = timm.create_model("deit_small_patch16_224").eval()
    official = copy.deepcopy(stock)
    tome.patch.timm(official)
    official.r = 13
    library = tr.create_model("deit_small_patch16_224", method="tome", r=13).eval()
    library.load_state_dict(stock.state_dict(), strict=False)
    images = torch.randn(args.model_batch, 3, 224, 224)
    with torch.inference_mode():
        max_diff = float((official(images) - library(images)).abs().max())
        times = interleaved({"stock": lambda: stock(images), "official": lambda: official(images),
                             "library": lambda: library(images)}, args.model_warmup, args.model_repeats)
    head = {"section": "tome_official", "name": f"deit_s r13 b{args.model_batch}"}
    return [
        {**head, "metric": "stock_ms", "value": 1e3 * med(times["stock"])},
        {**head, "metric": "official_speedup", "value": ratio(times["stock"], times["official"])},
        {**head, "metric": "library_speedup", "value": ratio(times["stock"], times["library"])},
        {**head, "metric": "library_vs_official", "value": ratio(times["official"], times["library"])},
        {**head, "metric": "max_logit_diff", "value": max_diff},
    ]


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def print_tables(frame: pd.DataFrame) -> None:
    for section, part in frame.groupby("section", sort=False):
        table = part.pivot(index="name", columns="metric", values="value")
        table = table[[c for c in dict.fromkeys(part["metric"]) if c in table.columns]]
        table = table.loc[list(dict.fromkeys(part["name"]))]
        table = table.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v))
                          else f"{v:.3g}" if isinstance(v, float) else v)
        print(f"\n== {section} ==")
        print(table.to_string())


def deit_s(args) -> List[Row]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import methods  # benchmarks/methods.py

    return [{**row, "section": "deit_s"} for row in methods.throughput(args)]


SECTIONS = {"unreduced": unreduced, "deit_s": deit_s, "tome_official": tome_official, "atc_batch": atc_batch, "atc_reducer": atc_reducer,
            "atc_large": atc_large,
            "sd_unet": sd_unet, "sd_block": sd_block, "sd15_unet": sd15_unet}


SECTIONS["sdxl_unet"] = sdxl_unet


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller model batch, 32x32 latent")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--tome-repo", type=Path, default=None,
                        help="a facebookresearch/ToMe checkout: adds the official ToMe patch's row")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/speed_table.csv"))
    parser.add_argument("--unet-rounds", type=int, default=None,
                        help="timed rounds of the UNet sections (default 3, 2 with --quick)")
    parser.add_argument("--sdxl-latent", type=int, default=None, help="sdxl_unet latent side (default 128, 64 with --quick)")
    parser.add_argument("--sdxl-depth", type=int, default=2,
                        help="sdxl_unet transformer layers per block at the lowest level (SDXL: 10; default 2)")
    parser.add_argument("--sdxl-batch", type=int, default=1, help="sdxl_unet batch (2 = a guidance batch)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model_batch, args.model_warmup, args.model_repeats = 8, 1, 3
        args.warmup, args.repeats, args.unet_repeats, args.latent = 1, 3, 2, 32
        args.sd15_repeats = 1
        args.large_sizes, args.large_linkages = [1024], ["average"]
    else:
        args.model_batch, args.model_warmup, args.model_repeats = 32, 1, 9
        args.warmup, args.repeats, args.unet_repeats, args.latent = 1, 7, 3, 64
        args.sd15_repeats = 3
        args.large_sizes, args.large_linkages = [1024, 4096], list(LINKAGES)
    if args.unet_rounds:
        args.unet_repeats = args.sd15_repeats = args.unet_rounds
    args.sdxl_latent = args.sdxl_latent or (64 if args.quick else 128)
    args.sdxl_repeats = args.unet_rounds or (1 if args.quick else 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: List[Row] = [{"section": "settings", "name": "run", "metric": "load_before", "value": os.getloadavg()[0]}]
    for name in args.sections:
        start = time.perf_counter()
        rows += SECTIONS[name](args)
        print(f"[{name}: {time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f}]", file=sys.stderr)
    settings = {"load_after": os.getloadavg()[0], "cpus": os.cpu_count(), "threads": args.threads,
                "quick": int(args.quick), "torch": torch.__version__}
    rows += [{"section": "settings", "name": "run", "metric": k, "value": v} for k, v in settings.items()]
    frame = pd.DataFrame(rows, columns=["section", "name", "metric", "value"])
    write_csv_atomic(frame, args.out)
    print_tables(frame)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
