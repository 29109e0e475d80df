"""Pictures of what a reduction method did, drawn from composed assignments.

A composed assignment (:func:`tokenreduction.compose_assignments`) says, for
every original patch, which token it belongs to after a stage (-1 once it was
dropped). Drawn over the image:

* **pruned** patches are blacked out (with thin grey diagonals, so that they
  stand apart from dark image content);
* **merged** groups (two or more patches in one token: ToMe, ATC, K-Medoids,
  EViT's fused token, the argmax of soft methods) are tinted with one colour
  per group and outlined in white;
* patches that kept a token of their own are shown as they are.

A group keeps its colour from stage to stage (the colour of its
lowest-numbered patch), so a reader follows a cluster as it grows.

* :func:`pattern_image`: the overlay of one stage as an RGB array (pure numpy).
* :func:`plot_stages`: one image, one panel per stage (a matplotlib Figure).
* :func:`visualize`: run a model on an image and plot its stages.
* :func:`pattern_grid`: the same images for many runs, one row per run and
  one column per image and stage; the DAG's ``pattern_grid`` rule draws it
  per dataset from the evaluation's ``patterns.npz``.
"""
from __future__ import annotations

import colorsys
from typing import Optional, Sequence, Union

import numpy as np
import torch

PRUNED_COLOR = (0.0, 0.0, 0.0)
HATCH_COLOR = (0.4, 0.4, 0.4)
HATCH_PERIOD = 5
BORDER_COLOR = (1.0, 1.0, 1.0)


def group_colors(num: int) -> np.ndarray:
    """(num, 3) distinct saturated RGB colours in [0, 1] (hues spaced by the
    golden ratio, two brightness levels alternating)."""
    out = np.empty((num, 3), dtype=np.float64)
    for i in range(num):
        hue = (i * 0.618033988749895) % 1.0
        out[i] = colorsys.hsv_to_rgb(hue, 0.85, 1.0 if i % 2 == 0 else 0.75)
    return out


def _as_rgb(image: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """(H, W, 3) float in [0, 1] from an (H, W, 3) or (3, H, W) array or tensor
    (uint8 0..255 or float 0..1), or an (H, W) grey image."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    is_int = np.issubdtype(arr.dtype, np.integer)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (H, W, 3), (3, H, W) or (H, W), got shape {tuple(np.shape(image))}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr.astype(np.float64)
    if is_int:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def _patch_labels(where: np.ndarray, grid: Sequence[int], height: int, width: int) -> np.ndarray:
    """(H, W) label of the patch under each pixel."""
    h, w = int(grid[0]), int(grid[1])
    rows = np.minimum(np.arange(height) * h // height, h - 1)
    cols = np.minimum(np.arange(width) * w // width, w - 1)
    return where.reshape(h, w)[rows[:, None], cols[None, :]]


def pattern_image(
    image: Union[np.ndarray, torch.Tensor],
    where: Union[np.ndarray, torch.Tensor],
    grid: Sequence[int],
    alpha: float = 0.55,
    scale: int = 1,
    colors: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Overlay of one stage's pattern on `image`.

    image: (H, W, 3) or (3, H, W), uint8 or float in [0, 1]; where: (P,) the
    token of each of the P = h*w patches after the stage, -1 if dropped
    (one row of a composed assignment); grid: (h, w). `scale` enlarges the
    image (nearest) first so borders stay thin next to the patches.
    Returns (H*scale, W*scale, 3) float in [0, 1].
    """
    rgb = _as_rgb(image)
    where = np.asarray(where.detach().cpu() if isinstance(where, torch.Tensor) else where).astype(np.int64).reshape(-1)
    h, w = int(grid[0]), int(grid[1])
    if where.size != h * w:
        raise ValueError(f"the pattern has {where.size} patches but the grid {h}x{w} has {h * w}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    H, W, _ = rgb.shape
    if colors is None:
        colors = group_colors(h * w)

    # group of each patch: its token; merged = shared with another patch
    tokens, first, counts = np.unique(where, return_index=True, return_counts=True)
    merged_token = {int(t): int(f) for t, f, c in zip(tokens, first, counts) if t >= 0 and c > 1}
    patch_color = np.zeros((h * w, 3))
    patch_merged = np.zeros(h * w, dtype=bool)
    for token, first_patch in merged_token.items():
        members = where == token
        patch_color[members] = colors[first_patch % len(colors)]
        patch_merged[members] = True

    labels = _patch_labels(where, (h, w), H, W)
    index = _patch_labels(np.arange(h * w), (h, w), H, W)
    tint = patch_merged[index][..., None]
    out = np.where(tint, (1.0 - alpha) * rgb + alpha * patch_color[index], rgb)
    pruned = labels < 0
    out[pruned] = PRUNED_COLOR
    # thin grey diagonals tell a pruned patch from dark image content
    ys, xs = np.indices((H, W))
    out[pruned & ((ys + xs) % HATCH_PERIOD == 0)] = HATCH_COLOR

    # borders: where the token changes between neighbouring pixels and one side is a merged group
    merged_px = patch_merged[index]
    edge = np.zeros((H, W), dtype=bool)
    diff_v = (labels[1:, :] != labels[:-1, :]) & (merged_px[1:, :] | merged_px[:-1, :])
    diff_h = (labels[:, 1:] != labels[:, :-1]) & (merged_px[:, 1:] | merged_px[:, :-1])
    edge[1:, :] |= diff_v & merged_px[1:, :]
    edge[:-1, :] |= diff_v & merged_px[:-1, :]
    edge[:, 1:] |= diff_h & merged_px[:, 1:]
    edge[:, :-1] |= diff_h & merged_px[:, :-1]
    out[edge] = BORDER_COLOR
    return out


def _legend_handles():
    from matplotlib.patches import Patch

    return [
        Patch(facecolor=PRUNED_COLOR, edgecolor=HATCH_COLOR, hatch="////", label="pruned patch"),
        Patch(facecolor=group_colors(3)[1], edgecolor=BORDER_COLOR, linewidth=1.5,
              label="merged group (one colour each, white border)"),
        Patch(facecolor="0.85", edgecolor="0.5", label="kept as its own token"),
    ]


def _auto_scale(image_size: int, grid_side: int, target_patch_px: int = 12) -> int:
    patch_px = max(1, image_size // max(1, grid_side))
    return max(1, -(-target_patch_px // patch_px))


def plot_stages(
    image: Union[np.ndarray, torch.Tensor],
    composed: Sequence[Union[np.ndarray, torch.Tensor]],
    grid: Sequence[int],
    blocks: Optional[Sequence[int]] = None,
    title: Optional[str] = None,
    panel_inches: float = 2.2,
):
    """A Figure: the image, then one panel per stage. composed: per stage
    the (P,) token of each patch (one image's composed assignments)."""
    import matplotlib.pyplot as plt

    rgb = _as_rgb(image)
    blocks = list(blocks) if blocks is not None else list(range(len(composed)))
    if len(blocks) != len(composed):
        raise ValueError(f"{len(composed)} stages but {len(blocks)} block numbers")
    scale = _auto_scale(rgb.shape[0], int(grid[0]))
    n = len(composed) + 1
    fig, axes = plt.subplots(1, n, figsize=(panel_inches * n, panel_inches + 0.9), squeeze=False)
    axes = axes[0]
    axes[0].imshow(rgb.repeat(scale, 0).repeat(scale, 1), interpolation="nearest")
    axes[0].set_title("input", fontsize=10)
    for ax, where, block in zip(axes[1:], composed, blocks):
        where = np.asarray(where.detach().cpu() if isinstance(where, torch.Tensor) else where).reshape(-1)
        ax.imshow(pattern_image(rgb, where, grid, scale=scale), interpolation="nearest")
        tokens = len({int(t) for t in where if t >= 0})
        ax.set_title(f"after block {block}\n{tokens} tokens", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    fig.legend(handles=_legend_handles(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def visualize(
    image: Union[torch.Tensor, np.ndarray],
    model: torch.nn.Module,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    title: Optional[str] = None,
):
    """Run `model` (from :func:`tokenreduction.create_model`) on one image and
    plot each reduction stage (:func:`plot_stages`); returns the Figure.

    image: the model's input, (3, H, W) or (1, 3, H, W), normalised with
    `mean`/`std` (default: the model's ``pretrained_cfg``, else ImageNet's);
    it is un-normalised for display.
    """
    from .patterns import model_patterns

    x = torch.as_tensor(image)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"visualize takes one image (3, H, W) or (1, 3, H, W), got {tuple(x.shape)}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406))
    std = std if std is not None else cfg.get("std", (0.229, 0.224, 0.225))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x.to(device))
    finally:
        model.train(was_training)
    state = model.reduction_state
    composed = [c[0].cpu() for c in model_patterns(model)]
    blocks = [s.block for s in state.stages]
    grid = state.grid if getattr(state, "grid", None) else tuple(model.patch_embed.grid_size)
    shown = x[0].float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    method = (getattr(model, "reduction_config", None) or {}).get("method") or "no reduction"
    return plot_stages(shown.clamp(0, 1), composed, grid, blocks, title=title or method)


def _cell_pixels(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> uint8, what a grid cell keeps: the figure
    holds every cell's array until it is saved, and float64 ones took 10 GB
    for a CLCA dataset's 160 runs at 448 px (benchmarks/pattern_grid_memory.py)."""
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def pattern_grid(
    images: Union[np.ndarray, Sequence[np.ndarray]],
    rows: Sequence[dict],
    grid: Sequence[int],
    title: Optional[str] = None,
    cell_inches: float = 1.1,
):
    """One figure for many runs on the same images.

    images: N images (H, W, 3); rows: one dict per run with ``label`` (str),
    ``blocks`` (S,) and ``composed`` (S, N, P) (``patterns.npz``'s arrays for
    those N images). Columns: for each image its input, then its S stages;
    rows with fewer stages leave cells empty. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    imgs = [_as_rgb(im) for im in images]
    if not imgs or not rows:
        raise ValueError("pattern_grid needs at least one image and one run")
    stages = max(len(r["blocks"]) for r in rows)
    per_image = 1 + stages
    ncols = len(imgs) * per_image
    nrows = len(rows)
    scale = _auto_scale(imgs[0].shape[0], int(grid[0]))
    label_inches = 2.2
    fig_w = label_inches + cell_inches * ncols
    fig_h = 1.1 + cell_inches * nrows + 0.5
    fig, axes = plt.subplots(nrows, ncols, figsize=(fig_w, fig_h), squeeze=False)
    for i, row in enumerate(rows):
        composed = np.asarray(row["composed"])
        blocks = list(row["blocks"])
        if composed.ndim != 3 or composed.shape[0] != len(blocks) or composed.shape[1] < len(imgs):
            raise ValueError(
                f"run {row['label']!r}: composed must be (stages={len(blocks)}, images>={len(imgs)}, patches), "
                f"got {composed.shape}"
            )
        for j, rgb in enumerate(imgs):
            base = j * per_image
            ax = axes[i, base]
            ax.imshow(_cell_pixels(rgb.repeat(scale, 0).repeat(scale, 1)), interpolation="nearest")
            for s in range(stages):
                ax = axes[i, base + 1 + s]
                if s < len(blocks):
                    ax.imshow(_cell_pixels(pattern_image(rgb, composed[s, j], grid, scale=scale)),
                              interpolation="nearest")
                    if i == 0:
                        ax.set_title(f"image {j + 1}\nblock {blocks[s]}", fontsize=8)
                else:
                    ax.set_visible(False)
            if i == 0:
                axes[i, base].set_title(f"image {j + 1}\ninput", fontsize=8)
        axes[i, 0].set_ylabel(row["label"], rotation=0, ha="right", va="center", fontsize=9, labelpad=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    top = 1.0 - 0.9 / fig_h
    bottom = 0.45 / fig_h
    fig.subplots_adjust(left=label_inches / fig_w, right=0.995, top=top, bottom=bottom, wspace=0.06, hspace=0.12)
    if title:
        fig.suptitle(title, fontsize=12, y=1.0 - 0.15 / fig_h, va="top")
    fig.legend(handles=_legend_handles(), loc="lower center", ncol=3, fontsize=9, frameon=False)
    return fig
