"""timm ViTs with token reduction inserted at chosen blocks.

The builders in :mod:`.vit` import timm and are loaded on first use (PEP 562);
the budgets, the reduction context and the extension registry need only torch.
"""
import importlib

from .budget import BUDGETS, StageBudget, TokenBudget, r_schedule
from .context import ReductionContext, StageRecord
from .extensions import get_extension, list_extensions, register_extension

_FROM_VIT = (
    "ReducedViTMixin",
    "ReductionConfig",
    "add_mixin",
    "compose_class",
    "count_flops",
    "create_model",
    "load_checkpoint",
    "load_state",
    "method_options",
    "patch_model",
    "read_checkpoint_state",
    "set_budget",
    "unpatch_model",
)


def __getattr__(name: str):
    if name in _FROM_VIT:
        return getattr(importlib.import_module(".vit", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUDGETS",
    "ReducedViTMixin",
    "ReductionConfig",
    "ReductionContext",
    "StageBudget",
    "StageRecord",
    "TokenBudget",
    "add_mixin",
    "compose_class",
    "count_flops",
    "create_model",
    "get_extension",
    "list_extensions",
    "load_checkpoint",
    "load_state",
    "method_options",
    "patch_model",
    "r_schedule",
    "read_checkpoint_state",
    "register_extension",
    "set_budget",
    "unpatch_model",
]
