"""Volume-level regression metrics of predictions against reference scores (MAE, RMSE, bias, Spearman rho)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["regression_metrics"]


def regression_metrics(pred: Any, target: Any, categories: Sequence[str]) -> pd.DataFrame:
    """Per-category volume-level regression metrics: n, MAE, RMSE, bias, Spearman rho (and p) of pred vs target.

    Args:
        pred: (n, K) predictions.
        target: (n, K) reference scores (consensus).
        categories: K names.

    Returns:
        DataFrame ``category, n, mae, rmse, bias, spearman_rho, spearman_p`` (rho and p are NaN when fewer than 3
        volumes or a constant column make them undefined).

    Example:
        >>> regression_metrics(np.array([[1.0], [2.0], [3.5]]), np.array([[1.0], [2.5], [3.0]]), ["overall"])
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    p, t = (a.reshape(-1, 1) if a.ndim == 1 else a for a in (p, t))
    if p.shape != t.shape or p.shape[1] != len(categories):
        raise ValueError(f"pred {p.shape} and target {t.shape} must both be (n, {len(categories)})")
    rows = []
    for j, cat in enumerate(categories):
        err = p[:, j] - t[:, j]
        rho = pv = math.nan
        if len(err) >= 3 and np.ptp(p[:, j]) > 0 and np.ptp(t[:, j]) > 0:
            r = stats.spearmanr(p[:, j], t[:, j])
            rho, pv = float(r.statistic), float(r.pvalue)
        rows.append(
            {
                "category": cat,
                "n": len(err),
                "mae": float(np.abs(err).mean()) if len(err) else math.nan,
                "rmse": float(np.sqrt((err**2).mean())) if len(err) else math.nan,
                "bias": float(err.mean()) if len(err) else math.nan,
                "spearman_rho": rho,
                "spearman_p": pv,
            }
        )
    return pd.DataFrame(rows)
