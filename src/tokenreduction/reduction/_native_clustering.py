"""A compiled kernel for exact agglomerative clustering, built on first use.

SciPy's dendrogram routines (``scipy.cluster._hierarchy``) run one image per
Python call on a float64 condensed copy made by the caller, hold the GIL and
always build the whole dendrogram with condensed-index arithmetic in the
inner loops. This kernel runs the *same algorithms with the same arithmetic
and the same tie-breaking*, so it yields SciPy's partition exactly, but:

* it reads the (B, N, N) float32/float64 square matrices directly (only the
  upper triangle, as SciPy's condensed form does) into a square float64
  work matrix, rows contiguous, a block of rows at a time: their upper
  parts are converted, then mirrored below the diagonal while still in
  cache, and every row's smallest entry is kept on the way;
* it loops over the images of a batch in C, and cuts each dendrogram in C
  (stable sort by height, union-find over the first N - K merges, labels =
  smallest member);
* a nearest-neighbour scan reads a whole row as one contiguous vector loop
  (AVX2 where the CPU has it, chosen when the library loads): the columns
  of clusters merged away are masked by adding +inf from a per-column
  penalty vector, and the first position of the smallest value (SciPy's
  choice) is found by a vector minimum and a vector search for it; the
  diagonal holds +inf so a row's own entry never wins. The vector and the
  portable code give the same bits: they only compare, add 0 or +inf and
  convert float32 to float64;
* a merge updates the merged row over the active clusters (a scalar loop,
  the Lance-Williams expression in SciPy's order, no fused multiply-add)
  and writes its column into every active row (prefetched; each write is a
  cache miss,
  which is what large N, a 64 x 64 SD latent, is bound by); the work matrix
  has an odd row stride and sits in huge pages where the kernel allows
  (``madvise``);
* the chain stops as soon as the N - K lowest merges are known: once N - K
  recorded merges lie at or below the smallest distance left between active
  clusters (no later merge of these reducible linkages is lower, and a later
  one of equal height sorts after them in SciPy's stable order); that
  smallest distance is the least of per-row minima kept across merges (a
  row is rescanned only when a merge replaced or removed its minimum), so
  it is checked every 16 merges at little cost;
* ATC for Stable Diffusion may pass cosine similarities instead of
  distances; ``max(1 - s, 0)`` is then formed in float32 while filling;
* at N >= 1024 (a 32 x 32 latent and up) a sparse path runs first and
  needs no work matrix: only the point pairs closer than a threshold T
  near the cut height are listed (the N - K lowest merges of these
  reducible linkages join clusters that share such a pair; T is raised
  while fewer lie below it). Single linkage unites the listed pairs in
  order of distance (Kruskal): its first N - K merges are the components
  of the pairs up to the last one taken, whatever the order among equal
  distances, provided the next union lies strictly farther. Complete and
  average linkage merge the closest pair of clusters, N - K times, on that
  graph, with the exact sum (average) or maximum (complete) of the point
  distances between neighbouring clusters. In exact arithmetic that is the
  dendrogram SciPy's chain builds; SciPy's floating-point heights differ
  from these by far less than a relative 1e-9, so where every merge is
  clear of the other neighbours of its two clusters by more than that, and
  the first merge left out clear above the last one taken, the partition
  is SciPy's. Otherwise (ties, e.g. equal float32 distances or duplicated
  tokens; a graph too dense to pay; clusters over 1,000 points) the dense
  kernel runs, which is SciPy's arithmetic and tie-breaking. On
  a UNet's hidden states at a 64 x 64 latent the graph has 5-10 pairs per
  token and the sparse path is about 5x faster than the dense chain
  (``benchmarks/speed_table.py``, section atc_large);
* single linkage only compares distances, and float32 -> float64 is exact
  and keeps their order: on float32 input its tree runs on a float32 work
  matrix (half the bytes to fill), with the same merges and heights;
* ctypes releases the GIL during the call, so the images of a batch are
  spread over threads (:func:`run`).

Algorithms (as ``scipy.cluster.hierarchy.linkage``): single linkage is
Prim's minimum spanning tree from point 0 (``mst_single_linkage``);
complete and average linkage the nearest-neighbour chain (``nn_chain``,
Lance-Williams update ``max`` resp. ``(n_x d_xi + n_y d_yi) / (n_x + n_y)``
in float64, chain grown from the smallest active index, the previous chain
element preferred on ties, then the first strictly smaller distance in index
order). The merges are then ordered by height with a stable sort, as SciPy's
``argsort(kind="mergesort")``.

The C source, ``_native_clustering.c`` next to this module (package data),
is compiled with the system C compiler (``$CC``, else
``cc``) into a cache folder (``$TOKENREDUCTION_CACHE``, else
``$XDG_CACHE_HOME/tokenreduction`` or ``~/.cache/tokenreduction``; a fresh
temporary folder when that is not writable), keyed by a hash of the source
and flags, written atomically. A missing source file (a broken install)
raises, naming it. :func:`library` returns None (and callers fall
back to SciPy) when there is no compiler, when the build fails, or when
``TOKENREDUCTION_NATIVE=0``.

Memory: each worker thread keeps its float64 work matrix (N x N x 8 bytes,
134 MB at N=4096, 0.3 MB at N=196) between calls, so repeated calls do not
fault fresh pages in; it is reused, and grown only for a larger N. It is made
only when the dense code runs: the sparse path needs the pairs below its
threshold (5-10 per point on SD hidden states, at most about 0.6 sqrt(N))
and per-cluster neighbour lists.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

METHOD_CODES = {"single": 0, "complete": 1, "average": 2}

SOURCE_PATH = Path(__file__).with_name("_native_clustering.c")

FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_tried = False
_pools: dict = {}


def _cache_root() -> Path:
    env = os.environ.get("TOKENREDUCTION_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tokenreduction"


def _source() -> str:
    """The kernel's C source (read from :data:`SOURCE_PATH`)."""
    try:
        return SOURCE_PATH.read_text()
    except OSError as err:
        raise RuntimeError(f"the clustering kernel's C source {SOURCE_PATH} cannot be read ({err}); the package "
                           "install is incomplete (it is package data of tokenreduction.reduction)") from err


def _build(folder: Path, compiler: str, digest: str, source: str) -> Path:
    """Compile `source` into folder/<digest>.so (atomically) and return it."""
    target = folder / f"agglomerative-{digest}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=folder, prefix=".build-"))
    try:
        src = work / "agglomerative.c"
        src.write_text(source)
        out = work / "lib.so"
        subprocess.run([compiler, *FLAGS, str(src), "-o", str(out), "-lm"], check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, built on the first call; None when unavailable."""
    global _library, _tried
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        _tried = True
        if os.environ.get("TOKENREDUCTION_NATIVE", "1") == "0":
            return None
        compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if compiler is None:
            return None
        source = _source()
        key = "\0".join([source, *FLAGS, compiler, sys.platform, os.uname().machine])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        for folder in (_cache_root(), None):
            try:
                path = _build(folder if folder is not None else Path(tempfile.mkdtemp(prefix="tokenreduction-")),
                              compiler, digest, source)
                lib = ctypes.CDLL(str(path))
                fn = lib.tr_agglomerative_labels
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)]
                fn.restype = ctypes.c_int
                lib.tr_set_simd.argtypes = [ctypes.c_int]
                lib.tr_set_simd.restype = ctypes.c_int
                lib.tr_set_sparse.argtypes = [ctypes.c_int]
                lib.tr_set_sparse.restype = ctypes.c_int
                lib.tr_sparse_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
                lib.tr_sparse_stats.restype = None
                _library = lib
                return _library
            except (OSError, subprocess.SubprocessError):
                continue
        return None


@contextlib.contextmanager
def disabled():
    """Within the block, :func:`library` returns None: "auto" clustering
    uses SciPy (for side-by-side benchmarks and tests). Not thread-safe."""
    global _library, _tried
    saved = (_library, _tried)
    _library, _tried = None, True
    try:
        yield
    finally:
        _library, _tried = saved


@contextlib.contextmanager
def portable_only():
    """Within the block the kernel uses its portable row loops instead of
    the AVX2 ones (for tests: both must give the same labels). Yields
    whether AVX2 was in use before. Not thread-safe."""
    lib = library()
    if lib is None:
        raise RuntimeError("the compiled clustering kernel is not available")
    had_simd = bool(lib.tr_set_simd(1))
    lib.tr_set_simd(0)
    try:
        yield had_simd
    finally:
        lib.tr_set_simd(1)


@contextlib.contextmanager
def dense_only():
    """Within the block the dense kernel (SciPy's minimum spanning tree or
    nearest-neighbour chain) runs also for N >= 1024, never the sparse path
    (for tests and benchmarks: both must give the same labels). Not
    thread-safe."""
    lib = library()
    if lib is None:
        raise RuntimeError("the compiled clustering kernel is not available")
    previous = lib.tr_set_sparse(0)
    try:
        yield
    finally:
        lib.tr_set_sparse(previous)


def sparse_stats() -> dict:
    """Counts since the last call (which resets them): ``finished``, the
    images the sparse path clustered; ``dense``, those it handed to the
    dense chain (a tie within the margin, too dense a graph); ``raises``,
    thresholds raised (each an extra pass over an image's input)."""
    out = (ctypes.c_int64 * 3)()
    lib = library()
    if lib is not None:
        lib.tr_sparse_stats(out)
    return {"finished": int(out[0]), "dense": int(out[1]), "raises": int(out[2])}


def _forget_pools() -> None:
    """In a forked child the parent's pool threads do not exist: start anew."""
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="tokenreduction-cluster")
        return pool


def run(distance: torch.Tensor, need: int, linkage: str, threads: Optional[int] = None,
        similarity: bool = False) -> torch.Tensor:
    """(B, N, N) CPU float32/float64 distances -> (B, N) long labels of the
    first `need` merges of SciPy's dendrogram of each image (see the module
    docstring). With ``similarity=True`` the input holds float32 cosine
    similarities s and the distance is ``max(1 - s, 0)`` computed in float32
    (bit for bit what ``(1 - s).clamp_min(0)`` gives), formed inside the
    kernel. Images are spread over `threads` threads (default
    ``torch.get_num_threads()``). Raises ValueError for inf or nan entries
    (in the upper triangle, the part SciPy reads)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the compiled clustering kernel is not available")
    if similarity:
        distance = distance.float()
        kind = 2
    else:
        if distance.dtype not in (torch.float32, torch.float64):
            distance = distance.double()
        kind = int(distance.dtype == torch.float64)
    distance = distance.contiguous()
    B, N, _ = distance.shape
    labels = torch.empty(B, N, dtype=torch.long)
    code = METHOD_CODES[linkage]
    workers = max(1, min(B, int(threads or torch.get_num_threads())))
    # the batch in `workers` contiguous chunks
    bounds = [B * w // workers for w in range(workers + 1)]
    elem = distance.element_size()

    def chunk(w: int):
        lo, hi = bounds[w], bounds[w + 1]
        bad = ctypes.c_int64(-1)
        status = lib.tr_agglomerative_labels(
            distance.data_ptr() + lo * N * N * elem, kind, hi - lo, N, need, code,
            labels.data_ptr() + lo * N * 8, ctypes.byref(bad))
        return status, lo + bad.value

    if workers == 1:
        results = [chunk(0)]
    else:
        results = list(_pool(workers).map(chunk, range(workers)))
    for status, bad in results:
        if status == 1:
            raise MemoryError(f"clustering {N} points needs {N * N * 8 / 2**20:.0f} MiB of work memory")
        if status == 2:
            raise ValueError(f"distance must be finite: image {bad} has inf or nan entries")
    return labels
