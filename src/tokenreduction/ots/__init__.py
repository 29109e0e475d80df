"""Off-the-shelf evaluation of pretrained backbones (AugReg, SWAG, MAE) under
ToMe-style r sweeps: presets, checkpoint conversion, the sweep and its plot;
and the table of the MAE fine-tuning stage (the ATC study's SSL-backbone stages)."""
from .mae import MAE_COLUMNS, summarise_mae_runs
from .presets import (
    PRESETS,
    BackbonePreset,
    build_backbone,
    convert_swag_state_dict,
    feasible_r,
    get_preset,
    load_swag_checkpoint,
    preset_from_spec,
    trained_preset,
    transform_for,
)
from .sweep import COLUMNS, collect_tables, patch_for_r, plot_sweep, sweep, write_table

__all__ = [
    "COLUMNS",
    "MAE_COLUMNS",
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
    "preset_from_spec",
    "summarise_mae_runs",
    "sweep",
    "trained_preset",
    "transform_for",
    "write_table",
]
