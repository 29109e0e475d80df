"""The pieces of a fine-tuning recipe: parameter groups, optimiser, schedule,
mixup, the task loss and a method's own training terms, the teacher.

Method-specific training goes through the reducer class
(:meth:`tokenreduction.reduction.base.TokenReducer.training_loss` and
``uses_teacher``): :func:`training_objective` asks the method, so adding a
learned method never touches the trainer.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..reduction.base import MethodLoss
from .config import TrainConfig
from .spec import ModelSpec


def stored_spec(cfg: TrainConfig, num_classes: int, multilabel: bool) -> dict[str, Any]:
    """The spec final.pth stores: the model spec's fields with the dataset's
    classes and image size (what build_model_from_spec needs to rebuild the
    trained network) plus what the evaluator reads (img_size, dataset,
    multilabel, eval_split)."""
    return {
        **cfg.model_spec.for_dataset(num_classes, cfg.img_size).to_dict(),
        "img_size": cfg.img_size,
        "dataset": cfg.dataset,
        "multilabel": bool(multilabel),
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


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimiser over :func:`param_groups` (or MAE's layer decay groups)."""
    from timm.optim import create_optimizer_v2

    groups = (
        layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay)
        if cfg.layer_decay is not None
        else param_groups(model, cfg.weight_decay, cfg.backbone_lr_scale)
    )
    return create_optimizer_v2(groups, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """timm's scheduler, stepped per optimizer update (``sched_in_steps``) or per epoch."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        cooldown_epochs=cfg.cooldown_epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=not cfg.sched_in_steps,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def build_mixup(cfg: TrainConfig, num_classes: int, multilabel: bool) -> Optional[Callable]:
    """timm's Mixup/CutMix when either alpha is > 0 (needs an even batch)."""
    if not (cfg.mixup > 0 or cfg.cutmix > 0):
        return None
    from timm.data import Mixup

    if cfg.batch_size % 2:
        raise ValueError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")
    # timm's Mixup mixes dense multi-label targets (multi_label=True) from 1.0.31 on;
    # single-label mixing is the same in every timm the package supports
    options = {"multi_label": True} if multilabel else {}
    if multilabel and "multi_label" not in inspect.signature(Mixup).parameters:
        import timm

        raise RuntimeError(
            f"mixup/cutmix on multi-label data needs timm>=1.0.31 (Mixup's multi_label), but timm "
            f"{timm.__version__} is installed: pip install 'timm>=1.0.31', or set mixup and cutmix to 0"
        )
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
        **options,
    )


def build_task_loss(cfg: TrainConfig, multilabel: bool, mixup_active: bool) -> nn.Module:
    """The task loss on float32 logits: ASL (gamma_neg 4, gamma_pos 0, clip
    0.05) or BCE for multi-label data; soft-target CE under mixup; label
    smoothing CE; plain CE."""
    from timm.loss import AsymmetricLossMultiLabel, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if multilabel:
        loss: nn.Module = (
            AsymmetricLossMultiLabel(gamma_neg=4, gamma_pos=0, clip=0.05)
            if cfg.multilabel_loss == "asl"
            else nn.BCEWithLogitsLoss()
        )
    elif mixup_active:
        loss = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        loss = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        loss = nn.CrossEntropyLoss()
    return FloatLoss(loss)


class FloatLoss(nn.Module):
    """Computes the wrapped loss on float32 logits (AMP-safe)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs.float(), targets)


class TaskLoss(MethodLoss):
    """The objective of a method without training terms of its own: the task loss."""

    def __init__(self, task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.task_loss = task_loss

    def forward(self, model, images, outputs, targets, teacher=None) -> torch.Tensor:
        return self.task_loss(outputs, targets)


def reducer_class(method: Optional[str]):
    """The registered TokenReducer class of `method` (None: no reduction)."""
    if method is None:
        return None
    from ..reduction import get_method

    return get_method(method)


def training_objective(cfg: TrainConfig, task_loss: nn.Module) -> MethodLoss:
    """The loss the trainer minimises: the method's own
    (``TokenReducer.training_loss`` with ``method_loss_kwargs``) or the task loss."""
    cls = reducer_class(cfg.model_spec.method)
    if cls is None:
        if cfg.method_loss_kwargs:
            raise ValueError("method_loss_kwargs given but no reduction method: the unreduced model has no training loss of its own")
        return TaskLoss(task_loss)
    objective = cls.training_loss(task_loss, **cfg.method_loss_kwargs)
    return objective if objective is not None else TaskLoss(task_loss)


def build_teacher(cfg: TrainConfig, spec: ModelSpec, device: torch.device) -> Optional[nn.Module]:
    """The frozen teacher a method's loss distils from (``uses_teacher``):
    the unreduced network of `spec` (the student's, dataset filled in)
    loaded from ``teacher_checkpoint``; None when the method uses none or no
    checkpoint is given."""
    method = spec.method
    cls = reducer_class(method)
    uses = bool(cls is not None and cls.uses_teacher)
    if cfg.teacher_checkpoint and not uses:
        raise ValueError(f"teacher_checkpoint given but method {method!r} trains without a teacher")
    if not (uses and cfg.teacher_checkpoint):
        return None
    plain = ModelSpec(model=spec.model, model_kwargs=spec.model_kwargs, num_classes=spec.num_classes)
    teacher = plain.build(checkpoint_path=cfg.teacher_checkpoint).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
