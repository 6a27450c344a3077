"""Numbers computed from maps and outputs: similarity features (:mod:`.similarity`), explanation quality
(:mod:`.evaluation`: localisation, faithfulness, sanity) and calibration (:mod:`.calibration`)."""

from __future__ import annotations

from monai_gamverify.metrics.calibration import (
    TemperatureScale,
    TemperatureScaled,
    TemperatureScaler,
    expected_calibration_error,
    maximum_calibration_error,
    reliability_bins,
    reliability_diagram_png,
)
from monai_gamverify.metrics.evaluation import (
    Curve,
    auc,
    binarize,
    cascading_randomization,
    deletion_curve,
    gaussian_blur,
    insertion_curve,
    localisation_scores,
    map_dice,
    map_iou,
    otsu_threshold,
    pointing_game,
    relevance_mass,
    score_layers,
    sparseness,
)
from monai_gamverify.metrics.regression import regression_metrics
from monai_gamverify.metrics.similarity import (
    ALL_METRICS,
    DEFAULT_METRICS,
    EXTRA_METRICS,
    KL_EPS,
    SSIM_WIN_SIZE,
    similarity_metrics,
)

__all__ = [
    "reliability_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "reliability_diagram_png",
    "TemperatureScaler",
    "TemperatureScale",
    "TemperatureScaled",
    "binarize",
    "otsu_threshold",
    "map_iou",
    "map_dice",
    "pointing_game",
    "relevance_mass",
    "sparseness",
    "localisation_scores",
    "Curve",
    "auc",
    "gaussian_blur",
    "deletion_curve",
    "insertion_curve",
    "cascading_randomization",
    "score_layers",
    "DEFAULT_METRICS",
    "EXTRA_METRICS",
    "ALL_METRICS",
    "SSIM_WIN_SIZE",
    "KL_EPS",
    "similarity_metrics",
    "regression_metrics",
]
