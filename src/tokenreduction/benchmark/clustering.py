"""Clustering back ends for ATC, timed and checked against SciPy.

As the ATC study's ``benchmark_atc_framework``: the clustering step alone on
random token features (B images x N points x C channels), over input sizes N,
batch sizes B and linkages, for each back end:

* ``scipy``: per image ``linkage`` + ``fcluster(K, criterion="maxclust")`` on
  the condensed distances (the reference);
* ``sklearn``: per image ``AgglomerativeClustering(n_clusters=K,
  metric="precomputed", linkage=...)`` as ATC's reference code does;
* ``fastcluster``: per image ``fastcluster.linkage`` + SciPy's ``fcluster``;
* ``atc``: the library's clustering
  (:func:`tokenreduction.reduction.clustering.agglomerative_labels`) with its
  default back end for the device (on the CPU the compiled "native" kernel:
  SciPy's algorithms in C over the whole batch, threads across images; SciPy
  where no C compiler is found), ``atc-scipy`` its SciPy back end (SciPy's
  compiled dendrogram per image, cut in batched tensor code), ``atc-rnn``
  its batched tensor back end (reciprocal-nearest-neighbour rounds, all
  images at once) on the CPU, and ``atc-cuda`` (the tensor back end) on a
  GPU when there is one;
* ``cuml``: RAPIDS cuML ``AgglomerativeClustering`` (cosine, pairwise
  connectivity; single linkage only) per image, when importable on a GPU.

Every back end gets the same float64 cosine distances (cuML the features;
each back end's time includes converting them to its own format, e.g. the
condensed vector, but not moving them to the GPU) and K = int(keep_rate * N)
clusters. Back ends are timed round-robin (see
:mod:`tokenreduction.benchmark.timing`). Time alone is not the point: each
back end's partitions are compared with SciPy's, image by image, as sets of
clusters (label names do not matter): ``agreement`` is the fraction of images
with the identical partition, ``ari`` the mean adjusted Rand index, ``valid``
the fraction of images with exactly K clusters; ``agrees`` is True only when
every image matches. A wrong back end shows up there, not as an exception.

A back end is a :class:`Backend`: a name, a function ``(ClusteringInput, K,
linkage) -> (B, N) integer labels``, the linkages it supports and an
availability check, so tests and users can pass their own.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from ..reduction.clustering import LINKAGES, agglomerative_labels, check_linkage
from .timing import Clock, default_clock, interleaved_times, paired_ratio, summarize

REFERENCE = "scipy"

COLUMNS = [
    "linkage", "num_points", "batch_size", "num_clusters", "feature_dim", "backend", "device", "status",
    "runs_kept", "median_ms", "q25_ms", "q75_ms", "std_ms", "ms_per_image", "speedup_vs_reference",
    "agreement", "ari", "valid", "agrees",
]


@dataclass
class ClusteringInput:
    """One problem: features (B, N, C) and their cosine distances (B, N, N),
    float64 on the CPU; moved copies per device are cached."""

    features: torch.Tensor
    distance: torch.Tensor
    _on_device: Dict[Tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def random(cls, batch_size: int, num_points: int, feature_dim: int, seed: int = 0) -> "ClusteringInput":
        gen = torch.Generator().manual_seed(seed)
        features = torch.randn(batch_size, num_points, feature_dim, generator=gen, dtype=torch.float64)
        unit = torch.nn.functional.normalize(features, dim=-1)
        distance = (1.0 - unit @ unit.transpose(1, 2)).clamp_min_(0.0)
        distance.diagonal(dim1=1, dim2=2).zero_()
        return cls(features, distance)

    @property
    def shape(self) -> Tuple[int, int]:
        return int(self.distance.shape[0]), int(self.distance.shape[1])

    def on(self, name: str, device: str) -> torch.Tensor:
        """`name` ("features" or "distance") on `device`, moved once."""
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(device)
        return self._on_device[key]


@dataclass(frozen=True)
class Backend:
    """A clustering back end. ``fn(problem, K, linkage)`` returns (B, N)
    integer labels (numpy or tensor); ``available()`` returns None when the
    back end can run here, else the reason it cannot."""

    name: str
    fn: Callable[[ClusteringInput, int, str], Any]
    linkages: Tuple[str, ...] = LINKAGES
    device: str = "cpu"
    available: Callable[[], Optional[str]] = lambda: None


def _condensed(square: np.ndarray) -> np.ndarray:
    """(N, N) symmetric -> SciPy's condensed upper triangle."""
    rows, cols = np.triu_indices(square.shape[0], k=1)
    return square[rows, cols]


def _scipy(problem: ClusteringInput, k: int, linkage: str) -> np.ndarray:
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    dist = problem.distance.numpy()
    return np.stack([fcluster(scipy_linkage(_condensed(d), method=linkage), k, criterion="maxclust") for d in dist])


def _fastcluster(problem: ClusteringInput, k: int, linkage: str) -> np.ndarray:
    import fastcluster
    from scipy.cluster.hierarchy import fcluster

    dist = problem.distance.numpy()
    return np.stack([fcluster(fastcluster.linkage(_condensed(d), method=linkage), k, criterion="maxclust")
                     for d in dist])


def _sklearn(problem: ClusteringInput, k: int, linkage: str) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    dist = problem.distance.numpy()
    return np.stack([
        AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage).fit_predict(d) for d in dist
    ])


def _atc(device: str, backend: str = "auto") -> Callable[[ClusteringInput, int, str], torch.Tensor]:
    def run(problem: ClusteringInput, k: int, linkage: str) -> torch.Tensor:
        return agglomerative_labels(problem.on("distance", device), k, linkage, backend=backend)

    return run


def _cuml(problem: ClusteringInput, k: int, linkage: str) -> np.ndarray:
    from cuml.cluster import AgglomerativeClustering

    feats = problem.on("features", "cuda").float()
    out = []
    for x in feats:
        model = AgglomerativeClustering(n_clusters=k, metric="cosine", linkage=linkage, connectivity="pairwise")
        out.append(np.asarray(model.fit_predict(x)))
    return np.stack(out)


def _needs(module: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"

    return check


def _needs_cuda(module: Optional[str] = None) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        if not torch.cuda.is_available():
            return "no CUDA device"
        return _needs(module)() if module else None

    return check


#: the back ends by name (the config lists which to run)
BACKENDS: Dict[str, Backend] = {
    "scipy": Backend("scipy", _scipy, available=_needs("scipy")),
    "sklearn": Backend("sklearn", _sklearn, available=_needs("sklearn")),
    "fastcluster": Backend("fastcluster", _fastcluster, available=_needs("fastcluster")),
    "atc": Backend("atc", _atc("cpu")),
    "atc-scipy": Backend("atc-scipy", _atc("cpu", "scipy"), available=_needs("scipy")),
    "atc-rnn": Backend("atc-rnn", _atc("cpu", "rnn")),
    "atc-cuda": Backend("atc-cuda", _atc("cuda"), device="cuda", available=_needs_cuda()),
    "cuml": Backend("cuml", _cuml, linkages=("single",), device="cuda", available=_needs_cuda("cuml")),
}


def get_backends(names: Sequence[str]) -> List[Backend]:
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown clustering back end(s) {unknown}; known: {', '.join(BACKENDS)}")
    return [BACKENDS[n] for n in names]


# ------------------------------------------------------------------ agreement


def canonical_labels(labels: Any) -> np.ndarray:
    """(B, N) labels -> each point named by the smallest point index of its
    cluster, so equal partitions give equal arrays whatever the label names."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"labels must have shape (B, N), got {arr.shape}")
    out = np.empty(arr.shape, dtype=np.int64)
    for b, row in enumerate(arr):
        _, first, inverse = np.unique(row, return_index=True, return_inverse=True)
        out[b] = first[inverse.reshape(-1)]
    return out


def agreement(labels: Any, reference: Any, num_clusters: int) -> Dict[str, float]:
    """Compare (B, N) partitions with the reference's, image by image:
    ``agreement`` (fraction identical), ``ari`` (mean adjusted Rand index),
    ``valid`` (fraction of images with exactly `num_clusters` clusters)."""
    from sklearn.metrics import adjusted_rand_score

    ours, ref = canonical_labels(labels), canonical_labels(reference)
    if ours.shape != ref.shape:
        raise ValueError(f"labels of shape {ours.shape} cannot be compared with the reference's {ref.shape}")
    same = (ours == ref).all(axis=1)
    ari = [adjusted_rand_score(r, o) for o, r in zip(ours, ref)]
    counts = np.array([len(np.unique(o)) for o in ours])
    return {
        "agreement": float(same.mean()),
        "ari": float(np.mean(ari)),
        "valid": float((counts == int(num_clusters)).mean()),
    }


# ------------------------------------------------------------------ the benchmark


def benchmark_clustering(
    backends: Sequence[Backend],
    sizes: Sequence[int],
    batch_sizes: Sequence[int],
    linkages: Sequence[str] = LINKAGES,
    keep_rate: float = 0.7,
    feature_dim: int = 64,
    warmup: int = 1,
    runs: int = 5,
    throw_out: float = 0.0,
    reference: Backend = BACKENDS[REFERENCE],
    clock: Optional[Clock] = None,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> pd.DataFrame:
    """Time every back end on every (N, B, linkage) and check its clusters
    against `reference` (SciPy by default; computed untimed when it is not
    among `backends`). Returns one row per (linkage, N, B, back end) with the
    columns :data:`COLUMNS`. Back ends that cannot run here (or do not support
    a linkage) get a row whose status says why. ``speedup_vs_reference`` is
    the median over rounds of reference time / back-end time (NaN when the
    reference is not timed)."""
    for linkage in linkages:
        check_linkage(linkage)
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise ValueError(f"back-end names must be unique, got {names}")
    rows: List[Dict[str, Any]] = []
    for n_points in [int(v) for v in sizes]:
        k = max(1, int(keep_rate * n_points))
        for batch in [int(v) for v in batch_sizes]:
            problem = ClusteringInput.random(batch, n_points, feature_dim, seed=seed)
            for linkage in linkages:
                head = {"linkage": linkage, "num_points": n_points, "batch_size": batch, "num_clusters": k,
                        "feature_dim": feature_dim}
                runnable, skipped = [], []
                for backend in backends:
                    reason = backend.available()
                    if reason is None and linkage not in backend.linkages:
                        reason = f"{linkage} linkage not supported"
                    (skipped if reason else runnable).append((backend, reason))
                rows += [{**head, "backend": b.name, "device": b.device, "status": f"skipped: {why}"}
                         for b, why in skipped]
                if not runnable:
                    continue
                rows += _time_backends(problem, [b for b, _ in runnable], k, linkage, warmup, runs, throw_out,
                                       reference, clock, head)
                if log:
                    log(" ".join(f"{r['backend']}={r['median_ms']:.1f}ms/agree={r['agreement']:.2f}"
                                 for r in rows[-len(runnable):]) + f" [N={n_points} B={batch} {linkage}]")
    return pd.DataFrame(rows, columns=COLUMNS)


def _time_backends(problem, backends, k, linkage, warmup, runs, throw_out, reference, clock, head):
    batch = problem.shape[0]
    fns = {b.name: (lambda b=b: b.fn(problem, k, linkage)) for b in backends}
    # each back end on its own device's clock unless one clock is injected
    clocks = {b.name: clock or default_clock(torch.device(b.device)) for b in backends}
    sync = torch.device("cuda") if any(b.device == "cuda" for b in backends) else torch.device("cpu")
    times = interleaved_times(fns, warmup, runs, throw_out, clocks, sync)
    ref_labels = reference.fn(problem, k, linkage)
    ref_times = times.get(reference.name)
    rows = []
    for backend in backends:
        stats = summarize(times[backend.name])
        labels = ref_labels if backend is reference else backend.fn(problem, k, linkage)
        agree = agreement(labels, ref_labels, k)
        rows.append({
            **head, "backend": backend.name, "device": backend.device, "status": "ok", "runs_kept": stats.n,
            "median_ms": 1e3 * stats.median, "q25_ms": 1e3 * stats.q25, "q75_ms": 1e3 * stats.q75,
            "std_ms": 1e3 * stats.std, "ms_per_image": 1e3 * stats.median / batch,
            "speedup_vs_reference": paired_ratio(ref_times, times[backend.name]) if ref_times else float("nan"),
            **agree, "agrees": agree["agreement"] == 1.0,
        })
    return rows
