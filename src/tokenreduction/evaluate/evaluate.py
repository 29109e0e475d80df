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
    The unreduced model has S = 0. Methods whose stages report cluster
    centres (K-Medoids, DPC-KNN) add ``kept`` (S, N_img, P) bool: the patches
    behind the centres, which the study counted as kept tokens.
``cls_features.npz``
    ``blocks`` (K,), ``features`` (K, N_img, D) float32: the CLS token of the
    output of those blocks (before the final norm), ``image_ids``. Blocks are
    the reduction locations plus the last block; for the unreduced model
    3, 6, 9 and the last block (those below the depth), as the study does.

The phases: :func:`load_for_evaluation` (model, spec, dataset),
:class:`PassRecorder` (one pass over the split: logits, kept tokens,
patterns, CLS features), :func:`score` (accuracy or mAP), :func:`measure_cost`
(parameters, GFLOPs, throughput), then the files. Progress lines go to the
log; with the run's W&B project set (stored in final.pth), the metrics are
logged to the training run they belong to.
"""
from __future__ import annotations

import io
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import tracking
from ..metrics import mean_average_precision, topk_accuracy
from ..analysis.patterns import kept_from_centres
from ..patterns import compose_assignments
from ..train.checkpoint import load_trained_model

PathLike = Union[str, os.PathLike]
UNREDUCED_FEATURE_BLOCKS = (3, 6, 9)


def _resolve_device(device: str) -> torch.device:
    """tokenreduction.train.runtime.resolve_device: an unusable CUDA device
    fails at once, naming the node, visible devices, torch and driver."""
    from ..train.runtime import resolve_device

    return resolve_device(device)


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


@dataclass
class EvalInput:
    """The trained model and the split it is evaluated on."""

    model: nn.Module
    spec: dict
    dataset: Any
    split: str
    img_size: int
    multilabel: bool
    device: torch.device


def load_for_evaluation(
    checkpoint: PathLike, dataset: str, data_root: PathLike, split: Optional[str], img_size: Optional[int], device: str
) -> EvalInput:
    """The model of a final.pth (eval mode, on `device`) and the split's
    dataset with the evaluation transform; checks the classes fit the head."""
    from ..data import build_dataset, build_transform

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
    head_classes = int(spec["num_classes"])
    if ds.num_classes > head_classes:
        raise ValueError(f"the dataset has {ds.num_classes} classes but the model's head only {head_classes}")
    return EvalInput(model, spec, ds, split, int(img_size), bool(ds.multilabel), dev)


@dataclass
class PassRecorder:
    """What one pass over the split records, batch by batch: logits and
    targets; per reduction stage its block, kind, the most tokens kept and
    the sum over images; the composed assignments and the CLS features of the
    first ``n_pattern`` images."""

    n_pattern: int
    feat_blocks: list
    want_patterns: bool
    want_features: bool
    logits: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    composed: list = field(default_factory=list)
    #: (S, b, P) bool centre masks per batch, when every stage reports centres
    kept: list = field(default_factory=list)
    features: dict = field(default_factory=dict)
    stage_blocks: list = field(default_factory=list)
    kinds: list = field(default_factory=list)
    kept_max: list = field(default_factory=list)
    kept_sum: Optional[torch.Tensor] = None
    seen: int = 0
    captured: dict = field(default_factory=dict)

    def hooks(self, model: nn.Module) -> list:
        """Forward hooks capturing the CLS token of the feature blocks' outputs."""
        if not self.want_features:
            return []

        def hook(index: int):
            def fn(_module, _inputs, output):
                self.captured[index] = output[:, 0].detach().float().cpu()

            return fn

        self.features = {b: [] for b in self.feat_blocks}
        return [model.blocks[b].register_forward_hook(hook(b)) for b in self.feat_blocks]

    def add(self, logits: torch.Tensor, targets: Any, state: Any) -> None:
        """Record one batch: its logits (B, K), targets and the model's reduction_state."""
        self.logits.append(logits.float().cpu())
        self.targets.append(torch.as_tensor(targets).cpu())
        stages = state.stages if state is not None else []
        B = logits.shape[0]
        if not self.stage_blocks and stages:
            self.stage_blocks = [s.block for s in stages]
            self.kinds = [s.kind for s in stages]
            self.kept_max = [0] * len(stages)
            self.kept_sum = torch.zeros(len(stages), dtype=torch.float64)
        for j, s in enumerate(stages):
            self.kept_max[j] = max(self.kept_max[j], int(s.tokens_out))
            per_image = s.kept_per_image if s.kept_per_image is not None else torch.full((B,), s.tokens_out)
            self.kept_sum[j] += per_image.double().sum().cpu()
        take = min(B, self.n_pattern - self.seen)
        if take > 0:
            if stages and self.want_patterns:
                comp = compose_assignments([s.assignment for s in stages])
                self.composed.append(torch.stack(comp)[:, :take].to(torch.int32).cpu())
                centres = [a["centres"][:take].cpu() for a in getattr(state, "aux", []) if "centres" in a]
                if len(centres) == len(stages):
                    self.kept.append(kept_from_centres(centres, int(comp[0].shape[1])))
            for b in self.feat_blocks if self.want_features else ():
                self.features[b].append(self.captured[b][:take])
            self.seen += take
        self.captured.clear()


def run_pass(inp: EvalInput, recorder: PassRecorder, batch_size: int, num_workers: int, amp: bool) -> PassRecorder:
    """One pass of the model over the split, with progress lines in the log."""
    model, dev = inp.model, inp.device
    loader = DataLoader(inp.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=dev.type == "cuda")
    progress = tracking.ProgressLog("evaluate", len(loader), every_steps=max(1, len(loader) // 10), every_seconds=60.0)
    handles = recorder.hooks(model)
    images_done = 0
    try:
        with torch.no_grad():
            for i, (images, targets) in enumerate(loader, start=1):
                images = images.to(dev, non_blocking=True)
                if amp:
                    with torch.autocast(device_type=dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16):
                        logits = model(images)
                else:
                    logits = model(images)
                recorder.add(logits, targets, model.reduction_state)
                images_done += images.shape[0]
                progress.update(i, images_done)
    finally:
        for h in handles:
            h.remove()
    return recorder


def score(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> dict[str, Any]:
    """mAP (multi-label) or top-1/top-5 with ``metric`` naming the headline and ``value`` it."""
    if multilabel:
        value = mean_average_precision(logits.sigmoid(), targets)
        return {"metric": "mAP", "value": value, "mAP": value}
    top1, top5 = topk_accuracy(logits, targets.long(), (1, 5))
    return {"metric": "top1", "value": top1, "top1": top1, "top5": top5}


def measure_cost(model: nn.Module, img_size: int, throughput_batch: int, device: torch.device, amp: bool) -> dict[str, Any]:
    """Parameters (millions), GFLOPs per image, and throughput (images/s;
    None when ``throughput_batch`` is 0)."""
    from ..models import count_flops

    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": count_flops(model, img_size=img_size),
        "throughput": measure_throughput(model, img_size, throughput_batch, device, amp=amp) if throughput_batch else None,
        "throughput_batch": throughput_batch or None,
    }


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
    throughput_batch defaults to batch_size, 0 skips the throughput measurement.
    """
    if num_pattern_images < 0 or batch_size < 1:
        raise ValueError("num_pattern_images must be >= 0 and batch_size >= 1")
    if throughput_batch is not None and throughput_batch < 0:
        raise ValueError(f"throughput_batch must be >= 0 (0 skips the measurement), got {throughput_batch}")
    inp = load_for_evaluation(checkpoint, dataset, data_root, split, img_size, device)
    model = inp.model
    depth = len(model.blocks)
    feat_blocks = sorted({int(b) for b in blocks}) if blocks is not None else feature_blocks(model)
    for b in feat_blocks:
        if not 0 <= b < depth:
            raise ValueError(f"feature block {b} is beyond the model's depth: blocks are 0..{depth - 1}")
    n_pattern = min(num_pattern_images, len(inp.dataset))
    rec = run_pass(inp, PassRecorder(n_pattern, feat_blocks, bool(out_patterns), bool(out_features)), batch_size, num_workers, amp)

    config = getattr(model, "reduction_config", {}) or {}
    reduced = bool(config.get("method"))
    tp_batch = batch_size if throughput_batch is None else int(throughput_batch)
    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "dataset": dataset,
        "split": inp.split,
        "num_images": len(inp.dataset),
        "multilabel": inp.multilabel,
        **score(torch.cat(rec.logits), torch.cat(rec.targets), inp.multilabel),
        **measure_cost(model, inp.img_size, tp_batch, inp.device, amp),
        "device": str(inp.device),
        "amp": amp,
        "model": inp.spec.get("model"),
        "img_size": inp.img_size,
        "method": config.get("method") or "none",
        "keep_rate": config.get("keep_rate"),
        "reduction_loc": config.get("reduction_loc") if reduced else [],
        "budget": config.get("budget") if reduced else None,
        "clca": config.get("clca"),
        "tuning": inp.spec.get("tuning") or "full",
        "stage_blocks": rec.stage_blocks,
        "tokens_kept": rec.kept_max,
        "tokens_kept_mean": [] if rec.kept_sum is None else (rec.kept_sum / len(inp.dataset)).tolist(),
        "tokens_expected": list(config.get("expected_tokens") or []),
        "num_patches": int(model.patch_embed.num_patches),
    }
    if out_metrics:
        _atomic_bytes(Path(out_metrics), (json.dumps(metrics, indent=2) + "\n").encode())
    image_ids = np.array([str(inp.dataset.image_id(i)) for i in range(n_pattern)], dtype=str)
    if out_patterns:
        _write_patterns(out_patterns, rec, model, metrics["method"], image_ids)
    if out_features:
        _write_features(out_features, rec, model, image_ids)
    _log_to_training_run(inp.spec.get("wandb"), Path(checkpoint).parent, metrics)
    return metrics


def _write_patterns(path: PathLike, rec: PassRecorder, model: nn.Module, method: str, image_ids: np.ndarray) -> None:
    P = int(model.patch_embed.num_patches)
    composed = (
        torch.cat(rec.composed, dim=1).numpy()
        if rec.composed
        else np.zeros((len(rec.stage_blocks), len(image_ids), P), dtype=np.int32)
    )
    kinds = rec.kinds
    kind = kinds[0] if kinds and len(set(kinds)) == 1 else ("none" if not kinds else "+".join(kinds))
    extra = {}
    if rec.kept and len(rec.kept) == len(rec.composed):
        extra["kept"] = np.concatenate(rec.kept, axis=1)
    save_npz(
        path,
        stage_blocks=np.array(rec.stage_blocks, dtype=np.int64),
        composed=composed.astype(np.int32),
        kind=np.array(kind),
        method=np.array(method),
        image_ids=image_ids,
        grid=np.array(tuple(int(v) for v in model.patch_embed.grid_size), dtype=np.int64),
        **extra,
    )


def _write_features(path: PathLike, rec: PassRecorder, model: nn.Module, image_ids: np.ndarray) -> None:
    D = int(model.embed_dim)
    parts = rec.features
    feats = np.stack(
        [torch.cat(parts[b]).numpy() if parts.get(b) else np.zeros((0, D), np.float32) for b in rec.feat_blocks]
    ).astype(np.float32)
    save_npz(path, blocks=np.array(rec.feat_blocks, dtype=np.int64), features=feats, image_ids=image_ids)


#: the evaluation metrics logged to the training run's W&B summary (prefixed "eval/")
WANDB_METRICS = ("value", "top1", "top5", "mAP", "gflops", "throughput", "params_m", "tokens_kept", "tokens_kept_mean")


def _log_to_training_run(settings: Optional[dict], run_dir: Path, metrics: dict[str, Any]) -> None:
    """With the run's W&B project set (the spec's ``wandb`` entry in
    final.pth), resume the training run (same id) and put the evaluation
    metrics in its summary."""
    if not settings or not settings.get("project"):
        return
    run = tracking.start_wandb({k: v for k, v in settings.items() if k != "job_type"}, dir=run_dir)
    if run is None:
        return
    run.summary.update({f"eval/{k}": metrics[k] for k in WANDB_METRICS if metrics.get(k) is not None})
    run.summary.update({"eval/split": metrics["split"], "eval/metric": metrics["metric"]})
    run.finish()
