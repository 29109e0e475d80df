"""Evaluation of trained models: metrics, cost, reduction patterns, CLS features."""
from .evaluate import evaluate, feature_blocks, measure_throughput
from .metrics import average_precision_per_class, mean_average_precision, topk_accuracy

__all__ = [
    "average_precision_per_class",
    "evaluate",
    "feature_blocks",
    "mean_average_precision",
    "measure_throughput",
    "topk_accuracy",
]
