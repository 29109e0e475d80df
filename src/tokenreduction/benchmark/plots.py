"""Figures of the speed benchmarks (PNG, written atomically)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import pandas as pd

from ..io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(throughput: pd.DataFrame, path: Union[str, Path]) -> None:
    """Images/s against batch size (log-log), one panel per backbone, one
    line per model (median, with the interquartile range shaded); the
    unreduced baseline dashed."""
    plt = _pyplot()
    ok = throughput[throughput.status == "ok"]
    backbones = list(dict.fromkeys(ok.backbone)) or [""]
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4.5), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        sub = ok[ok.backbone == backbone]
        for model, group in sub.groupby("model", sort=False):
            group = group.sort_values("batch_size")
            base = (group.method == "none").all()
            line = ax.plot(group.batch_size, group.img_per_s, marker="o", markersize=3, label=model,
                           linestyle="--" if base else "-", color="k" if base else None)
            ax.fill_between(group.batch_size, group.img_per_s_q25, group.img_per_s_q75, alpha=0.15,
                            color=line[0].get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{backbone} ({sub.device.iloc[0] if len(sub) else ''})")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_accuracy_vs_throughput(summary: pd.DataFrame, speed: pd.DataFrame, path: Union[str, Path]) -> None:
    """Accuracy (or mAP) of every fine-tuned run against the throughput
    ratio to the baseline measured for its (backbone, method, keep rate):
    one panel per dataset/backbone, one line per method; runs without a
    speed measurement are left out."""
    plt = _pyplot()
    merged = join_accuracy_speed(summary, speed)
    panels = sorted(merged.groupby(["dataset", "backbone"]).groups) or [("", "")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (dataset, backbone) in zip(axes[0], panels):
        sub = merged[(merged.dataset == dataset) & (merged.backbone == backbone)]
        for method, group in sub.groupby("method"):
            mean = group.groupby("throughput_ratio", as_index=False)["metric"].mean().sort_values("throughput_ratio")
            base = method == "none"
            ax.plot(mean.throughput_ratio, mean.metric, marker="*" if base else "o", label=method,
                    linestyle="none" if base else "-", color="k" if base else None)
        ax.set_title(f"{dataset} / {backbone}")
        ax.set_xlabel("throughput / baseline throughput (measured)")
        ax.set_ylabel(sub.metric_name.iloc[0] if len(sub) else "metric")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def join_accuracy_speed(summary: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """The summary rows (dataset, backbone, method name, keep rate, metric)
    with the speed table's throughput ratio of the same backbone, method
    name and keep rate (the baseline: keep rate 1)."""
    sp = speed.copy()
    sp["method_name"] = sp.model.str.split(" ").str[0]
    sp.loc[sp.method == "none", "method_name"] = "__baseline__"
    sp = sp[sp.r.isna()] if "r" in sp else sp
    sm = summary.copy()
    sm["method_name"] = sm.method
    sm.loc[sm.keep_rate == 1.0, "method_name"] = "__baseline__"
    sm.loc[sm.keep_rate == 1.0, "method"] = "none"
    out = sm.merge(sp[["backbone", "method_name", "keep_rate", "throughput_ratio"]],
                   on=["backbone", "method_name", "keep_rate"], how="inner")
    return out.drop(columns="method_name")
