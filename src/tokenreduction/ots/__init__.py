"""Off-the-shelf evaluation of pretrained backbones (AugReg, SWAG, MAE) under
ToMe-style r sweeps: presets, checkpoint conversion, the sweep and its plot."""
from .presets import (
    PRESETS,
    BackbonePreset,
    build_backbone,
    convert_swag_state_dict,
    feasible_r,
    get_preset,
    load_swag_checkpoint,
    trained_preset,
    transform_for,
)
from .sweep import COLUMNS, collect_tables, patch_for_r, plot_sweep, sweep, write_table

__all__ = [
    "COLUMNS",
    "PRESETS",
    "BackbonePreset",
    "build_backbone",
    "collect_tables",
    "convert_swag_state_dict",
    "feasible_r",
    "get_preset",
    "load_swag_checkpoint",
    "patch_for_r",
    "plot_sweep",
    "sweep",
    "trained_preset",
    "transform_for",
    "write_table",
]
