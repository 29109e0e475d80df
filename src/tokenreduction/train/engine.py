"""Fine-tuning loop: timm's optimiser, scheduler, mixup, losses and EMA around
a reduced ViT, with exact resume.

The recipe reads in the order the papers describe it; each phase is a
function that fits on a screen and shares one :class:`Run`:

    build_data -> build_model_and_optimiser -> restore_state ->
    (train_one_epoch -> validate_and_select (or log_unvalidated_epoch, see
    ``val_every_epochs``) -> save_checkpoint) per epoch -> finish

A method's own training terms (DynamicViT's distillation and ratio losses,
its teacher) come from its reducer class
(:meth:`~tokenreduction.reduction.base.TokenReducer.training_loss`,
``uses_teacher``; see :mod:`.recipe`), the tuning mode (full, head, h2t,
vqt, ...) from a registry (:func:`tokenreduction.clca.baselines.get_tuning`):
the trainer never branches on a method's name.

Outputs in ``out_dir`` (rank 0 writes; every file is written atomically):

``log.csv``
    one row per epoch: epoch, step, lr, train_loss, the plain model's
    validation (val_metric, val_top5) and the EMA model's (val_ema_metric,
    val_ema_top5), the best so far (best_metric, best_epoch, best_weights:
    model or ema), time. val_metric is top-1 % or mAP x 100; the top-5
    columns are empty for multi-label data, the EMA columns without EMA.
``checkpoint_last.pth``
    model, optimizer, scheduler, grad scaler, EMA, epoch, batch within the
    epoch, optimizer step, RNG states, running loss, log rows, best so far,
    config. Written after every epoch, every ``checkpoint_every_steps``
    optimizer steps, and when SIGTERM/SIGUSR1 arrives (then the run exits
    with 128 + signal number, so a Slurm requeue or a Snakemake retry resumes
    it). A process killed outright (SIGKILL) resumes from the last complete
    one: files are written to a temporary name, fsynced, then renamed.
``checkpoint_best_eNNN.pth``
    with ``select_weights: best``: the weights (plain or EMA) that were best on
    validation so far, and which they are.
``final.pth``
    the selected weights (:mod:`.selection`: best of plain/EMA on validation,
    the study's rule; or last plain; or last EMA), which they are, and the
    ``spec`` that rebuilds the network
    (:func:`~tokenreduction.train.checkpoint.load_trained_model`).
``train_metrics.json``
    the selected weights' validation metrics (``final``), the last plain and
    EMA validations, the best, epochs, steps, time.

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
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .. import tracking
from ..metrics import mean_average_precision, topk_accuracy
from ..safe_load import load_checkpoint_file
from .checkpoint import atomic_save, remove_stale_temporaries
from .config import RUNTIME_KEYS, TrainConfig
from .recipe import (  # noqa: F401  (param_groups, layer_decay_groups: public here since before)
    build_mixup,
    build_optimizer,
    build_scheduler,
    build_task_loss,
    build_teacher,
    layer_decay_groups,
    param_groups,
    stored_spec,
    training_objective,
)
from .runtime import Runtime, SignalFlag, autocast, rng_state, seed_all, set_rng_state
from .sampling import EpochSampler, SeededSamples, mix_seed, worker_init
from .selection import selected, update_best

LOG_COLUMNS = (
    "epoch", "step", "lr", "train_loss", "val_metric", "val_top5", "val_ema_metric", "val_ema_top5",
    "best_metric", "best_epoch", "best_weights", "time",
)
BEST_PREFIX = "checkpoint_best_e"


class TrainingInterrupted(SystemExit):
    """Raised after checkpoint_last.pth was saved on a signal (or the test
    hook ``stop_after_steps``); exits with a non-zero code."""


# ----------------------------------------------------------------- shared state
@dataclass
class TrainData:
    """Loaders and the batch arithmetic of a run."""

    train_loader: DataLoader
    val_loader: DataLoader
    sampler: EpochSampler
    seeded_train: SeededSamples
    loader_gen: torch.Generator
    multilabel: bool
    num_classes: int
    micro_per_epoch: int
    updates_per_epoch: int
    accum: int
    global_batch: int
    lr: float


@dataclass
class TrainParts:
    """The network (``model``, DDP-wrapped under torchrun; ``bare`` unwrapped)
    and what trains it."""

    model: nn.Module
    bare: nn.Module
    teacher: Optional[nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: Any
    mixup_fn: Optional[Callable]
    objective: nn.Module
    spec: dict


@dataclass
class RunState:
    """Where the run stands; exactly what checkpoint_last.pth restores."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    log_rows: list = field(default_factory=list)
    best: dict = field(default_factory=dict)
    last_val: dict = field(default_factory=dict)
    elapsed: float = 0.0
    finished: bool = False


@dataclass
class Run:
    cfg: TrainConfig
    out_dir: Path
    rt: Runtime
    data: TrainData
    parts: TrainParts
    state: RunState = field(default_factory=RunState)
    t_start: float = field(default_factory=time.time)
    images: int = 0
    sig: Optional[SignalFlag] = None
    stop_after_steps: Optional[int] = None
    on_step: Optional[Callable[[int], None]] = None
    progress: Optional[tracking.ProgressLog] = None
    wandb_run: Any = None

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "checkpoint_last.pth"

    def elapsed(self) -> float:
        return self.state.elapsed + (time.time() - self.t_start)

    def lr_now(self) -> float:
        g = self.parts.optimizer.param_groups[0]
        return g["lr"] / g.get("lr_scale", 1.0) if g.get("lr_scale", 1.0) else g["lr"]


# ----------------------------------------------------------------- phases
def build_data(cfg: TrainConfig, rt: Runtime) -> TrainData:
    """Datasets with the reference's augmentation for the dataset kind, the
    seeded sampler and loaders, the batch arithmetic and the scaled lr."""
    from ..data import build_dataset, build_transform
    from ..data.transforms import train_augmentation

    aug = train_augmentation(
        cfg.dataset, auto_augment=cfg.auto_augment or None, reprob=cfg.reprob, re_mode=cfg.re_mode,
        re_count=cfg.re_count, color_jitter=cfg.color_jitter, cutout=cfg.cutout,
    )
    train_split, val_split = cfg.data_splits()
    train_ds = build_dataset(cfg.dataset, cfg.data_root, train_split, build_transform(True, cfg.img_size, cfg.dataset, **aug))
    val_ds = build_dataset(cfg.dataset, cfg.data_root, val_split, build_transform(False, cfg.img_size, cfg.dataset))
    if len(val_ds) == 0 or len(train_ds) == 0:
        raise ValueError(f"dataset {cfg.dataset!r} at {cfg.data_root}: the train or val split is empty")
    num_classes = int(cfg.model_spec.num_classes or train_ds.num_classes)
    if num_classes < int(train_ds.num_classes):
        raise ValueError(f"num_classes={num_classes} but the dataset has {train_ds.num_classes} classes")
    accum = cfg.grad_accum_steps
    if cfg.keep_effective_batch and rt.world_size > 1:
        if accum % rt.world_size:
            raise ValueError(f"keep_effective_batch: grad_accum_steps={accum} is not divisible by the world size {rt.world_size}")
        accum //= rt.world_size
    global_batch = cfg.batch_size * accum * rt.world_size
    seeded_train = SeededSamples(train_ds, cfg.seed)
    sampler = EpochSampler(len(train_ds), cfg.seed, shuffle=True, rank=rt.rank, world_size=rt.world_size)
    micro_per_epoch = len(sampler.rank_indices()) // cfg.batch_size
    if micro_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(sampler.rank_indices())} training images per process")
    loader_gen = torch.Generator()
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=rt.device.type == "cuda",
                  worker_init_fn=worker_init if cfg.num_workers else None)
    train_loader = DataLoader(seeded_train, sampler=sampler, drop_last=True, generator=loader_gen, **common)
    val_part = torch.utils.data.Subset(val_ds, list(range(rt.rank, len(val_ds), rt.world_size))) if rt.distributed else val_ds
    val_loader = DataLoader(val_part, shuffle=False, generator=torch.Generator().manual_seed(0), **common)
    return TrainData(
        train_loader=train_loader, val_loader=val_loader, sampler=sampler, seeded_train=seeded_train,
        loader_gen=loader_gen, multilabel=bool(train_ds.multilabel), num_classes=num_classes,
        micro_per_epoch=micro_per_epoch, updates_per_epoch=math.ceil(micro_per_epoch / accum), accum=accum,
        global_batch=global_batch,
        lr=cfg.lr * global_batch / cfg.lr_batch_normalizer if cfg.lr_batch_normalizer else cfg.lr,
    )


def build_model_and_optimiser(cfg: TrainConfig, rt: Runtime, data: TrainData) -> TrainParts:
    """The reduced network (tuning mode applied), the method's teacher and
    objective, optimiser, scheduler, grad scaler, EMA and mixup."""
    from timm.utils import ModelEmaV3

    device = rt.device
    seed_all(cfg.seed)
    network = cfg.model_spec.for_dataset(data.num_classes, cfg.img_size)
    model = network.build(
        pretrained=cfg.pretrained, checkpoint_path=cfg.init_checkpoint, drop_path_rate=cfg.drop_path
    ).to(device)
    seed_all(cfg.seed + rt.rank)
    teacher = build_teacher(cfg, network, device)
    optimizer = build_optimizer(cfg, model, data.lr)
    scheduler = build_scheduler(cfg, optimizer, data.updates_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    mixup_fn = build_mixup(cfg, data.num_classes, data.multilabel)
    objective = training_objective(cfg, build_task_loss(cfg, data.multilabel, mixup_fn is not None))
    wrapped = model
    if rt.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )
    return TrainParts(model=wrapped, bare=model, teacher=teacher, optimizer=optimizer, scheduler=scheduler,
                      scaler=scaler, ema=ema, mixup_fn=mixup_fn, objective=objective,
                      spec=stored_spec(cfg, data.num_classes, data.multilabel))


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Config keys (runtime keys aside) whose values differ. A key that a
    checkpoint written by an earlier version lacks counts as its default
    (a recipe key added since, e.g. ``val_every_epochs``), so such a run
    resumes unless the current config sets it otherwise."""
    defaults = TrainConfig().to_dict()
    keys = (set(saved) | set(current)) - RUNTIME_KEYS
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return sorted(k for k in keys if norm(saved.get(k, defaults.get(k))) != norm(current.get(k, defaults.get(k))))


def restore_state(run: Run, on_config_change: str = "error") -> None:
    """Load checkpoint_last.pth when it exists (written under the same
    config) into the run: weights, optimiser, RNG states, position."""
    cfg, rt, p, path = run.cfg, run.rt, run.parts, run.ckpt_path
    if rt.is_main:
        remove_stale_temporaries(run.out_dir)  # left by a process killed mid-write
    if not path.is_file():
        return
    saved = load_checkpoint_file(path, map_location="cpu")
    diff = config_diff(saved["config"], cfg.to_dict())
    if diff and on_config_change == "restart":
        if rt.is_main:
            path.replace(run.out_dir / "checkpoint_stale.pth")
            print(f"{path} was written under another config ({', '.join(diff)}): starting afresh", flush=True)
        return
    if diff:
        raise ValueError(f"{path} was written by a run with another config (differs in {', '.join(diff)}); delete it to start afresh")
    p.bare.load_state_dict(saved["model"])
    p.optimizer.load_state_dict(saved["optimizer"])
    p.scheduler.load_state_dict(saved["scheduler"])
    p.scaler.load_state_dict(saved["scaler"])
    if p.ema is not None:
        p.ema.load_state_dict(saved["ema"])
    run.state = RunState(**{f.name: saved[f.name] for f in fields(RunState)})
    if rt.is_main:
        set_rng_state(saved["rng"])
        write_log(run.out_dir / "log.csv", run.state.log_rows)
        st = run.state
        print(f"resumed from {path}: epoch {st.epoch}, batch {st.batch_in_epoch}, step {st.step}", flush=True)
    else:
        seed_all(mix_seed(cfg.seed, rt.rank, run.state.step))


def save_checkpoint(run: Run) -> None:
    """checkpoint_last.pth (rank 0), then drop best-weight files it no longer names."""
    if not run.rt.is_main:
        return
    p, st = run.parts, run.state
    atomic_save(
        {
            "model": p.bare.state_dict(),
            "optimizer": p.optimizer.state_dict(),
            "scheduler": p.scheduler.state_dict(),
            "scaler": p.scaler.state_dict(),
            "ema": p.ema.state_dict() if p.ema is not None else None,
            **asdict(st),
            "elapsed": run.elapsed(),
            "rng": rng_state(),
            "data_seed": run.cfg.seed,
            "world_size": run.rt.world_size,
            "config": run.cfg.to_dict(),
        },
        run.ckpt_path,
    )
    keep = st.best.get("file")
    for f in run.out_dir.glob(f"{BEST_PREFIX}*.pth"):
        if f.name != keep:
            f.unlink()


def _stop_requested(run: Run) -> bool:
    hook = run.stop_after_steps is not None and run.state.step >= run.stop_after_steps
    return run.rt.any_flag((run.sig is not None and run.sig.signum is not None) or hook)


def _interrupt(run: Run) -> None:
    save_checkpoint(run)
    run.rt.barrier()
    code = 128 + ((run.sig.signum if run.sig else None) or signal.SIGTERM)
    if run.rt.is_main:
        print(f"interrupted at step {run.state.step}: saved {run.ckpt_path}, exiting with {code}", flush=True)
    raise TrainingInterrupted(code)


def _forward_backward(run: Run, images: torch.Tensor, targets: torch.Tensor, need_update: bool) -> torch.Tensor:
    """One micro-batch: forward, the method's objective (plus the model's
    ``regularization_loss()`` when it has one), scaled backward."""
    cfg, p, rt = run.cfg, run.parts, run.rt
    sync = contextlib.nullcontext() if (need_update or not rt.distributed) else p.model.no_sync()
    with sync:
        with autocast(rt.device, cfg.amp):
            outputs = p.model(images)
            loss = p.objective(p.bare, images, outputs, targets, p.teacher)
            if hasattr(p.bare, "regularization_loss"):  # a tuning mode's penalty (Head2Toe's group lasso)
                loss = loss + p.bare.regularization_loss()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {run.state.step}; stopping")
        p.scaler.scale(loss / run.data.accum).backward()
    return loss


def _optimizer_step(run: Run) -> None:
    cfg, p, st = run.cfg, run.parts, run.state
    if cfg.clip_grad:
        p.scaler.unscale_(p.optimizer)
        nn.utils.clip_grad_norm_(p.model.parameters(), cfg.clip_grad)
    p.scaler.step(p.optimizer)
    p.scaler.update()
    p.optimizer.zero_grad(set_to_none=True)
    st.step += 1
    if p.ema is not None:
        p.ema.update(p.bare, step=st.step)
    if cfg.sched_in_steps:
        p.scheduler.step_update(st.step)


def train_one_epoch(run: Run) -> bool:
    """Train from the saved position to the end of the epoch (or of the step
    budget); True when ``max_steps`` was reached."""
    cfg, d, st, rt = run.cfg, run.data, run.state, run.rt
    if not cfg.sched_in_steps:
        run.parts.scheduler.step(st.epoch)
    d.sampler.set_epoch(st.epoch, start=st.batch_in_epoch * cfg.batch_size)
    d.seeded_train.epoch = st.epoch
    d.loader_gen.manual_seed(mix_seed(cfg.seed, st.epoch, rt.rank))
    for i, (images, targets) in enumerate(d.train_loader, start=st.batch_in_epoch):
        images = images.to(rt.device, non_blocking=True)
        targets = targets.to(rt.device, non_blocking=True)
        if run.parts.mixup_fn is not None:
            images, targets = run.parts.mixup_fn(images, targets)
        need_update = (i + 1) % d.accum == 0 or i + 1 == d.micro_per_epoch
        loss = _forward_backward(run, images, targets, need_update)
        st.loss_sum += float(loss.detach())
        st.loss_count += 1
        run.images += images.shape[0] * rt.world_size
        if not need_update:
            continue
        _optimizer_step(run)
        st.batch_in_epoch = i + 1
        if rt.is_main:
            extra = f"epoch {st.epoch}, loss {st.loss_sum / st.loss_count:.4f}, lr {run.lr_now():.3e}"
            run.progress.update(st.step, run.images, extra)
            if run.on_step is not None:
                run.on_step(st.step)
        if _stop_requested(run):
            _interrupt(run)
        if cfg.checkpoint_every_steps and st.step % cfg.checkpoint_every_steps == 0 and st.batch_in_epoch < d.micro_per_epoch:
            save_checkpoint(run)
        if cfg.max_steps is not None and st.step >= cfg.max_steps:
            return True
    return False


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, device: torch.device, multilabel: bool, amp: bool, rt: Optional[Runtime] = None) -> dict[str, float]:
    """Top-1/top-5 (single label) or mAP (multi-label) of `model` on `loader`;
    ``metric`` is the headline number (top-1 or mAP). Under torchrun the
    ranks' predictions are gathered first."""
    was_training = model.training
    model.eval()
    outs, tgts = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        with autocast(device, amp):
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


def validate_and_select(run: Run, epoch_start: float) -> None:
    """Validate the plain and the EMA model, keep the best weights so far
    (``select_weights: best``), append the epoch's log row."""
    cfg, d, p, st, rt = run.cfg, run.data, run.parts, run.state, run.rt
    val = validate(p.bare, d.val_loader, rt.device, d.multilabel, cfg.amp, rt)
    val_ema = validate(p.ema.module, d.val_loader, rt.device, d.multilabel, cfg.amp, rt) if p.ema is not None else None
    st.best, improved = update_best(st.best, st.epoch, st.step, val, val_ema)
    if improved is not None and cfg.select_weights == "best":
        name = f"{BEST_PREFIX}{st.epoch:03d}.pth"
        if rt.is_main:
            weights = p.ema.module if improved == "ema" else p.bare
            atomic_save({"model": weights.state_dict(), "weights": improved, "epoch": st.epoch, "step": st.step,
                         "metric": st.best["metric"]}, run.out_dir / name)
        st.best["file"] = name
    row = {
        "epoch": st.epoch, "step": st.step, "lr": run.lr_now(), "train_loss": st.loss_sum / max(st.loss_count, 1),
        "val_metric": val["metric"], "val_top5": val.get("top5"),
        "val_ema_metric": None if val_ema is None else val_ema["metric"],
        "val_ema_top5": None if val_ema is None else val_ema.get("top5"),
        "best_metric": st.best["metric"], "best_epoch": st.best["epoch"], "best_weights": st.best["weights"],
        "time": time.time() - epoch_start,
    }
    st.log_rows.append(row)
    st.last_val = {"model": val, "ema": val_ema, "epoch": st.epoch}
    if rt.is_main:
        write_log(run.out_dir / "log.csv", st.log_rows)
        if run.wandb_run is not None:
            run.wandb_run.log({k: v for k, v in row.items() if v is not None}, step=st.step)
        print(
            f"epoch {st.epoch} done: step {st.step}, train_loss {row['train_loss']:.4f}, val {val['metric']:.2f}"
            + ("" if val_ema is None else f", ema {val_ema['metric']:.2f}")
            + f", best {st.best['metric']:.2f} ({st.best['weights']}, epoch {st.best['epoch']})",
            flush=True,
        )
    if hasattr(p.bare, "end_epoch"):  # a tuning mode's epoch hook (Head2Toe's feature selection)
        p.bare.end_epoch(st.epoch, cfg.total_epochs)


def validation_due(cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch `epoch` (0-based, just trained) ends with a validation:
    every ``val_every_epochs``-th epoch and always the last one."""
    return (epoch + 1) % cfg.val_every_epochs == 0 or epoch + 1 >= cfg.total_epochs


def log_unvalidated_epoch(run: Run, epoch_start: float) -> None:
    """An epoch without validation (``val_every_epochs``): its log row with
    empty validation columns, the best so far unchanged, the tuning mode's
    epoch hook run as after a validated epoch."""
    cfg, p, st, rt = run.cfg, run.parts, run.state, run.rt
    row = {
        "epoch": st.epoch, "step": st.step, "lr": run.lr_now(), "train_loss": st.loss_sum / max(st.loss_count, 1),
        "val_metric": None, "val_top5": None, "val_ema_metric": None, "val_ema_top5": None,
        "best_metric": st.best.get("metric"), "best_epoch": st.best.get("epoch"), "best_weights": st.best.get("weights"),
        "time": time.time() - epoch_start,
    }
    st.log_rows.append(row)
    if rt.is_main:
        write_log(run.out_dir / "log.csv", st.log_rows)
        if run.wandb_run is not None:
            run.wandb_run.log({k: v for k, v in row.items() if v is not None}, step=st.step)
        print(f"epoch {st.epoch} done: step {st.step}, train_loss {row['train_loss']:.4f}, not validated "
              f"(val_every_epochs {cfg.val_every_epochs})", flush=True)
    if hasattr(p.bare, "end_epoch"):  # a tuning mode's epoch hook (Head2Toe's feature selection)
        p.bare.end_epoch(st.epoch, cfg.total_epochs)


def finish(run: Run) -> dict[str, Any]:
    """final.pth with the selected weights and train_metrics.json."""
    cfg, d, p, st, rt = run.cfg, run.data, run.parts, run.state, run.rt
    which, final_val, final_epoch = selected(cfg.select_weights, st.best, st.last_val)
    result = {
        "metric": "mAP" if d.multilabel else "top1",
        "final": final_val,
        "final_model": st.last_val.get("model"),
        "final_ema": st.last_val.get("ema"),
        "best_val_metric": st.best.get("metric"),
        "best_epoch": st.best.get("epoch"),
        "best_weights": st.best.get("weights"),
        "select_weights": cfg.select_weights,
        "weights": which,
        "weights_epoch": final_epoch,
        "epochs_completed": st.epoch,
        "steps": st.step,
        "time_s": run.elapsed(),
        "lr": d.lr,
        "global_batch": d.global_batch,
        "grad_accum_steps": d.accum,
        "world_size": rt.world_size,
        "num_classes": d.num_classes,
        "multilabel": d.multilabel,
        "spec": p.spec,
    }
    if rt.is_main:
        if cfg.select_weights == "best":
            best_file = run.out_dir / st.best["file"]
            if not best_file.is_file():
                raise FileNotFoundError(f"the best weights {best_file} named by {run.ckpt_path} are missing")
            state_dict = load_checkpoint_file(best_file, map_location="cpu")["model"]
        else:
            state_dict = (p.ema.module if which == "ema" else p.bare).state_dict()
        # the W&B run travels with the weights, so the evaluator logs to the same run
        spec = {**p.spec, "wandb": tracking.wandb_settings(run.out_dir, cfg.to_dict())}
        atomic_save({"model": state_dict, "weights": which, "spec": spec, "config": cfg.to_dict(), "metrics": result},
                    run.out_dir / "final.pth")
        _atomic_text(run.out_dir / "train_metrics.json", json.dumps(result, indent=2, default=float) + "\n")
        if run.wandb_run is not None:
            run.wandb_run.summary.update({"best_val_metric": st.best.get("metric"),
                                          "final_val_metric": (final_val or {}).get("metric"), "final_weights": which})
            run.wandb_run.finish()
    rt.barrier()
    return result


# ----------------------------------------------------------------- the recipe
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
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict(cfg)
    cfg.validate()
    rt = Runtime(cfg.device)
    out_dir = Path(out_dir)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    data = build_data(cfg, rt)
    parts = build_model_and_optimiser(cfg, rt, data)
    run = Run(cfg=cfg, out_dir=out_dir, rt=rt, data=data, parts=parts, stop_after_steps=stop_after_steps, on_step=on_step)
    restore_state(run, on_config_change)
    st = run.state
    total = data.updates_per_epoch * cfg.total_epochs if cfg.max_steps is None else min(cfg.max_steps, data.updates_per_epoch * cfg.total_epochs)
    run.progress = tracking.ProgressLog("train", total, every_steps=cfg.log_every, every_seconds=cfg.progress_seconds, start_step=st.step)
    if rt.is_main and cfg.wandb_project:
        run.wandb_run = tracking.start_wandb(tracking.wandb_settings(out_dir, cfg.to_dict()), cfg.to_dict(), dir=out_dir)
    run.t_start = time.time()
    parts.model.train()
    if cfg.sched_in_steps:
        parts.scheduler.step_update(st.step)
    try:
        with SignalFlag() as run.sig:
            while not st.finished and st.epoch < cfg.total_epochs and not (cfg.max_steps is not None and st.step >= cfg.max_steps):
                epoch_start = time.time()
                reached_max = train_one_epoch(run)
                if reached_max or validation_due(cfg, st.epoch):
                    validate_and_select(run, epoch_start)
                else:
                    log_unvalidated_epoch(run, epoch_start)
                st.epoch += 1
                st.batch_in_epoch, st.loss_sum, st.loss_count = 0, 0.0, 0
                st.finished = reached_max or st.epoch >= cfg.total_epochs
                save_checkpoint(run)
                if not st.finished and _stop_requested(run):
                    _interrupt(run)
    except BaseException as err:
        if run.wandb_run is not None:  # the requeued job continues this W&B run (same id)
            run.wandb_run.finish(exit_code=err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 1)
        raise
    return finish(run)


# ----------------------------------------------------------------- files
def write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    """log.csv with :data:`LOG_COLUMNS` (None as empty), atomically."""
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
