"""Similarity of two sets of CLS features over the same images.

Convention (the study's): a representation is a ``(D, N)`` matrix, D feature
dimensions ("neurons") by N images, and both matrices of a comparison hold the
same images in the same order (D may differ). Everything is computed in
float64 with numpy; torch tensors (any float dtype) are accepted.

Preprocessing (``preprocess``, as the study): centre each feature over the
images, then divide the whole matrix by its Frobenius norm. Every public
metric applies it itself (it is idempotent), so raw features may be passed.

What is returned (the study's reporting, column names of
``feature_similarities``):

==============  ======================================================  ==========
column          quantity                                                 identical
==============  ======================================================  ==========
PWCCA           projection-weighted CCA *distance* (asymmetric: the      0
                weights come from A)
MeanSqCCA       mean squared canonical correlation (a *similarity*)      1
MeanCCA         mean canonical correlation (a *similarity*)              1
LinCKA          linear CKA *distance* 1 - CKA                            0
LinCKAPrime     debiased linear CKA *distance* 1 - CKA_unbiased          0
Procrustes      orthogonal Procrustes *distance* (on unit-norm inputs:   0
                2 - 2 ||A B^T||_*, in [0, 2])
==============  ======================================================  ==========

Differences from the reference code (deliberate):

* CCA whitening is the study's symmetric eigen-whitening (A A^T)^(-1/2),
  computed from the thin SVD of A (the eigenvectors of A A^T are A's left
  singular vectors, its eigenvalues the squared singular values), so the
  condition number is not squared. Directions whose singular value is below
  ``rtol`` x the largest are treated as absent (the reference keeps every
  eigenvalue > 0, which turns round-off into spurious unit-variance
  directions). The canonical correlations are the min(rank A, rank B)
  non-trivial ones; the reference divides by min(D_A, D_B), which differs
  only for rank-deficient inputs.
* PWCCA when A is wider than B: two definitions, chosen by ``pwcca``.
  ``"study"`` (the default, the study's ``pwcca_dist``): the weights of all
  r_A canonical variates of A are normalised together and the variates
  without a partner in B count with correlation 0, i.e.
  1 - sum_{i<=k} w_i rho_i / sum_{i<=r_A} w_i. ``"paired"`` (this project's
  variant): the weights are normalised over the k = min(r_A, r_B) paired
  variates only, 1 - sum_{i<=k} w_i rho_i / sum_{i<=k} w_i. The two agree
  when D_A <= D_B; on a 384-vs-192 pair they can differ by a factor of two.
  The unpaired variates span a null space whose basis the SVD picks, so the
  study's value depends on that choice; it is kept as the default to
  reproduce the study's tables.
* Degenerate CCA: with N images <= D_A + D_B features (after centring the
  row spaces live in N - 1 dimensions, so they must intersect), some
  canonical correlations are 1 by construction and PWCCA / mean (squared)
  CCA say nothing about the representations. Those three are NaN for such a
  pair and a :class:`DegenerateCCAWarning` names the sizes (the study
  asserted D < N per matrix only). CKA and Procrustes are unaffected.
* ``lin_cka_prime_dist`` is the *debiased* linear CKA (unbiased HSIC
  estimator of Song et al. 2012, as used by Kornblith et al. 2019). The
  reference's function of that name (unused in the study) computed another
  normalisation, 1 - 2 ||B A^T||_F^2 / (||A||_F^4 + ||B||_F^4).
* A representation that is constant over the images has no defined
  similarity: every metric returns NaN for it instead of dividing by zero.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from ._arrays import as_numpy

DEFAULT_RTOL = 1e-6

FEATURE_METRICS = ("PWCCA", "MeanSqCCA", "MeanCCA", "LinCKA", "LinCKAPrime", "Procrustes")
CCA_METRICS = ("PWCCA", "MeanSqCCA", "MeanCCA")
#: PWCCA normalisation: "study" (over all of A's variates; the default) or
#: "paired" (over the paired variates only; this project's variant)
PWCCA_MODES = ("study", "paired")


class DegenerateCCAWarning(UserWarning):
    """CCA of two representations with N <= D_A + D_B: correlations forced to 1."""


def cca_degenerate(d_a: int, d_b: int, n: int) -> bool:
    """True when N images cannot separate D_A + D_B features (N <= D_A + D_B):
    canonical correlations of 1 are then forced, whatever the data."""
    return int(n) <= int(d_a) + int(d_b)


def _warn_degenerate(d_a: int, d_b: int, n: int) -> None:
    warnings.warn(
        f"degenerate CCA: {n} images <= {d_a} + {d_b} features, canonical correlations are forced to 1; "
        f"PWCCA / MeanCCA / MeanSqCCA reported as NaN (use more than {d_a + d_b} images)",
        DegenerateCCAWarning,
        stacklevel=3,
    )


def _check_mode(pwcca: str) -> str:
    if pwcca not in PWCCA_MODES:
        raise ValueError(f"unknown PWCCA mode {pwcca!r}: use 'study' (the study's normalisation) or 'paired'")
    return pwcca


def _check_pair(A, B) -> tuple[np.ndarray, np.ndarray]:
    A = as_numpy(A, np.float64)
    B = as_numpy(B, np.float64)
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"features must be 2-D (D, N) matrices, got shapes {A.shape} and {B.shape}")
    if A.shape[1] != B.shape[1]:
        raise ValueError(
            f"features must cover the same images: A has {A.shape[1]} columns (images), B has {B.shape[1]}"
        )
    if A.shape[1] < 2:
        raise ValueError(f"need at least 2 images (columns), got {A.shape[1]}")
    if not (np.isfinite(A).all() and np.isfinite(B).all()):
        raise ValueError("features contain NaN or infinite values")
    return A, B


def preprocess(A) -> np.ndarray:
    """(D, N) -> (D, N) float64: each feature centred over the N images, then
    the matrix divided by its Frobenius norm. A constant representation (zero
    after centring) is returned as zeros."""
    A = as_numpy(A, np.float64)
    if A.ndim != 2:
        raise ValueError(f"features must be a 2-D (D, N) matrix, got shape {A.shape}")
    A = A - A.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(A)
    return A / norm if norm > 0 else A


def _degenerate(A: np.ndarray, B: np.ndarray) -> bool:
    return not (np.any(A) and np.any(B))


class CCAResult(NamedTuple):
    """rho: (min(r_A, r_B),) canonical correlations, descending.
    variates_a: (r_A, N) canonical variates of A (unit-norm rows), the first
    len(rho) paired with rho. r_* = numerical ranks."""

    rho: np.ndarray
    variates_a: np.ndarray  # (r_A, N)


def _whiten(A: np.ndarray, rtol: float) -> np.ndarray:
    """(D, N) -> (r, N): orthonormal basis of A's row space (= the rows of the
    whitened (A A^T)^(-1/2) A restricted to the r kept directions)."""
    _, s, vt = np.linalg.svd(A, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return vt[:0]
    return vt[s > rtol * s[0]]


def _cca(A: np.ndarray, B: np.ndarray, rtol: float) -> CCAResult:
    """CCA of preprocessed (D_A, N), (D_B, N)."""
    return _cca_whitened(_whiten(A, rtol), _whiten(B, rtol))


def _cca_whitened(wa: np.ndarray, wb: np.ndarray) -> CCAResult:
    """CCA of whitened (r_A, N), (r_B, N) row-space bases (``_whiten``)."""
    p, rho, _ = np.linalg.svd(wa @ wb.T, full_matrices=True)  # (r_A, r_A), (min r,), (r_B, r_B)
    return CCAResult(np.clip(rho, 0.0, 1.0), p.T @ wa)


def cca_correlations(A, B, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """(D_A, N), (D_B, N) -> (min(rank A, rank B),) canonical correlations in
    [0, 1], descending. ``rtol``: singular values below rtol x the largest are
    dropped (rank deficiency)."""
    A, B = _check_pair(A, B)
    A, B = preprocess(A), preprocess(B)
    if _degenerate(A, B):
        return np.full(0, np.nan)
    return _cca(A, B, rtol).rho


def _cca_or_none(A, B, rtol: float, check_size: bool):
    """(preprocessed A, B, CCA) or None when undefined (constant input, or N
    <= D_A + D_B with ``check_size``: warns)."""
    A, B = _check_pair(A, B)
    if check_size and cca_degenerate(A.shape[0], B.shape[0], A.shape[1]):
        _warn_degenerate(A.shape[0], B.shape[0], A.shape[1])
        return None
    A, B = preprocess(A), preprocess(B)
    if _degenerate(A, B):
        return None
    return A, B, _cca(A, B, rtol)


def mean_cca_corr(A, B, rtol: float = DEFAULT_RTOL) -> float:
    """Mean canonical correlation of (D_A, N), (D_B, N) (similarity, 1 = a
    linear map apart). NaN (and a warning) when N <= D_A + D_B."""
    got = _cca_or_none(A, B, rtol, check_size=True)
    if got is None or not got[2].rho.size:
        return float("nan")
    return float(got[2].rho.mean())


def mean_sq_cca_corr(A, B, rtol: float = DEFAULT_RTOL) -> float:
    """Mean squared canonical correlation of (D_A, N), (D_B, N) (similarity).
    NaN (and a warning) when N <= D_A + D_B."""
    got = _cca_or_none(A, B, rtol, check_size=True)
    if got is None or not got[2].rho.size:
        return float("nan")
    return float((got[2].rho ** 2).mean())


def _pwcca(A: np.ndarray, cca: CCAResult, mode: str = "study") -> float:
    # weight of each canonical variate of A: summed |inner product| with A's
    # features (Morcos et al. 2018); "study": normalised over all of A's
    # variates (the unpaired ones enter the sum with correlation 0),
    # "paired": normalised over the paired ones only.
    k = cca.rho.size
    weights = np.abs(cca.variates_a @ A.T).sum(axis=1)
    total = weights.sum() if mode == "study" else weights[:k].sum()
    if total == 0:
        return float("nan")
    return float(1.0 - (weights[:k] / total) @ cca.rho)


def pwcca_dist(A, B, rtol: float = DEFAULT_RTOL, pwcca: str = "study") -> float:
    """Projection-weighted CCA distance of (D_A, N) to (D_B, N) (0 when
    identical; asymmetric, weighted by A). ``pwcca``: "study" or "paired"
    normalisation (module docstring); NaN (and a warning) when N <= D_A + D_B."""
    _check_mode(pwcca)
    got = _cca_or_none(A, B, rtol, check_size=True)
    if got is None:
        return float("nan")
    return _pwcca(got[0], got[2], pwcca)


def _lin_cka(A: np.ndarray, B: np.ndarray) -> float:
    da, n = A.shape
    db = B.shape[0]
    if da * db <= n * n:  # feature space: (D_B, D_A) products
        cross = np.sum((B @ A.T) ** 2)
        norm = np.linalg.norm(A @ A.T) * np.linalg.norm(B @ B.T)
    else:  # image space: (N, N) Gram matrices, same value
        ka, kb = A.T @ A, B.T @ B
        cross = np.sum(ka * kb)
        norm = np.linalg.norm(ka) * np.linalg.norm(kb)
    return float(1.0 - cross / norm)


def lin_cka_dist(A, B) -> float:
    """Linear CKA distance 1 - ||B A^T||_F^2 / (||A A^T||_F ||B B^T||_F) of
    (D_A, N), (D_B, N) (0 when identical up to rotation and scale)."""
    A, B = _check_pair(A, B)
    A, B = preprocess(A), preprocess(B)
    if _degenerate(A, B):
        return float("nan")
    return _lin_cka(A, B)


def _unbiased_hsic(A: np.ndarray, B: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al. 2012) of linear kernels K = A^T A,
    L = B^T B ((N, N), never formed): with K~, L~ their zero-diagonal versions,
    [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = A.shape[1]
    da, db = np.sum(A * A, axis=0), np.sum(B * B, axis=0)  # (N,) diagonals
    ka = A.sum(axis=1) @ A - da  # (N,) row sums of K~
    lb = B.sum(axis=1) @ B - db
    if A.shape[0] * B.shape[0] <= n * n:
        trace = np.sum((B @ A.T) ** 2) - da @ db
    else:
        trace = np.sum((A.T @ A) * (B.T @ B)) - da @ db
    return float(
        (trace + ka.sum() * lb.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (ka @ lb)) / (n * (n - 3))
    )


def _lin_cka_prime(A: np.ndarray, B: np.ndarray) -> float:
    if A.shape[1] < 4:
        raise ValueError(f"debiased CKA needs at least 4 images, got {A.shape[1]}")
    hab = _unbiased_hsic(A, B)
    haa, hbb = _unbiased_hsic(A, A), _unbiased_hsic(B, B)
    if haa <= 0 or hbb <= 0:
        return float("nan")
    return float(1.0 - hab / np.sqrt(haa * hbb))


def lin_cka_prime_dist(A, B) -> float:
    """Debiased linear CKA distance of (D_A, N), (D_B, N) (N >= 4):
    1 - HSIC_1(A, B) / sqrt(HSIC_1(A, A) HSIC_1(B, B)) with the unbiased HSIC
    estimator. NaN when a self-HSIC estimate is not positive."""
    A, B = _check_pair(A, B)
    A, B = preprocess(A), preprocess(B)
    if _degenerate(A, B):
        return float("nan")
    return _lin_cka_prime(A, B)


def _procrustes(A: np.ndarray, B: np.ndarray) -> float:
    nuclear = np.linalg.svd(A @ B.T, compute_uv=False).sum()
    return float(max(np.sum(A * A) + np.sum(B * B) - 2.0 * nuclear, 0.0))


def procrustes_dist(A, B) -> float:
    """Orthogonal Procrustes distance ||A||_F^2 + ||B||_F^2 - 2 ||A B^T||_* of
    the preprocessed (D_A, N), (D_B, N) (0 when a rotation apart)."""
    A, B = _check_pair(A, B)
    A, B = preprocess(A), preprocess(B)
    if _degenerate(A, B):
        return float("nan")
    return _procrustes(A, B)


def feature_similarities(A, B, rtol: float = DEFAULT_RTOL, pwcca: str = "study") -> dict[str, float]:
    """All metrics of (D_A, N), (D_B, N) at once (one preprocessing, one CCA):
    {PWCCA, MeanSqCCA, MeanCCA, LinCKA, LinCKAPrime, Procrustes}; see the
    module docstring for which are distances. LinCKAPrime is NaN for N < 4;
    the CCA metrics are NaN (with a :class:`DegenerateCCAWarning`) when
    N <= D_A + D_B. ``pwcca``: "study" (default) or "paired" normalisation."""
    _check_mode(pwcca)
    A, B = _check_pair(A, B)
    degenerate = cca_degenerate(A.shape[0], B.shape[0], A.shape[1])
    if degenerate:
        _warn_degenerate(A.shape[0], B.shape[0], A.shape[1])
    A, B = preprocess(A), preprocess(B)
    if _degenerate(A, B):
        return {k: float("nan") for k in FEATURE_METRICS}
    nan = float("nan")
    cca = None if degenerate else _cca(A, B, rtol)
    rho = cca.rho if cca is not None else np.zeros(0)
    return {
        "PWCCA": _pwcca(A, cca, pwcca) if cca is not None else nan,
        "MeanSqCCA": float((rho**2).mean()) if rho.size else nan,
        "MeanCCA": float(rho.mean()) if rho.size else nan,
        "LinCKA": _lin_cka(A, B),
        "LinCKAPrime": _lin_cka_prime(A, B) if A.shape[1] >= 4 else float("nan"),
        "Procrustes": _procrustes(A, B),
    }


#: the metrics of ``feature_similarities`` whose value does not depend on the
#: order of the two representations (all but PWCCA, which A weights)
SYMMETRIC_FEATURE_METRICS = ("MeanSqCCA", "MeanCCA", "LinCKA", "LinCKAPrime", "Procrustes")


def feature_similarities_both(A, B, rtol: float = DEFAULT_RTOL,
                              pwcca: str = "study") -> tuple[dict[str, float], dict[str, float]]:
    """``(feature_similarities(A, B), feature_similarities(B, A))`` of (D_A, N),
    (D_B, N) for about the cost of one: the symmetric metrics
    (:data:`SYMMETRIC_FEATURE_METRICS`) are computed once and mirrored, each
    matrix is preprocessed and whitened once, and PWCCA is computed in both
    directions (weighted by A, then by B). Equal to the two calls up to
    floating-point round-off (a transposed product sums in another order).
    Warns once (:class:`DegenerateCCAWarning`) when N <= D_A + D_B."""
    _check_mode(pwcca)
    A, B = _check_pair(A, B)
    degenerate = cca_degenerate(A.shape[0], B.shape[0], A.shape[1])
    if degenerate:
        _warn_degenerate(A.shape[0], B.shape[0], A.shape[1])
    A, B = preprocess(A), preprocess(B)
    if _degenerate(A, B):
        nan = {k: float("nan") for k in FEATURE_METRICS}
        return nan, dict(nan)
    nan = float("nan")
    if degenerate:
        ab = {"PWCCA": nan, "MeanSqCCA": nan, "MeanCCA": nan}
        pwcca_ba = nan
    else:
        wa, wb = _whiten(A, rtol), _whiten(B, rtol)
        cca_ab, cca_ba = _cca_whitened(wa, wb), _cca_whitened(wb, wa)
        rho = cca_ab.rho
        ab = {"PWCCA": _pwcca(A, cca_ab, pwcca),
              "MeanSqCCA": float((rho**2).mean()) if rho.size else nan,
              "MeanCCA": float(rho.mean()) if rho.size else nan}
        pwcca_ba = _pwcca(B, cca_ba, pwcca)
    ab.update(LinCKA=_lin_cka(A, B), LinCKAPrime=_lin_cka_prime(A, B) if A.shape[1] >= 4 else nan,
              Procrustes=_procrustes(A, B))
    ab = {k: ab[k] for k in FEATURE_METRICS}
    ba = {**ab, "PWCCA": pwcca_ba}
    return ab, ba
