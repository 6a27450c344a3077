"""monai-gamverify: is this model suitable for this image? Answers from the model's own attention, on MONAI."""

from __future__ import annotations

__version__ = "0.1.0"

from .cam import CAMResult, GradCAM, GradCAMpp, ScoreCAM
from .energy import attribution_energy, spearman_loo
from .similarity import similarity_metrics

__all__ = [
    "GradCAM",
    "GradCAMpp",
    "ScoreCAM",
    "CAMResult",
    "similarity_metrics",
    "attribution_energy",
    "spearman_loo",
    "__version__",
]
