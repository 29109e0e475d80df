"""Fine-tuning of reduced ViTs (timm optimiser/scheduler/mixup/EMA, exact resume).

Modules, bottom-up: :mod:`.spec` (the network: :class:`ModelSpec`),
:mod:`.config` (the recipe, holding a ModelSpec), :mod:`.sampling` (data order),
:mod:`.runtime` (device, ranks, RNG, signals), :mod:`.recipe` (optimiser,
losses, a method's training terms, teacher), :mod:`.selection` (which weights
become final.pth), :mod:`.checkpoint` (files written and read),
:mod:`.engine` (the phases and :func:`train`).
"""
from .checkpoint import atomic_save, build_model_from_spec, load_trained_model
from .config import TrainConfig
from .engine import TrainingInterrupted, param_groups, train, validate
from .spec import ModelSpec

__all__ = [
    "ModelSpec",
    "TrainConfig",
    "TrainingInterrupted",
    "atomic_save",
    "build_model_from_spec",
    "load_trained_model",
    "param_groups",
    "train",
    "validate",
]
