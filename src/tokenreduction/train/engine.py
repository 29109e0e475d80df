"""Fine-tuning loop: timm's optimiser, scheduler, mixup, losses and EMA around
a reduced ViT, with exact resume.

Outputs in ``out_dir`` (rank 0 writes; every file is written atomically):

``log.csv``
    one row per epoch: epoch, step, lr, train_loss, val_metric, val_top5,
    val_ema_metric, time (val_metric is top-1 % or mAP x 100; val_top5 is empty
    for multi-label data, val_ema_metric without EMA).
``checkpoint_last.pth``
    model, optimizer, scheduler, grad scaler, EMA, epoch, batch within the
    epoch, optimizer step, RNG states, running loss, log rows, config. Written
    after every epoch, every ``checkpoint_every_steps`` optimizer steps, and
    when SIGTERM/SIGUSR1 arrives (then the run exits with 128 + signal number,
    so a Slurm requeue or a Snakemake retry resumes it).
``final.pth``
    the weights to evaluate (EMA weights when ``model_ema``) and the ``spec``
    that rebuilds the network (:func:`~tokenreduction.train.checkpoint.load_trained_model`).
``train_metrics.json``
    final and best validation metrics, epochs, steps, time.

Resume is exact on one process: the data order and every augmentation depend
only on (seed, epoch, sample index) -- a seeded sampler per epoch and a per-sample
RNG for the transforms -- and the global RNGs (dropout, drop path, mixup) are
restored from the checkpoint, so a run stopped after any optimizer step and
resumed reaches bit-identical weights on CPU. Under torchrun only rank 0
writes the checkpoint, so on resume rank 0 restores its RNG states and the
other ranks reseed from (seed, rank, step): a resumed multi-GPU run is
equivalent to, not bit-identical with, an uninterrupted one.

Batch and learning rate: the global batch is batch_size x grad_accum_steps x
world size, and lr is multiplied by global batch / lr_batch_normalizer (MAE's
``blr`` is lr with lr_batch_normalizer 256; ``layer_decay`` gives MAE's
layer-wise lr decay, :func:`layer_decay_groups`). With
``keep_effective_batch`` the recipe's batch_size x grad_accum_steps is kept as
the global batch under torchrun: grad_accum_steps is divided by the world size
(which must divide it).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..evaluate.metrics import mean_average_precision, topk_accuracy
from .checkpoint import atomic_save
from .config import RUNTIME_KEYS, TrainConfig

LOG_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_metric", "val_top5", "val_ema_metric", "time")


class TrainingInterrupted(SystemExit):
    """Raised after checkpoint_last.pth was saved on a signal (or the test
    hook ``stop_after_steps``); exits with a non-zero code."""


# ----------------------------------------------------------------- data order
def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler[int]):
    """Indices of one rank for one epoch, a function of (seed, epoch) only.

    Shuffled by a generator seeded per epoch; padded to a multiple of the
    world size and strided by rank like DistributedSampler; ``start`` skips
    the first indices (mid-epoch resume)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def rank_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.world_size > 1:
            total = math.ceil(self.num_samples / self.world_size) * self.world_size
            order = (order + order[: total - len(order)])[self.rank :: self.world_size]
        return order

    def __iter__(self):
        return iter(self.rank_indices()[self.start :])

    def __len__(self) -> int:
        return len(self.rank_indices()) - self.start


class SeededSamples(Dataset):
    """Wraps a dataset so each item's random transforms draw from RNGs seeded
    by (seed, epoch, index), leaving the caller's RNG states untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        s = _mix_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s % (2**32))
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _worker_init(_worker_id: int) -> None:
    # the main process handles SIGTERM/SIGUSR1 and saves; workers must not die first
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


# ----------------------------------------------------------------- runtime
class _Runtime:
    def __init__(self, cfg: TrainConfig) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        if cfg.device == "auto":
            use_cuda = torch.cuda.is_available()
        else:
            use_cuda = cfg.device.startswith("cuda")
            if use_cuda and not torch.cuda.is_available():
                raise ValueError(f"device {cfg.device!r} asked for but CUDA is not available")
        if use_cuda:
            index = self.local_rank if self.distributed else (torch.device(cfg.device).index or 0 if cfg.device != "auto" else 0)
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        self.is_main = self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------- building blocks
def model_spec(cfg: TrainConfig, num_classes: int, multilabel: bool) -> dict[str, Any]:
    """What build_model_from_spec needs to rebuild the trained network."""
    model_kwargs = dict(cfg.model_kwargs)
    model_kwargs.setdefault("img_size", cfg.img_size)
    return {
        "model": cfg.model,
        "model_kwargs": model_kwargs,
        "num_classes": int(num_classes),
        "method": cfg.method,
        "keep_rate": cfg.keep_rate,
        "reduction_loc": None if cfg.reduction_loc is None else [int(v) for v in cfg.reduction_loc],
        "budget": cfg.budget,
        "r": cfg.r,
        "r_schedule": cfg.r_schedule,
        "prop_attn": cfg.prop_attn,
        "method_kwargs": dict(cfg.method_kwargs),
        "img_size": cfg.img_size,
        "dataset": cfg.dataset,
        "multilabel": bool(multilabel),
        "clca": dict(cfg.clca) if cfg.clca else None,
        "tuning": cfg.tuning,
        "tuning_kwargs": dict(cfg.tuning_kwargs),
        "eval_split": cfg.data_splits()[1],
    }


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float) -> list[dict[str, Any]]:
    """Four groups at most: backbone / reduction modules x decay / no decay.

    No weight decay on 1-d parameters (norms, biases) and the model's
    ``no_weight_decay()`` names (pos_embed, cls_token). The backbone's lr is
    scaled by ``backbone_lr_scale`` through timm's ``lr_scale`` key; the
    reduction modules (``model.reduction_parameters()``) train at the base lr.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    reduction = {n for n, _ in model.reduction_parameters()} if hasattr(model, "reduction_parameters") else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        groups.setdefault((name in reduction, decay), []).append(p)
    out = []
    for (is_reduction, decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": 1.0 if is_reduction else float(backbone_lr_scale),
                "group_name": f"{'reduction' if is_reduction else 'backbone'}_{'decay' if decay else 'no_decay'}",
            }
        )
    return out


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """MAE's layer-wise lr decay through timm's ``param_groups_layer_decay``:
    with L blocks, block i gets ``lr_scale = layer_decay ** (L - i)``, the stem
    (patch embedding, cls token, position embedding) ``layer_decay ** (L + 1)``,
    the final norm / fc_norm and head 1; no weight decay on 1-d parameters
    and ``no_weight_decay()`` names. A reduction module inside block i decays
    with that block."""
    from timm.optim import param_groups_layer_decay

    skip = list(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else []
    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)


def _build_criterion(cfg: TrainConfig, multilabel: bool, mixup_active: bool) -> nn.Module:
    from timm.loss import AsymmetricLossMultiLabel, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if multilabel:
        if cfg.multilabel_loss == "asl":
            return AsymmetricLossMultiLabel(gamma_neg=4, gamma_pos=0, clip=0.05)
        return nn.BCEWithLogitsLoss()
    if mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


class _FloatLoss(nn.Module):
    """Computes the wrapped loss on float32 logits (AMP-safe)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs.float(), targets)


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, device: torch.device, multilabel: bool, amp: bool, rt: Optional[_Runtime] = None) -> dict[str, float]:
    """Top-1/top-5 (single label) or mAP (multi-label) of `model` on `loader`;
    ``metric`` is the headline number (top-1 or mAP). Under torchrun the
    ranks' predictions are gathered first."""
    was_training = model.training
    model.eval()
    outs, tgts = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(images)
        outs.append(logits.float().cpu())
        tgts.append(targets.cpu() if torch.is_tensor(targets) else torch.as_tensor(targets))
    model.train(was_training)
    logits = torch.cat(outs) if outs else torch.empty(0)
    targets = torch.cat(tgts) if tgts else torch.empty(0)
    if rt is not None and rt.distributed:
        gathered: list = [None] * rt.world_size
        dist.all_gather_object(gathered, (logits, targets))
        logits = torch.cat([g[0] for g in gathered])
        targets = torch.cat([g[1] for g in gathered])
    if multilabel:
        value = mean_average_precision(logits.sigmoid(), targets)
        return {"metric": value, "mAP": value}
    top1, top5 = topk_accuracy(logits, targets.long(), (1, 5))
    return {"metric": top1, "top1": top1, "top5": top5}


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in LOG_COLUMNS})
    _atomic_text(path, buf.getvalue())


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = (set(saved) | set(current)) - RUNTIME_KEYS
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return sorted(k for k in keys if norm(saved.get(k)) != norm(current.get(k)))


class _SignalFlag:
    """Records SIGTERM/SIGUSR1 instead of dying; restores the old handlers."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_SignalFlag":
        for sig in _SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------- training
def train(
    cfg: Union[TrainConfig, dict[str, Any]],
    out_dir: Union[str, Path],
    *,
    stop_after_steps: Optional[int] = None,
    on_step: Optional[Callable[[int], None]] = None,
    on_config_change: str = "error",
) -> dict[str, Any]:
    """Fine-tune as `cfg` says, writing into `out_dir`; resumes from
    ``out_dir/checkpoint_last.pth`` when it exists. Returns the content of
    train_metrics.json.

    stop_after_steps: test hook, behaves like a SIGTERM after that optimizer
    step (checkpoint, then TrainingInterrupted). on_step(step) is called after
    every optimizer step on rank 0. on_config_change: what to do when
    checkpoint_last.pth was written under another config: "error", or
    "restart" (the DAG's choice: a job rerun for changed parameters starts
    afresh; the stale checkpoint is kept as checkpoint_stale.pth).
    """
    from .. import create_model
    from ..data import build_dataset, build_transform

    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict(cfg)
    cfg.validate()
    out_dir = Path(out_dir)
    rt = _Runtime(cfg)
    device = rt.device
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint_last.pth"

    # ---- data
    aug = {"auto_augment": cfg.auto_augment or None, "re_prob": cfg.reprob}
    train_split, val_split = cfg.data_splits()
    train_ds = build_dataset(cfg.dataset, cfg.data_root, train_split, build_transform(True, cfg.img_size, cfg.dataset, **aug))
    val_ds = build_dataset(cfg.dataset, cfg.data_root, val_split, build_transform(False, cfg.img_size, cfg.dataset))
    if len(val_ds) == 0 or len(train_ds) == 0:
        raise ValueError(f"dataset {cfg.dataset!r} at {cfg.data_root}: the train or val split is empty")
    multilabel = bool(train_ds.multilabel)
    num_classes = int(cfg.num_classes or train_ds.num_classes)
    if num_classes < int(train_ds.num_classes):
        raise ValueError(f"num_classes={num_classes} but the dataset has {train_ds.num_classes} classes")

    accum = cfg.grad_accum_steps
    if cfg.keep_effective_batch and rt.world_size > 1:
        if accum % rt.world_size:
            raise ValueError(
                f"keep_effective_batch: grad_accum_steps={accum} is not divisible by the world size {rt.world_size}"
            )
        accum //= rt.world_size
    global_batch = cfg.batch_size * accum * rt.world_size
    lr = cfg.lr * global_batch / cfg.lr_batch_normalizer if cfg.lr_batch_normalizer else cfg.lr

    seeded_train = SeededSamples(train_ds, cfg.seed)
    sampler = EpochSampler(len(train_ds), cfg.seed, shuffle=True, rank=rt.rank, world_size=rt.world_size)
    micro_per_epoch = len(sampler.rank_indices()) // cfg.batch_size
    if micro_per_epoch == 0:
        raise ValueError(
            f"batch_size={cfg.batch_size} exceeds the {len(sampler.rank_indices())} training images per process"
        )
    updates_per_epoch = math.ceil(micro_per_epoch / accum)
    loader_gen = torch.Generator()
    train_loader = DataLoader(
        seeded_train,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=loader_gen,
        worker_init_fn=_worker_init if cfg.num_workers else None,
    )
    val_indices = list(range(rt.rank, len(val_ds), rt.world_size))
    val_loader = DataLoader(
        torch.utils.data.Subset(val_ds, val_indices) if rt.distributed else val_ds,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=_worker_init if cfg.num_workers else None,
    )

    # ---- model
    _seed_all(cfg.seed)
    spec = model_spec(cfg, num_classes, multilabel)
    model = create_model(
        cfg.model,
        method=cfg.method,
        keep_rate=cfg.keep_rate,
        reduction_loc=cfg.reduction_loc,
        budget=cfg.budget,
        r=cfg.r,
        r_schedule=cfg.r_schedule,
        prop_attn=cfg.prop_attn,
        method_kwargs=cfg.method_kwargs or None,
        pretrained=cfg.pretrained,
        checkpoint_path=cfg.init_checkpoint,
        num_classes=num_classes,
        drop_path_rate=cfg.drop_path,
        clca=cfg.clca or None,
        **spec["model_kwargs"],
    ).to(device)
    if cfg.tuning != "full":
        from ..clca import apply_tuning

        model = apply_tuning(model, cfg.tuning, **cfg.tuning_kwargs).to(device)
    _seed_all(cfg.seed + rt.rank)

    teacher = None
    if cfg.method == "dynamicvit" and cfg.teacher_checkpoint:
        teacher = create_model(
            cfg.model, method=None, checkpoint_path=cfg.teacher_checkpoint, num_classes=num_classes, **spec["model_kwargs"]
        ).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    optimizer = create_optimizer_v2(
        layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay)
        if cfg.layer_decay is not None
        else param_groups(model, cfg.weight_decay, cfg.backbone_lr_scale),
        opt=cfg.opt,
        lr=lr,
        weight_decay=cfg.weight_decay,
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=not cfg.sched_in_steps,
        updates_per_epoch=updates_per_epoch,
    )
    use_scaler = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup_fn = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
            multi_label=multilabel,
        )
        if cfg.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")
    criterion: nn.Module = _FloatLoss(_build_criterion(cfg, multilabel, mixup_fn is not None))
    if cfg.method == "dynamicvit":
        from ..reduction.dynamicvit import DynamicViTLoss

        criterion = DynamicViTLoss(base_criterion=criterion, **cfg.method_loss_kwargs)
        uses_model_loss = True
    else:
        if cfg.method_loss_kwargs:
            raise ValueError(f"method_loss_kwargs given but method {cfg.method!r} has no training loss of its own")
        uses_model_loss = False

    model_without_ddp = model
    if rt.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )

    # ---- state (fresh or resumed)
    epoch, batch_in_epoch, step = 0, 0, 0
    loss_sum, loss_count = 0.0, 0
    log_rows: list[dict[str, Any]] = []
    best = {"metric": None, "epoch": None}
    last_val: dict[str, Any] = {}
    elapsed_before = 0.0
    finished = False
    state = None
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = _config_diff(state["config"], cfg.to_dict())
        if diff and on_config_change == "restart":
            if rt.is_main:
                ckpt_path.replace(out_dir / "checkpoint_stale.pth")
                print(f"{ckpt_path} was written under another config ({', '.join(diff)}): starting afresh", flush=True)
            state = None
        elif diff:
            raise ValueError(
                f"{ckpt_path} was written by a run with another config (differs in {', '.join(diff)}); "
                "delete it to start afresh"
            )
    if state is not None:
        model_without_ddp.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        epoch, batch_in_epoch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        loss_sum, loss_count = state["loss_sum"], state["loss_count"]
        log_rows, best, last_val = state["log_rows"], state["best"], state["last_val"]
        elapsed_before, finished = state["elapsed"], state["finished"]
        if rt.is_main:
            _set_rng_state(state["rng"])
        else:
            _seed_all(_mix_seed(cfg.seed, rt.rank, step))
        if rt.is_main:
            _write_log(out_dir / "log.csv", log_rows)
            print(f"resumed from {ckpt_path}: epoch {epoch}, batch {batch_in_epoch}, step {step}", flush=True)

    def save_checkpoint() -> None:
        if not rt.is_main:
            return
        atomic_save(
            {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "step": step,
                "loss_sum": loss_sum,
                "loss_count": loss_count,
                "log_rows": log_rows,
                "best": best,
                "last_val": last_val,
                "elapsed": elapsed_before + (time.time() - t_start),
                "finished": finished,
                "rng": _rng_state(),
                "data_seed": cfg.seed,
                "world_size": rt.world_size,
                "config": cfg.to_dict(),
            },
            ckpt_path,
        )

    wandb_run = None
    if rt.is_main and cfg.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is not None:
            import wandb

            wandb_run = wandb.init(
                project=cfg.wandb_project,
                config=cfg.to_dict(),
                dir=str(out_dir),
                mode=os.environ.get("WANDB_MODE", "offline"),
                name=out_dir.name,
                resume="allow",
            )

    def lr_now() -> float:
        g = optimizer.param_groups[0]
        return g["lr"] / g.get("lr_scale", 1.0) if g.get("lr_scale", 1.0) else g["lr"]

    max_steps = cfg.max_steps
    show_bar = rt.is_main and sys.stderr.isatty()
    t_start = time.time()
    model.train()
    if cfg.sched_in_steps:
        scheduler.step_update(step)

    with _SignalFlag() as sig:

        def stop_requested() -> bool:
            hook = stop_after_steps is not None and step >= stop_after_steps
            return rt.any_flag(sig.signum is not None or hook)

        def interrupt() -> None:
            save_checkpoint()
            rt.barrier()
            code = 128 + (sig.signum or signal.SIGTERM)
            if rt.is_main:
                print(f"interrupted at step {step}: saved {ckpt_path}, exiting with {code}", flush=True)
            raise TrainingInterrupted(code)

        while not finished and epoch < cfg.epochs and not (max_steps is not None and step >= max_steps):
            if not cfg.sched_in_steps:
                scheduler.step(epoch)
            sampler.set_epoch(epoch, start=batch_in_epoch * cfg.batch_size)
            seeded_train.epoch = epoch
            loader_gen.manual_seed(_mix_seed(cfg.seed, epoch, rt.rank))
            epoch_start = time.time()
            reached_max = False
            bar = None
            if show_bar:
                from tqdm import tqdm

                bar = tqdm(total=micro_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch}", leave=False)
            for i, (images, targets) in enumerate(train_loader, start=batch_in_epoch):
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                if mixup_fn is not None:
                    images, targets = mixup_fn(images, targets)
                need_update = (i + 1) % accum == 0 or i + 1 == micro_per_epoch
                sync = contextlib.nullcontext() if (need_update or not rt.distributed) else model.no_sync()
                with sync:
                    with _autocast(device, cfg.amp):
                        outputs = model(images)
                        if uses_model_loss:
                            loss = criterion(model_without_ddp, images, outputs, targets, teacher)
                        else:
                            loss = criterion(outputs, targets)
                        if hasattr(model_without_ddp, "regularization_loss"):  # Head2Toe's group lasso
                            loss = loss + model_without_ddp.regularization_loss()
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping")
                    scaler.scale(loss / accum).backward()
                loss_sum += float(loss.detach())
                loss_count += 1
                if bar is not None:
                    bar.update(1)
                if not need_update:
                    continue
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_in_epoch = i + 1
                if ema is not None:
                    ema.update(model_without_ddp, step=step)
                if cfg.sched_in_steps:
                    scheduler.step_update(step)
                if rt.is_main:
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}", lr=f"{lr_now():.2e}")
                    elif step % cfg.log_every == 0:
                        print(f"epoch {epoch} step {step} loss {loss_sum / loss_count:.4f} lr {lr_now():.3e}", flush=True)
                    if on_step is not None:
                        on_step(step)
                if stop_requested():
                    if bar is not None:
                        bar.close()
                    interrupt()
                if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and batch_in_epoch < micro_per_epoch:
                    save_checkpoint()
                if max_steps is not None and step >= max_steps:
                    reached_max = True
                    break
            if bar is not None:
                bar.close()

            # ---- end of epoch (or of the step budget)
            val = validate(model_without_ddp, val_loader, device, multilabel, cfg.amp, rt)
            val_ema = validate(ema.module, val_loader, device, multilabel, cfg.amp, rt) if ema is not None else None
            final_val = val_ema if val_ema is not None else val
            row = {
                "epoch": epoch,
                "step": step,
                "lr": lr_now(),
                "train_loss": loss_sum / max(loss_count, 1),
                "val_metric": val["metric"],
                "val_top5": val.get("top5"),
                "val_ema_metric": None if val_ema is None else val_ema["metric"],
                "time": time.time() - epoch_start,
            }
            log_rows.append(row)
            last_val = {"model": val, "ema": val_ema, "final": final_val, "epoch": epoch}
            if best["metric"] is None or final_val["metric"] > best["metric"]:
                best = {"metric": final_val["metric"], "epoch": epoch, **{f"val_{k}": v for k, v in final_val.items()}}
            if rt.is_main:
                _write_log(out_dir / "log.csv", log_rows)
                if wandb_run is not None:
                    wandb_run.log({k: v for k, v in row.items() if v is not None}, step=step)
                print(
                    f"epoch {epoch} done: step {step}, train_loss {row['train_loss']:.4f}, "
                    f"val {val['metric']:.2f}" + ("" if val_ema is None else f", ema {val_ema['metric']:.2f}"),
                    flush=True,
                )
            if hasattr(model_without_ddp, "end_epoch"):  # Head2Toe's feature selection
                model_without_ddp.end_epoch(epoch, cfg.epochs)
            epoch += 1
            batch_in_epoch = 0
            loss_sum, loss_count = 0.0, 0
            if reached_max or epoch >= cfg.epochs:
                finished = True
            save_checkpoint()
            if not finished and stop_requested():
                interrupt()

    # ---- final outputs
    total_time = elapsed_before + (time.time() - t_start)
    weights = ema.module if ema is not None else model_without_ddp
    metric_name = "mAP" if multilabel else "top1"
    result = {
        "metric": metric_name,
        "final": last_val.get("final"),
        "final_model": last_val.get("model"),
        "final_ema": last_val.get("ema"),
        "best_val_metric": best["metric"],
        "best_epoch": best["epoch"],
        "epochs_completed": epoch,
        "steps": step,
        "time_s": total_time,
        "lr": lr,
        "global_batch": global_batch,
        "grad_accum_steps": accum,
        "world_size": rt.world_size,
        "num_classes": num_classes,
        "multilabel": multilabel,
        "weights": "ema" if ema is not None else "model",
        "spec": spec,
    }
    if rt.is_main:
        atomic_save(
            {"model": weights.state_dict(), "spec": spec, "config": cfg.to_dict(), "metrics": result},
            out_dir / "final.pth",
        )
        _atomic_text(out_dir / "train_metrics.json", json.dumps(result, indent=2, default=float) + "\n")
        if wandb_run is not None:
            wandb_run.summary.update({"best_val_metric": best["metric"], "final_val_metric": (last_val.get("final") or {}).get("metric")})
            wandb_run.finish()
    rt.barrier()
    return result
