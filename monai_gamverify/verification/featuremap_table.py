"""Method 2 of the verification study: the feature table of early-layer activation maps against a reference."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from monai_gamverify.verification.reference import reference_map
from monai_gamverify.verification.tables import feature_table
from monai_gamverify.visualize.featuremaps import FeatureMap

__all__ = ["feature_map_table"]


def feature_map_table(
    reference: tuple[nn.Module, str],
    candidates: Mapping[str, tuple[nn.Module, str, int | None]],
    data: Iterable[Mapping[str, Any]],
    *,
    reference_data: Iterable[Mapping[str, Any]] | None = None,
    slice_axis: int | None = None,
    metrics: Sequence[str] | None = None,
    progress: bool = True,
    **keys: Any,
) -> pd.DataFrame:
    """Method 2 feature table: each candidate's feature map of each sample against the reference's mean feature map.

    Both passes stream: the reference mean is a running sum, and the table is built batch by batch.

    Args:
        reference: ``(model, layer)`` of the reference model.
        candidates: ``{name: (model, layer, label)}`` with label 1 (suitable), 0 (not) or ``None`` (unknown).
        data: iterable of batch dicts (as a ``DataLoader`` yields) with ``"image"`` (B, C, *spatial) and optional
            ``"id"`` / ``"subject"``.
        reference_data: data for the reference mean (default: ``data``).
        slice_axis: compare per 2D slice along this spatial axis (see ``similarity_metrics``).
        metrics: feature names (default: the seven of the study).
        progress: show progress bars.
        **keys: ``image_key``, ``id_key``, ``subject_key`` overrides passed to :func:`feature_table`.

    Returns:
        The feature table (see :func:`monai_gamverify.verification.tables.feature_table`).

    Example:
        >>> table = feature_map_table((ref_net, "layer1"), {"sos": (net_a, "layer1", 1)}, loader)
    """
    ref_model, ref_layer = reference
    image_key = keys.get("image_key", "image")
    ref = reference_map(
        FeatureMap(ref_model, ref_layer),
        data if reference_data is None else reference_data,
        image_key=image_key,
        progress=progress,
    )
    fns: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int | None]] = {
        name: (FeatureMap(model, layer), label) for name, (model, layer, label) in candidates.items()
    }
    return feature_table(ref, fns, data, slice_axis=slice_axis, metrics=metrics, progress=progress, **keys)
