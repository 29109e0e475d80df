"""Model throughput: images per second of reduced ViTs and their unreduced
baseline, measured side by side in one job.

As in the ATC study's ``benchmark_merging_method``: random inputs, batch sizes
2^k, untimed warm-up, many timed runs with a fraction of the first runs thrown
out, images/s from the median. Here the baseline and every reduced model are
timed round-robin at each batch size (one forward of each per round), so each
row's ``throughput_ratio`` is taken against the baseline measured in the same
rounds: the median over rounds of baseline time / model time.

Timing: CUDA events after synchronisation on a GPU, ``time.perf_counter`` on
the CPU (see :mod:`tokenreduction.benchmark.timing`; the clock can be
injected). All forwards run under ``torch.inference_mode``.

Peak memory (``peak_mem_mb``) is measured in a separate untimed forward per
model and batch size, as the memory the forward takes above what was in use
before it (all models' weights and the input stay resident and are excluded):

* ``cuda_max_allocated``: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus ``memory_allocated`` before the forward.
* ``rss_hwm`` (CPU, Linux): the process's resident-set high-water mark
  (``VmHWM``) after the forward, reset before it by writing 5 to
  ``/proc/self/clear_refs``, minus the resident set (``VmRSS``) before. Memory
  that an earlier forward freed and the allocator kept is reused without
  growing the resident set, so this is a lower bound of what the forward uses.
* ``ru_maxrss`` (CPU elsewhere): the process's lifetime peak RSS from
  ``resource.getrusage``, not resettable: an upper bound shared by all rows.

The models share the baseline's backbone weights (random, seeded); the token
counts of data-dependent methods (ATS) are those of these random weights.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd
import torch
from torch import nn

from ..models import create_model
from .specs import BASELINE, ModelSpec
from .timing import Clock, default_clock, interleaved_times, num_thrown_out, paired_ratio, summarize, synchronize

#: columns of the throughput CSV, in order
COLUMNS = [
    "backbone", "model", "method", "keep_rate", "r", "device", "dtype", "threads", "batch_size",
    "warmup", "runs", "throw_out", "runs_kept", "status", "median_ms", "q25_ms", "q75_ms", "std_ms",
    "img_per_s", "img_per_s_q25", "img_per_s_q75", "baseline_img_per_s", "throughput_ratio",
    "peak_mem_mb", "mem_measure", "tokens_kept",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_models(
    model_name: str,
    specs: Sequence[ModelSpec],
    model_kwargs: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
) -> Dict[str, nn.Module]:
    """{label: eval-mode model} for every spec, plus the baseline under
    :data:`BASELINE` when no spec is one. Every model gets the baseline's
    backbone weights (random, from `seed`); learned reduction modules keep
    their seeded initialisation."""
    model_kwargs = dict(model_kwargs or {})
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}")
    base_specs = [s for s in specs if s.is_baseline]
    base_label = base_specs[0].label if base_specs else BASELINE
    torch.manual_seed(seed)
    base = create_model(model_name, **model_kwargs).eval()
    models: Dict[str, nn.Module] = {base_label: base}
    state = base.state_dict()
    for i, spec in enumerate(specs):
        if spec.is_baseline:
            continue
        torch.manual_seed(seed + 1 + i)
        model = create_model(
            model_name,
            method=spec.method,
            keep_rate=spec.keep_rate,
            r=spec.r,
            r_schedule=spec.r_schedule,
            reduction_loc=spec.reduction_loc,
            budget=spec.budget,
            method_kwargs=dict(spec.method_kwargs),
            clca=dict(spec.clca) if spec.clca else None,
            **model_kwargs,
        )
        model.load_state_dict(state, strict=False)
        models[spec.label] = model.eval()
    return models


# ------------------------------------------------------------------ memory


def _proc_status() -> Optional[Dict[str, int]]:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    out = {}
    for key in ("VmRSS", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
        if m is None:
            return None
        out[key] = int(m.group(1)) * 1024
    return out


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


#: runs a forward once and returns (megabytes, how they were measured)
MemoryProbe = Callable[[Callable[[], object], torch.device], Tuple[float, str]]


def peak_memory(fn: Callable[[], object], device: torch.device) -> Tuple[float, str]:
    """Memory (MB) one call of `fn` takes above what was in use before it;
    see the module docstring for the three measures."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "cuda_max_allocated"
    status = _proc_status()
    if status is not None and _reset_rss_peak():
        before = _proc_status()["VmRSS"]
        fn()
        after = _proc_status()
        return max(after["VmHWM"] - before, 0) / 2**20, "rss_hwm"
    import resource

    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"


# ------------------------------------------------------------------ the harness


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def benchmark_throughput(
    models: Mapping[str, nn.Module],
    img_size: int,
    batch_sizes: Sequence[int],
    baseline: str = BASELINE,
    warmup: int = 10,
    runs: int = 100,
    throw_out: float = 0.25,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    clock: Optional[Clock] = None,
    memory_probe: Optional[MemoryProbe] = peak_memory,
    specs: Optional[Mapping[str, ModelSpec]] = None,
    backbone: str = "",
    log: Optional[Callable[[str], None]] = None,
) -> pd.DataFrame:
    """Images/s of every model at every batch size, against `baseline`.

    models:      {label: model}; must contain `baseline` (the unreduced model).
    batch_sizes: e.g. ``[2**k for k in range(11)]``.
    warmup:      untimed rounds before the timed ones, per batch size.
    runs:        timed rounds per batch size; the first
                 ``floor(throw_out * runs)`` are thrown out.
    clock:       times one call (default: CUDA events on a GPU, perf_counter
                 on the CPU).
    memory_probe: measures one forward's peak memory (None: not measured).
    specs:       {label: ModelSpec} for the method / keep_rate / r columns.
    Returns one row per (model, batch size) with the columns :data:`COLUMNS`;
    a batch size that runs out of memory gives status "oom" rows and ends
    the sweep. Times are per batch (ms); images/s = batch / time.
    """
    if baseline not in models:
        raise ValueError(f"the baseline {baseline!r} is not among the models ({', '.join(models)})")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    device = torch.device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    clock = clock or default_clock(device)
    specs = dict(specs or {})
    drop = num_thrown_out(runs, throw_out)
    order = [baseline] + [name for name in models if name != baseline]
    for model in models.values():
        model.to(device=device, dtype=dtype).eval()

    def base_row(name: str, batch: int) -> Dict[str, Any]:
        spec = specs.get(name, ModelSpec(name))
        return {
            "backbone": backbone, "model": name,
            "method": "none" if name == baseline else (spec.method or "none"),
            "keep_rate": 1.0 if name == baseline else spec.keep_rate, "r": spec.r,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "batch_size": int(batch), "warmup": int(warmup),
            "runs": int(runs), "throw_out": float(throw_out), "runs_kept": 0,
        }

    rows: List[Dict[str, Any]] = []
    for batch in [int(b) for b in batch_sizes]:
        try:
            rows += _one_batch_size(models, order, batch, img_size, warmup, runs, throw_out, device, dtype,
                                    clock, memory_probe, base_row)
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            rows += [{**base_row(name, batch), "status": "oom"} for name in order]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if log:
                log(f"batch {batch}: out of memory; larger batch sizes skipped")
            break
        if log:
            base = rows[-len(order)]
            log(f"batch {batch}: baseline {base['img_per_s']:.1f} img/s ({runs - drop} runs kept)")
    return pd.DataFrame(rows, columns=COLUMNS)


def _one_batch_size(models, order, batch, img_size, warmup, runs, throw_out, device, dtype, clock,
                    memory_probe, base_row) -> List[Dict[str, Any]]:
    torch.manual_seed(batch)
    images = torch.randn(batch, 3, img_size, img_size, device=device, dtype=dtype)
    with torch.inference_mode():
        fns = {name: (lambda m=models[name]: m(images)) for name in order}
        times = interleaved_times(fns, warmup, runs, throw_out, clock, device)
        base_times = times[order[0]]
        base_ips = batch / summarize(base_times).median
        rows = []
        for name in order:
            stats = summarize(times[name])
            mem, how = (float("nan"), "")
            if memory_probe is not None:
                mem, how = memory_probe(fns[name], device)
            kept = getattr(models[name], "tokens_kept", [])
            rows.append({
                **base_row(name, batch),
                "runs_kept": stats.n,
                "status": "ok",
                "median_ms": 1e3 * stats.median,
                "q25_ms": 1e3 * stats.q25,
                "q75_ms": 1e3 * stats.q75,
                "std_ms": 1e3 * stats.std,
                "img_per_s": batch / stats.median,
                "img_per_s_q25": batch / stats.q75,
                "img_per_s_q75": batch / stats.q25,
                "baseline_img_per_s": base_ips,
                "throughput_ratio": paired_ratio(base_times, times[name]),
                "peak_mem_mb": mem,
                "mem_measure": how,
                "tokens_kept": " ".join(str(v) for v in kept),
            })
    return rows
