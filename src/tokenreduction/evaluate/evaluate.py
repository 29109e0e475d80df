"""Evaluate a trained checkpoint: accuracy or mAP, cost, reduction patterns
and CLS features, in one pass over a split.

Outputs (each written atomically):

metrics JSON
    ``top1``/``top5`` (single label) or ``mAP`` (multi-label), ``metric`` (its
    name) and ``value``; ``params_m`` (millions), ``gflops``
    (:func:`tokenreduction.count_flops`), ``throughput`` (images/s on random
    input at ``throughput_batch``: warm-up, then the median of timed runs,
    synchronised on CUDA); ``tokens_kept`` (patch tokens after each stage, the
    largest count over the split), ``tokens_kept_mean`` (mean per image) and
    ``tokens_expected`` (what the budget asked); the model's reduction setup.
``patterns.npz`` (first ``num_pattern_images`` images of the split, in order)
    ``stage_blocks`` (S,) int, ``composed`` (S, N_img, P) int32: for every
    original patch the token it belongs to after each stage, -1 once dropped
    (:func:`tokenreduction.compose_assignments`), ``kind`` ("prune", "merge",
    "soft" or "none"), ``method``, ``image_ids`` (N_img,), ``grid`` (h, w).
    The unreduced model has S = 0.
``cls_features.npz``
    ``blocks`` (K,), ``features`` (K, N_img, D) float32: the CLS token of the
    output of those blocks (before the final norm), ``image_ids``. Blocks are
    the reduction locations plus the last block; for the unreduced model
    3, 6, 9 and the last block (those below the depth), as the study does.
"""
from __future__ import annotations

import io
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..patterns import compose_assignments
from ..train.checkpoint import load_trained_model
from .metrics import mean_average_precision, topk_accuracy

PathLike = Union[str, os.PathLike]
UNREDUCED_FEATURE_BLOCKS = (3, 6, 9)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    return dev


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_npz(path: PathLike, **arrays: Any) -> None:
    """np.savez_compressed to a temporary name, then rename (atomic)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    _atomic_bytes(Path(path), buf.getvalue())


def feature_blocks(model: nn.Module) -> list[int]:
    """Blocks whose CLS output is extracted: the reduction locations plus the
    last block, or 3, 6, 9 and the last for the unreduced model."""
    depth = len(model.blocks)
    config = getattr(model, "reduction_config", None) or {}
    locs = list(config.get("reduction_loc") or []) if config.get("method") else []
    base = locs if locs else [b for b in UNREDUCED_FEATURE_BLOCKS if b < depth]
    return sorted(set(base) | {depth - 1})


@torch.no_grad()
def measure_throughput(
    model: nn.Module, img_size: int, batch_size: int, device: torch.device, warmup: int = 5, runs: int = 10, amp: bool = False
) -> float:
    """Images per second of forward passes on random input: `warmup`
    untimed passes, then the median time of `runs` timed ones."""
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
        if amp
        else None
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once() -> None:
        if autocast is not None:
            with autocast:
                model(x)
        else:
            model(x)

    for _ in range(warmup):
        once()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t0)
    return batch_size / statistics.median(times)


def evaluate(
    checkpoint: PathLike,
    dataset: str,
    data_root: PathLike,
    split: Optional[str] = None,
    img_size: Optional[int] = None,
    out_metrics: Optional[PathLike] = None,
    out_patterns: Optional[PathLike] = None,
    out_features: Optional[PathLike] = None,
    num_pattern_images: int = 256,
    batch_size: int = 64,
    device: str = "auto",
    throughput_batch: Optional[int] = None,
    num_workers: int = 0,
    amp: bool = False,
    blocks: Optional[Sequence[int]] = None,
) -> dict[str, Any]:
    """Evaluate the trained model in `checkpoint` (a final.pth) on `split` of
    `dataset`; returns the metrics dict (also written to `out_metrics`).

    split defaults to the split the run validated on (the spec's
    ``eval_split``: ``test`` for runs trained with ``train_trainval``, else
    ``val``); img_size defaults to the one the model was trained at; `blocks`
    overrides the CLS-feature blocks (:func:`feature_blocks`);
    throughput_batch defaults to batch_size.
    """
    from ..data import build_dataset, build_transform
    from ..models import count_flops

    if num_pattern_images < 0 or batch_size < 1:
        raise ValueError("num_pattern_images must be >= 0 and batch_size >= 1")
    dev = _resolve_device(device)
    model, spec = load_trained_model(checkpoint)
    model.to(dev).eval()
    if img_size is None:
        img_size = int(spec.get("img_size") or model.patch_embed.img_size[0])
    if split is None:
        split = str(spec.get("eval_split") or "val")
    ds = build_dataset(dataset, data_root, split, build_transform(False, img_size, dataset))
    if len(ds) == 0:
        raise ValueError(f"{dataset} split {split!r} at {data_root} has no images")
    multilabel = bool(ds.multilabel)
    head_classes = int(spec["num_classes"])
    if ds.num_classes > head_classes:
        raise ValueError(f"the dataset has {ds.num_classes} classes but the model's head only {head_classes}")

    depth = len(model.blocks)
    feat_blocks = sorted({int(b) for b in blocks}) if blocks is not None else feature_blocks(model)
    for b in feat_blocks:
        if not 0 <= b < depth:
            raise ValueError(f"feature block {b} is beyond the model's depth: blocks are 0..{depth - 1}")
    n_pattern = min(num_pattern_images, len(ds))
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def fn(_module, _inputs, output):
            captured[index] = output[:, 0].detach().float().cpu()

        return fn

    handles = [model.blocks[b].register_forward_hook(hook(b)) for b in feat_blocks] if out_features else []

    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=dev.type == "cuda")
    logits_all, targets_all = [], []
    composed_parts: list[torch.Tensor] = []
    feature_parts: dict[int, list[torch.Tensor]] = {b: [] for b in feat_blocks}
    stage_blocks: list[int] = []
    kinds: list[str] = []
    kept_max: list[int] = []
    kept_sum: Optional[torch.Tensor] = None
    seen = 0
    try:
        with torch.no_grad():
            for images, targets in loader:
                images = images.to(dev, non_blocking=True)
                if amp:
                    with torch.autocast(device_type=dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16):
                        logits = model(images)
                else:
                    logits = model(images)
                logits_all.append(logits.float().cpu())
                targets_all.append(torch.as_tensor(targets).cpu())
                state = model.reduction_state
                stages = state.stages if state is not None else []
                B = images.shape[0]
                if not stage_blocks and stages:
                    stage_blocks = [s.block for s in stages]
                    kinds = [s.kind for s in stages]
                    kept_max = [0] * len(stages)
                    kept_sum = torch.zeros(len(stages), dtype=torch.float64)
                for j, s in enumerate(stages):
                    kept_max[j] = max(kept_max[j], int(s.tokens_out))
                    per_image = s.kept_per_image if s.kept_per_image is not None else torch.full((B,), s.tokens_out)
                    kept_sum[j] += per_image.double().sum().cpu()
                take = min(B, n_pattern - seen)
                if take > 0:
                    if stages and out_patterns:
                        comp = compose_assignments([s.assignment for s in stages])
                        composed_parts.append(torch.stack(comp)[:, :take].to(torch.int32).cpu())
                    for b in feat_blocks if out_features else ():
                        feature_parts[b].append(captured[b][:take])
                    seen += take
                captured.clear()
    finally:
        for h in handles:
            h.remove()

    logits = torch.cat(logits_all)
    targets = torch.cat(targets_all)
    if multilabel:
        value = mean_average_precision(logits.sigmoid(), targets)
        scores = {"metric": "mAP", "value": value, "mAP": value}
    else:
        top1, top5 = topk_accuracy(logits, targets.long(), (1, 5))
        scores = {"metric": "top1", "value": top1, "top1": top1, "top5": top5}

    config = getattr(model, "reduction_config", {}) or {}
    tp_batch = int(throughput_batch or batch_size)
    gflops = count_flops(model, img_size=img_size)
    throughput = measure_throughput(model, img_size, tp_batch, dev, amp=amp)
    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "dataset": dataset,
        "split": split,
        "num_images": len(ds),
        "multilabel": multilabel,
        **scores,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": gflops,
        "throughput": throughput,
        "throughput_batch": tp_batch,
        "device": str(dev),
        "amp": amp,
        "model": spec.get("model"),
        "img_size": img_size,
        "method": config.get("method") or "none",
        "keep_rate": config.get("keep_rate"),
        "reduction_loc": config.get("reduction_loc") if config.get("method") else [],
        "budget": config.get("budget") if config.get("method") else None,
        "clca": config.get("clca"),
        "tuning": spec.get("tuning") or "full",
        "stage_blocks": stage_blocks,
        "tokens_kept": kept_max,
        "tokens_kept_mean": [] if kept_sum is None else (kept_sum / len(ds)).tolist(),
        "tokens_expected": list(config.get("expected_tokens") or []),
        "num_patches": int(model.patch_embed.num_patches),
    }
    if out_metrics:
        _atomic_bytes(Path(out_metrics), (json.dumps(metrics, indent=2) + "\n").encode())

    image_ids = np.array([str(ds.image_id(i)) for i in range(n_pattern)], dtype=str)
    grid = tuple(int(v) for v in model.patch_embed.grid_size)
    P = int(model.patch_embed.num_patches)
    if out_patterns:
        composed = (
            torch.cat(composed_parts, dim=1).numpy()
            if composed_parts
            else np.zeros((len(stage_blocks), n_pattern, P), dtype=np.int32)
        )
        kind = kinds[0] if kinds and len(set(kinds)) == 1 else ("none" if not kinds else "+".join(kinds))
        save_npz(
            out_patterns,
            stage_blocks=np.array(stage_blocks, dtype=np.int64),
            composed=composed.astype(np.int32),
            kind=np.array(kind),
            method=np.array(metrics["method"]),
            image_ids=image_ids,
            grid=np.array(grid, dtype=np.int64),
        )
    if out_features:
        D = int(model.embed_dim)
        feats = np.stack(
            [torch.cat(feature_parts[b]).numpy() if feature_parts[b] else np.zeros((0, D), np.float32) for b in feat_blocks]
        ).astype(np.float32)
        save_npz(out_features, blocks=np.array(feat_blocks, dtype=np.int64), features=feats, image_ids=image_ids)
    return metrics
