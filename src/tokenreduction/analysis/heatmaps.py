"""Comparison metrics of two 2-D maps (e.g. (14, 14) mean token-depth maps).

Definitions follow the MIT saliency benchmark code (cvzoya/saliency, MATLAB),
which the study ported; ``eps`` is MATLAB's ``eps`` (2.2204e-16).

* ``kld(a, b)``: KL divergence of the sum-normalised maps in the MATLAB form
  ``KLdiv(saliencyMap=a, fixationMap=b) = sum q log(eps + q / (p + eps))``,
  i.e. KL(q || p) with p = a / sum(a), q = b / sum(b). The study's KLD12 is
  ``kld(a, b)`` and KLD21 ``kld(b, a)``. Log base 2 by default (bits), as
  the study's port (MATLAB uses the natural log: pass ``base=np.e``, values
  0.693x).
* ``jsd``: Jensen-Shannon divergence 0.5 KL(p||m) + 0.5 KL(q||m), m = (p+q)/2
  (bounded by 1 in base 2). The study's port computed KL(m||p) + KL(m||q) halves
  instead (the reversed direction, infinite when a map has a zero): not
  reproduced.
* ``pearson_cc``: MATLAB ``corr2`` of the two maps.
* ``spearman_cc``: Spearman rank correlation of the flattened maps.
* ``similarity``: histogram intersection (SIM) after min-max normalisation
  (a constant map becomes all ones, as MATLAB) then sum-normalisation.
* ``emd``: Earth Mover's distance between the sum-normalised maps with
  Euclidean ground distance between cell centres (1 = one cell), solved
  exactly by POT's network simplex (``ot.emd2``), as the study's pyemd
  (``emd_with_flow``, also a network simplex) with the same ground distance.

Maps are non-negative (KL, JSD, EMD normalise them to distributions); all
functions take (h, w) arrays of the same shape and return floats; a metric
that is undefined for the inputs (a constant map's correlation) is NaN.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from ._arrays import as_numpy

EPS = float(np.finfo(np.float64).eps)  # MATLAB eps

HEATMAP_METRICS = ("KLD12", "KLD21", "JSD", "PCC", "SCC", "EMD", "SIM")
#: log base of KL and JS divergences (the study's: 2, i.e. bits)
DEFAULT_KL_BASE = 2.0


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = as_numpy(a, np.float64)
    b = as_numpy(b, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"maps must be 2-D arrays of the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("maps are empty")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("maps contain NaN or infinite values")
    return a, b


def _distribution(m: np.ndarray, name: str) -> np.ndarray:
    if (m < 0).any():
        raise ValueError(f"map {name} has negative values; a distribution is needed")
    total = m.sum()
    return m / total if total > 0 else m  # MATLAB: normalise only if any(map(:))


def _log_base(base: float) -> float:
    if not (np.isfinite(base) and base > 0 and base != 1):
        raise ValueError(f"log base must be positive and not 1, got {base}")
    return float(np.log(base))


def kld(a, b, base: float = DEFAULT_KL_BASE) -> float:
    """KL(q || p) with p, q the sum-normalised (h, w) maps a, b, in MATLAB's
    eps-guarded form sum q log(eps + q / (p + eps)), in log base ``base``
    (default 2, the study's); argument order as MATLAB's
    KLdiv(saliencyMap, fixationMap)."""
    a, b = _pair(a, b)
    p, q = _distribution(a, "a"), _distribution(b, "b")
    return float(np.sum(q * np.log(EPS + q / (p + EPS))) / _log_base(base))


def _kl_exact(p: np.ndarray, q: np.ndarray) -> float:
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def jsd(a, b, base: float = DEFAULT_KL_BASE) -> float:
    """Jensen-Shannon divergence of the sum-normalised (h, w) maps (symmetric,
    0 when equal, at most log(2) in the given base: 1 in the default base 2)."""
    a, b = _pair(a, b)
    p, q = _distribution(a, "a"), _distribution(b, "b")
    m = 0.5 * (p + q)
    return (0.5 * _kl_exact(p, m) + 0.5 * _kl_exact(q, m)) / _log_base(base)


def pearson_cc(a, b) -> float:
    """MATLAB corr2 of two (h, w) maps; NaN when either is constant."""
    a, b = _pair(a, b)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / denom) if denom > 0 else float("nan")


def spearman_cc(a, b) -> float:
    """Spearman rank correlation of the flattened (h, w) maps; NaN when either
    is constant."""
    a, b = _pair(a, b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.spearmanr(a.ravel(), b.ravel()).statistic)


def _minmax(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min(), m.max()
    return np.ones_like(m) if hi == lo else (m - lo) / (hi - lo)


def similarity(a, b) -> float:
    """Histogram intersection SIM of two (h, w) maps: each min-max normalised
    (a constant map -> all ones), then divided by its sum; sum of the
    elementwise minimum. 1 for identical maps, 0 for disjoint supports."""
    a, b = _pair(a, b)
    p, q = _minmax(a), _minmax(b)
    return float(np.sum(np.minimum(p / p.sum(), q / q.sum())))


histogram_intersection = similarity


def _cell_distance(w: int, cells_a: np.ndarray, cells_b: np.ndarray) -> np.ndarray:
    """(len(cells_a), len(cells_b)) Euclidean distance between the centres of
    the given row-major cells of a grid w cells wide."""
    ra, ca = np.divmod(cells_a, w)
    rb, cb = np.divmod(cells_b, w)
    return np.hypot(ra[:, None] - rb[None, :], ca[:, None] - cb[None, :])


def grid_distance(h: int, w: int) -> np.ndarray:
    """(h*w, h*w) Euclidean distance between the cell centres of an h x w grid
    (row-major cell order), 1 between neighbours."""
    cells = np.arange(h * w)
    return _cell_distance(w, cells, cells)


#: pivot limit of the network simplex (POT's default, 100,000, is near what a
#: 784 x 784 problem can need). A limit reached would give a non-optimal cost:
#: 10**8 is a safety valve, and reaching it is an error (``_transport``),
#: never an approximate value.
EMD_MAX_ITERATIONS = 100_000_000


def _transport(p: np.ndarray, q: np.ndarray, cost: np.ndarray) -> float:
    """Exact min-cost transport of mass p (n,) to q (m,) (equal totals, float64)
    over cost (n, m): POT's network simplex. Raises RuntimeError when the
    solver stops before optimality (pivot limit) or finds no feasible flow."""
    import ot  # POT imports its backends (torch among them): only when an EMD is asked for

    p, q = np.ascontiguousarray(p, np.float64), np.ascontiguousarray(q, np.float64)
    cost = np.ascontiguousarray(cost, np.float64)
    with warnings.catch_warnings():
        # a non-optimal result is turned into the error below, not a warning
        warnings.filterwarnings("ignore", message="numItermax reached", category=UserWarning)
        value, log = ot.emd2(p, q, cost, numItermax=EMD_MAX_ITERATIONS, log=True)
    if log["result_code"] != 1:  # 1: OPTIMAL (0: infeasible, 2: unbounded, 3: pivot limit reached)
        raise RuntimeError(
            f"EMD transport problem ({p.size} x {q.size}) not solved to optimality: "
            f"{log['warning']} (POT result code {log['result_code']}, pivot limit {EMD_MAX_ITERATIONS})"
        )
    return float(value)


def emd(a, b, ground_distance: np.ndarray | None = None) -> float:
    """Earth Mover's distance between the sum-normalised (h, w) maps a, b.

    ground_distance: (h*w, h*w) cost between cells in row-major order; default
    ``grid_distance(h, w)`` (Euclidean, 1 per cell). Mass shared by both maps
    stays in place at no cost (exact for a metric ground distance), so only the
    surplus of a is transported to the deficit of b, exactly, by POT's network
    simplex; a custom ground_distance is solved in full (no shortcut).
    Float64 throughout; symmetric for a symmetric ground distance.
    """
    a, b = _pair(a, b)
    h, w = a.shape
    if ground_distance is not None:
        d = as_numpy(ground_distance, np.float64)
        if d.shape != (h * w, h * w):
            raise ValueError(f"ground_distance must be ({h * w}, {h * w}), got {d.shape}")
        if not (np.isfinite(d).all() and (d >= 0).all()):
            raise ValueError("ground_distance must be finite and non-negative")
    p, q = _distribution(a, "a").ravel(), _distribution(b, "b").ravel()
    if p.sum() == 0 or q.sum() == 0:
        raise ValueError("EMD needs maps with positive total mass")
    if ground_distance is not None:
        # the shared-mass shortcut needs a metric; for a general cost solve it all
        return _transport(p, q, d)
    moved = moved_mass(p, q)
    if moved is None:
        return 0.0
    src, dst, ps, qs, total = moved
    return float(total * _transport(ps, qs, _cell_distance(w, src, dst)))  # grid_distance's (src, dst) block


def moved_mass(p: np.ndarray, q: np.ndarray):
    """What a metric-cost transport of distribution p (n,) to q (n,) moves:
    the mass both share stays in place, so only p's surplus goes to q's
    deficit. Returns (src, dst, ps, qs, total): the surplus and deficit cells,
    their normalised masses and the total moved; None when nothing moves."""
    common = np.minimum(p, q)
    surplus, deficit = p - common, q - common
    src, dst = np.flatnonzero(surplus > 1e-15), np.flatnonzero(deficit > 1e-15)
    total = surplus[src].sum()
    if src.size == 0 or dst.size == 0 or total <= 1e-12:
        return None
    return src, dst, surplus[src] / total, deficit[dst] / deficit[dst].sum(), total


def heatmap_metrics(a, b, kl_base: float = DEFAULT_KL_BASE) -> dict[str, float]:
    """All map metrics of (h, w) maps a, b: KLD12 = kld(a, b), KLD21 =
    kld(b, a), JSD, PCC, SCC, EMD, SIM (``kl_base`` applies to KLD and JSD;
    default 2, the study's)."""
    return {
        "KLD12": kld(a, b, kl_base),
        "KLD21": kld(b, a, kl_base),
        "JSD": jsd(a, b, kl_base),
        "PCC": pearson_cc(a, b),
        "SCC": spearman_cc(a, b),
        "EMD": emd(a, b),
        "SIM": similarity(a, b),
    }
