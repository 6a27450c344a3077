"""Model-level verdicts: a model is suitable or not from the distribution of its per-sample P(suitable).

Per-sample votes are not a verdict on a model: a model's verdict comes from the mean of its per-sample
P(suitable) over the dataset with a seeded bootstrap confidence interval (percentile or BCa). The model is
**suitable** only when the interval's lower bound is above the threshold, **not suitable** when its upper bound is
below, else **undecided** (the data cannot tell at that confidence).

Example:
    >>> verdicts = model_verdicts(predictions, threshold=0.5, confidence=0.95, seed=0)
    >>> verdicts[["model", "mean_p_suitable", "ci_low", "ci_high", "verdict"]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri
from sklearn.metrics import roc_auc_score

__all__ = [
    "VERDICTS",
    "bootstrap_mean_ci",
    "verdict_of",
    "model_verdicts",
    "model_level_auc",
    "format_verdicts",
    "verdicts_to_dict",
]

#: verdict names
VERDICTS = ("suitable", "not suitable", "undecided")
_CI_METHODS = ("percentile", "bca")


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_boot: int = 2000,
    method: str = "bca",
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of ``values`` and its two-sided bootstrap confidence interval (resampling the values, seeded).

    Args:
        values: one value per sample (finite; at least 2).
        confidence: coverage of the interval, in (0, 1).
        n_boot: bootstrap resamples.
        method: ``"percentile"`` or ``"bca"`` (bias-corrected and accelerated, Efron 1987; acceleration from the
            jackknife).
        seed: seed of the resampling (``numpy.random.default_rng``).

    Returns:
        ``(mean, low, high)``; a constant sample gives ``(v, v, v)``.

    Example:
        >>> bootstrap_mean_ci([0.8, 0.7, 0.9, 0.75], confidence=0.9, seed=0)
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 values, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError("values contain NaN or infinite entries")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if method not in _CI_METHODS:
        raise ValueError(f"method must be one of {_CI_METHODS}, got {method!r}")
    if int(n_boot) < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot!r}")
    theta = float(x.mean())
    if np.ptp(x) == 0:
        return theta, theta, theta
    n, b = x.size, int(n_boot)
    rng = np.random.default_rng(seed)
    # resample in chunks so that memory stays ~ 8 MB whatever n and n_boot
    chunk = max(1, 1_000_000 // n)
    boot = np.concatenate([x[rng.integers(0, n, size=(min(chunk, b - i), n))].mean(1) for i in range(0, b, chunk)])
    alpha = (1.0 - confidence) / 2.0
    if method == "percentile":
        lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
        return theta, float(lo), float(hi)
    # BCa: bias correction z0 from the share of resamples below the estimate, acceleration from the jackknife
    share = (np.sum(boot < theta) + 0.5 * np.sum(boot == theta)) / b
    z0 = ndtri(np.clip(share, 0.5 / b, 1 - 0.5 / b))
    jack = (x.sum() - x) / (n - 1)
    d = jack.mean() - jack
    denom = 6.0 * np.sum(d**2) ** 1.5
    a = float(np.sum(d**3) / denom) if denom > 0 else 0.0
    z = ndtri(np.array([alpha, 1.0 - alpha]))
    adj = ndtr(z0 + (z0 + z) / (1.0 - a * (z0 + z)))
    lo, hi = np.quantile(boot, np.clip(adj, 0.0, 1.0))
    return theta, float(lo), float(hi)


def verdict_of(low: float, high: float, threshold: float = 0.5) -> str:
    """``"suitable"`` if ``low > threshold``, ``"not suitable"`` if ``high < threshold``, else ``"undecided"``."""
    if low > threshold:
        return "suitable"
    if high < threshold:
        return "not suitable"
    return "undecided"


def model_verdicts(
    predictions: pd.DataFrame,
    threshold: float = 0.5,
    confidence: float = 0.95,
    n_boot: int = 2000,
    method: str = "bca",
    seed: int = 0,
    score: str = "p_suitable",
) -> pd.DataFrame:
    """One verdict per model from its per-sample scores.

    Args:
        predictions: one row per (sample, model) with ``model``, ``score`` (P(suitable), e.g. the out-of-fold
            predictions of a leave-models-out cross-validation) and optionally ``label``.
        threshold: P(suitable) threshold of the verdict.
        confidence: coverage of the bootstrap interval.
        n_boot: bootstrap resamples.
        method: ``"bca"`` or ``"percentile"``.
        seed: seed of the bootstrap (the same seed for every model).
        score: column of the per-sample score.

    Returns:
        DataFrame ``model, label, n, mean_p_suitable, ci_low, ci_high, verdict`` (input model order); ``label`` is
        ``<NA>`` where unknown.

    Example:
        >>> model_verdicts(pd.read_csv("report/predictions.csv"))
    """
    if not isinstance(predictions, pd.DataFrame) or not {"model", score} <= set(predictions.columns):
        raise ValueError(f"predictions must be a DataFrame with 'model' and {score!r} columns")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    rows = []
    for name, part in predictions.groupby("model", sort=False):
        mean, lo, hi = bootstrap_mean_ci(part[score].to_numpy(), confidence, n_boot, method, seed)
        label = part["label"].iloc[0] if "label" in part.columns else pd.NA
        rows.append(
            {
                "model": name,
                "label": pd.NA if pd.isna(label) else int(label),
                "n": len(part),
                "mean_p_suitable": mean,
                "ci_low": lo,
                "ci_high": hi,
                "verdict": verdict_of(lo, hi, threshold),
            }
        )
    out = pd.DataFrame(rows)
    out["label"] = out["label"].astype("Int64")
    return out


def model_level_auc(verdicts: pd.DataFrame, score: str = "mean_p_suitable") -> float:
    """ROC AUC over models (label vs ``score``); NaN when the labelled models hold one class only."""
    known = verdicts[verdicts["label"].notna()]
    y = known["label"].astype(int).to_numpy()
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, known[score].to_numpy(dtype=np.float64)))


def format_verdicts(verdicts: pd.DataFrame, protocol: str, confidence: float = 0.95, threshold: float = 0.5) -> str:
    """The per-model table as text, its protocol and interval named in the header.

    Example:
        >>> print(format_verdicts(v, "leave-models-out"))
    """
    pct = f"{100 * confidence:g}%"
    lines = [
        f"per-model verdicts ({protocol}, out-of-fold P(suitable); mean with {pct} bootstrap CI; threshold "
        f"{threshold:g})",
        f"{'model':<28} {'label':>5} {'mean':>6} {pct + ' CI':>17}  verdict",
    ]
    for r in verdicts.itertuples(index=False):
        lab = "?" if pd.isna(r.label) else str(int(r.label))
        lines.append(
            f"{str(r.model):<28} {lab:>5} {r.mean_p_suitable:6.3f} [{r.ci_low:6.3f}, {r.ci_high:6.3f}]  {r.verdict}"
        )
    return "\n".join(lines)


def verdicts_to_dict(verdicts: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """``{model: {label, n, mean_p_suitable, ci_low, ci_high, verdict}}`` (JSON-ready)."""
    out = {}
    for r in verdicts.to_dict(orient="records"):
        name = str(r.pop("model"))
        r["label"] = None if pd.isna(r["label"]) else int(r["label"])
        out[name] = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()}
    return out
