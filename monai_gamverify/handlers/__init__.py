"""Ignite handlers for bundles: CAM images in TensorBoard, CAM NIfTI writer, prediction CSV, metrics."""

from __future__ import annotations

from monai_gamverify.handlers.writers import (
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
