"""The analysis stages of the DAG (Which Tokens to Use?, sections 1.6-1.7 of
the references): compare -> collate -> correlate, token statistics and the
heatmap comparison. Each function reads the evaluation stage's per-run files,
writes its table atomically and returns it.

A run is named by its results path, ``<dataset>/<backbone>/<method>/kr<rate>/seed<s>``;
the runs table is the summary table (``results/summary/metrics.csv``) whose
columns give dataset, backbone, capacity, method, keep_rate, seed and metric.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..io import atomic_path, write_json
from .compare import (AXES, BASELINE_PAIR_RATE, HC_TRUE, compare_features, compare_features_both, compare_patterns,
                      compare_patterns_both, load_npz, pairs, token_statistics)
from .correlate import CORRELATION_COLUMNS, correlate, correlate_groups
from .heatmaps import DEFAULT_KL_BASE, heatmap_metrics
from .similarity import DegenerateCCAWarning

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
#: per-pair measures that the collated tables keep (the study's columns)
PATTERN_MEASURES = ("IoU_mean", "Homogeneity_mean", "Completeness_mean", "NMI_mean", "ARI_mean")
FEATURE_MEASURES = ("PWCCA", "MeanSqCCA", "MeanCCA", "LinCKA", "LinCKAPrime", "Procrustes")


def run_name(row: Mapping) -> str:
    return f"{row['dataset']}/{row['backbone']}/{row['method']}/kr{_rate(row['keep_rate'])}/seed{int(row['seed'])}"


def _rate(value) -> str:
    return f"{float(value):g}"


def runs_table(summary: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The runs of one dataset as `pairs` expects them (run, method,
    capacity, keep_rate, dataset, seed, metric)."""
    sub = summary[summary["dataset"] == dataset].copy()
    if sub.empty:
        raise ValueError(f"the summary table has no runs of dataset {dataset!r}")
    sub["run"] = [run_name(r) for r in sub.to_dict("records")]
    return sub[["run", "method", "capacity", "keep_rate", "dataset", "seed", "metric"]].reset_index(drop=True)


def _load(eval_dir: Path, run: str, name: str) -> dict:
    path = eval_dir / run / name
    if not path.exists():
        raise FileNotFoundError(f"run {run} did not produce {name} ({path} is missing)")
    return load_npz(path)


def pair_order(todo: pd.DataFrame, axis: str) -> list[int]:
    """The order in which compare_runs visits the rows of ``pairs(...)``: the
    pairs of one group of the axis together (rates: method and capacity;
    capacity: method and keep rate; models: capacity and keep rate, the
    baseline's pairs with those of ``baseline_rate``), so that a run's files
    are loaded once and dropped after its group, and a job holds one group's
    runs rather than every run of the dataset. Stable: within a group, the
    order of ``todo``."""
    if todo.empty:
        return []
    if axis == "rates":
        keys = [todo["method_a"].astype(str), todo["capacity_a"].astype(str)]
    elif axis == "capacity":
        keys = [todo["method_a"].astype(str), todo["keep_rate_a"].astype(float)]
    else:
        keys = [todo["capacity_a"].astype(str),
                np.minimum(todo["keep_rate_a"].astype(float), todo["keep_rate_b"].astype(float))]
    frame = pd.DataFrame({f"k{i}": key.to_numpy() for i, key in enumerate(keys)})
    return frame.sort_values(list(frame.columns), kind="stable").index.tolist()


def _long_table(axis: str, parts: list, columns: list[str]) -> pd.DataFrame:
    """The tables of compare_runs, one after the other, with their pair and
    source as columns: ``parts`` lists (pair record, table, source) in output
    order. Concatenated per source (tables of one source share their
    columns; thousands of small concatenations cost more than the
    comparisons) and put back in order; columns ``columns`` first, then the
    rest in the order the tables give them."""
    if not parts:
        return pd.DataFrame(columns=columns)
    lengths = np.array([len(table) for _, table, _ in parts])
    starts = np.cumsum(lengths) - lengths  # each table's first row in the output
    blocks, rows = [], []
    for source in dict.fromkeys(src for _, _, src in parts):  # first source first: the tables' column order
        mine = [k for k, (_, _, src) in enumerate(parts) if src == source]
        blocks.append(pd.concat([parts[k][1] for k in mine], ignore_index=True))
        rows.append(np.concatenate([np.arange(starts[k], starts[k] + lengths[k]) for k in mine]))
    out = pd.concat(blocks, ignore_index=True)
    out = out.iloc[np.argsort(np.concatenate(rows), kind="stable")].reset_index(drop=True)
    out["axis"] = axis
    out["run_a"] = np.repeat([pair["run_a"] for pair, _, _ in parts], lengths)
    out["run_b"] = np.repeat([pair["run_b"] for pair, _, _ in parts], lengths)
    out["source"] = np.repeat([source for _, _, source in parts], lengths)
    return out.reindex(columns=[c for c in columns if c in out.columns] + [c for c in out.columns if c not in columns])


def compare_runs(summary_csv: PathLike, dataset: str, axis: str, eval_dir: PathLike, out_csv: PathLike,
                 progress: Callable = lambda it, **kw: it, pwcca: str = "study",
                 baseline_rate: Optional[float] = BASELINE_PAIR_RATE,
                 hc_true: Optional[str] = None) -> pd.DataFrame:
    """Compare every pair of runs of `dataset` along `axis` (rates, capacity,
    models): reduction patterns per reduction block and CLS features per
    feature block. Long table: axis, run_a, run_b, block, source (pattern or
    feature) and the measures of compare_patterns / compare_features.

    pwcca: "study" or "paired" PWCCA normalisation; baseline_rate: the keep
    rate the models axis pairs with the unreduced baseline (None: none);
    hc_true: which run is sklearn's labels_true (default: the study's order
    of the axis, ``HC_TRUE``)."""
    if axis not in AXES:
        raise ValueError(f"unknown comparison axis {axis!r}, expected one of {AXES}")
    hc_true = hc_true or HC_TRUE[axis]
    eval_dir = Path(eval_dir)
    runs = runs_table(pd.read_csv(summary_csv), dataset)
    todo = pairs(runs, axis, match=("seed",), baseline_rate=baseline_rate)
    order = pair_order(todo, axis)
    # a pair whose swap is also listed (the models axis holds both orders) is
    # compared once, at the first of the two in `order`; the other is its mirror
    records = todo.to_dict("records")
    position = {(r["run_a"], r["run_b"]): i for i, r in enumerate(records)}
    twin_of: dict[int, int] = {}  # computed pair -> its mirrored pair
    mirrored: set = set()
    for index in order:
        twin = position.get((records[index]["run_b"], records[index]["run_a"]))
        if index not in mirrored and twin is not None and twin != index:
            twin_of[index] = twin
            mirrored.add(twin)
    computed = [index for index in order if index not in mirrored]
    last_use = {}
    for step, index in enumerate(computed):
        last_use[records[index]["run_a"]] = last_use[records[index]["run_b"]] = step
    frames: dict[int, list] = {}
    degenerate: list = []
    cache: dict = {}

    def get(run: str, name: str) -> dict:
        if (run, name) not in cache:
            cache[(run, name)] = _load(eval_dir, run, name)
        return cache[(run, name)]

    for step, index in enumerate(progress(computed, desc=f"compare {dataset} {axis}")):
        pair = records[index]
        a, b = pair["run_a"], pair["run_b"]
        twin = twin_of.get(index)
        patterns = (get(a, "patterns.npz"), get(b, "patterns.npz"))
        features = (get(a, "cls_features.npz"), get(b, "cls_features.npz"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DegenerateCCAWarning)
            if twin is None:
                results = {index: (compare_patterns(*patterns, names=(a, b), hc_true=hc_true),
                                   compare_features(*features, names=(a, b), pwcca=pwcca))}
            else:
                pat_ab, pat_ba = compare_patterns_both(*patterns, names=(a, b), hc_true=hc_true)
                feat_ab, feat_ba = compare_features_both(*features, names=(a, b), pwcca=pwcca)
                results = {index: (pat_ab, feat_ab), twin: (pat_ba, feat_ba)}
        for w in caught:
            if issubclass(w.category, DegenerateCCAWarning):
                degenerate += [(i, f"{records[i]['run_a']} vs {records[i]['run_b']}: {w.message}") for i in results]
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for i, (pat, feat) in results.items():
            frames[i] = [(table, source) for table, source in ((pat, "pattern"), (feat, "feature")) if len(table)]
        # a run no later pair reads leaves the cache (the job holds a group's runs, not the dataset's)
        for run in {a, b}:
            if last_use[run] == step:
                cache.pop((run, "patterns.npz"), None)
                cache.pop((run, "cls_features.npz"), None)
    columns = ["axis", "run_a", "run_b", "source", "block", "n_images", *PATTERN_MEASURES, *FEATURE_MEASURES]
    out = _long_table(axis, [(records[index], *frame) for index in sorted(frames) for frame in frames[index]], columns)
    if degenerate:
        log.warning(
            "degenerate CCA in %d feature comparisons (PWCCA, MeanCCA, MeanSqCCA are NaN there): "
            "evaluate more images than the two widths together (evaluate.num_pattern_images). First: %s",
            len(degenerate), min(degenerate)[1],
        )
    with atomic_path(out_csv) as tmp:
        out.to_csv(tmp, index=False)
    return out


def collate(summary_csv: PathLike, dataset: str, axis: str, compare_csv: PathLike, out_csv: PathLike) -> pd.DataFrame:
    """One row per pair: the two runs, their metrics, ``metric_diff`` =
    metric A - metric B (the study's Acc Diff), and every measure per block as
    ``<measure>@<block>`` (e.g. IoU_mean@3, LinCKA@11). Columns that are all
    NaN (a comparison that did not apply) are dropped."""
    runs = runs_table(pd.read_csv(summary_csv), dataset).set_index("run")
    cmp = pd.read_csv(compare_csv)
    base_cols = ["axis", "run_a", "run_b", "method_a", "method_b", "capacity_a", "capacity_b",
                 "keep_rate_a", "keep_rate_b", "metric_a", "metric_b", "metric_diff"]
    if cmp.empty:
        out = pd.DataFrame(columns=base_cols)
    else:
        measures = [c for c in (*PATTERN_MEASURES, *FEATURE_MEASURES) if c in cmp.columns]
        wide = cmp.pivot_table(index=["run_a", "run_b"], columns="block", values=measures, aggfunc="first")
        wide.columns = [f"{m}@{int(b)}" for m, b in wide.columns]
        wide = wide.dropna(axis=1, how="all").reset_index()
        for side in ("a", "b"):
            info = runs.loc[wide[f"run_{side}"]]
            for col in ("method", "capacity", "keep_rate", "metric"):
                wide[f"{col}_{side}"] = info[col].to_numpy()
        wide["metric_diff"] = wide["metric_a"] - wide["metric_b"]
        wide["axis"] = axis
        out = wide[base_cols + [c for c in wide.columns if "@" in c]]
    with atomic_path(out_csv) as tmp:
        out.to_csv(tmp, index=False)
    return out


#: the study's grouping of the correlation tables per axis: rates per reduced
#: model (method and capacity), capacity per method, models per method A,
#: capacity and keep rate (the baseline's pairs at 0.9 join the 0.9 group)
CORRELATION_GROUPS = {
    "rates": ("method_a", "capacity_a"),
    "capacity": ("method_a",),
    "models": ("method_a", "capacity_a", "keep_rate"),
}


def one_order(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a collated table with each unordered pair once: where both
    (A, B) and (B, A) are present (the models axis), the row with run_a <
    run_b. Pooling both orders would cancel every symmetric measure's
    correlation (the metric difference flips sign, the measure does not)."""
    if table.empty:
        return table
    keys = set(zip(table["run_a"], table["run_b"]))
    keep = [not ((b, a) in keys and a > b) for a, b in zip(table["run_a"], table["run_b"])]
    return table[np.asarray(keep, dtype=bool)].reset_index(drop=True)


def _group_table(table: pd.DataFrame, axis: str) -> pd.DataFrame:
    out = table.copy()
    if axis == "models":
        out["keep_rate"] = np.minimum(pd.to_numeric(out["keep_rate_a"]), pd.to_numeric(out["keep_rate_b"]))
    return out


def correlate_axis(collated_csv: PathLike, out_csv: PathLike, out_png: PathLike, axis: Optional[str] = None,
                   out_pooled: Optional[PathLike] = None) -> pd.DataFrame:
    """Spearman's and Kendall's rank correlation (with p-values) between the
    metric difference and each similarity measure of the collated table.

    ``out_csv`` (the primary table): the study's grouping
    (``CORRELATION_GROUPS`` of the axis; models: per method A, capacity and
    keep rate, the baseline's pairs counted at 0.9), columns
    ``CORRELATION_COLUMNS`` + group + the group columns. ``out_pooled``: all
    pairs of the axis pooled, one order per pair (``one_order``); on the models
    axis against |metric A - metric B| (pooled over methods A, the sign of the
    difference only says which name sorts first). The figure: one scatter per
    measure over the pooled pairs with its least-squares line and the pooled
    rho. Returns the primary table."""
    table = pd.read_csv(collated_csv)
    if axis is None:
        axis = str(table["axis"].iloc[0]) if len(table) else "rates"
    if axis not in AXES:
        raise ValueError(f"unknown comparison axis {axis!r}, expected one of {AXES}")
    measures = [c for c in table.columns if "@" in c]
    by = list(CORRELATION_GROUPS[axis])
    empty = pd.DataFrame(columns=list(CORRELATION_COLUMNS))
    grouped = (correlate_groups(_group_table(table, axis), "metric_diff", measures, by) if len(table)
               else pd.DataFrame(columns=[*CORRELATION_COLUMNS, "group", *by]))
    pooled_table = one_order(table)
    diff = "metric_diff"
    if axis == "models" and len(pooled_table):
        pooled_table = pooled_table.assign(abs_metric_diff=pooled_table["metric_diff"].abs())
        diff = "abs_metric_diff"
    pooled = correlate(pooled_table, diff, measures) if len(pooled_table) else empty
    with atomic_path(out_csv) as tmp:
        grouped.to_csv(tmp, index=False)
    if out_pooled is not None:
        with atomic_path(out_pooled) as tmp:
            pooled.to_csv(tmp, index=False)
    _scatter(pooled_table, measures, pooled, out_png, axis, diff)
    return grouped


def _scatter(table: pd.DataFrame, measures: Sequence[str], stats: pd.DataFrame, out_png: PathLike,
             axis: str = "", diff: str = "metric_diff") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(measures))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    by_measure = stats.set_index("measure") if len(stats) else None
    for ax, measure in zip(axes.flat, measures):
        sub = table[[diff, measure]].dropna()
        ax.scatter(sub[measure], sub[diff], s=12, alpha=0.7)
        if len(sub) >= 2 and sub[measure].nunique() > 1:
            slope, icept = np.polyfit(sub[measure], sub[diff], 1)
            xs = np.linspace(sub[measure].min(), sub[measure].max(), 20)
            ax.plot(xs, slope * xs + icept, color="C3")
        title = measure
        if by_measure is not None and measure in by_measure.index:
            rho = by_measure.loc[measure, "spearman_rho"]
            title += f"\nrho={rho:.2f} (n={int(by_measure.loc[measure, 'n'])})" if np.isfinite(rho) else "\nrho=n/a"
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylabel("|metric A - metric B|" if diff == "abs_metric_diff" else "metric A - metric B", fontsize=7)
    for ax in list(axes.flat)[len(measures):]:
        ax.axis("off")
    if not measures:
        axes[0][0].text(0.5, 0.5, "no pairs on this axis", ha="center", va="center")
    fig.tight_layout()
    if axis:  # above the panels (the tight bounding box makes room)
        fig.suptitle(f"{axis} axis: all pairs pooled, one order per pair", fontsize=9, y=1.0, va="bottom")
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def rho_matrix(pooled: pd.DataFrame) -> pd.DataFrame:
    """Pooled correlations (measure column ``<name>@<block>``) as a measure x
    block table of Spearman's rho (NaN where undefined or absent)."""
    if pooled.empty:
        return pd.DataFrame()
    split = pooled["measure"].astype(str).str.rsplit("@", n=1, expand=True)
    frame = pd.DataFrame({"measure": split[0].str.replace("_mean", "", regex=False),
                          "block": split[1].astype(int), "rho": pd.to_numeric(pooled["spearman_rho"])})
    known = [m.replace("_mean", "") for m in (*PATTERN_MEASURES, *FEATURE_MEASURES)]
    present = list(dict.fromkeys(frame["measure"]))
    order = [m for m in known if m in present] + [m for m in present if m not in known]
    wide = frame.pivot_table(index="measure", columns="block", values="rho", aggfunc="first", dropna=False)
    return wide.reindex(index=order).sort_index(axis=1)


def rho_heatmap(pooled_csvs: Mapping[str, PathLike], out_png: PathLike, title: str = "") -> dict:
    """One compact figure: per axis a measure x block heatmap of the pooled
    Spearman rho between the metric difference and each measure (diverging
    colours, -1 blue .. +1 red, the value written in each cell, blank where
    undefined); all panels share the rows, columns and colour scale. Returns
    {axis: rho_matrix}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = {axis: rho_matrix(pd.read_csv(path)) for axis, path in pooled_csvs.items()}
    known = [m.replace("_mean", "") for m in (*PATTERN_MEASURES, *FEATURE_MEASURES)]
    present = list(dict.fromkeys(m for mat in mats.values() for m in mat.index))
    rows = [m for m in known if m in present] + [m for m in present if m not in known]
    cols = sorted({b for mat in mats.values() for b in mat.columns})
    n = max(1, len(mats))
    width = 0.75 + 0.5 * max(1, len(cols))
    fig, axes = plt.subplots(1, n, figsize=(width * n + 2.2, 0.3 * max(2, len(rows)) + 1.3),
                             squeeze=False, sharey=True)
    image = None
    for k, (ax, (axis, mat)) in enumerate(zip(axes.flat, mats.items())):
        ax.set_title(axis, fontsize=9)
        if not rows:
            ax.text(0.5, 0.5, "no pairs", ha="center", va="center", fontsize=8)
            ax.axis("off")
            continue
        values = mat.reindex(index=rows, columns=cols).to_numpy(dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(cols)), [str(b) for b in cols], fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.tick_params(axis="y", labelleft=k == 0)
        ax.set_xlabel("block", fontsize=7)
        if mat.empty:
            ax.text(len(cols) / 2 - 0.5, len(rows) / 2 - 0.5, "no pairs", ha="center", va="center", fontsize=8)
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 else "black")
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), fraction=0.04, pad=0.02, label="Spearman rho")
    fig.suptitle(f"{title + ': ' if title else ''}rho(metric A - metric B, measure), pairs pooled per axis "
                 "(models: |metric A - metric B|)", fontsize=9)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return mats


def token_stats(summary_csv: PathLike, dataset: str, eval_dir: PathLike, depth_of: Mapping[str, int],
                out_json: PathLike, out_png: PathLike) -> dict:
    """Token statistics of every run of `dataset` (accuracy, reduction rate
    per stage, token depth and its per-patch heatmap); depth_of maps a
    backbone name to its number of blocks. Writes JSON and a figure of the
    depth heatmaps of the pruning-type runs."""
    summary = pd.read_csv(summary_csv)
    runs = summary[summary["dataset"] == dataset]
    stats = {}
    for row in runs.to_dict("records"):
        name = run_name(row)
        pat = _load(Path(eval_dir), name, "patterns.npz")
        grid = tuple(int(v) for v in pat["grid"]) if "grid" in pat else None
        s = token_statistics(pat, depth_of[row["backbone"]], grid=grid, name=name)
        stats[name] = {"metric": float(row["metric"]), "method": row["method"], "backbone": row["backbone"],
                       "capacity": row["capacity"], "keep_rate": float(row["keep_rate"]),
                       "depth": int(depth_of[row["backbone"]]), **s}
    write_json(out_json, stats)
    _depth_figure(stats, out_png)
    return stats


def _depth_figure(stats: Mapping[str, dict], out_png: PathLike) -> None:
    """Depth heatmaps of the pruning-type runs on one shared colour scale
    (0 .. the deepest model's depth) with one colour bar, so panels compare
    by eye."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {k: v for k, v in stats.items() if v["prune_like"] and v["stage_blocks"]}
    n = max(1, len(shown))
    cols = min(6, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols + 0.9, 2.3 * rows + 0.4), squeeze=False)
    vmin, vmax = depth_scale(shown)
    image = None
    for ax, (name, s) in zip(axes.flat, shown.items()):
        image = ax.imshow(np.asarray(s["depth_map_mean"], dtype=float), cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_title("\n".join(name.split("/")[1:4]), fontsize=7)
        ax.axis("off")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), fraction=0.03, pad=0.02, label="mean token depth (block)")
    else:
        axes[0][0].text(0.5, 0.5, "no pruning-type runs", ha="center", va="center", fontsize=8)
    fig.suptitle("mean token depth per patch (block at which a patch is dropped)", fontsize=9)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def depth_scale(stats: Mapping[str, dict]) -> tuple:
    """(vmin, vmax) shared by every depth heatmap: 0 and the largest model
    depth among the runs (the depth of a patch never dropped)."""
    depths = [int(s.get("depth", 0)) for s in stats.values()]
    finite = [float(np.nanmax(s["depth_map_mean"])) for s in stats.values()
              if np.isfinite(np.asarray(s["depth_map_mean"], dtype=float)).any()]
    vmax = max(depths + finite + [1.0])
    return 0.0, float(vmax)


def compare_heatmaps(token_stats_files: Sequence[PathLike], out_csv: PathLike,
                     kl_base: float = DEFAULT_KL_BASE) -> pd.DataFrame:
    """Global pruning patterns compared with the saliency metrics (KLD12,
    KLD21, JSD, PCC, SCC, EMD, SIM): the same method, capacity and keep rate
    across datasets, and within each dataset across keep rates, capacities
    and methods. Only runs whose depth map is defined (pruning-type,
    K-Medoids / DPC-KNN by their centres) count. KL and JS in log base
    ``kl_base`` (the study's: 2)."""
    entries = []
    for path in token_stats_files:
        for name, s in json.loads(Path(path).read_text()).items():
            if s["prune_like"] and s["stage_blocks"]:
                entries.append((name, s))
    rows = []
    for i, (name_a, a) in enumerate(entries):
        for name_b, b in entries[i + 1:]:
            relation = _relation(name_a, a, name_b, b)
            if relation is None:
                continue
            metrics = heatmap_metrics(np.asarray(a["depth_map_mean"]), np.asarray(b["depth_map_mean"]), kl_base)
            rows.append({"comparison": relation, "run_a": name_a, "run_b": name_b, **metrics})
    out = pd.DataFrame(rows, columns=["comparison", "run_a", "run_b", "KLD12", "KLD21", "JSD", "PCC", "SCC", "EMD", "SIM"])
    with atomic_path(out_csv) as tmp:
        out.to_csv(tmp, index=False)
    return out


def _relation(name_a: str, a: dict, name_b: str, b: dict):
    same = {k: a[k] == b[k] for k in ("method", "capacity", "keep_rate")}
    dataset_a, dataset_b = name_a.split("/")[0], name_b.split("/")[0]
    if np.asarray(a["depth_map_mean"]).shape != np.asarray(b["depth_map_mean"]).shape:
        return None
    if dataset_a != dataset_b:
        return "datasets" if all(same.values()) else None
    if same["method"] and same["capacity"]:
        return "rates"
    if same["method"] and same["keep_rate"]:
        return "capacity"
    if same["capacity"] and same["keep_rate"]:
        return "models"
    return None
