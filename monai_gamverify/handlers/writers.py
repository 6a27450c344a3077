"""Deprecated location: the handlers now live in :mod:`.cam`, :mod:`.tables`, :mod:`.metrics` and
:mod:`.lr_logger`. Import from :mod:`monai_gamverify.handlers` instead; this module only re-exports those names for
callers not yet updated and will be removed."""

from __future__ import annotations

from monai_gamverify.handlers import (
    Accuracy,
    CAMImageHandler,
    CAMWriter,
    ClassificationMetric,
    LearningRateLogger,
    MacroF1,
    PredictionCSVWriter,
    batch_items,
    cam_overlay_rgb,
)

__all__ = [
    "CAMImageHandler",
    "CAMWriter",
    "PredictionCSVWriter",
    "ClassificationMetric",
    "Accuracy",
    "MacroF1",
    "LearningRateLogger",
    "cam_overlay_rgb",
    "batch_items",
]
