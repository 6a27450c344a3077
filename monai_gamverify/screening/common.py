"""What the screen's modules share: the detector names, the :class:`ScreenRecord` of one image, small helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.spatial.distance import jensenshannon

from monai_gamverify.screening.profile import DataProfile

__all__ = ["DETECTORS", "ScreenRecord", "js_distance", "intensity_width"]

DETECTORS = (
    "profile",
    "layout",
    "maha_penultimate",
    "rmaha_penultimate",
    "knn_penultimate",
    "maha_early",
    "rmaha_early",
    "knn_early",
    "kplus1",
    "attention",
)


@dataclass
class ScreenRecord:
    """What the screen uses of one image: its data profile and what it takes of the engine's observation.

    Attributes:
        profile: the data profile (with the preprocessed tensor's statistics when it was given).
        penultimate: (D,) pooled input of the classifier head, or ``None``.
        early: (D2,) pooled early-layer activations (channel means and stds, layers concatenated), or ``None``.
        logits: (K,) model output, or ``None``.
        cam: (1, *spatial) CAM normalised to [0, 1], or ``None``.
    """

    profile: DataProfile
    penultimate: np.ndarray | None = None
    early: np.ndarray | None = None
    logits: np.ndarray | None = None
    cam: torch.Tensor | None = None


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance (base 2, in [0, 1]) of histograms (rows of ``p``) against ``q``.

    ``scipy.spatial.distance.jensenshannon``: each histogram is normalised to sum 1 first, so counts and fractions
    give the same distance. A row without any mass (no voxel in the histogram's range) is as far as can be: 1.

    Args:
        p: (H,) or (N, H) histograms (counts or fractions).
        q: (H,) reference histogram.

    Returns:
        (N,) distances.
    """
    p = np.atleast_2d(np.asarray(p, float))
    q = np.broadcast_to(np.asarray(q, float), p.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = jensenshannon(p, q, base=2, axis=1)
    return np.where(p.sum(1) > 0, np.nan_to_num(d, nan=1.0), 1.0)


def intensity_width(screen: Any) -> float:
    """Intensity scale of the training images: the window's width, else their median 1st-99th percentile range."""
    return float(screen.intensity_width_)
