"""Fine-tuning of reduced ViTs (timm optimiser/scheduler/mixup/EMA, exact resume)."""
from .checkpoint import atomic_save, build_model_from_spec, load_trained_model
from .config import TrainConfig
from .engine import TrainingInterrupted, param_groups, train, validate

__all__ = [
    "TrainConfig",
    "TrainingInterrupted",
    "atomic_save",
    "build_model_from_spec",
    "load_trained_model",
    "param_groups",
    "train",
    "validate",
]
