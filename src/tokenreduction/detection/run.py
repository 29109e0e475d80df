"""Train, evaluate and benchmark the ViT-Adapter Mask R-CNN with mmengine.

Thin functions over mmengine's Runner used by ``scripts/detection.py``: a
config file from ``config/detection`` plus run options (reduction, data
root, gradient accumulation, launcher) -> a Config; training resumes from the
last checkpoint in its work dir (a requeued job continues); evaluation is
mmdet's CocoMetric (pycocotools) for bbox and segm; the benchmark times the
detector's inference on real validation images. Every checkpoint is read
weights-only (:mod:`.checkpoint`), and a checkpoint given as ``load_from`` or
to the benchmark must fit the backbone exactly.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from mmengine.config import Config

from .checkpoint import backbone_state, check_backbone_state, install_safe_loader, load_detection_checkpoint

CUSTOM_IMPORTS = ["tokenreduction.detection.vit_adapter", "tokenreduction.detection.optim"]
LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
EVALUATORS = {"val_dataloader": "val_evaluator", "test_dataloader": "test_evaluator"}


def build_config(
    config_file: str,
    work_dir: str,
    *,
    linkage: Optional[str] = None,
    keep_rate: Optional[float] = None,
    data_root: Optional[str] = None,
    load_from: Optional[str] = None,
    cumulative_iters: int = 1,
    batch_size: Optional[int] = None,
    seed: int = 0,
    launcher: str = "none",
    options: Optional[dict] = None,
) -> Config:
    """Load `config_file` and apply the run options.

    linkage: the backbone's ``linkage`` ("tome", "single", "average", "complete").
    keep_rate: the fraction of the current tokens kept at each reduction
    location, in (0, 1]; 1 keeps every token: the unreduced backbone (its
    ``reduction_ratio`` 0, no merging module attached).
    data_root: a COCO-layout root; the datasets' ``data_root`` and the
    evaluators' ``ann_file`` (joined with the dataset's) are set from it.
    cumulative_iters: gradient accumulation (``optim_wrapper.accumulative_counts``).
    options: extra ``key.sub=value`` overrides (as ``--cfg-options``)."""
    cfg = Config.fromfile(config_file)
    if linkage is not None:
        cfg.model.backbone.linkage = linkage
    if keep_rate is not None:
        if not 0.0 < float(keep_rate) <= 1.0:
            raise ValueError(f"keep_rate (fraction of the current tokens kept) must be in (0, 1], got {keep_rate}")
        cfg.model.backbone.reduction_ratio = 0.0 if float(keep_rate) == 1.0 else float(keep_rate)
    if data_root is not None:
        root = str(data_root).rstrip("/") + "/"
        for loader in LOADERS:
            if loader in cfg and cfg[loader] is not None:
                cfg[loader].dataset.data_root = root
        for loader, evaluator in EVALUATORS.items():
            if evaluator in cfg and cfg[evaluator] is not None:
                cfg[evaluator].ann_file = os.path.join(root, cfg[loader].dataset.ann_file)
    if batch_size is not None:
        cfg.train_dataloader.batch_size = int(batch_size)
    if int(cumulative_iters) < 1:
        raise ValueError(f"cumulative_iters must be >= 1, got {cumulative_iters}")
    cfg.optim_wrapper.accumulative_counts = int(cumulative_iters)
    if load_from is not None:
        cfg.load_from = load_from
    if options:
        cfg.merge_from_dict(options)
    cfg.work_dir = str(work_dir)
    cfg.launcher = launcher
    cfg.randomness = dict(seed=int(seed), deterministic=False)
    return cfg


def _runner(cfg: Config):
    from mmdet.utils import register_all_modules
    from mmengine.runner import Runner

    register_all_modules(init_default_scope=True)
    install_safe_loader()  # every checkpoint mmengine reads: weights-only, allow-listed types
    for name in CUSTOM_IMPORTS:
        __import__(name)
    runner = Runner.from_cfg(cfg)
    if cfg.get("load_from") and not cfg.get("resume"):
        # mmengine loads non-strictly (a mismatch only warns): check the backbone first
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        check_backbone_state(model.backbone, backbone_state(load_detection_checkpoint(cfg.load_from)), cfg.load_from)
    return runner


def train(cfg: Config, final: str) -> None:
    """Train (resuming from the work dir's last checkpoint, if any) and copy
    the last checkpoint to `final` atomically (rank 0)."""
    work_dir = Path(cfg.work_dir)
    cfg.resume = (work_dir / "last_checkpoint").exists()
    runner = _runner(cfg)
    runner.train()
    if runner.rank == 0:
        last = (work_dir / "last_checkpoint").read_text().strip()
        tmp = Path(str(final) + ".tmp")
        shutil.copyfile(last, tmp)
        os.replace(tmp, final)


def _plain(metrics: dict) -> dict:
    return {k: (float(v) if isinstance(v, (int, float)) or torch.is_tensor(v) else v) for k, v in metrics.items()}


def evaluate(cfg: Config, checkpoint: str) -> dict:
    """COCO bbox/segm metrics of `checkpoint` on the test split (mmdet's
    CocoMetric keys, e.g. ``coco/bbox_mAP``, ``coco/segm_mAP``), plus the
    backbone's ``tokens_kept`` per merging stage on the last batch."""
    cfg.load_from = checkpoint
    cfg.resume = False
    runner = _runner(cfg)
    metrics = _plain(runner.test())
    # CocoMetric returns nothing for a metric when no image has a detection:
    # no detections is an AP of 0
    metrics["empty_predictions"] = [m for m in ("bbox", "segm") if f"coco/{m}_mAP" not in metrics]
    for m in metrics["empty_predictions"]:
        metrics[f"coco/{m}_mAP"] = 0.0
    backbone = runner.model.module.backbone if hasattr(runner.model, "module") else runner.model.backbone
    metrics["tokens_kept"] = list(getattr(backbone, "tokens_kept", []))
    return metrics


@torch.no_grad()
def benchmark(cfg: Config, checkpoint: Optional[str], batch_size: int = 1, runs: int = 20, warmup: int = 5) -> dict:
    """Inference throughput (images/s) of the whole detector and of its
    backbone alone, on the first `batch_size` test images (batch repeated);
    `warmup` untimed runs, then `runs` timed ones."""
    from mmdet.registry import DATASETS, MODELS
    from mmdet.utils import register_all_modules
    from mmengine.dataset import pseudo_collate
    from mmengine.runner.checkpoint import load_checkpoint

    register_all_modules(init_default_scope=True)
    install_safe_loader()
    for name in CUSTOM_IMPORTS:
        __import__(name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = MODELS.build(cfg.model)
    if checkpoint:
        check_backbone_state(model.backbone, backbone_state(load_detection_checkpoint(checkpoint)), checkpoint)
        load_checkpoint(model, checkpoint, map_location="cpu")
    model = model.to(device).eval()
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    samples = [dataset[i % len(dataset)] for i in range(batch_size)]
    batch = model.data_preprocessor(pseudo_collate(samples), False)

    def timed(fn) -> float:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(runs):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return runs * batch_size / (time.perf_counter() - start)

    detector = timed(lambda: model(batch["inputs"], batch["data_samples"], mode="predict"))
    backbone = timed(lambda: model.backbone(batch["inputs"]))
    return {
        "images_per_s": detector,
        "backbone_images_per_s": backbone,
        "batch_size": batch_size,
        "image_shape": list(batch["inputs"].shape[-2:]),
        "tokens_kept": list(getattr(model.backbone, "tokens_kept", [])),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


SUMMARY_COLUMNS = ("size", "method", "keep_rate", "bbox_mAP", "segm_mAP", "images_per_s", "backbone_images_per_s", "tokens_kept")


def summary_rows(runs: Sequence[dict]) -> list[dict]:
    """One row per run from {size, method, keep_rate, metrics path, benchmark
    path}: box and mask AP (x100) and throughput (keep_rate 1: unreduced)."""
    rows = []
    for run in runs:
        metrics = json.loads(Path(run["metrics"]).read_text())
        bench = json.loads(Path(run["benchmark"]).read_text())
        rows.append(
            {
                "size": run["size"],
                "method": run["method"],
                "keep_rate": float(run["keep_rate"]),
                "bbox_mAP": 100.0 * float(metrics.get("coco/bbox_mAP", float("nan"))),
                "segm_mAP": 100.0 * float(metrics.get("coco/segm_mAP", float("nan"))),
                "images_per_s": bench["images_per_s"],
                "backbone_images_per_s": bench["backbone_images_per_s"],
                "tokens_kept": " ".join(str(t) for t in metrics.get("tokens_kept", [])),
            }
        )
    return rows
