"""Statistics of AE against expert scores: leave-one-out Spearman rho with a bootstrap interval, Holm's adjustment.

The question asked of AE is whether it tracks the expert consensus score of each quality category across volumes
(volume-level Spearman rho), and how much any single volume drives that answer (leave-one-out: rho on the other
n - 1 volumes, summarised by the median rho and median p). :func:`spearman_loo` adds a percentile bootstrap interval
for rho; :func:`holm_adjust` adjusts p-values over categories.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats

__all__ = ["SpearmanLOO", "spearman_loo", "holm_adjust", "check_pair"]

logger = logging.getLogger(__name__)


def _as_vector(x: Any, name: str) -> np.ndarray:
    """1D float64 array from a tensor / array / sequence, with clear errors on bad input."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be numeric (array, tensor or sequence of numbers): {err}") from err
    arr = np.squeeze(arr) if arr.ndim > 1 else arr
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one value per volume (1D), got shape {np.shape(x)}")
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr))
        raise ValueError(f"{name} contains NaN or infinite values at positions {bad[:10].tolist()}")
    return arr


def check_pair(energy: Any, scores: Any, min_n: int) -> tuple[np.ndarray, np.ndarray]:
    """(energy, scores) as float64 vectors of equal length >= ``min_n``, neither constant (else ``ValueError``).

    Args:
        energy: AE per volume.
        scores: score per volume.
        min_n: fewest volumes accepted.

    Returns:
        The two 1D arrays.

    Example:
        >>> check_pair([1, 2, 3], [3, 1, 2], min_n=3)[0]
        array([1., 2., 3.])
    """
    e, s = _as_vector(energy, "energy"), _as_vector(scores, "scores")
    if e.shape != s.shape:
        raise ValueError(f"energy and scores differ in length: {e.size} vs {s.size} volumes")
    if e.size < min_n:
        raise ValueError(f"need at least {min_n} volumes, got {e.size}")
    if np.ptp(s) == 0:
        raise ValueError(f"scores are constant (all {s[0]:g}): Spearman's rho is undefined")
    if np.ptp(e) == 0:
        raise ValueError(f"energy is constant (all {e[0]:g}): Spearman's rho is undefined (are the raw maps all zero?)")
    return e, s


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair of (R, n) arrays (average ranks for ties, as scipy); NaN for a constant row."""
    rx = stats.rankdata(x, axis=1)
    ry = stats.rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(axis=1) / den
    rho[den == 0] = np.nan
    return np.clip(rho, -1.0, 1.0)


@dataclass(frozen=True)
class SpearmanLOO:
    """Result of :func:`spearman_loo`.

    Attributes:
        n: number of volumes.
        rho, p: Spearman rho and its p-value on all volumes (``scipy.stats.spearmanr``).
        loo_rho, loo_p: rho and p with volume ``i`` left out, in input order.
        median_rho, median_p: medians of ``loo_rho`` and ``loo_p`` (the study's summary).
        min_loo_rho, max_loo_rho: range of ``loo_rho``.
        most_influential: index of the volume whose removal moves rho the most.
        degenerate_folds: folds whose remaining energy or scores are constant (rho undefined); they are
            reported as rho = 0, p = 1 (no evidence of association) instead of NaN.
        ci_low, ci_high: percentile bootstrap interval for rho at level ``ci`` (NaN only if ``n_boot == 0``
            or no resample was valid).
        ci: interval level.
        n_boot: requested resamples; n_boot_valid: resamples with non-constant energy and scores (used).
    """

    n: int
    rho: float
    p: float
    loo_rho: np.ndarray = field(repr=False)
    loo_p: np.ndarray = field(repr=False)
    median_rho: float
    median_p: float
    min_loo_rho: float
    max_loo_rho: float
    most_influential: int
    degenerate_folds: tuple[int, ...]
    ci_low: float
    ci_high: float
    ci: float
    n_boot: int
    n_boot_valid: int

    def summary(self) -> dict[str, float | int]:
        """The scalar fields (no per-fold arrays) as a plain dict, e.g. for a table row or JSON."""
        d = asdict(self)
        d.pop("loo_rho"), d.pop("loo_p")
        d["degenerate_folds"] = len(self.degenerate_folds)
        return d


def spearman_loo(
    energy: Any,
    scores: Any,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    alternative: str = "two-sided",
) -> SpearmanLOO:
    """Volume-level Spearman correlation of AE with scores, on all volumes and leaving each volume out in turn.

    Every leave-one-out value is exactly ``scipy.stats.spearmanr(np.delete(energy, i), np.delete(scores, i))``;
    ties get average ranks as in scipy. A fold whose remaining energy or scores are constant has no defined rho;
    it is reported as rho = 0, p = 1 and listed in ``degenerate_folds`` so the result never holds NaN.

    Args:
        energy: AE per volume, shape (n,).
        scores: consensus score per volume, shape (n,).
        n_boot: bootstrap resamples (of volumes, with replacement) for the rho interval; 0 disables it.
            Resamples with constant energy or scores are skipped (``n_boot_valid`` counts the used ones).
        ci: level of the percentile bootstrap interval.
        seed: seed of the bootstrap resampling.
        alternative: passed to ``scipy.stats.spearmanr`` ("two-sided", "less", "greater").

    Returns:
        A :class:`SpearmanLOO`.

    Raises:
        ValueError: length mismatch, fewer than 4 volumes (each fold must keep at least 3, otherwise scipy's p is
            NaN), NaN/inf values, constant energy or constant scores over all volumes, bad ``ci``/``n_boot``.

    Example:
        >>> res = spearman_loo(ae, consensus)
        >>> res.median_rho, res.median_p
    """
    e, s = check_pair(energy, scores, min_n=4)
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    if int(n_boot) != n_boot or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, got {n_boot}")
    n = e.size
    full = stats.spearmanr(e, s, alternative=alternative)
    loo_rho, loo_p, degenerate = np.zeros(n), np.ones(n), []
    for i in range(n):
        ei, si = np.delete(e, i), np.delete(s, i)
        if np.ptp(ei) == 0 or np.ptp(si) == 0:
            degenerate.append(i)  # rho undefined: keep the documented (0, 1)
            continue
        r = stats.spearmanr(ei, si, alternative=alternative)
        loo_rho[i], loo_p[i] = float(r.statistic), float(r.pvalue)

    ci_low = ci_high = math.nan
    n_valid = 0
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(int(n_boot), n))
        boot = _spearman_rows(e[idx], s[idx])
        boot = boot[np.isfinite(boot)]
        n_valid = int(boot.size)
        if n_valid:
            ci_low, ci_high = (float(v) for v in np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2]))
        else:
            logger.warning("spearman_loo: no bootstrap resample had non-constant data; the interval is NaN")

    rho = float(full.statistic)
    return SpearmanLOO(
        n=n,
        rho=rho,
        p=float(full.pvalue),
        loo_rho=loo_rho,
        loo_p=loo_p,
        median_rho=float(np.median(loo_rho)),
        median_p=float(np.median(loo_p)),
        min_loo_rho=float(loo_rho.min()),
        max_loo_rho=float(loo_rho.max()),
        most_influential=int(np.argmax(np.abs(loo_rho - rho))),
        degenerate_folds=tuple(degenerate),
        ci_low=ci_low,
        ci_high=ci_high,
        ci=float(ci),
        n_boot=int(n_boot),
        n_boot_valid=n_valid,
    )


def holm_adjust(pvalues: Any) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), returned in input order.

    With the m p-values sorted ascending, ``p_adj(k) = max_{j <= k} min(1, (m - j + 1) * p(j))`` (1-based ``j``).

    Args:
        pvalues: p-values in [0, 1], shape (m,).

    Returns:
        Adjusted p-values, shape (m,).

    Example:
        >>> holm_adjust([0.01, 0.04, 0.03])  # -> [0.03, 0.06, 0.06]
    """
    p = _as_vector(pvalues, "pvalues") if np.size(pvalues) else np.zeros(0)
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adj = np.empty(m)
    adj[order] = np.maximum.accumulate(stepped)  # monotone: a later hypothesis never gets a smaller p
    return adj
