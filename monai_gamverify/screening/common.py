"""What the screen's modules share: the detector names, the :class:`ScreenRecord` of one image, small helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
    """Jensen-Shannon distance (base 2, in [0, 1]) of histograms (rows of p) against q."""
    p = np.atleast_2d(np.asarray(p, float))
    q = np.asarray(q, float)[None]
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / np.where(b > 0, b, 1)), 0.0).sum(1)

    return np.sqrt(np.clip(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0, None))


def intensity_width(screen: Any) -> float:
    """Intensity scale of the training images: the window's width, else their median 1st-99th percentile range."""
    return float(screen.intensity_width_)
