"""Clocks, interleaved timing rounds and robust statistics for the benchmarks.

A *clock* runs a callable once and returns the seconds it took. On a GPU the
clock brackets the call with CUDA events after synchronising the device (the
kernels the call queues are timed, not the Python launch); on the CPU it reads
``time.perf_counter``. Benchmarks take the clock as an argument so that a test
can inject a scripted one and check what is kept and how it is summarised.

Timing follows the ATC study's ``benchmark_merging_method``: untimed warm-up
calls, then many timed runs of which a fraction of the *first* ones is thrown
out (``throw_out``), then the median. Several callables are timed round-robin
(one call of each per round), so that drift of a shared machine hits all of
them alike and ratios can be taken per round, side by side.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Sequence, Union

import numpy as np
import torch

#: runs the callable once, returns elapsed seconds
Clock = Callable[[Callable[[], object]], float]


def perf_counter_clock(fn: Callable[[], object]) -> float:
    """Wall time of one call by ``time.perf_counter`` (CPU)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cuda_event_clock(device: torch.device) -> Clock:
    """A clock timing one call with CUDA events on `device`: the device is
    synchronised before the start event, and the end event is waited for."""

    def clock(fn: Callable[[], object]) -> float:
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return clock


def default_clock(device: torch.device) -> Clock:
    """CUDA events on a CUDA device, ``perf_counter`` otherwise."""
    return cuda_event_clock(device) if device.type == "cuda" else perf_counter_clock


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def num_thrown_out(runs: int, throw_out: float) -> int:
    """How many of the first `runs` timed runs are discarded:
    ``floor(throw_out * runs)``; at least one run is always kept."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if not 0.0 <= throw_out < 1.0:
        raise ValueError(f"throw_out must be a fraction in [0, 1), got {throw_out}")
    return min(int(math.floor(throw_out * runs)), runs - 1)


def interleaved_times(
    fns: Mapping[str, Callable[[], object]],
    warmup: int,
    runs: int,
    throw_out: float,
    clock: Union[Clock, Mapping[str, Clock]],
    device: torch.device = torch.device("cpu"),
) -> Dict[str, List[float]]:
    """Time the callables round-robin and return {name: kept seconds per run}.

    `warmup` untimed rounds come first (each callable called once per round,
    the device synchronised after each call), then `runs` timed rounds; the
    first ``num_thrown_out(runs, throw_out)`` timed rounds are dropped for
    every callable, so the kept lists stay aligned by round (entry i of each
    list was measured in the same round). `clock` is one clock for all, or
    {name: clock} (e.g. CUDA events for a GPU back end, perf_counter for a
    CPU one); warm-up calls synchronise `device`.
    """
    clocks = {name: clock[name] for name in fns} if isinstance(clock, Mapping) else {name: clock for name in fns}
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    drop = num_thrown_out(runs, throw_out)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            synchronize(device)
    for rnd in range(runs):
        for name, fn in fns.items():
            elapsed = clocks[name](fn)
            if rnd >= drop:
                times[name].append(float(elapsed))
    return times


@dataclass(frozen=True)
class Stats:
    """Median and spread of a list of times (seconds)."""

    n: int
    median: float
    q25: float
    q75: float
    mean: float
    std: float


def summarize(values: Sequence[float]) -> Stats:
    """Median, quartiles (the IQR is q75 - q25), mean and standard deviation
    (ddof 0) of `values`."""
    if len(values) == 0:
        raise ValueError("no values to summarise")
    arr = np.asarray(values, dtype=np.float64)
    q25, median, q75 = np.percentile(arr, [25, 50, 75])
    return Stats(len(arr), float(median), float(q25), float(q75), float(arr.mean()), float(arr.std()))


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i] (both measured in
    the same round)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"paired lists must be non-empty and equally long ({len(numerator)} vs {len(denominator)})")
    return float(np.median(np.asarray(numerator, dtype=np.float64) / np.asarray(denominator, dtype=np.float64)))

