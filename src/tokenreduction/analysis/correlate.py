"""Rank correlation of the accuracy difference with each similarity measure:
does a more similar reduction pattern / CLS representation go with a smaller
accuracy gap? (the study's ``calculate_correlation_*``).

p-values: scipy's large-sample approximations (Spearman: t distribution;
Kendall: normal, or scipy's exact null without ties) are far too optimistic
for the handful of pairs a group of the study holds (n = 4, perfect
agreement: the t approximation gives p = 0, the exact p is 2/4! = 0.083).
Below ``exact_below`` pairs (default 10) both p-values are exact permutation
p-values instead: the statistic is computed for all n! pairings of the two
columns and p is the fraction at least as extreme (two-sided, |stat|), which
is exact also with ties. Column ``p_method`` says which was used.
"""
from __future__ import annotations

import functools
import itertools
import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

CORRELATION_COLUMNS = ("measure", "n", "spearman_rho", "spearman_p", "kendall_tau", "kendall_p", "p_method")
#: below this many pairs the p-values are exact permutation p-values
EXACT_BELOW = 10


def _rank(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x)


def _spearman_all(rx: np.ndarray, ry_perm: np.ndarray) -> np.ndarray:
    """Pearson correlation of ranks rx (n,) with every row of ry_perm (K, n)."""
    a = rx - rx.mean()
    b = ry_perm - ry_perm.mean(axis=1, keepdims=True)
    return (b @ a) / np.sqrt((a @ a) * np.sum(b * b, axis=1))


def _kendall_all(x: np.ndarray, y_perm: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of x (n,) with every row of y_perm (K, n)."""
    n = x.size
    i, j = np.triu_indices(n, 1)
    sx = np.sign(x[i] - x[j])  # (n(n-1)/2,)
    sy = np.sign(y_perm[:, i] - y_perm[:, j]).astype(np.int8)  # (K, n(n-1)/2)
    num = sy.astype(np.float64) @ sx
    den = np.sqrt(np.sum(sx != 0) * np.sum(sy != 0, axis=1).astype(np.float64))
    return num / den


@functools.lru_cache(maxsize=4)
def _permutations(n: int) -> np.ndarray:
    """(n!, n) every permutation of range(n), the identity first (read-only)."""
    perms = np.array(list(itertools.permutations(range(n))), dtype=np.intp)
    perms.setflags(write=False)
    return perms


def permutation_pvalues(x, y) -> tuple[float, float, float, float]:
    """Exact two-sided permutation test of independence over all n! pairings
    of x, y (n,) (n < 10): (spearman rho, its p, kendall tau-b, its p);
    p = fraction of pairings with |stat| >= |observed| (observed included)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.size
    if n > 9:
        raise ValueError(f"exact permutation p-values enumerate n! pairings; n = {n} is too many (use n < 10)")
    perms = _permutations(n)  # (n!, n), identity first
    rx, ry = _rank(x), _rank(y)
    rho_all = _spearman_all(rx, ry[perms])
    tau_all = _kendall_all(x, y[perms])
    tol = 1e-12
    rho, tau = rho_all[0], tau_all[0]
    p_rho = float(np.mean(np.abs(rho_all) >= abs(rho) - tol))
    p_tau = float(np.mean(np.abs(tau_all) >= abs(tau) - tol))
    return float(rho), p_rho, float(tau), p_tau


def correlate(df: pd.DataFrame, diff_col: str, measure_cols: Sequence[str],
              exact_below: int = EXACT_BELOW) -> pd.DataFrame:
    """One row per measure: Spearman rho and its p-value, Kendall tau (tau-b,
    scipy's default) and its p-value between ``df[diff_col]`` and
    ``df[measure]``, over the rows where both are finite (``n`` of them). With
    fewer than 3 such rows, or a constant column, the statistics are NaN.
    p-values are exact permutation p-values when n < ``exact_below`` (at most
    10), scipy's otherwise (module docstring).

    Columns: measure, n, spearman_rho, spearman_p, kendall_tau, kendall_p,
    p_method ("exact-permutation", "scipy" or "" when undefined).
    """
    if exact_below > 10:
        raise ValueError(f"exact_below must be at most 10 (n! pairings are enumerated), got {exact_below}")
    missing = [c for c in [diff_col, *measure_cols] if c not in df.columns]
    if missing:
        raise ValueError(f"columns not in the table: {missing}; it has {list(df.columns)}")
    rows = []
    diff_all = pd.to_numeric(df[diff_col], errors="coerce").to_numpy(dtype=np.float64)
    for measure in measure_cols:
        values = pd.to_numeric(df[measure], errors="coerce").to_numpy(dtype=np.float64)
        ok = np.isfinite(diff_all) & np.isfinite(values)
        x, y = diff_all[ok], values[ok]
        row = {"measure": measure, "n": int(ok.sum())}
        if x.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            if x.size < exact_below:
                rho, p_rho, tau, p_tau = permutation_pvalues(x, y)
                row.update(spearman_rho=rho, spearman_p=p_rho, kendall_tau=tau, kendall_p=p_tau,
                           p_method="exact-permutation")
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    s = stats.spearmanr(x, y)
                    k = stats.kendalltau(x, y)
                row.update(spearman_rho=float(s.statistic), spearman_p=float(s.pvalue),
                           kendall_tau=float(k.statistic), kendall_p=float(k.pvalue), p_method="scipy")
        else:
            row.update(spearman_rho=np.nan, spearman_p=np.nan, kendall_tau=np.nan, kendall_p=np.nan, p_method="")
        rows.append(row)
    return pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))


def correlate_groups(df: pd.DataFrame, diff_col: str, measure_cols: Sequence[str], by: Sequence[str],
                     exact_below: int = EXACT_BELOW) -> pd.DataFrame:
    """``correlate`` within every group of rows sharing the values of ``by``
    (the study's per-method tables). Columns: CORRELATION_COLUMNS, then
    ``group`` (the values joined by '/'), then the ``by`` columns."""
    by = list(by)
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise ValueError(f"group columns not in the table: {missing}; it has {list(df.columns)}")
    columns = [*CORRELATION_COLUMNS, "group", *by]
    frames = []
    for key, sub in df.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        out = correlate(sub, diff_col, measure_cols, exact_below)
        out["group"] = "/".join(_fmt(k) for k in key)
        for col, value in zip(by, key):
            out[col] = value
        frames.append(out)
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def _fmt(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return str(value)
