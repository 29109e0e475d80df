"""CLCA: cross-layer cache aggregation (Rios et al., ICASSP 2025) for every
reduction method, and the study's parameter-efficient baselines.

* :func:`apply_clca` (or ``tokenreduction.create_model(..., clca=dict(...))``):
  the CLA head and the cross-layer cache, see :mod:`.model`.
* :func:`apply_tuning`: ``full`` fine-tuning, ``head`` (frozen backbone,
  trainable classifier), ``h2t`` (:class:`Head2ToeViT`, features of every
  layer with group-lasso feature selection) and ``vqt``
  (:class:`VisualQueryTuningViT`, learnable queries per layer).
"""
from .baselines import TUNINGS, Head2ToeViT, VisualQueryTuningViT, apply_tuning, trainable_parameters
from .cache import cached_blocks, insert_extra_tokens, recovery_layers, tokens_per_block
from .head import CLAHead
from .model import CLCAConfig, CLCAModule, CLCAViTMixin, apply_clca

__all__ = [
    "CLAHead",
    "CLCAConfig",
    "CLCAModule",
    "CLCAViTMixin",
    "Head2ToeViT",
    "TUNINGS",
    "VisualQueryTuningViT",
    "apply_clca",
    "apply_tuning",
    "cached_blocks",
    "insert_extra_tokens",
    "recovery_layers",
    "tokens_per_block",
    "trainable_parameters",
]
