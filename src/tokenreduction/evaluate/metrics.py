"""Kept for imports written before the metrics moved below both the trainer
and the evaluator: see :mod:`tokenreduction.metrics`."""
from ..metrics import average_precision_per_class, mean_average_precision, topk_accuracy

__all__ = ["average_precision_per_class", "mean_average_precision", "topk_accuracy"]
