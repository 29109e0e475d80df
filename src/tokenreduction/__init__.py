"""tokenreduction: token reduction methods for Vision Transformers.

The timm model builders (create_model, patch_model, set_budget, ...) are
imported on first use (PEP 562), so the torch-only parts
(tokenreduction.reduction, tokenreduction.detection) also import where timm
is not installed. The model extensions (CLCA) are imported here so that they
register themselves with :mod:`tokenreduction.models.extensions`; the model
code never imports them.
"""
from . import clca  # noqa: F401  (registers the "clca" model extension)
from . import models
from .models import r_schedule
from .patterns import compose_assignments, model_patterns, token_depth
from .reduction import get_method, list_methods

__version__ = "0.1.0"

_FROM_MODELS = (
    "count_flops",
    "create_model",
    "load_checkpoint",
    "patch_model",
    "set_budget",
    "unpatch_model",
)


def __getattr__(name: str):
    if name in _FROM_MODELS:
        return getattr(models, name)
    if name == "visualize":  # matplotlib is imported only when a figure is drawn
        from .visualization import visualize

        return visualize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "compose_assignments",
    "count_flops",
    "create_model",
    "get_method",
    "list_methods",
    "load_checkpoint",
    "model_patterns",
    "patch_model",
    "r_schedule",
    "set_budget",
    "token_depth",
    "unpatch_model",
    "visualize",
]
