"""Theoretical FLOPs of the configured models and how much of the speed-up
they imply is achieved.

GFLOPs come from :func:`tokenreduction.count_flops`: one actual forward, so
the per-block token counts are the real ones, counted in the papers'
(fvcore's) convention, attention's QK^T and AV included on every device and
attention kernel (:mod:`tokenreduction.models.flop_count`, docs/flops.md). A reduced model's FLOPs imply
a speed-up of ``baseline GFLOPs / model GFLOPs``; the throughput benchmark
measures the achieved one (``throughput_ratio``). Their quotient,
``achieved_over_implied``, is the headline of the speed table: 1.0 means the
model is as fast as its FLOPs promise; below 1.0 the reduction's own cost,
memory traffic or launch overhead eat part of the saving.
"""
from __future__ import annotations

from typing import Mapping, Optional

import pandas as pd
from torch import nn

from ..models import count_flops
from .specs import BASELINE, ModelSpec

FLOPS_COLUMNS = ["backbone", "model", "method", "keep_rate", "r", "gflops", "baseline_gflops", "flops_ratio",
                 "flops_implied_speedup", "tokens_kept"]

SPEED_COLUMNS = ["backbone", "model", "method", "keep_rate", "r", "batch_size", "device", "img_per_s",
                 "img_per_s_q25", "img_per_s_q75", "baseline_img_per_s", "throughput_ratio", "gflops",
                 "flops_implied_speedup", "achieved_over_implied", "peak_mem_mb", "tokens_kept"]


def model_flops(
    models: Mapping[str, nn.Module],
    img_size: int,
    baseline: str = BASELINE,
    specs: Optional[Mapping[str, ModelSpec]] = None,
    backbone: str = "",
) -> pd.DataFrame:
    """GFLOPs per image of every model and the speed-up they imply over
    `baseline` (columns :data:`FLOPS_COLUMNS`, one row per model)."""
    if baseline not in models:
        raise ValueError(f"the baseline {baseline!r} is not among the models ({', '.join(models)})")
    specs = dict(specs or {})
    base = count_flops(models[baseline], img_size=img_size)
    rows = []
    for name in [baseline] + [n for n in models if n != baseline]:
        model = models[name]
        gflops = base if name == baseline else count_flops(model, img_size=img_size)
        spec = specs.get(name, ModelSpec(name))
        rows.append({
            "backbone": backbone, "model": name,
            "method": "none" if name == baseline else (spec.method or "none"),
            "keep_rate": 1.0 if name == baseline else spec.keep_rate, "r": spec.r,
            "gflops": gflops, "baseline_gflops": base, "flops_ratio": gflops / base,
            "flops_implied_speedup": base / gflops,
            "tokens_kept": " ".join(str(v) for v in getattr(model, "tokens_kept", [])),
        })
    return pd.DataFrame(rows, columns=FLOPS_COLUMNS)


def headline_batch(throughput: pd.DataFrame, batch_size: Optional[int] = None) -> int:
    """The batch size of the speed table: `batch_size` when given (it must
    have been measured), else the largest one at which every model ran."""
    ok = throughput[throughput.status == "ok"]
    if batch_size is not None:
        if int(batch_size) not in set(ok.batch_size):
            raise ValueError(f"batch size {batch_size} was not measured (measured: {sorted(set(ok.batch_size))})")
        return int(batch_size)
    counts = ok.groupby("batch_size").model.nunique()
    complete = counts[counts == throughput.model.nunique()]
    if complete.empty:
        raise ValueError("no batch size at which every model ran")
    return int(complete.index.max())


def speed_table(throughput: pd.DataFrame, flops: pd.DataFrame, batch_size: Optional[int] = None) -> pd.DataFrame:
    """Per backbone and model at the headline batch size (see
    :func:`headline_batch`, chosen per backbone): measured images/s, the
    throughput ratio to the baseline, GFLOPs, the FLOPs-implied speed-up and
    ``achieved_over_implied = throughput_ratio / flops_implied_speedup``
    (columns :data:`SPEED_COLUMNS`)."""
    parts = []
    for backbone, tp in throughput.groupby("backbone", sort=False):
        batch = headline_batch(tp, batch_size)
        at = tp[(tp.batch_size == batch) & (tp.status == "ok")]
        fl = flops[flops.backbone == backbone][["model", "gflops", "flops_implied_speedup"]]
        missing = set(at.model) - set(fl.model)
        if missing:
            raise ValueError(f"no FLOPs for {sorted(missing)} on backbone {backbone!r}")
        merged = at.merge(fl, on="model", how="left")
        merged["achieved_over_implied"] = merged["throughput_ratio"] / merged["flops_implied_speedup"]
        parts.append(merged)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SPEED_COLUMNS)
    return table[SPEED_COLUMNS]
