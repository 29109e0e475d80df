"""timm ViTs with token reduction inserted at chosen blocks."""
from .budget import BUDGETS, StageBudget, TokenBudget, r_schedule
from .context import ReductionContext, StageRecord
from .vit import count_flops, create_model, load_checkpoint, patch_model

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
