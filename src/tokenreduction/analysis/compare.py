"""Library-level drivers of the comparison stage: what the analysis rules call.

Per-run inputs, as the evaluation stage writes them (``load_npz`` reads
either into a dict; any mapping with these keys works):

``patterns.npz``
    stage_blocks (S,) int: block index of each reduction stage;
    composed (S, N_img, P) int: for each original patch its token index after
    stage s, -1 once dropped; kind: str scalar prune / merge / soft / none;
    image_ids (N_img,) str.
``cls_features.npz``
    blocks (K,) int; features (K, N_img, D) float; image_ids (N_img,) str.

Two runs are compared over the images they share by id: the id sets must be
equal (order may differ; B is reordered to A's order), otherwise a ValueError
names both runs. Stages / blocks are matched by block index; only the blocks
both runs have are compared (no common block -> an empty table).

Which pattern comparison applies (the study's split, simplified):

* IoU of kept patches when both runs are *prune-like*: kind ``prune``, a
  composed assignment with dropped (-1) patches, or a run that records its
  kept tokens (``kept`` (S, N_img, P) bool in ``patterns.npz``: the evaluator
  writes it for K-Medoids and DPC-KNN, whose cluster *centres* the study
  counted as kept tokens). Kept = ``kept`` when recorded, else the patch
  survives as a token of its own (``patterns.kept_patches``; EViT's fused
  patches count as dropped, as in the study).
* Cluster agreement when both are *merge-like* (kind ``merge`` or ``soft``;
  soft methods by their argmax assignment); NMI = V-measure. The argument
  order of sklearn's ``homogeneity_completeness_v_measure(labels_true,
  labels_pred)`` is the study's per axis (:data:`HC_TRUE`): capacity and
  models pass (A, B), rates (B, A); swapping it swaps homogeneity and
  completeness.
"""
from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ._arrays import as_numpy
from .patterns import _grid_shape, cluster_agreement, count_tokens, kept_iou, kept_patches, token_depth_from_kept, token_depth_map
from .similarity import DEFAULT_RTOL, FEATURE_METRICS, feature_similarities, feature_similarities_both

PATTERN_KINDS = ("prune", "merge", "soft", "none")
CAPACITY_ORDER = ("tiny", "small", "base", "large", "huge", "giant")
PATTERN_COLUMNS = (
    "block", "stage_a", "stage_b", "n_images",
    "IoU_mean", "IoU_std",
    "Homogeneity_mean", "Homogeneity_std", "Completeness_mean", "Completeness_std",
    "NMI_mean", "NMI_std", "ARI_mean", "ARI_std",
)
FEATURE_COLUMNS = ("block", "n_images", *FEATURE_METRICS)
AXES = ("rates", "capacity", "models")
#: which run's clustering is sklearn's ``labels_true`` on each axis (the
#: study: ``homogeneity_completeness_v_measure(cluster1, cluster2)`` for
#: capacity and models, ``(cluster2, cluster1)`` for rates)
HC_TRUE = {"rates": "b", "capacity": "a", "models": "a"}
#: the keep rate whose runs the models axis also pairs with the unreduced
#: baseline (keep rate 1.0), as the study's models tables did
BASELINE_PAIR_RATE = 0.9


def load_npz(path) -> dict:
    """Every array of an .npz file in a dict (string scalars such as ``kind``
    as Python str)."""
    with np.load(path, allow_pickle=False) as f:
        out = {k: f[k] for k in f.files}
    for k, v in out.items():
        if v.ndim == 0 and v.dtype.kind in "US":
            out[k] = str(v.item().decode() if isinstance(v.item(), bytes) else v.item())
    return out


def _field(run: Mapping, key: str, name: str):
    try:
        return run[key]
    except KeyError:
        raise ValueError(f"run {name!r} has no {key!r} entry (keys: {sorted(run.keys())})") from None


def _kind(patterns: Mapping, name: str) -> str:
    kind = np.asarray(_field(patterns, "kind", name)).item()
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind not in PATTERN_KINDS:
        raise ValueError(f"run {name!r}: unknown pattern kind {kind!r}, expected one of {PATTERN_KINDS}")
    return kind


def _ids(run: Mapping, name: str, count: int) -> np.ndarray:
    ids = np.asarray(_field(run, "image_ids", name)).astype(str)
    if ids.ndim != 1 or ids.size != count:
        raise ValueError(f"run {name!r}: image_ids has shape {ids.shape}, expected ({count},)")
    return ids


def align_images(ids_a, ids_b, names: Sequence[str] = ("A", "B")) -> np.ndarray:
    """(N,) ids of A, (N,) ids of B -> (N,) int index into B such that
    ``ids_b[index] == ids_a``. ValueError naming both runs when the id sets
    differ or contain duplicates."""
    a, b = np.asarray(ids_a).astype(str), np.asarray(ids_b).astype(str)
    for ids, name in ((a, names[0]), (b, names[1])):
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"run {name!r} has duplicate image ids, e.g. {uniq[counts > 1][:3].tolist()}")
    only_a, only_b = np.setdiff1d(a, b), np.setdiff1d(b, a)
    if only_a.size or only_b.size:
        raise ValueError(
            f"runs {names[0]!r} and {names[1]!r} cover different images: {only_a.size} ids only in "
            f"{names[0]!r} (e.g. {only_a[:3].tolist()}), {only_b.size} only in {names[1]!r} "
            f"(e.g. {only_b[:3].tolist()})"
        )
    order = np.argsort(b, kind="stable")
    return order[np.searchsorted(b[order], a)]


def _patterns(p: Mapping, name: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    kind = _kind(p, name)
    blocks = np.asarray(_field(p, "stage_blocks", name)).astype(np.int64).reshape(-1)
    composed = as_numpy(_field(p, "composed", name)).astype(np.int64, copy=False)
    if composed.ndim != 3 or composed.shape[0] != blocks.size:
        raise ValueError(
            f"run {name!r}: composed must be (S, N_img, P) with S = {blocks.size} stages, got {composed.shape}"
        )
    return kind, blocks, composed, _ids(p, name, composed.shape[1])


def is_prune_like(kind: str, composed, kept=None) -> bool:
    """Prune-like pattern: kind 'prune', some patch is dropped (-1), or the
    run records its kept tokens (``kept``: K-Medoids / DPC-KNN centres)."""
    return kind == "prune" or kept is not None or bool((as_numpy(composed) < 0).any())


def kept_mask(patterns: Mapping, composed: np.ndarray, name: str = "run") -> np.ndarray:
    """(S, N_img, P) bool kept patches of a run: its recorded ``kept`` array
    (cluster centres) when present, else ``patterns.kept_patches(composed)``."""
    kept = patterns.get("kept") if hasattr(patterns, "get") else None
    if kept is None:
        return kept_patches(composed)
    kept = as_numpy(kept).astype(bool)
    if kept.shape != composed.shape:
        raise ValueError(f"run {name!r}: kept has shape {kept.shape}, expected {composed.shape} like composed")
    return kept


def is_merge_like(kind: str) -> bool:
    """Merge-like pattern: kind 'merge' or 'soft'."""
    return kind in ("merge", "soft")


def _common_blocks(blocks_a: np.ndarray, blocks_b: np.ndarray) -> list[tuple[int, int, int]]:
    """(block, stage in A, stage in B) for the blocks both have, A's order."""
    pos_b = {int(b): j for j, b in enumerate(blocks_b)}
    return [(int(b), i, pos_b[int(b)]) for i, b in enumerate(blocks_a) if int(b) in pos_b]


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x))


def compare_patterns(patterns_a: Mapping, patterns_b: Mapping, names: Sequence[str] = ("A", "B"),
                     hc_true: str = "b") -> pd.DataFrame:
    """Per-stage comparison of two runs' reduction patterns.

    One row per block both runs reduce at: block, stage_a, stage_b (stage
    indices), n_images, then mean and population std over images of IoU
    (both prune-like), Homogeneity, Completeness, NMI (= V-measure) and ARI
    (both merge-like); NaN where a comparison does not apply. Columns:
    ``PATTERN_COLUMNS``. hc_true: "a" or "b", the run whose clustering is
    sklearn's ``labels_true`` (the study's order per axis: :data:`HC_TRUE`).
    """
    if hc_true not in ("a", "b"):
        raise ValueError(f"hc_true must be 'a' or 'b', got {hc_true!r}")
    kind_a, blocks_a, comp_a, ids_a = _patterns(patterns_a, names[0])
    kind_b, blocks_b, comp_b, ids_b = _patterns(patterns_b, names[1])
    if comp_a.shape[2] != comp_b.shape[2]:
        raise ValueError(
            f"runs {names[0]!r} and {names[1]!r} have different patch counts: {comp_a.shape[2]} vs {comp_b.shape[2]}"
        )
    index_b = align_images(ids_a, ids_b, names)
    kept_a = kept_mask(patterns_a, comp_a, names[0])
    kept_b = kept_mask(patterns_b, comp_b, names[1])[:, index_b]
    comp_b = comp_b[:, index_b]
    prune = is_prune_like(kind_a, comp_a, patterns_a.get("kept")) and is_prune_like(kind_b, comp_b, patterns_b.get("kept"))
    merge = is_merge_like(kind_a) and is_merge_like(kind_b)
    rows = []
    for block, sa, sb in _common_blocks(blocks_a, blocks_b):
        row = dict.fromkeys(PATTERN_COLUMNS, np.nan)
        row.update(block=block, stage_a=sa, stage_b=sb, n_images=int(comp_a.shape[1]))
        if prune:
            row["IoU_mean"], row["IoU_std"] = _mean_std(kept_iou(kept_a[sa], kept_b[sb]))
        if merge:
            true, pred = (comp_a[sa], comp_b[sb]) if hc_true == "a" else (comp_b[sb], comp_a[sa])
            agree = cluster_agreement(true, pred)
            for col, key in (("Homogeneity", "homogeneity"), ("Completeness", "completeness"),
                             ("NMI", "v_measure"), ("ARI", "ari")):
                row[f"{col}_mean"], row[f"{col}_std"] = _mean_std(agree[key])
        rows.append(row)
    return pd.DataFrame(rows, columns=list(PATTERN_COLUMNS))


def _features(f: Mapping, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blocks = np.asarray(_field(f, "blocks", name)).astype(np.int64).reshape(-1)
    feats = as_numpy(_field(f, "features", name))
    if feats.ndim != 3 or feats.shape[0] != blocks.size:
        raise ValueError(
            f"run {name!r}: features must be (K, N_img, D) with K = {blocks.size} blocks, got {feats.shape}"
        )
    return blocks, feats, _ids(f, name, feats.shape[1])


def compare_features(feats_a: Mapping, feats_b: Mapping, names: Sequence[str] = ("A", "B"),
                     rtol: float = DEFAULT_RTOL, pwcca: str = "study") -> pd.DataFrame:
    """Per-block similarity of two runs' CLS features (``feature_similarities``
    on the (D, N_img) matrices). One row per block both runs have: block,
    n_images, PWCCA, MeanSqCCA, MeanCCA, LinCKA, LinCKAPrime, Procrustes.
    PWCCA is weighted by A (``pwcca``: "study" or "paired" normalisation);
    the CCA measures are NaN, with a warning, when N_img <= D_A + D_B."""
    blocks_a, fa, ids_a = _features(feats_a, names[0])
    blocks_b, fb, ids_b = _features(feats_b, names[1])
    index_b = align_images(ids_a, ids_b, names)
    rows = []
    for block, ka, kb in _common_blocks(blocks_a, blocks_b):
        sims = feature_similarities(fa[ka].T, fb[kb][index_b].T, rtol=rtol, pwcca=pwcca)
        rows.append({"block": block, "n_images": int(fa.shape[1]), **sims})
    return pd.DataFrame(rows, columns=list(FEATURE_COLUMNS))


def compare_patterns_both(patterns_a: Mapping, patterns_b: Mapping, names: Sequence[str] = ("A", "B"),
                          hc_true: str = "b") -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(compare_patterns(A, B), compare_patterns(B, A))`` with the same
    ``hc_true``, each pair of stages compared once: IoU, NMI and ARI are
    symmetric, and swapping the two runs swaps sklearn's ``labels_true`` and
    ``labels_pred``, hence Homogeneity and Completeness. The mirrored table
    lists B's stages in B's order. Equal to the two calls up to floating-point
    round-off (the per-image means are taken over the images in A's order)."""
    ab = compare_patterns(patterns_a, patterns_b, names=names, hc_true=hc_true)
    ba = ab.rename(columns={"stage_a": "stage_b", "stage_b": "stage_a",
                            **{f"Homogeneity_{s}": f"Completeness_{s}" for s in ("mean", "std")},
                            **{f"Completeness_{s}": f"Homogeneity_{s}" for s in ("mean", "std")}})
    ba = ba.sort_values("stage_a", kind="stable")[list(PATTERN_COLUMNS)].reset_index(drop=True)
    return ab, ba


def compare_features_both(feats_a: Mapping, feats_b: Mapping, names: Sequence[str] = ("A", "B"),
                          rtol: float = DEFAULT_RTOL, pwcca: str = "study") -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(compare_features(A, B), compare_features(B, A))`` for about the cost
    of one (``feature_similarities_both``: the symmetric metrics once, PWCCA
    both ways). The mirrored table lists the blocks in B's order. Equal to the
    two calls up to floating-point round-off."""
    blocks_a, fa, ids_a = _features(feats_a, names[0])
    blocks_b, fb, ids_b = _features(feats_b, names[1])
    index_b = align_images(ids_a, ids_b, names)
    rows_ab, rows_ba = [], []
    for block, ka, kb in _common_blocks(blocks_a, blocks_b):
        ab, ba = feature_similarities_both(fa[ka].T, fb[kb][index_b].T, rtol=rtol, pwcca=pwcca)
        rows_ab.append({"block": block, "n_images": int(fa.shape[1]), **ab})
        rows_ba.append((kb, {"block": block, "n_images": int(fa.shape[1]), **ba}))
    rows_ba = [row for _, row in sorted(rows_ba, key=lambda kr: kr[0])]
    return (pd.DataFrame(rows_ab, columns=list(FEATURE_COLUMNS)),
            pd.DataFrame(rows_ba, columns=list(FEATURE_COLUMNS)))


def token_statistics(patterns: Mapping, depth: int, grid=None, name: str = "run") -> dict:
    """Token statistics of one run (the study's ``compute_token_statistics``).

    depth: the model's number of blocks (a patch kept to the end has depth
    ``depth``); grid: (h, w) of the patch grid (default square).

    Returns a dict:
      kind (str), stage_blocks (list of int), prune_like (bool),
      reduction_mean, reduction_std: (S,) mean / std over images of the
        fraction of the P patches' tokens alive after each stage (kept patches
        for prune-like runs, distinct tokens otherwise);
      mean_depth, std_depth: token depth over all images and patches;
      depth_map_mean, depth_map_std: (h, w) per-patch mean / std over images
        (the study's depth heatmap). Token depth is the block of the stage at
        which the patch stops being kept (``depth`` if never); it is defined for
        prune-like runs (including K-Medoids / DPC-KNN runs that record their
        centres as ``kept``) and runs without stages (kind 'none': ``depth``
        everywhere); NaN otherwise.
    """
    kind, blocks, composed, _ = _patterns(patterns, name)
    S, n_img, P = composed.shape
    if n_img == 0:
        raise ValueError(f"run {name!r} has no images")
    if blocks.size and int(blocks.max()) >= depth:
        raise ValueError(f"run {name!r}: stage block {int(blocks.max())} is beyond the model depth {depth}")
    prune = is_prune_like(kind, composed, patterns.get("kept"))
    kept = kept_mask(patterns, composed, name)
    alive = kept.sum(axis=-1) if prune else count_tokens(composed)  # (S, N_img)
    frac = alive / P
    h, w = _grid_shape(P, grid)
    out = {
        "kind": kind,
        "stage_blocks": [int(b) for b in blocks],
        "prune_like": prune,
        "reduction_mean": frac.mean(axis=1) if S else np.zeros(0),
        "reduction_std": frac.std(axis=1) if S else np.zeros(0),
    }
    if prune or S == 0:
        d = token_depth_from_kept(kept, blocks, depth)
        out["mean_depth"], out["std_depth"] = float(d.mean()), float(d.std())
        out["depth_map_mean"], out["depth_map_std"] = token_depth_map(d, (h, w))
    else:
        out["mean_depth"] = out["std_depth"] = float("nan")
        out["depth_map_mean"] = np.full((h, w), np.nan)
        out["depth_map_std"] = np.full((h, w), np.nan)
    return out


def _capacity_rank(capacity, order: Sequence[str]) -> int:
    try:
        return list(order).index(str(capacity))
    except ValueError:
        raise ValueError(f"unknown capacity {capacity!r}: expected one of {list(order)}") from None


def pairs(runs: pd.DataFrame, axis: str, symmetric: bool | None = None,
          capacity_order: Sequence[str] = CAPACITY_ORDER, match: Sequence[str] = (),
          baseline_rate: float | None = BASELINE_PAIR_RATE) -> pd.DataFrame:
    """Comparison pairs of runs along one axis of the study.

    runs: one row per run with columns run (unique name), method, capacity,
    keep_rate, dataset; any other column (e.g. metric) is carried along.
    axis:
      "rates":    same method, capacity, dataset; keep_rate_a > keep_rate_b.
      "capacity": same method, keep rate, dataset; capacity_a larger than
                  capacity_b in ``capacity_order``.
      "models":   same capacity, keep rate, dataset; different methods
                  (method_a < method_b by name). The unreduced runs (keep
                  rate 1.0) are also paired with the runs at keep rate
                  ``baseline_rate`` (the study: 0.9; None: not).
    match: further columns that must be equal within a pair (e.g. the
    reduction locations). symmetric: also list every pair swapped (B, A);
    default True for "models" (the study's models tables hold both orders),
    False otherwise.

    Returns a DataFrame with columns axis, run_a, run_b, then ``<col>_a``,
    ``<col>_b`` for every other column of ``runs``; one row per pair, sorted.
    """
    if axis not in AXES:
        raise ValueError(f"unknown comparison axis {axis!r}, expected one of {AXES}")
    required = ["run", "method", "capacity", "keep_rate", "dataset", *match]
    missing = [c for c in required if c not in runs.columns]
    if missing:
        raise ValueError(f"runs table lacks columns {missing}; it has {list(runs.columns)}")
    if runs["run"].duplicated().any():
        raise ValueError(f"duplicate run names: {runs['run'][runs['run'].duplicated()].tolist()}")
    if symmetric is None:
        symmetric = axis == "models"
    table = runs.reset_index(drop=True).copy()
    table["_rate"] = pd.to_numeric(table["keep_rate"], errors="raise").astype(float).round(9)
    keys = {
        "rates": ["method", "capacity", "dataset"],
        "capacity": ["method", "_rate", "dataset"],
        "models": ["capacity", "_rate", "dataset"],
    }[axis] + list(match)
    if axis == "capacity":
        table["_cap"] = [_capacity_rank(c, capacity_order) for c in table["capacity"]]
    if axis == "models" and baseline_rate is not None:
        extra = table[table["_rate"] == 1.0].copy()
        extra["_rate"] = round(float(baseline_rate), 9)
        table = pd.concat([table, extra], ignore_index=True)

    def ordered(a: pd.Series, b: pd.Series) -> bool:
        if axis == "rates":
            return a["_rate"] > b["_rate"]
        if axis == "capacity":
            return a["_cap"] > b["_cap"]
        return str(a["method"]) < str(b["method"])

    found, seen = [], set()
    for _, group in table.groupby(keys, sort=True, dropna=False):
        for i, j in itertools.permutations(range(len(group)), 2):
            a, b = group.iloc[i], group.iloc[j]
            if ordered(a, b) and (a["run"], b["run"]) not in seen:
                seen.add((a["run"], b["run"]))
                found.append((a, b))
                if symmetric:
                    found.append((b, a))
    carried = [c for c in runs.columns if c != "run"]
    columns = ["axis", "run_a", "run_b"] + [f"{c}_{s}" for c in carried for s in ("a", "b")]
    rows = []
    for a, b in found:
        row = {"axis": axis, "run_a": a["run"], "run_b": b["run"]}
        for c in carried:
            row[f"{c}_a"], row[f"{c}_b"] = a[c], b[c]
        rows.append(row)
    out = pd.DataFrame(rows, columns=columns)
    return out.sort_values(["run_a", "run_b"], kind="stable").reset_index(drop=True)
