"""The summary stage: one table of every run and the accuracy plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

import pandas as pd

from .io import atomic_path

#: columns of results/summary/metrics.csv, in order
COLUMNS = [
    "dataset", "backbone", "capacity", "method", "keep_rate", "seed", "metric_name", "metric", "acc5",
    "params_m", "gflops", "throughput", "tokens_kept", "tokens_expected",
]


def run_dir(run: dict) -> str:
    return f"{run['dataset']}/{run['backbone']}/{run['method']}/kr{run['keep_rate']}/seed{run['seed']}"


def summarise_runs(
    runs: Sequence[dict], metric_paths: Sequence[Union[str, Path]], table_path: Union[str, Path]
) -> pd.DataFrame:
    """Read each run's metrics.json (metric_paths[i] belongs to runs[i]) into
    one table (columns COLUMNS) and write it as CSV atomically. A missing
    file names the run that did not produce it."""
    if len(runs) != len(metric_paths):
        raise ValueError(f"{len(runs)} runs but {len(metric_paths)} metrics files")
    rows = []
    for run, path in zip(runs, metric_paths):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"run {run_dir(run)} produced no metrics ({path} is missing)")
        m = json.loads(path.read_text())
        rows.append({
            "dataset": run["dataset"],
            "backbone": run["backbone"],
            "capacity": run.get("capacity", run["backbone"]),
            "method": run["method"],
            "keep_rate": float(run["keep_rate"]),
            "seed": int(run["seed"]),
            "metric_name": m["metric"],
            "metric": m["value"],
            "acc5": m.get("top5"),
            "params_m": m.get("params_m"),
            "gflops": m.get("gflops"),
            "throughput": m.get("throughput"),
            "tokens_kept": " ".join(str(v) for v in m.get("tokens_kept", [])),
            "tokens_expected": " ".join(str(v) for v in m.get("tokens_expected", [])),
        })
    table = pd.DataFrame(rows, columns=COLUMNS)
    with atomic_path(table_path) as tmp:
        table.to_csv(tmp, index=False)
    return table


def plot_accuracy(table: pd.DataFrame, x: str, path: Union[str, Path], baseline: str = "deit") -> None:
    """Accuracy (or mAP) against `x` (keep_rate or gflops): one panel per
    dataset/backbone, one line per method (mean over seeds); the unreduced
    baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(table.groupby(["dataset", "backbone"]).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (dataset, backbone) in zip(axes[0], panels):
        sub = table[(table.dataset == dataset) & (table.backbone == backbone)]
        base = sub[sub.keep_rate == 1.0]
        for method, group in sub[sub.keep_rate < 1.0].groupby("method"):
            mean = group.groupby(x, as_index=False)["metric"].mean().sort_values(x)
            ax.plot(mean[x], mean["metric"], marker="o", label=method)
        if len(base):
            ax.axhline(base["metric"].mean(), color="k", linestyle="--", label="no reduction")
        ax.set_title(f"{dataset} / {backbone}")
        ax.set_xlabel("keep rate" if x == "keep_rate" else "GFLOPs per image")
        ax.set_ylabel(sub["metric_name"].iloc[0] if len(sub) else "metric")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
