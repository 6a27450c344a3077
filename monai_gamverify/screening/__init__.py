"""In-distribution screen: is this image like the data the model was made for? (data profile, feature density,
K+1 garbage probability, attention atypicality, conformal p-values).

The screen does statistics over the engine's observations (``monai_gamverify.apps.pipeline.ImagePipeline.observe``);
the workflows that drive the engine for it, ``fit_screen`` and ``run_screen``, are in
:mod:`monai_gamverify.apps.screening`.

Example:
    >>> from monai_gamverify.apps.screening import fit_screen, run_screen
    >>> screen = fit_screen("bundles/sos_staging", "data/sos", "screen_sos", {"network_name": "small_cnn"})
    >>> table = run_screen(screen, ["new.nii.gz", "dicom_series/"], "screen_out")
"""

from __future__ import annotations

from monai_gamverify.screening.common import DETECTORS, ScreenRecord
from monai_gamverify.screening.dataset import beta_binomial_sf, dataset_test
from monai_gamverify.screening.detectors import (
    ClassMahalanobis,
    KNNDetector,
    RelativeMahalanobis,
    RobustScaler,
    bonferroni,
    conformal_pvalues,
    fisher_conformal,
    pool_features,
)
from monai_gamverify.screening.persistence import ScreenFileError
from monai_gamverify.screening.profile import DataProfile, attach_tensor, intensity_window_of, profile_image
from monai_gamverify.screening.recorder import PENULTIMATE, FeatureRecorder
from monai_gamverify.screening.screen import Screen

__all__ = [
    "DETECTORS",
    "PENULTIMATE",
    "ClassMahalanobis",
    "DataProfile",
    "FeatureRecorder",
    "KNNDetector",
    "RelativeMahalanobis",
    "RobustScaler",
    "ScreenRecord",
    "Screen",
    "ScreenFileError",
    "attach_tensor",
    "bonferroni",
    "beta_binomial_sf",
    "conformal_pvalues",
    "dataset_test",
    "fisher_conformal",
    "intensity_window_of",
    "pool_features",
    "profile_image",
]
