"""Comparing reduction patterns, batched over images (numpy).

Inputs are per-image rows over the P original patches, taken from composed
assignments (``tokenreduction.patterns.compose_assignments``): for each
original patch, the index of its token after a stage, -1 once dropped.

* Pruning patterns are compared by the IoU of the kept-patch sets
  (``kept_iou``); ``kept_patches`` reads the kept set from a composed
  assignment.
* Merging patterns are compared as clusterings of the patches
  (``cluster_agreement``): homogeneity, completeness, V-measure (= NMI with
  the arithmetic mean, the study's "NMI") and the adjusted Rand index, all
  from per-image contingency tables built in one sort over all images; they
  equal scikit-learn's per-image values.
* ``token_depth_map`` averages per-patch token depth into a 2-D map.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ._arrays import as_numpy


def _grid_shape(P: int, grid) -> tuple[int, int]:
    if grid is None:
        side = int(round(np.sqrt(P)))
        if side * side != P:
            raise ValueError(f"{P} patches is not a square grid: pass grid=(h, w)")
        return side, side
    h, w = (grid, grid) if np.isscalar(grid) else tuple(int(g) for g in grid)
    if h * w != P:
        raise ValueError(f"grid {h}x{w} does not hold {P} patches")
    return h, w


def kept_patches(composed) -> np.ndarray:
    """(..., P) composed assignment -> (..., P) bool: the patch survives *as a
    token of its own* (index >= 0 and no other patch of the image shares it).

    For plain pruning this is ``composed >= 0``. The singleton condition also
    excludes the patches fused into EViT's extra token, which the study counted
    as dropped (its kept indices discarded the fused token). A fused token that
    holds exactly one patch is indistinguishable from a kept one and counts as
    kept.
    """
    c = as_numpy(composed).astype(np.int64, copy=False)
    if c.ndim < 1:
        raise ValueError("composed assignment needs a patch axis")
    shape = c.shape
    c = c.reshape(-1, shape[-1])
    R, P = c.shape
    if R == 0 or P == 0:
        return np.zeros(shape, dtype=bool)
    width = int(c.max()) + 2  # ids -1 .. max -> 0 .. max+1
    flat = np.arange(R)[:, None] * width + (c + 1)
    counts = np.bincount(flat.ravel(), minlength=R * width)[flat]
    return ((c >= 0) & (counts == 1)).reshape(shape)


def kept_from_centres(centres: Sequence, num_patches: int) -> np.ndarray:
    """Per-stage cluster centres -> (S, B, P) bool kept-patch masks.

    centres: one (B, k_s) int array per stage: the input token of that stage
    behind each output token (K-Medoids' medoids, DPC-KNN's density peaks; the
    study's ``Kept_Token`` of those methods). Chaining them back to the P
    original patches (a stage-s token is the patch its centre chain starts
    from) gives the patches kept as tokens after each stage."""
    masks = []
    current = None  # (B, k) original patch behind each token of the current stage
    for s, c in enumerate(centres):
        c = as_numpy(c).astype(np.int64, copy=False)
        if c.ndim != 2:
            raise ValueError(f"centres of stage {s} must be (B, k), got shape {c.shape}")
        if current is None:
            current = np.broadcast_to(np.arange(num_patches), (c.shape[0], num_patches))
        if c.shape[0] != current.shape[0] or (c.size and (c.min() < 0 or c.max() >= current.shape[1])):
            raise ValueError(f"centres of stage {s} index tokens outside 0..{current.shape[1] - 1}")
        current = np.take_along_axis(current, c, axis=1)
        mask = np.zeros((c.shape[0], num_patches), dtype=bool)
        np.put_along_axis(mask, current, True, axis=1)
        masks.append(mask)
    if not masks:
        return np.zeros((0, 0, num_patches), dtype=bool)
    return np.stack(masks)


def kept_iou(kept_a, kept_b) -> np.ndarray:
    """(B, P) bool, (B, P) bool -> (B,) float64 IoU |a & b| / |a | b| of the
    kept-patch sets per image. Two empty sets give 1.0 (identical patterns)."""
    a = as_numpy(kept_a).astype(bool, copy=False)
    b = as_numpy(kept_b).astype(bool, copy=False)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"kept masks must both be (B, P), got {a.shape} and {b.shape}")
    inter = np.sum(a & b, axis=1)
    union = np.sum(a | b, axis=1)
    out = np.ones(a.shape[0], dtype=np.float64)
    nz = union > 0
    out[nz] = inter[nz] / union[nz]
    return out


def _dense_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """(B, P) int -> (B, P) labels in 0..K-1 (per-row offsets removed) and K."""
    shifted = labels - labels.min(axis=1, keepdims=True)
    return shifted, int(shifted.max()) + 1


def _entropy_from_cells(image: np.ndarray, counts: np.ndarray, n: int, B: int) -> np.ndarray:
    """Per-image entropy (nats) of a distribution given as (image, count) cells."""
    p = counts / n
    return -np.bincount(image, weights=p * np.log(p), minlength=B)


def _cells(keys: np.ndarray, per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique cells of flattened keys image * per_image + cell -> (image, count)."""
    uniq, counts = np.unique(keys, return_counts=True)
    return uniq // per_image, counts


def cluster_agreement(labels_true, labels_pred) -> dict[str, np.ndarray]:
    """Agreement of two clusterings of the same P patches, per image.

    labels_true, labels_pred: (B, P) int cluster ids (any integers; a -1 is a
    cluster like any other). The argument order is scikit-learn's: homogeneity
    = each cluster of ``labels_pred`` holds one class of ``labels_true``;
    swapping the arguments swaps homogeneity and completeness.

    Returns (B,) float64 arrays: ``homogeneity``, ``completeness``,
    ``v_measure`` (= NMI with arithmetic mean), ``ari`` (adjusted Rand index),
    each equal to scikit-learn's value for that image (a single-cluster
    labelling has homogeneity/completeness 1 by its convention).
    """
    a = as_numpy(labels_true)
    b = as_numpy(labels_pred)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"labels must both be (B, P), got {a.shape} and {b.shape}")
    if not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
        raise ValueError(f"labels must be integers, got {a.dtype} and {b.dtype}")
    B, P = a.shape
    if P == 0:
        raise ValueError("labels have no patches")
    la, ka = _dense_labels(a.astype(np.int64))
    lb, kb = _dense_labels(b.astype(np.int64))
    img = np.arange(B, dtype=np.int64)[:, None]
    # contingency cells n_ij, and the marginals, as (image, count) lists
    ij_img, n_ij = _cells(((img * ka + la) * kb + lb).ravel(), ka * kb)
    i_img, n_i = _cells((img * ka + la).ravel(), ka)
    j_img, n_j = _cells((img * kb + lb).ravel(), kb)

    h_true = _entropy_from_cells(i_img, n_i, P, B)
    h_pred = _entropy_from_cells(j_img, n_j, P, B)
    h_joint = _entropy_from_cells(ij_img, n_ij, P, B)
    mi = np.clip(h_true + h_pred - h_joint, 0.0, None)

    tiny = 1e-15  # exact-zero entropy means a single cluster
    single_true, single_pred = h_true <= tiny, h_pred <= tiny
    homogeneity = np.where(single_true, 1.0, mi / np.where(single_true, 1.0, h_true))
    completeness = np.where(single_pred, 1.0, mi / np.where(single_pred, 1.0, h_pred))
    homogeneity, completeness = np.minimum(homogeneity, 1.0), np.minimum(completeness, 1.0)
    hc = homogeneity + completeness
    v_measure = np.where(hc > 0, 2.0 * homogeneity * completeness / np.where(hc > 0, hc, 1.0), 0.0)

    # adjusted Rand index from pair counts (as sklearn's pair confusion matrix)
    sum_sq = np.bincount(ij_img, weights=n_ij.astype(np.float64) ** 2, minlength=B)
    sum_i = np.bincount(i_img, weights=n_i.astype(np.float64) ** 2, minlength=B)
    sum_j = np.bincount(j_img, weights=n_j.astype(np.float64) ** 2, minlength=B)
    tp = sum_sq - P
    fp = sum_j - sum_sq
    fn = sum_i - sum_sq
    tn = float(P) * P - fp - fn - sum_sq
    denom = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    same = (fp == 0) & (fn == 0)
    ari = np.where(same, 1.0, 2.0 * (tp * tn - fn * fp) / np.where(same, 1.0, denom))
    return {"homogeneity": homogeneity, "completeness": completeness, "v_measure": v_measure, "ari": ari}


def token_depth_from_kept(kept, stage_blocks: Sequence[int], depth: int) -> np.ndarray:
    """(S, B, P) bool kept masks per stage, (S,) block of each stage, model
    depth -> (B, P) int64: the block of the first stage at which the patch is
    no longer kept, ``depth`` when it survives every stage (the study's token
    depth; with no stages every patch has ``depth``)."""
    k = as_numpy(kept).astype(bool, copy=False)
    blocks = np.asarray(stage_blocks, dtype=np.int64)
    if k.ndim != 3 or k.shape[0] != blocks.size:
        raise ValueError(f"kept must be (S, B, P) with S = {blocks.size} stages, got {k.shape}")
    if blocks.size == 0:
        return np.full(k.shape[1:], depth, dtype=np.int64)
    dropped = ~k
    any_dropped = dropped.any(axis=0)
    first = dropped.argmax(axis=0)  # first stage where dropped (0 when never)
    return np.where(any_dropped, blocks[first], depth).astype(np.int64)


def token_depth_map(depth, grid=None) -> tuple[np.ndarray, np.ndarray]:
    """(B, P) per-patch token depth -> ((h, w) mean, (h, w) std) over the B
    images (population std, as the study). ``grid``: (h, w) or an int side;
    default a square grid."""
    d = as_numpy(depth, np.float64)
    if d.ndim != 2 or d.shape[0] == 0:
        raise ValueError(f"depth must be (B, P) with B >= 1, got {d.shape}")
    h, w = _grid_shape(d.shape[1], grid)
    return d.mean(axis=0).reshape(h, w), d.std(axis=0).reshape(h, w)


def count_tokens(composed) -> np.ndarray:
    """(..., P) composed assignment -> (...) int64: distinct non-negative token
    ids per row (tokens alive after the stage)."""
    c = np.sort(as_numpy(composed).astype(np.int64, copy=False), axis=-1)
    if c.shape[-1] == 0:
        return np.zeros(c.shape[:-1], dtype=np.int64)
    new = np.ones(c.shape, dtype=bool)
    new[..., 1:] = c[..., 1:] != c[..., :-1]
    return np.sum(new & (c >= 0), axis=-1)
