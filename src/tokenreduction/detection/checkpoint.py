"""Checkpoint loads of the detection path: weights-only, and strict for the backbone.

mmengine 0.10 reads every checkpoint (``load_from``, resuming, the
benchmark's weights) with a bare ``torch.load`` of its local-file scheme.
:func:`install_safe_loader` replaces that scheme by
:func:`load_detection_checkpoint`: :func:`tokenreduction.safe_load.load_checkpoint_file`
(``weights_only=True``) with the allow-list of the types mmengine's own
checkpoints hold besides tensors, plain containers and numpy values:

``mmengine.logging.HistoryBuffer``
    the message hub's logged scalars (``message_hub.log_scalars``). Its
    pickled state names its default statistics ``HistoryBuffer.min / max /
    current / mean``, which pickle protocol 2 writes as ``getattr(HistoryBuffer,
    name)``: the pickle's ``builtins.getattr`` resolves to
    :func:`history_buffer_attr`, which returns those four and refuses anything else.

Released mmdet 2.x checkpoints (ViT-Adapter's) hold tensors, strings, tuples
and dicts only. Any other type or function in a file is refused with
:class:`~tokenreduction.safe_load.UnsafeCheckpointError` before anything in
it runs.

mmengine loads the weights non-strictly (a mismatch only warns), so
:func:`check_backbone_state` compares a detector checkpoint's ``backbone.*``
weights with the backbone first: a missing, unexpected or differently shaped
key is one ValueError naming them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..safe_load import load_checkpoint_file

_STATISTICS = ("min", "max", "current", "mean")


def history_buffer_attr(obj: Any, name: str) -> Any:
    """The only ``getattr`` a detection checkpoint may call: a default
    statistics method of mmengine's HistoryBuffer."""
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and name in _STATISTICS:
        return getattr(HistoryBuffer, name)
    raise TypeError(f"checkpoint asks getattr({obj!r}, {name!r}), which is not a HistoryBuffer statistic")


def detection_allowed_globals() -> list:
    """The extra allow-list of mmengine checkpoints (torch ``safe_globals`` form)."""
    from mmengine.logging import HistoryBuffer

    return [HistoryBuffer, (history_buffer_attr, "builtins.getattr")]


def load_detection_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> Any:
    """What a detection checkpoint file holds, read weights-only (see the module docstring)."""
    return load_checkpoint_file(path, map_location=map_location, extra_globals=detection_allowed_globals())


def load_from_local_weights_only(filename: str, map_location: Any = None) -> Any:
    return load_detection_checkpoint(Path(filename).expanduser(), map_location=map_location)


def install_safe_loader() -> None:
    """Make mmengine read local checkpoint files through
    :func:`load_detection_checkpoint` (idempotent)."""
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", loader=load_from_local_weights_only, force=True)


def backbone_state(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` weights of a detector checkpoint (mmengine/mmdet:
    ``{"state_dict": ..., "meta": ...}``, or a bare state dict), prefix removed."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError("the checkpoint holds no state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def check_backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """ValueError naming every missing, unexpected or differently shaped key
    of `state` (from :func:`backbone_state`) against `backbone`."""
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(v.shape)} (backbone {tuple(own[k].shape)})"
              for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"lacks {len(missing)} backbone weights: {missing[:8]}")
    if unexpected:
        problems.append(f"has {len(unexpected)} backbone weights the model does not: {unexpected[:8]}")
    if shapes:
        problems.append(f"has {len(shapes)} backbone weights of another shape: {shapes[:8]}")
    if problems:
        raise ValueError(
            f"{source} does not fit the backbone: {'; '.join(problems)}. Set the backbone's options "
            "(embed_dim, num_heads, conv_inplane, deform_num_heads, layer_scale, ...) as the checkpoint was trained"
        )


__all__ = [
    "backbone_state",
    "check_backbone_state",
    "detection_allowed_globals",
    "history_buffer_attr",
    "install_safe_loader",
    "load_detection_checkpoint",
]
