"""Anomaly scores of the screen's detectors and the combined statistic (``screen``: a fitted
:class:`monai_gamverify.screening.Screen`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from monai_gamverify.metrics.similarity import DEFAULT_METRICS, similarity_metrics
from monai_gamverify.screening.common import DETECTORS, ScreenRecord, js_distance

__all__ = ["profile_matrix", "attention_grid", "attention_features", "raw_scores", "monotone", "statistic"]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def profile_matrix(screen: Any, obs: Sequence[ScreenRecord]) -> np.ndarray:
    rows = []
    for o in obs:
        v = o.profile.vector()
        js = np.nan
        if screen.hist_ref_.size and len(o.profile.histogram) == screen.hist_ref_.size:
            js = js_distance(np.asarray(o.profile.histogram), screen.hist_ref_)[0]
        rows.append(np.append(v, js))
    return np.vstack(rows)


def attention_grid(screen: Any, cams: torch.Tensor) -> torch.Tensor:
    """(N, 1, *spatial) maps average-pooled to at most ``attention_size`` voxels per axis (a CAM carries no more
    detail than its target layer's grid; this bounds the cost of the similarity features on large inputs)."""
    size = [min(int(s), screen.attention_size) for s in cams.shape[2:]]
    if list(cams.shape[2:]) == size:
        return cams
    pool = (F.adaptive_avg_pool3d, F.adaptive_avg_pool2d)[0 if cams.ndim == 5 else 1]
    return pool(cams, size).clamp(0, 1)


def attention_features(screen: Any, cams: torch.Tensor) -> np.ndarray:
    ref = torch.as_tensor(screen.cam_ref_, dtype=torch.float32)
    cams = attention_grid(screen, cams)
    if tuple(cams.shape[2:]) != tuple(ref.shape[1:]):
        mode = "trilinear" if ref.ndim == 4 else "bilinear"
        cams = F.interpolate(cams, size=tuple(ref.shape[1:]), mode=mode, align_corners=False).clamp(0, 1)
    sims = similarity_metrics(cams, ref[None], metrics=list(DEFAULT_METRICS))
    return np.stack([sims[m].detach().cpu().double().numpy() for m in DEFAULT_METRICS], axis=1)


def raw_scores(screen: Any, obs: Sequence[ScreenRecord], loo: bool = False) -> np.ndarray:
    """(N, len(DETECTORS)) anomaly scores; NaN where a detector is inactive or its input is missing."""
    n = len(obs)
    out = np.full((n, len(DETECTORS)), np.nan)
    ok = np.array([not o.profile.hard_failures for o in obs])
    col = {d: i for i, d in enumerate(DETECTORS)}
    active = screen.detectors
    if ok.any() and "profile" in active:
        prof = profile_matrix(screen, [o for o, g in zip(obs, ok) if g])
        z = np.abs(screen.profile_scaler_.transform(prof))
        out[ok, col["profile"]] = np.nanmax(np.where(np.isnan(z), -np.inf, z), axis=1)
    if "layout" in active:
        have = np.array([g and o.profile.layout is not None for o, g in zip(obs, ok)])
        if have.any():
            feats = np.vstack([o.profile.layout for o, h in zip(obs, have) if h])
            out[have, col["layout"]] = screen.detectors_["layout"].score(feats)
    for layer in ("penultimate", "early"):
        names = [d for d in (f"maha_{layer}", f"rmaha_{layer}", f"knn_{layer}") if d in active]
        have = np.array([g and getattr(o, layer) is not None for o, g in zip(obs, ok)])
        if not names or not have.any():
            continue
        feats = np.vstack([getattr(o, layer) for o, h in zip(obs, have) if h])
        for d in names:
            det = screen.detectors_[d]
            out[have, col[d]] = det.score(feats, exclude_self=loo) if d.startswith("knn") else det.score(feats)
    if "kplus1" in active:
        for i, o in enumerate(obs):
            if ok[i] and o.logits is not None and o.logits.size > screen.garbage_index:
                out[i, col["kplus1"]] = float(torch.softmax(torch.as_tensor(o.logits), 0)[screen.garbage_index])
    if "attention" in active:
        idx = [i for i, o in enumerate(obs) if ok[i] and o.cam is not None]
        if idx:
            cams = torch.stack([obs[i].cam for i in idx])
            out[idx, col["attention"]] = screen.detectors_["attention"].score(attention_features(screen, cams))
    return out


def monotone(raw: np.ndarray) -> np.ndarray:
    """Fixed monotone transforms that make each detector's scores roughly symmetric before the robust z-score
    (p-values, being ranks, do not change)."""
    t = raw.copy()
    col = {d: i for i, d in enumerate(DETECTORS)}
    for d in ("layout", "maha_penultimate", "maha_early", "attention"):
        t[:, col[d]] = np.sqrt(np.clip(t[:, col[d]], 0.0, None))
    t[:, col["profile"]] = np.log1p(np.clip(t[:, col["profile"]], 0.0, None))
    t[:, col["kplus1"]] = _logit(t[:, col["kplus1"]])
    return t


def statistic(screen: Any, raw: np.ndarray) -> np.ndarray:
    z = screen.score_scaler_.transform(monotone(raw))
    allnan = np.isnan(z).all(axis=1)
    stat = np.nanmax(np.where(np.isnan(z), -np.inf, z), axis=1)
    return np.where(allnan, np.nan, stat)
