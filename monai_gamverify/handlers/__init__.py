"""Ignite handlers for bundles: CAM images in TensorBoard and CAM NIfTI writer (:mod:`.cam`), prediction CSV
(:mod:`.tables`), accuracy / macro-F1 (:mod:`.metrics`), learning rate (:mod:`.lr_logger`), the attribution-energy
analysis (:mod:`.energy`), the K+1 rejection counter (:mod:`.garbage`) and the bundle passport (:mod:`.passport`)."""

from __future__ import annotations

from monai_gamverify.handlers.cam import CAMImageHandler, CAMWriter, cam_overlay_rgb
from monai_gamverify.handlers.energy import AttributionEnergyHandler
from monai_gamverify.handlers.garbage import RejectionCounter
from monai_gamverify.handlers.lr_logger import LearningRateLogger
from monai_gamverify.handlers.metrics import Accuracy, ClassificationMetric, MacroF1
from monai_gamverify.handlers.passport import BundlePassport, validation_confidences, write_passport
from monai_gamverify.handlers.tables import PredictionCSVWriter
from monai_gamverify.handlers.utils import batch_items, network_device
from monai_gamverify.io.names import OutputNamer

__all__ = [
    "CAMImageHandler",
    "CAMWriter",
    "PredictionCSVWriter",
    "ClassificationMetric",
    "Accuracy",
    "MacroF1",
    "LearningRateLogger",
    "BundlePassport",
    "validation_confidences",
    "write_passport",
    "cam_overlay_rgb",
    "batch_items",
    "network_device",
    "OutputNamer",
    "AttributionEnergyHandler",
    "RejectionCounter",
]
