"""Is a whole dataset like the data a model was made for? A test on how many of its images a model's screen rejects.

For one image exchangeable with the screen's calibration images, a conformal screen at level ``alpha`` rejects with
probability at most ``alpha``; for a split-conformal score with ``n_cal`` calibration images the probability *given
the calibration set* is itself random, ``C ~ Beta(l, n_cal + 1 - l)`` with ``l = floor(alpha (n_cal + 1))`` (Vovk,
2012). The images of a dataset share that calibration set, so the number ``K`` of rejections among ``n`` in-
distribution images is Beta-binomial, not binomial: ``K ~ BetaBinomial(n, l, n_cal + 1 - l)``. The dataset's p-value
is ``P(K >= k)``, small when the screen rejects more images than an in-distribution dataset would. (Exact for a
split-conformal score such as ``combine="maxz"``; the symmetric Fisher combination is valid image by image and this
test is then a close approximation.)

Example:
    >>> dataset_test([True] * 14 + [False], n_cal=200, alpha=0.05)["p_value"]
    0.52...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scipy.stats import betabinom

__all__ = ["dataset_test", "beta_binomial_sf"]


def beta_binomial_sf(k: int, n: int, a: float, b: float) -> float:
    """``P(K >= k)`` for ``K ~ BetaBinomial(n, a, b)``: ``scipy.stats.betabinom.sf(k - 1, n, a, b)``.

    Example:
        >>> round(beta_binomial_sf(1, 10, 1.0, 1.0), 4)  # uniform over 0..10
        0.9091
    """
    return float(min(1.0, max(0.0, betabinom.sf(int(k) - 1, int(n), a, b))))


def dataset_test(in_distribution: Sequence[bool], n_cal: int, alpha: float = 0.05) -> dict[str, Any]:
    """Dataset-level verdict from a screen's per-image answers.

    Args:
        in_distribution: the screen's ``in_distribution`` of every image of the dataset.
        n_cal: the screen's number of calibration images (``Screen.n_cal_``).
        alpha: the screen's level (``Screen.alpha``).

    Returns:
        ``n``, ``n_rejected``, ``expected_rate`` (``l / (n_cal + 1)``: what an in-distribution dataset shows on
        average), ``p_value`` (``P(K >= n_rejected)`` under the Beta-binomial above) and ``like_training_data``
        (``p_value > alpha``).

    Raises:
        ValueError: no images, or ``n_cal`` < 1.

    Example:
        >>> dataset_test([False] * 15, n_cal=55, alpha=0.05)["like_training_data"]
        False
    """
    flags = [bool(v) for v in in_distribution]
    if not flags:
        raise ValueError("dataset_test needs at least one image")
    if int(n_cal) < 1:
        raise ValueError(f"n_cal must be >= 1, got {n_cal}")
    n, k = len(flags), sum(1 for v in flags if not v)
    l_rej = math.floor(alpha * (n_cal + 1))
    if l_rej == 0:  # the screen cannot reject an in-distribution image: any rejection is evidence
        p = 1.0 if k == 0 else 0.0
    else:
        p = beta_binomial_sf(k, n, float(l_rej), float(n_cal + 1 - l_rej))
    return {
        "n": n,
        "n_rejected": k,
        "expected_rate": l_rej / (n_cal + 1),
        "p_value": p,
        "like_training_data": p > alpha,
    }
