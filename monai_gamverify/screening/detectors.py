"""Feature-density detectors and conformal p-values of the in-distribution screen.

Every detector here returns an **anomaly score: higher = less like the training data** (the opposite sign of the
scores in :mod:`monai_gamverify.kplus1`, whose convention is higher = in-distribution).

- :class:`ClassMahalanobis`: min over classes of the squared Mahalanobis distance with a shared covariance
  (Lee et al., 2018), computed by :class:`monai_gamverify.metrics.ood.MahalanobisDetector`.
- :class:`RelativeMahalanobis`: that distance minus the distance to one Gaussian fitted to all the data
  (Ren et al., 2021), which removes the part of the distance that every input shares.
- :class:`KNNDetector`: distance to the k-th nearest training feature after L2 normalisation (cosine geometry;
  Sun et al., 2022).
- :func:`conformal_pvalues`: ``(1 + #{s_cal >= s}) / (n + 1)``; :func:`bonferroni` combines several.

Example:
    >>> det = KNNDetector(k=5).fit(train_feats)
    >>> p = conformal_pvalues(det.score(cal_feats), det.score(test_feats))
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from monai_gamverify.metrics.ood import MahalanobisDetector

__all__ = [
    "pool_features",
    "ClassMahalanobis",
    "RelativeMahalanobis",
    "KNNDetector",
    "RobustScaler",
    "conformal_pvalues",
    "bonferroni",
    "fisher_conformal",
    "tail_extended",
]


def pool_features(x: Any, moments: int = 1) -> np.ndarray:
    """(B, C, *spatial) activations -> (B, C) channel means (``moments=2``: means then standard deviations,
    (B, 2C)); (B, D) features pass through. Returns float64 numpy.

    Example:
        >>> pool_features(torch.ones(2, 3, 4, 4, 4), moments=2).shape
        (2, 6)
    """
    t = torch.as_tensor(x).detach()
    if t.ndim < 2:
        raise ValueError(f"features must have shape (B, D) or (B, C, *spatial), got {tuple(t.shape)}")
    if t.ndim == 2:
        return t.to(torch.float64).cpu().numpy()
    flat = t.reshape(t.shape[0], t.shape[1], -1)
    if flat.dtype not in (torch.float32, torch.float64):  # half precision (AMP), integers: square in float32
        flat = flat.float()
    # sums accumulated in float64 where the activations are (no float64 copy of a large activation: 4x faster)
    mean = flat.mean(-1, dtype=torch.float64)
    parts = [mean]
    if moments >= 2:
        centred = flat - mean.to(flat.dtype)[..., None]
        parts.append((centred * centred).mean(-1, dtype=torch.float64).sqrt())
    return torch.cat(parts, dim=1).cpu().numpy()


def _mahalanobis_state(det: MahalanobisDetector, prefix: str) -> dict[str, np.ndarray]:
    return {
        f"{prefix}classes": det.classes_.cpu().numpy(),
        f"{prefix}means": det.means_.cpu().numpy(),
        f"{prefix}covariance": det.covariance_.cpu().numpy(),
        f"{prefix}precision": det.precision_.cpu().numpy(),
    }


def _mahalanobis_from_state(arrays: dict[str, np.ndarray], prefix: str, reg: float) -> MahalanobisDetector:
    det = MahalanobisDetector(reg=reg)
    det.classes_ = torch.as_tensor(arrays[f"{prefix}classes"])
    det.means_ = torch.as_tensor(arrays[f"{prefix}means"], dtype=torch.float64)
    det.covariance_ = torch.as_tensor(arrays[f"{prefix}covariance"], dtype=torch.float64)
    det.precision_ = torch.as_tensor(arrays[f"{prefix}precision"], dtype=torch.float64)
    det.n_features_in_ = int(det.means_.shape[1])
    return det


class ClassMahalanobis:
    """Class-conditional Mahalanobis anomaly score ``min_k (x - mu_k)^T S^-1 (x - mu_k)`` (shared covariance S).

    Args:
        reg: ridge on the covariance diagonal relative to its mean variance (see ``MahalanobisDetector``).

    Example:
        >>> ClassMahalanobis().fit(feats, labels).score(feats[:2])
    """

    def __init__(self, reg: float = 1e-3) -> None:
        self.reg = float(reg)
        self.det: MahalanobisDetector | None = None

    def fit(self, features: np.ndarray, labels: np.ndarray) -> ClassMahalanobis:
        """Fit the class means and the shared covariance on (N, D) features and (N,) integer labels."""
        self.det = MahalanobisDetector(reg=self.reg).fit(torch.as_tensor(features), torch.as_tensor(labels))
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) anomaly scores (squared distance to the closest class mean)."""
        if self.det is None:
            raise RuntimeError("ClassMahalanobis is not fitted")
        return (-self.det.score(torch.as_tensor(features))).cpu().numpy()

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays that rebuild the detector (for ``.npz``)."""
        if self.det is None:
            raise RuntimeError("ClassMahalanobis is not fitted")
        return _mahalanobis_state(self.det, prefix)

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], prefix: str, reg: float) -> ClassMahalanobis:
        """Inverse of :meth:`state`."""
        obj = cls(reg)
        obj.det = _mahalanobis_from_state(arrays, prefix, reg)
        return obj


class RelativeMahalanobis:
    """Relative Mahalanobis distance (Ren et al., 2021): ``min_k d_k^2(x) - d_0^2(x)``, where ``d_0`` is the
    distance to one Gaussian fitted to all training features (labels ignored).

    Example:
        >>> RelativeMahalanobis().fit(feats, labels).score(test_feats)
    """

    def __init__(self, reg: float = 1e-3) -> None:
        self.reg = float(reg)
        self.cls = ClassMahalanobis(reg)
        self.background = ClassMahalanobis(reg)

    def fit(self, features: np.ndarray, labels: np.ndarray) -> RelativeMahalanobis:
        """Fit the class-conditional model and the single background Gaussian."""
        self.cls.fit(features, labels)
        self.background.fit(features, np.zeros(len(features), dtype=np.int64))
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) relative Mahalanobis anomaly scores."""
        return self.cls.score(features) - self.background.score(features)

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays that rebuild the detector."""
        return {**self.cls.state(prefix + "cls_"), **self.background.state(prefix + "bg_")}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], prefix: str, reg: float) -> RelativeMahalanobis:
        """Inverse of :meth:`state`."""
        obj = cls(reg)
        obj.cls = ClassMahalanobis.from_state(arrays, prefix + "cls_", reg)
        obj.background = ClassMahalanobis.from_state(arrays, prefix + "bg_", reg)
        return obj


def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


class KNNDetector:
    """Distance to the k-th nearest training feature, both L2-normalised (so distance = sqrt(2 - 2 cos)); the search
    is ``sklearn.neighbors.NearestNeighbors`` over the stored bank.

    Args:
        k: neighbour rank (clipped to the bank size).

    Example:
        >>> KNNDetector(k=5).fit(train_feats).score(test_feats)
    """

    def __init__(self, k: int = 5) -> None:
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k!r}")
        self.k = int(k)
        self.bank: np.ndarray | None = None
        self._index: NearestNeighbors | None = None

    def fit(self, features: np.ndarray) -> KNNDetector:
        """Store the normalised (N, D) training features."""
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or len(feats) < 2:
            raise ValueError(f"need (N >= 2, D) features, got shape {feats.shape}")
        self.bank = _l2n(feats)
        self._index = None
        return self

    def score(self, features: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        """(N,) k-th neighbour distances; ``exclude_self=True`` scores the bank itself leaving each point out."""
        if self.bank is None:
            raise RuntimeError("KNNDetector is not fitted")
        q = _l2n(features)
        if q.shape[1] != self.bank.shape[1]:
            raise ValueError(f"expected {self.bank.shape[1]} features, got {q.shape[1]}")
        if self._index is None:  # built on first use (also after from_state)
            self._index = NearestNeighbors().fit(self.bank)
        k = min(self.k + int(exclude_self), self.bank.shape[0])
        dist, _ = self._index.kneighbors(q, n_neighbors=k)
        return dist[:, k - 1]

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays that rebuild the detector."""
        if self.bank is None:
            raise RuntimeError("KNNDetector is not fitted")
        return {f"{prefix}bank": self.bank}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], prefix: str, k: int) -> KNNDetector:
        """Inverse of :meth:`state`."""
        obj = cls(k)
        obj.bank = np.asarray(arrays[f"{prefix}bank"], dtype=np.float64)
        obj._index = None
        return obj


class RobustScaler:
    """``z = (s - median) / scale`` with ``scale = max(1.4826 MAD, floor)`` fitted column-wise on (N, M) scores.

    Example:
        >>> RobustScaler().fit(np.array([[1.0], [2.0], [3.0]])).transform(np.array([[5.0]]))
    """

    def __init__(self, floor: np.ndarray | float = 1e-9) -> None:
        self.floor = floor
        self.median_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def fit(self, scores: np.ndarray) -> RobustScaler:
        """Fit medians and scales, ignoring NaN."""
        s = np.asarray(scores, dtype=np.float64)
        s = s[:, None] if s.ndim == 1 else s
        with warnings.catch_warnings():  # an all-NaN column (inactive detector) stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            self.median_ = np.nanmedian(s, axis=0)
            mad = 1.4826 * np.nanmedian(np.abs(s - self.median_), axis=0)
        floor = np.broadcast_to(np.asarray(self.floor, dtype=np.float64), mad.shape)
        self.scale_ = np.maximum(np.nan_to_num(mad, nan=0.0), floor)
        return self

    def transform(self, scores: np.ndarray) -> np.ndarray:
        """Robust z-scores (NaN stays NaN)."""
        if self.median_ is None or self.scale_ is None:
            raise RuntimeError("RobustScaler is not fitted")
        s = np.asarray(scores, dtype=np.float64)
        return (s - self.median_) / self.scale_


def conformal_pvalues(
    calibration: Any, scores: Any, z_calibration: Any = None, z_scores: Any = None, tail_scale: float = 1.0
) -> np.ndarray:
    """Conformal p-values of anomaly ``scores`` against in-distribution ``calibration`` scores.

    ``p = (1 + #{s_cal >= s}) / (n + 1)``: for a new in-distribution image exchangeable with the calibration set,
    ``P(p <= alpha) <= alpha`` for every alpha. A NaN score gives a NaN p-value.

    **Tail extension.** A rank cannot go below ``1 / (n + 1)``, so an image far beyond every calibration image would
    count no more than one just beyond them. With ``z_calibration``/``z_scores`` (the same scores on a fixed scale,
    e.g. robust z-scores, increasing with them) an image beyond every calibration image gets
    ``p = exp(-(z - max z_cal) / tail_scale) / (n + 1)`` (:func:`tail_extended`): smaller the further it is. The
    rejections at any ``alpha >= 1 / (n + 1)`` are exactly those of the rank p-value (the guarantee is unchanged);
    below that level the exponential tail is a model, not a guarantee.

    Args:
        calibration: (n,) anomaly scores of held-out in-distribution images (finite).
        scores: anomaly scores to test (any shape).
        z_calibration: optional (n,) the calibration scores on the fixed scale.
        z_scores: optional, the test scores on that scale (the shape of ``scores``).
        tail_scale: the scale of the exponential tail in ``z`` units.

    Returns:
        p-values, the shape of ``scores``.

    Example:
        >>> conformal_pvalues([0.1, 0.2, 0.3], [0.25, 5.0])
        array([0.5 , 0.25])
    """
    cal = np.sort(np.asarray(calibration, dtype=np.float64).reshape(-1))
    if cal.size == 0 or not np.isfinite(cal).all():
        raise ValueError("calibration scores must be a non-empty finite array")
    s = np.asarray(scores, dtype=np.float64)
    n_ge = cal.size - np.searchsorted(cal, s, side="left")
    p = (1.0 + n_ge) / (cal.size + 1.0)
    if z_calibration is not None and z_scores is not None:
        zc = np.asarray(z_calibration, dtype=np.float64).reshape(-1)
        p = tail_extended(p, n_ge == 0, np.asarray(z_scores, dtype=np.float64), float(np.max(zc)), tail_scale)
    return np.where(np.isnan(s), np.nan, p)


_TINY = float(np.finfo(np.float64).tiny)


def tail_extended(p: Any, beyond: Any, t: Any, t_max: Any, scale: float) -> np.ndarray:
    """Rank p-values with an exponential tail beyond the calibration set: where ``beyond`` (the statistic ``t``
    exceeds every calibration statistic, largest ``t_max``), ``p * exp(-(t - t_max) / scale)``; elsewhere ``p``.

    The result stays above 0 (the smallest positive float): ``p = 0`` is kept for hard failures.

    Example:
        >>> tail_extended(np.array([0.05, 0.05]), np.array([True, True]), np.array([3.0, 30.0]), 2.0, 2.0)
        array([3.0326533e-02, 4.1576436e-08])
    """
    p = np.asarray(p, dtype=np.float64)
    excess = np.clip(np.nan_to_num(np.asarray(t, dtype=np.float64) - t_max, nan=0.0), 0.0, None)
    tail = np.maximum(p * np.exp(-excess / float(scale)), _TINY)  # > 0: p = 0 means a hard failure
    return np.where(np.asarray(beyond, dtype=bool), tail, p)


def bonferroni(pvalues: Any, axis: int = -1) -> np.ndarray:
    """Bonferroni min-p combination ``min(1, m * min_j p_j)`` over the non-NaN p-values along ``axis``
    (m = how many are present); all NaN gives NaN. Valid under any dependence between the detectors.

    Example:
        >>> bonferroni(np.array([[0.01, 0.5, np.nan]]))
        array([0.02])
    """
    p = np.asarray(pvalues, dtype=np.float64)
    m = np.sum(~np.isnan(p), axis=axis)
    with np.errstate(invalid="ignore"):
        mn = np.nanmin(np.where(np.isnan(p), np.inf, p), axis=axis)
    out = np.minimum(1.0, m * mn)
    return np.where(m > 0, out, np.nan)


def fisher_conformal(
    calibration: Any, scores: Any, z_calibration: Any = None, z_scores: Any = None, tail: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Combined conformal p-values of several detectors: Fisher's statistic ``T = -2 sum_j log p_j`` of the
    per-detector conformal p-values, ranked against the same statistic of the calibration images.

    Fully symmetric (hence exactly valid): for each test image the n calibration images and the test image are
    treated alike -- every one of the n + 1 gets its per-detector p-values among the other n, then its ``T``, and the
    test image's p-value is the rank of its ``T`` among all n + 1. For an in-distribution image exchangeable with the
    calibration images, ``P(p <= alpha) <= alpha`` whatever the detectors' dependence. Unlike a maximum of z-scores,
    a detector that is noisy in distribution does not swamp one that separates well.

    A rank p-value cannot go below ``1 / (n + 1)``, so one detector far beyond every calibration image would count no
    more than one just beyond them. With ``z_calibration``/``z_scores`` (per-detector scores on a fixed scale, e.g.
    robust z-scores from the fit images, increasing with the anomaly scores) an image beyond all the others on
    detector j adds ``2 (z_j - max z_j of the others)`` to its ``T``; applied to all n + 1 images alike, the test
    stays exactly valid.

    A test image whose ``T`` exceeds every calibration image's gets ``p = exp(-(T - max T_cal) / 2) / (n + 1)``
    (``tail=True``, :func:`tail_extended`; Fisher's statistic has a chi-square tail): an image far beyond the
    calibration set gets a smaller p-value than one barely beyond. Rejections at ``alpha >= 1 / (n + 1)`` are
    those of the rank p-value, so the guarantee is unchanged.

    A detector whose calibration column is not finite is left out; a NaN test score counts as "no evidence" (its
    p-value 1 for that image), which only makes the test conservative.

    Args:
        calibration: (n, m) anomaly scores (higher = more atypical) of held-out in-distribution images.
        scores: (N, m) anomaly scores of the images to test.
        z_calibration: optional (n, m) the calibration scores on the fixed scale.
        z_scores: optional (N, m) the test scores on the same scale.
        tail: extend the p-value beyond the calibration set (``False``: the plain rank p-value).

    Returns:
        ``(p, T)``: (N,) combined p-values and the test images' statistics.

    Example:
        >>> p, t = fisher_conformal(np.random.default_rng(0).normal(size=(99, 3)), np.full((1, 3), 5.0))
        >>> float(p[0]) < 0.01  # beyond all 99 calibration images: below the rank floor 1 / 100
        True
    """
    cal = np.asarray(calibration, dtype=np.float64)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if cal.ndim != 2 or s.shape[1] != cal.shape[1]:
        raise ValueError(f"calibration (n, m) and scores (N, m) must have the same m, got {cal.shape} and {s.shape}")
    cols = np.flatnonzero(np.isfinite(cal).all(axis=0)) if cal.size else np.zeros(0, int)
    n = cal.shape[0]
    if n == 0 or cols.size == 0:
        raise ValueError("fisher_conformal needs at least one calibration image and one finite detector column")
    step = max(1, (1 << 21) // max(1, n * cols.size))  # test rows per block: (rows, n, m) temporaries stay ~2M cells
    if s.shape[0] > step:
        zs = None if z_scores is None else np.atleast_2d(np.asarray(z_scores, dtype=np.float64))
        parts = [
            fisher_conformal(cal, s[i : i + step], z_calibration, None if zs is None else zs[i : i + step])
            for i in range(0, s.shape[0], step)
        ]
        return np.concatenate([p for p, _ in parts]), np.concatenate([t for _, t in parts])
    c, t = cal[:, cols], s[:, cols]
    missing = np.isnan(t)
    # calibration image i, detector j: 1 + #{k != i: c_kj >= c_ij}, then the test image may add one
    base = (c[None, :, :] >= c[:, None, :]).sum(axis=1)  # [i, j] = #{k: c_kj >= c_ij}, itself included: the "1 +"
    test_ge = (c[None, :, :] >= t[:, None, :]).sum(axis=1)  # (N, m): #{cal >= test}
    p_test = np.where(missing, 1.0, (1.0 + test_ge) / (n + 1.0))
    adds = (t[:, None, :] >= c[None, :, :]) & ~missing[:, None, :]  # (N, n, m): the test image ranks above cal i
    p_cal = (base[None] + adds) / (n + 1.0)
    t_test = -2.0 * np.log(p_test).sum(axis=1)
    t_cal = -2.0 * np.log(p_cal).sum(axis=2)  # (N, n)
    if z_calibration is not None and z_scores is not None:
        zc = np.asarray(z_calibration, dtype=np.float64)[:, cols]
        zt = np.atleast_2d(np.asarray(z_scores, dtype=np.float64))[:, cols]
        zt = np.where(missing | np.isnan(zt), -np.inf, zt)
        if n > 1:  # the largest z of the other calibration images: the top one's runner-up, else the top one
            order = np.sort(zc, axis=0)
            top, second = order[-1], order[-2]
            others = np.where(zc >= top[None], second[None], top[None])  # (n, m)
        else:
            others = np.full_like(zc, -np.inf)
        t_test = t_test + 2.0 * np.clip(zt - zc.max(axis=0), 0.0, None).sum(axis=1)
        rival = np.maximum(others[None], zt[:, None, :])  # (N, n, m): the others of cal i include the test image
        t_cal = t_cal + 2.0 * np.clip(zc[None] - rival, 0.0, None).sum(axis=2)
    n_ge = (t_cal >= t_test[:, None] - 1e-12).sum(axis=1)
    p = (1.0 + n_ge) / (n + 1.0)
    if tail:  # beyond every calibration image: Fisher's statistic has a chi-square tail, exp(-T / 2)
        p = tail_extended(p, n_ge == 0, t_test, t_cal.max(axis=1), 2.0)
    return p, t_test
