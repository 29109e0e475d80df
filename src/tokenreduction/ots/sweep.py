"""Off-the-shelf evaluation: one pretrained backbone, one reduction method and
schedule, a sweep of r (tokens removed per block, ToMe-style), no training.

The backbone is built and the validation set opened once; every sweep point
re-patches the same model in place (:func:`tokenreduction.patch_model`) and
passes over the split. Every r is checked before the first point is
evaluated, so an r too large for some block fails at once (ValueError naming
the block and the token count) instead of after hours of evaluation. Blocks
whose r is 0 get no reducer (as ToMe skips them), so r = 0 is the unreduced
model for every method.

Table columns (:data:`COLUMNS`), one row per r:
``backbone family model img_size method reducer schedule r r_per_block top1
top5 gflops throughput throughput_batch params_m tokens_left prop_attn
num_images device``; top1/top5 in %, gflops per image
(:func:`tokenreduction.count_flops`), throughput in images/s on random input
(NaN when not measured), tokens_left the patch tokens after the last block,
r_per_block the schedule as space-separated integers.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..evaluate.evaluate import _resolve_device, measure_throughput
from ..evaluate.metrics import topk_accuracy
from ..io import atomic_path
from ..models.budget import r_schedule as per_block_r
from .presets import BackbonePreset, build_backbone, transform_for

PathLike = Union[str, Path]
COLUMNS = [
    "backbone", "family", "model", "img_size", "method", "reducer", "schedule", "r", "r_per_block", "top1", "top5",
    "gflops", "throughput", "throughput_batch", "params_m", "tokens_left", "prop_attn", "num_images", "device",
]
_NONE = (None, "none", "deit", "baseline")
_LINESTYLES = {"constant": "-", "decrease": "--", "increase": ":"}


def patch_for_r(model: nn.Module, preset: BackbonePreset, method: Optional[str], r: int,
                schedule: Union[str, float], method_kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
    """Patch `model` in place: `method` removing r tokens per block with
    `schedule`, proportional attention as the preset says.

    As in ToMe, a block whose r is 0 does no reduction work at all (no
    similarity computed), so r = 0 is exactly the unreduced model, in accuracy
    and in GFLOPs, whatever the method."""
    from ..models import patch_model

    if method in _NONE:
        return patch_model(model, method=None)
    per_block = per_block_r(int(r), len(model.blocks), schedule)
    locs = [b for b, v in enumerate(per_block) if v > 0]
    if not locs:
        return patch_model(model, method=None)
    return patch_model(
        model, method=method, r=per_block, reduction_loc=locs, prop_attn=preset.prop_attn,
        method_kwargs=method_kwargs,
    )


def sweep(
    preset: BackbonePreset,
    method: Optional[str],
    r_values: Sequence[int],
    r_schedule: Union[str, float] = "constant",
    *,
    dataset: str,
    data_root: PathLike,
    split: str = "val",
    label: Optional[str] = None,
    method_kwargs: Optional[dict[str, Any]] = None,
    batch_size: int = 64,
    throughput_batch: Optional[int] = None,
    device: str = "auto",
    num_workers: int = 0,
    amp: bool = False,
    max_images: Optional[int] = None,
    pretrained: Optional[bool] = None,
    model: Optional[nn.Module] = None,
) -> pd.DataFrame:
    """Evaluate `preset` with `method` at each r of `r_values` on `split` of
    `dataset` (a single-label kind); returns the table (see module doc).

    label names the method in the table (a config variant such as
    ``atc-single``; default the method). throughput_batch 0 skips the
    throughput measurement (None: batch_size). max_images evaluates the
    first images of the split only. `model` replaces the preset's weights
    (an already built plain model, e.g. random weights in tests).
    """
    from ..data import build_dataset
    from ..models import count_flops

    r_values = [int(r) for r in r_values]
    if not r_values:
        raise ValueError("r_values is empty")
    if any(r < 0 for r in r_values):
        raise ValueError(f"r values must be >= 0, got {r_values}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = _resolve_device(device)
    if model is None:
        model = build_backbone(preset, pretrained=pretrained)
    model.to(dev).eval()

    # every point is built once before anything is evaluated: bad r fail here
    for r in r_values:
        try:
            patch_for_r(model, preset, method, r, r_schedule, method_kwargs)
        except ValueError as err:
            raise ValueError(f"backbone {preset.name}, method {label or method}, r={r} ({r_schedule}): {err}") from err

    ds = build_dataset(dataset, data_root, split, transform_for(preset))
    if ds.multilabel:
        raise ValueError(f"off-the-shelf evaluation reports top-1/top-5: {dataset} is multi-label")
    if len(ds) == 0:
        raise ValueError(f"{dataset} split {split!r} at {data_root} has no images")
    if ds.num_classes > int(model.num_classes):
        raise ValueError(f"the dataset has {ds.num_classes} classes but the model's head only {model.num_classes}")
    if max_images is not None:
        ds = Subset(ds, range(min(int(max_images), len(ds))))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")
    tp_batch = batch_size if throughput_batch is None else int(throughput_batch)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6

    rows = []
    for r in r_values:
        patch_for_r(model, preset, method, r, r_schedule, method_kwargs)
        model.eval()
        top1, top5 = _accuracy(model, loader, dev, amp)
        config = model.reduction_config
        gflops = count_flops(model, img_size=preset.img_size)
        kept = model.tokens_kept  # of that forward
        rows.append({
            "backbone": preset.name,
            "family": preset.family,
            "model": preset.model,
            "img_size": preset.img_size,
            "method": label or (method if method not in _NONE else "none"),
            "reducer": method if method not in _NONE else "none",
            "schedule": str(r_schedule),
            "r": r,
            "r_per_block": " ".join(str(v) for v in per_block_r(r, len(model.blocks), r_schedule)),
            "top1": top1,
            "top5": top5,
            "gflops": gflops,
            "throughput": measure_throughput(model, preset.img_size, tp_batch, dev, amp=amp) if tp_batch > 0 else math.nan,
            "throughput_batch": tp_batch,
            "params_m": params_m,
            "tokens_left": int(kept[-1]) if kept else int(model.patch_embed.num_patches),
            "prop_attn": bool(preset.prop_attn),
            "num_images": len(ds),
            "device": str(dev),
        })
        print(f"{preset.name} {label or method} {r_schedule} r={r}: top1 {top1:.2f} "
              f"gflops {gflops:.4g}", flush=True)
    return pd.DataFrame(rows, columns=COLUMNS)


@torch.no_grad()
def _accuracy(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> tuple[float, float]:
    logits_all, targets_all = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if amp:
            dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
            with torch.autocast(device_type=device.type, dtype=dtype):
                logits = model(images)
        else:
            logits = model(images)
        logits_all.append(logits.float().cpu())
        targets_all.append(torch.as_tensor(targets).cpu())
    top1, top5 = topk_accuracy(torch.cat(logits_all), torch.cat(targets_all).long(), (1, 5))
    return top1, top5


def write_table(table: pd.DataFrame, path: PathLike) -> None:
    """CSV, written atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def collect_tables(paths: Sequence[PathLike], out: Optional[PathLike] = None) -> pd.DataFrame:
    """Concatenate sweep CSVs (e.g. every method and schedule of one backbone)
    into one table sorted by method, schedule and r; written to `out` if given."""
    if not paths:
        raise ValueError("no sweep tables to collect")
    frames = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"sweep table {p} is missing")
        frames.append(pd.read_csv(p))
    missing = sorted(set(COLUMNS) - set(frames[0].columns))
    if missing:
        raise ValueError(f"{paths[0]} lacks the columns {missing}")
    table = pd.concat(frames, ignore_index=True).sort_values(["backbone", "method", "schedule", "r"], kind="stable")
    table = table.reset_index(drop=True)[COLUMNS]
    if out is not None:
        write_table(table, out)
    return table


def plot_sweep(table: pd.DataFrame, path: PathLike, metric: str = "top1") -> None:
    """Accuracy against GFLOPs per image: one panel per backbone, one line per
    (method, schedule) through its r points (labelled with r; colour by
    method, line style by schedule), as the
    off-the-shelf figure of the ATC study. Written atomically (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if table.empty:
        raise ValueError("nothing to plot: the sweep table is empty")
    backbones = list(dict.fromkeys(table["backbone"]))
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4.5), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        sub = table[table["backbone"] == backbone]
        colours = {m: f"C{i % 10}" for i, m in enumerate(sorted(sub["method"].unique()))}
        for (method, schedule), group in sub.groupby(["method", "schedule"], sort=True):
            group = group.sort_values("gflops")
            (line,) = ax.plot(group["gflops"], group[metric], marker="o", color=colours[method],
                              linestyle=_LINESTYLES.get(str(schedule), "-."), label=f"{method} ({schedule})")
            for _, row in group.iterrows():
                ax.annotate(str(int(row["r"])), (row["gflops"], row[metric]), fontsize=6, color=line.get_color(),
                            xytext=(2, 2), textcoords="offset points")
        ax.set_title(f"{backbone} ({sub['model'].iloc[0]} @ {int(sub['img_size'].iloc[0])})")
        ax.set_xlabel("GFLOPs per image")
        ax.set_ylabel("top-1 accuracy (%)" if metric == "top1" else metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
