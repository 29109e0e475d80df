"""tokenreduction: token reduction methods for Vision Transformers."""
from .models import count_flops, create_model, load_checkpoint, patch_model, r_schedule
from .patterns import compose_assignments, model_patterns, token_depth
from .reduction import get_method, list_methods

__version__ = "0.1.0"

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
    "token_depth",
]
