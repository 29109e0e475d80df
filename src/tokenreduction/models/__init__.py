"""timm ViTs with token reduction inserted at chosen blocks.

The builders in :mod:`.vit` import timm and are loaded on first use (PEP 562);
the budgets and the reduction context need only torch.
"""
import importlib

from .budget import BUDGETS, StageBudget, TokenBudget, r_schedule
from .context import ReductionContext, StageRecord

_FROM_VIT = ("count_flops", "create_model", "load_checkpoint", "patch_model")


def __getattr__(name: str):
    if name in _FROM_VIT:
        return getattr(importlib.import_module(".vit", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUDGETS",
    "ReductionContext",
    "StageBudget",
    "StageRecord",
    "TokenBudget",
    "count_flops",
    "create_model",
    "load_checkpoint",
    "patch_model",
    "r_schedule",
]
