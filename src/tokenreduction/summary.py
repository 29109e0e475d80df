"""The summary stage: one table of every run, the accuracy plots, and each
method's accuracy drop from the unreduced model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

import pandas as pd

from .io import atomic_path

#: columns of results/summary/accuracy_drop.csv, in order
DROP_COLUMNS = [
    "dataset", "backbone", "method", "keep_rate", "metric_name", "baseline_metric", "metric", "drop", "drop_std",
    "seeds", "rank",
]

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


def accuracy_drop(table: pd.DataFrame, baseline: str = "deit") -> pd.DataFrame:
    """Per dataset, backbone, method and keep rate: the drop of the metric
    (top-1 or mAP, in points) from the unreduced ``baseline`` method of the
    same dataset and backbone, ``baseline_metric - metric``.

    ``table``: rows as in :data:`COLUMNS` (one per run). Each reduced run is
    paired with the baseline run of its own seed (the seeds' mean baseline
    when that seed has none); ``drop`` is the mean over seeds and ``drop_std``
    their standard deviation (0 for one seed). ``rank`` orders the methods of
    one dataset, backbone and keep rate by drop (1 = smallest drop; ties share
    the lower rank). Returns a frame with columns :data:`DROP_COLUMNS`, sorted
    by dataset, backbone, keep rate and rank; groups without a baseline run
    are left out (a :class:`ValueError` if no group has one)."""
    missing = {"dataset", "backbone", "method", "keep_rate", "seed", "metric", "metric_name"} - set(table.columns)
    if missing:
        raise ValueError(f"summary table lacks column(s) {sorted(missing)}")
    rows = []
    for (dataset, backbone), sub in table.groupby(["dataset", "backbone"], sort=True):
        base = sub[sub.method == baseline]
        if base.empty:
            continue
        base_by_seed = base.groupby("seed")["metric"].mean()
        base_mean = float(base["metric"].mean())
        for (method, keep_rate), group in sub[sub.method != baseline].groupby(["method", "keep_rate"], sort=True):
            paired = [float(base_by_seed.get(seed, base_mean)) for seed in group["seed"]]
            drops = [b - float(m) for b, m in zip(paired, group["metric"])]
            rows.append({
                "dataset": dataset,
                "backbone": backbone,
                "method": method,
                "keep_rate": float(keep_rate),
                "metric_name": group["metric_name"].iloc[0],
                "baseline_metric": sum(paired) / len(paired),
                "metric": float(group["metric"].mean()),
                "drop": sum(drops) / len(drops),
                "drop_std": float(pd.Series(drops).std(ddof=0)),
                "seeds": len(drops),
            })
    if not rows:
        raise ValueError(f"no dataset/backbone of the summary has a run of the baseline method {baseline!r}")
    drops = pd.DataFrame(rows)
    drops["rank"] = (
        drops.groupby(["dataset", "backbone", "keep_rate"])["drop"].rank(method="min").astype(int)
    )
    drops = drops.sort_values(["dataset", "backbone", "keep_rate", "rank", "method"]).reset_index(drop=True)
    return drops[DROP_COLUMNS]


def write_accuracy_drop(
    table: pd.DataFrame, table_path: Union[str, Path], plot_path: Union[str, Path], baseline: str = "deit"
) -> pd.DataFrame:
    """Write :func:`accuracy_drop` as CSV and as a bar chart, both atomically."""
    drops = accuracy_drop(table, baseline)
    with atomic_path(table_path) as tmp:
        drops.to_csv(tmp, index=False, float_format="%.4f")
    plot_accuracy_drop(drops, plot_path)
    return drops


def plot_accuracy_drop(drops: pd.DataFrame, path: Union[str, Path]) -> None:
    """Horizontal bars of the drop from the unreduced model: one panel per
    dataset/backbone, one row per method (smallest mean drop on top), one
    bar per keep rate with its seed standard deviation as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = sorted(drops.groupby(["dataset", "backbone"]).groups)
    heights = [max(2.0, 0.3 * drops[(drops.dataset == d) & (drops.backbone == b)].method.nunique() + 1.2) for d, b in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(7, sum(heights)), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    rates = sorted(drops.keep_rate.unique())
    colours = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, len(rates)))
    for ax, (dataset, backbone) in zip(axes[:, 0], panels):
        sub = drops[(drops.dataset == dataset) & (drops.backbone == backbone)]
        order = sub.groupby("method")["drop"].mean().sort_values(ascending=False).index.tolist()
        y = np.arange(len(order))
        width = 0.8 / len(rates)
        for i, (rate, colour) in enumerate(zip(rates, colours)):
            at = sub[sub.keep_rate == rate].set_index("method").reindex(order)
            ax.barh(y - 0.4 + width * (i + 0.5), at["drop"], height=width, xerr=at["drop_std"].fillna(0),
                    color=colour, label=f"keep rate {rate:g}", error_kw={"elinewidth": 0.8})
        ax.set_yticks(y, order, fontsize=8)
        ax.axvline(0, color="k", linewidth=0.8)
        base = sub["baseline_metric"].mean()
        name = sub["metric_name"].iloc[0]
        ax.set_title(f"{dataset} / {backbone}: unreduced {name} {base:.1f}", fontsize=10)
        ax.set_xlabel(f"drop in {name} from the unreduced model (points)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")  # the smallest drops are on top
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _flops_axis(values: pd.Series) -> tuple[float, str]:
    """(scale, axis label) that shows FLOPs per image with readable numbers:
    GFLOPs from 1 GFLOP up, MFLOPs below."""
    top = float(values.max()) if len(values) else 0.0
    return (1.0, "GFLOPs per image") if top >= 1.0 else (1e3, "MFLOPs per image")


def plot_accuracy(table: pd.DataFrame, x: str, path: Union[str, Path], baseline: str = "deit") -> None:
    """Accuracy (or mAP) against `x` (keep_rate or gflops): one panel per
    dataset/backbone, one line per method (mean over seeds); the unreduced
    baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = sorted(table.groupby(["dataset", "backbone"]).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (dataset, backbone) in zip(axes[0], panels):
        sub = table[(table.dataset == dataset) & (table.backbone == backbone)]
        base = sub[sub.keep_rate == 1.0]
        scale, xlabel = (1.0, "keep rate") if x == "keep_rate" else _flops_axis(sub[x].dropna())
        colours = plt.get_cmap("tab20").colors  # more methods than tab10's ten colours
        for i, (method, group) in enumerate(sub[sub.keep_rate < 1.0].groupby("method")):
            mean = group.groupby(x, as_index=False)["metric"].mean().sort_values(x)
            ax.plot(mean[x] * scale, mean["metric"], marker="os^D"[i // 20 % 4], color=colours[i % 20], label=method)
        if len(base):
            ax.axhline(base["metric"].mean(), color="k", linestyle="--", label="no reduction")
        # a few short tick labels: FLOPs counts are long decimals that overlap
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, min_n_ticks=3))
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.set_title(f"{dataset} / {backbone}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(sub["metric_name"].iloc[0] if len(sub) else "metric")
        ax.grid(alpha=0.3)
    for ax in axes[0]:  # each panel names its own methods, beside the plot
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
