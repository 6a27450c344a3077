"""Fitting and conformal calibration of a screen (:meth:`monai_gamverify.screening.Screen.fit`): computes the fitted
state, which the screen sets on itself (:meth:`~monai_gamverify.screening.Screen._set_fitted`)."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from monai_gamverify.screening.common import ScreenRecord, intensity_width
from monai_gamverify.screening.detectors import ClassMahalanobis, KNNDetector, RelativeMahalanobis, RobustScaler
from monai_gamverify.screening.scores import (
    attention_features,
    attention_grid,
    monotone,
    profile_matrix,
    raw_scores,
    statistic,
)

__all__ = ["FITTED", "fit_state"]

#: the fitted state of a screen (attributes set by ``Screen.fit`` and ``Screen.load``, nowhere else)
FITTED = (
    "detectors_",
    "cam_ref_",
    "hist_range_",
    "hist_ref_",
    "intensity_width_",
    "profile_scaler_",
    "profile_min_",
    "profile_max_",
    "orientations_",
    "score_scaler_",
    "cal_scores_",
    "cal_stat_",
    "n_fit_",
    "n_cal_",
    "seed_",
    "calibration_index_",
)

logger = logging.getLogger(__name__)


def fit_state(
    screen: Any,
    observations: Sequence[ScreenRecord],
    labels: Sequence[int] | None = None,
    *,
    calibration: Sequence[ScreenRecord] | None = None,
    calibration_fraction: float = 0.35,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The fitted state of ``screen`` (name -> value, :data:`FITTED`) from its records: detectors fitted on the fit
    part, scales, calibration scores. ``screen`` itself is not changed (the work is done on a shallow copy)."""
    screen = copy.copy(screen)  # a scratch copy: the scores below need the state fitted so far
    n_given = len(observations)
    obs = list(observations) + list(calibration or [])
    names = list(names) if names is not None else [f"image {i}" for i in range(len(obs))]
    bad = [(n, o.profile.hard_failures) for n, o in zip(names, obs) if o.profile.hard_failures]
    for n, why in bad:
        logger.warning("screen fit: %s left out: %s", n, "; ".join(why))
    keep = [i for i, o in enumerate(obs) if not o.profile.hard_failures]
    if labels is not None:
        lab = np.full(len(obs), -1, dtype=np.int64)
        lab[:n_given] = np.asarray(labels, dtype=np.int64)
    y = None if labels is None else lab[keep]
    is_cal = np.array([i >= n_given for i in keep])
    obs = [obs[i] for i in keep]
    n = len(obs)
    if not 0 < calibration_fraction < 1:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction!r}")
    if calibration is not None:
        cal_idx, fit_idx = np.flatnonzero(is_cal), np.flatnonzero(~is_cal)
    else:
        perm = np.random.default_rng(seed).permutation(n)
        n_cal = int(round(calibration_fraction * n))
        cal_idx, fit_idx = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
    n_cal = len(cal_idx)
    if len(fit_idx) < 8 or n_cal < 1:
        raise ValueError(
            f"{n} usable images: too few to fit ({len(fit_idx)}, need 8) and calibrate ({n_cal}, need 1) a screen"
        )
    if (n_cal + 1) * screen.alpha < 1:
        raise ValueError(
            f"{n_cal} calibration images cannot reject anything at alpha = {screen.alpha:g}: the smallest conformal "
            f"p-value is 1/(n_cal + 1) = {1 / (n_cal + 1):.3g}; give at least {math.ceil(1 / screen.alpha) - 1} "
            "calibration images (calibration splits / datasets) or a larger alpha"
        )
    fit_obs = [obs[i] for i in fit_idx]
    active = screen.detectors
    if y is None:
        y = np.array([_predicted(screen, o) for o in obs], dtype=np.int64)
    elif (y[fit_idx] < 0).any():
        raise ValueError("labels must be non-negative class indices")
    y_fit = y[fit_idx]
    screen.detectors_ = {}
    for layer in ("penultimate", "early"):
        wanted = [d for d in (f"maha_{layer}", f"rmaha_{layer}", f"knn_{layer}") if d in active]
        if not wanted:
            continue
        missing = [names[keep[i]] for i in fit_idx if getattr(obs[i], layer) is None]
        if missing:
            raise ValueError(f"no {layer} features recorded for {missing[:3]}: check the layer names")
        feats = np.vstack([getattr(o, layer) for o in fit_obs])
        makers = {
            f"maha_{layer}": lambda f: ClassMahalanobis(screen.reg).fit(f, y_fit),
            f"rmaha_{layer}": lambda f: RelativeMahalanobis(screen.reg).fit(f, y_fit),
            f"knn_{layer}": lambda f: KNNDetector(screen.k).fit(f),
        }
        for d in wanted:
            screen.detectors_[d] = makers[d](feats)
    if "layout" in active:
        missing = [names[keep[i]] for i in fit_idx if obs[i].profile.layout is None]
        if missing:
            raise ValueError(f"no layout for {missing[:3]}: observe the images with their preprocessed tensor")
        feats = np.vstack([o.profile.layout for o in fit_obs])
        screen.detectors_["layout"] = ClassMahalanobis(screen.reg).fit(feats, np.zeros(len(feats), np.int64))
    if "attention" in active:
        cams = torch.stack([o.cam for o in fit_obs])
        screen.cam_ref_ = attention_grid(screen, cams).mean(0).numpy().astype(np.float32)
        feats = attention_features(screen, cams)
        screen.detectors_["attention"] = ClassMahalanobis(screen.reg).fit(feats, np.zeros(len(feats), np.int64))
    # data profile: histogram range and reference, per-feature robust scales with floors, ranges for messages
    if screen.window is not None:
        screen.hist_range_ = screen.window
    ranges = {tuple(o.profile.hist_range or ()) for o in obs}
    common = getattr(screen, "hist_range_", None)
    if common is not None and ranges == {tuple(common)}:
        screen.hist_ref_ = np.mean([o.profile.histogram for o in fit_obs], axis=0)
    else:  # histograms binned over different ranges are not comparable: no histogram feature
        screen.hist_range_, screen.hist_ref_ = None, np.zeros(0)
    if screen.window is not None:
        screen.intensity_width_ = float(screen.window[1] - screen.window[0])
    else:
        spread = [o.profile.percentiles["p99"] - o.profile.percentiles["p1"] for o in fit_obs]
        screen.intensity_width_ = max(float(np.median(spread)), 1e-6)
    prof = profile_matrix(screen, obs)
    screen.profile_scaler_ = RobustScaler(_profile_floors(screen, prof.shape[1])).fit(prof[fit_idx])
    with warnings.catch_warnings():  # an all-NaN column (no histogram feature) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        screen.profile_min_ = np.nanmin(prof, axis=0)
        screen.profile_max_ = np.nanmax(prof, axis=0)
    screen.orientations_ = sorted({o.profile.orientation for o in obs})
    # scale of each detector (fit part, k-NN leave-one-out), then calibration scores
    raw_fit = raw_scores(screen, fit_obs, loo=True)
    mono = monotone(raw_fit)
    with warnings.catch_warnings():  # inactive detectors: all-NaN columns
        warnings.simplefilter("ignore", RuntimeWarning)
        floor = 1e-6 * (np.abs(np.nanmedian(mono, axis=0)) + 1.0)
    screen.score_scaler_ = RobustScaler(np.nan_to_num(floor, nan=1e-6)).fit(mono)
    screen.cal_scores_ = raw_scores(screen, [obs[i] for i in cal_idx])
    screen.cal_stat_ = statistic(screen, screen.cal_scores_)
    screen.n_fit_, screen.n_cal_, screen.seed_ = len(fit_idx), len(cal_idx), int(seed)
    # positions (in the observations given) of the calibration images, for comparisons calibrated the same way
    # (``calibration`` given: positions in it), for comparisons calibrated on the same images
    screen.calibration_index_ = np.asarray(keep)[cal_idx] - (n_given if calibration is not None else 0)
    logger.info("screen fitted: %d fit, %d calibration images, detectors %s", len(fit_idx), len(cal_idx), active)
    return {k: getattr(screen, k) for k in FITTED if hasattr(screen, k)}


def _predicted(screen: Any, o: ScreenRecord) -> int:
    if o.logits is None:
        return 0
    lg = np.array(o.logits, dtype=np.float64)
    if screen.garbage_index is not None and lg.size > screen.garbage_index:
        lg[screen.garbage_index] = -np.inf
    return int(np.argmax(lg))


def _profile_floors(screen: Any, n_features: int) -> np.ndarray:
    nd = screen.spatial_dims
    width = intensity_width(screen)
    floors = [0.02] * (2 * nd)  # log spacing / log FOV: a 2 % change is one unit
    floors += [0.01 * width] * 9  # 7 percentiles, mean, std
    if screen.window is not None:
        floors += [0.01] * 3
    floors += [0.01, 0.01, 0.01, 0.01]  # foreground fraction, windowed mean/std, histogram JS distance
    if len(floors) != n_features:
        raise RuntimeError(f"profile floors ({len(floors)}) do not match the features ({n_features})")
    return np.asarray(floors)
