"""Rank correlation of the accuracy difference with each similarity measure:
does a more similar reduction pattern / CLS representation go with a smaller
accuracy gap? (the study's ``calculate_correlation_*``)."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

CORRELATION_COLUMNS = ("measure", "n", "spearman_rho", "spearman_p", "kendall_tau", "kendall_p")


def correlate(df: pd.DataFrame, diff_col: str, measure_cols: Sequence[str]) -> pd.DataFrame:
    """One row per measure: Spearman rho and its p-value, Kendall tau (tau-b,
    scipy's default) and its p-value between ``df[diff_col]`` and
    ``df[measure]``, over the rows where both are finite (``n`` of them). With
    fewer than 3 such rows, or a constant column, the statistics are NaN.

    Columns: measure, n, spearman_rho, spearman_p, kendall_tau, kendall_p.
    """
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = stats.spearmanr(x, y)
                k = stats.kendalltau(x, y)
            row.update(spearman_rho=float(s.statistic), spearman_p=float(s.pvalue),
                       kendall_tau=float(k.statistic), kendall_p=float(k.pvalue))
        else:
            row.update(spearman_rho=np.nan, spearman_p=np.nan, kendall_tau=np.nan, kendall_p=np.nan)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))
