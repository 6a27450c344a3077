"""Attention maps: one hook manager (:mod:`.hooks`), Grad-CAM / Grad-CAM++ / Score-CAM (:mod:`.cam`) and the
one registry of CAM methods (:mod:`.registry`), early feature maps (:mod:`.featuremaps`), figures (:mod:`.plots`)
and text descriptions of maps (:mod:`.text`)."""

from __future__ import annotations

from monai_gamverify.visualize.cam import (
    BaseCAM,
    CAMResult,
    GradCAM,
    GradCAMpp,
    ScoreCAM,
    normalize_maps,
    upsample_maps,
)
from monai_gamverify.visualize.featuremaps import (
    FeatureMap,
    feature_map,
)
from monai_gamverify.visualize.hooks import (
    LayerHooks,
    model_state,
    preserved_state,
    record_activations,
    resolve_layers,
)
from monai_gamverify.visualize.plots import (
    overlay_png,
    save_figure,
    to_numpy,
)
from monai_gamverify.visualize.registry import (
    CAM_METHODS,
    cam_method,
    make_cam,
    unwrap_network,
)
from monai_gamverify.visualize.text import (
    describe_map,
    describe_maps,
    region_properties,
)

__all__ = [
    "BaseCAM",
    "GradCAM",
    "GradCAMpp",
    "ScoreCAM",
    "CAMResult",
    "normalize_maps",
    "upsample_maps",
    "feature_map",
    "FeatureMap",
    "resolve_layers",
    "LayerHooks",
    "record_activations",
    "model_state",
    "preserved_state",
    "overlay_png",
    "save_figure",
    "to_numpy",
    "CAM_METHODS",
    "cam_method",
    "make_cam",
    "unwrap_network",
    "describe_map",
    "describe_maps",
    "region_properties",
]
