"""The MAE fine-tuning stage's table: one row per fine-tuned run (dataset,
backbone, method, r, schedule, seed) with the evaluator's metrics."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

import pandas as pd

from ..io import atomic_path

#: columns of the MAE fine-tuning table, in order
MAE_COLUMNS = [
    "dataset", "backbone", "method", "r", "schedule", "seed", "top1", "top5", "params_m", "gflops", "throughput",
    "tokens_kept",
]


def summarise_mae_runs(
    runs: Sequence[dict], metric_paths: Sequence[Union[str, Path]], table_path: Union[str, Path]
) -> pd.DataFrame:
    """Read each run's metrics.json (metric_paths[i] belongs to runs[i], a dict
    with dataset, backbone, method, r, schedule, seed) into one table
    (:data:`MAE_COLUMNS`), written as CSV atomically."""
    if len(runs) != len(metric_paths):
        raise ValueError(f"{len(runs)} runs but {len(metric_paths)} metrics files")
    rows = []
    for run, path in zip(runs, metric_paths):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MAE run {run} produced no metrics ({path} is missing)")
        m = json.loads(path.read_text())
        if "top1" not in m:
            raise ValueError(f"{path} has no top1: the MAE stage reports single-label accuracy")
        rows.append({
            **{k: run[k] for k in ("dataset", "backbone", "method", "schedule")},
            "r": int(run["r"]),
            "seed": int(run["seed"]),
            "top1": m["top1"],
            "top5": m.get("top5"),
            "params_m": m.get("params_m"),
            "gflops": m.get("gflops"),
            "throughput": m.get("throughput"),
            "tokens_kept": " ".join(str(v) for v in m.get("tokens_kept", [])),
        })
    table = pd.DataFrame(rows, columns=MAE_COLUMNS)
    with atomic_path(table_path) as tmp:
        table.to_csv(tmp, index=False)
    return table
