"""Plain-language reasons of the screen's verdicts (``screen``: a fitted :class:`monai_gamverify.screening.Screen`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from monai_gamverify.screening.common import DETECTORS, intensity_width, js_distance
from monai_gamverify.screening.profile import DataProfile

__all__ = ["profile_messages", "detector_messages"]

_DESCRIPTION = {
    "profile": "the image's geometry/intensity profile is atypical",
    "layout": "the content lies or is oriented unlike the training images (intensity centroid and principal axes: "
    "e.g. rotated, shifted or cropped anatomy)",
    "maha_penultimate": "the model's penultimate features are far from every class (Mahalanobis)",
    "rmaha_penultimate": "the model's penultimate features are atypical (relative Mahalanobis)",
    "knn_penultimate": "the model's penultimate features have no close training neighbour (k-NN)",
    "maha_early": "the model's early-layer features are far from every class (Mahalanobis: low-level shift)",
    "rmaha_early": "the model's early-layer features are atypical (relative Mahalanobis: low-level shift)",
    "knn_early": "the model's early-layer features have no close training neighbour (k-NN: low-level shift)",
    "kplus1": "the model's garbage class claims the image",
    "attention": "the model looks at an unusual place (attention similarity features atypical)",
}


def _fmt_mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def profile_messages(screen: Any, prof: DataProfile) -> list[str]:
    msgs: list[str] = []
    nd = screen.spatial_dims
    lo, hi = screen.profile_min_, screen.profile_max_
    sp = np.sort(np.asarray(prof.spacing, float))
    sp_lo, sp_hi = np.exp(lo[:nd]), np.exp(hi[:nd])
    if np.any(sp < sp_lo * 0.98) or np.any(sp > sp_hi * 1.02):
        msgs.append(
            f"spacing {_fmt_mm(prof.spacing)} mm is outside the training range {sp_lo.min():.3g}-{sp_hi.max():.3g} mm"
        )
    fov = np.sort(np.asarray(prof.fov_mm, float))
    f_lo, f_hi = np.exp(lo[nd : 2 * nd]), np.exp(hi[nd : 2 * nd])
    if np.any(fov < f_lo * 0.98) or np.any(fov > f_hi * 1.02):
        msgs.append(
            f"field of view {_fmt_mm(prof.fov_mm)} mm is outside the training range "
            f"{f_lo.min():.3g}-{f_hi.max():.3g} mm"
        )
    if screen.orientations_ and prof.orientation not in screen.orientations_:
        msgs.append(
            f"orientation {prof.orientation} was not seen in training ({', '.join(screen.orientations_)}); "
            "the preprocessing reorients it"
        )
    base = 2 * nd
    width = intensity_width(screen)
    med_i = base + 3  # p50
    if not lo[med_i] - 0.05 * width <= prof.percentiles["p50"] <= hi[med_i] + 0.05 * width:
        msgs.append(
            f"median intensity {prof.percentiles['p50']:.4g} is outside the training range "
            f"{lo[med_i]:.4g} to {hi[med_i]:.4g}"
        )
    j = base + 9
    if screen.window is not None:
        a, b = screen.window
        ct = " : not CT-like" if (screen.modality or "").upper() in ("CT", "CBCT") else ""
        for name, k, frac in (("below", 0, prof.frac_below), ("above", 2, prof.frac_above)):
            if frac is not None and frac > hi[j + k] + 0.05:
                tail = ct.replace(" :", ":") if frac >= 0.9 else ""
                msgs.append(
                    f"{100 * frac:.0f} % of voxels fall {name} the intensity window [{a:g}, {b:g}] "
                    f"(training: at most {100 * hi[j + k]:.0f} %){tail}"
                )
        j += 3
    fg = prof.foreground_fraction
    if not lo[j] - 0.05 <= fg <= hi[j] + 0.05:
        msgs.append(f"foreground fraction {fg:.2f} is outside the training range {lo[j]:.2f}-{hi[j]:.2f}")
    ws = prof.windowed_std
    if ws is not None and ws < lo[j + 2] * 0.5:
        msgs.append(
            f"after the intensity window the image is nearly constant (std {ws:.3g}; training "
            f"{lo[j + 2]:.3g}-{hi[j + 2]:.3g})"
        )
    js = np.nan
    if screen.hist_ref_.size and len(prof.histogram) == screen.hist_ref_.size:
        js = js_distance(np.asarray(prof.histogram), screen.hist_ref_)[0]
    if np.isfinite(js) and np.isfinite(hi[j + 3]) and js > hi[j + 3] + 0.05:
        msgs.append(
            f"the intensity histogram differs from the training images (Jensen-Shannon distance {js:.2f}; "
            f"training at most {hi[j + 3]:.2f})"
        )
    return msgs


def detector_messages(screen: Any, raw: np.ndarray, pvals: np.ndarray, z: np.ndarray) -> list[str]:
    msgs = []
    order = np.argsort(np.where(np.isnan(pvals), np.inf, pvals))
    for j in order:
        d = DETECTORS[j]
        if np.isnan(pvals[j]) or pvals[j] > screen.alpha:
            continue
        extra = f", p(garbage) = {raw[j]:.2f}" if d == "kplus1" else ""
        msgs.append(f"{_DESCRIPTION[d]} (p = {pvals[j]:.3g}{extra})")  # far beyond: e.g. p = 2.1e-08
    if not msgs and np.isfinite(z).any():
        j = int(np.nanargmax(np.where(np.isnan(z), -np.inf, z)))
        msgs.append(f"combined evidence; most atypical: {_DESCRIPTION[DETECTORS[j]]} (z = {z[j]:.1f})")
    return msgs
